"""Never lose work: checkpoints, preemption, and runs that resume bit for bit.

The end-to-end tests run LODO on a small bowl through the command line with
a checkpoint after every chunk, stop it twice (kill -9 at a random checkpoint,
then SIGTERM), start it again in the same folder, and compare every number with
an uninterrupted run: summary.json, curve.csv, and the final checkpoint's
loss trace and TensorFlow state, exactly. Only timings may differ.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from lodo.experiment.checkpoints import CheckpointError, RunCheckpoint
from lodo.experiment.preemption import Preemption

# One worker runs the whole file: its module fixture is computed once (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("resume")

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
STEPS, CHUNK = 1200, 20
RUN = [f"steps={STEPS}", "num_seeds=2", "task.dim=12", "optimizer.num_layers=4", f"chunk_size={CHUNK}",
       "hessian_every=200", "checkpoint.every_s=0", "progress=false"]
TIMINGS = {"train_time_s", "seed_steps_per_s", "compile_time_s", "cpu_sharing"}  # the clock, not the numbers


# -- RunCheckpoint ---------------------------------------------------------------------------------

def test_save_restore_roundtrip_with_host_arrays_and_pruning(tmp_path):
    weights = tf.Variable(np.arange(6.0).reshape(2, 3))
    slots = [tf.Variable(np.zeros(3)), tf.Variable(7, dtype=tf.int64)]
    checkpoint = RunCheckpoint(tmp_path / "ckpt", keep=2, every_s=3600, weights=weights, slots=slots)
    assert checkpoint.restore() is None and not checkpoint.due()
    losses = np.random.default_rng(0).standard_normal((5, 2))
    for step in (10, 20, 30):
        weights.assign_add(tf.ones_like(weights))
        slots[1].assign(step)
        checkpoint.save(step, {"losses": losses * step, "clock": 1.5 * step, "note": "x"})
    assert [p.name for p in checkpoint.complete()] == ["ckpt-00000002", "ckpt-00000003"]  # keep=2

    weights.assign(tf.zeros_like(weights))
    slots[1].assign(0)
    restored = RunCheckpoint(tmp_path / "ckpt", weights=weights, slots=slots).restore()
    assert restored["step"] == 30 and restored["clock"] == 45.0 and restored["note"] == "x"
    np.testing.assert_array_equal(restored["losses"], losses * 30)  # bit for bit
    np.testing.assert_array_equal(weights.numpy(), np.arange(6.0).reshape(2, 3) + 3)
    assert int(slots[1].numpy()) == 30


def test_due_after_every_s(tmp_path):
    checkpoint = RunCheckpoint(tmp_path, every_s=0.2, v=tf.Variable(1.0))
    assert not checkpoint.due()
    time.sleep(0.25)
    assert checkpoint.due()
    checkpoint.save(1, {})
    assert not checkpoint.due()
    assert RunCheckpoint(tmp_path, every_s=0, v=tf.Variable(1.0)).due()


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path):
    v = tf.Variable([1.0, 2.0])
    checkpoint = RunCheckpoint(tmp_path, v=v)
    checkpoint.save(5, {"clock": 1.0})
    # What a kill leaves mid-save: a half-written temporary folder, and mid-prune a renamed one.
    (tmp_path / ".tmp-ckpt-00000002-999").mkdir()
    (tmp_path / ".tmp-ckpt-00000002-999" / "state.index").write_bytes(b"\0partial")
    (tmp_path / "ckpt-00000003").mkdir()  # no metadata.json: never complete
    v.assign([0.0, 0.0])
    assert RunCheckpoint(tmp_path, v=v).restore()["step"] == 5
    assert v.numpy().tolist() == [1.0, 2.0]
    checkpoint.save(6, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "ckpt-00000002"]


@pytest.mark.parametrize("damage, message", [
    ("metadata", "has unreadable metadata"),
    ("state", "is corrupt"),
    ("mismatch", "does not match this run"),
])
def test_a_damaged_checkpoint_is_a_one_line_error_that_says_how_to_start_fresh(tmp_path, damage, message):
    RunCheckpoint(tmp_path, v=tf.Variable([1.0, 2.0]), w=[tf.Variable(3.0)]).save(4, {"a": np.ones(3)})
    folder = tmp_path / "ckpt-00000001"
    variables = {"v": tf.Variable([0.0, 0.0]), "w": [tf.Variable(0.0)]}
    if damage == "metadata":
        (folder / "metadata.json").write_text('{"step": 4, "form')
    elif damage == "state":
        data = next(folder.glob("state.data-*"))
        data.write_bytes(b"\x13" * data.stat().st_size)
    else:
        variables = {"v": tf.Variable([0.0, 0.0, 0.0]), "w": [tf.Variable(0.0)]}
    with pytest.raises(CheckpointError) as err:
        RunCheckpoint(tmp_path, **variables).restore()
    text = str(err.value)
    assert message in text and "\n" not in text
    assert text.endswith(f"delete {tmp_path} or rerun with checkpoint.resume=false to start fresh")


# -- Preemption ------------------------------------------------------------------------------------

def test_signals_set_a_flag_and_the_old_handlers_come_back(capfd):
    handled = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)
    before = [signal.getsignal(s) for s in handled]
    with Preemption() as preemption:
        assert preemption.active and not preemption.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert preemption.requested and preemption.signal_name == "SIGUSR2"
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt
        time.sleep(0.05)
        assert preemption.signal_name == "SIGUSR2" and preemption.status == 144  # the first signal decides
    assert "SIGTERM received again: finishing the checkpoint first" in capfd.readouterr().err
    assert [signal.getsignal(s) for s in handled] == before


def test_exit_for_requeue_hands_submitits_signal_to_submitits_handler():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            with pytest.raises(SystemExit) as exit_:
                preemption.exit_for_requeue()  # this stand-in for submitit's handler returns: exit anyway
        assert calls == [signal.SIGUSR2] and exit_.value.code == Preemption.EXIT_CODE == 144
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            with pytest.raises(SystemExit):
                preemption.exit_for_requeue()
        assert calls == [signal.SIGUSR2]  # SIGTERM: SLURM requeues a preempted job itself
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_outside_the_main_thread_nothing_is_installed():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(Preemption().__enter__().active))
    thread.start()
    thread.join()
    assert seen == [False]


# -- end to end through the command line -----------------------------------------------------------

def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lodo.run", *RUN, *extra, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 900):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("ckpt-*/metadata.json"))
    return found[-1].parent if found else None


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / "metadata.json").read_text())["step"]


def wait_for_checkpoint(process: subprocess.Popen, run_dir: Path, step: int) -> int:
    """Poll until the run has a checkpoint at ``step`` or later; that checkpoint's step."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        folder = newest_checkpoint(run_dir)
        try:
            if folder is not None and checkpoint_step(folder) >= step:
                return checkpoint_step(folder)
        except (OSError, ValueError):
            pass  # pruned between the glob and the read
        if process.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {process.stderr.read()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step {step} in time")


def final_state(run_dir: Path) -> dict:
    """Every tensor of the final checkpoint and its loss trace."""
    folder = newest_checkpoint(run_dir)
    reader = tf.train.load_checkpoint(str(folder / "state"))
    tensors = {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(str(folder / "state"))
               if "OBJECT_GRAPH" not in name}
    with np.load(folder / "arrays.npz") as arrays:
        tensors.update({k: arrays[k] for k in arrays.files if k not in CLOCK_ARRAYS})
    return tensors


# What a checkpoint holds of the clock: a resumed run's differs, its numbers do not.
CLOCK_ARRAYS = ("trace_chunk_ends", "trace_eval_hessian_error_times", "trace_compile_time_s", "trace_others_cpu")


def assert_same_numbers(expected: Path, actual: Path) -> None:
    a, b = (json.loads((d / "summary.json").read_text()) for d in (expected, actual))
    assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    curve_a, curve_b = (pd.read_csv(d / "curve.csv").drop(columns="train_time_s") for d in (expected, actual))
    pd.testing.assert_frame_equal(curve_a, curve_b, check_exact=True)
    state_a, state_b = final_state(expected), final_state(actual)
    assert sorted(state_a) == sorted(state_b) and len(state_a) > 5
    for name in state_a:
        np.testing.assert_array_equal(state_a[name], state_b[name], err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, started at once and waited for only when a test needs it."""
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    process = start(run_dir)

    def wait() -> Path:
        if process.returncode is None:
            code, _, err = finish(process)
            assert code == 0, err[-3000:]
        return run_dir

    yield wait
    if process.poll() is None:
        process.kill()


@pytest.mark.slow
@pytest.mark.long
def test_kill_9_then_sigterm_then_rerun_gives_the_uninterrupted_numbers(uninterrupted, tmp_path):
    """One run interrupted both ways: SIGKILL at a random checkpoint (no handler, no last save), then SIGTERM
    during the resumed attempt (checkpoint, exit for requeueing); the third attempt finishes with the
    uninterrupted run's numbers, and its clock continued from the checkpoints'."""
    run_dir = tmp_path / "run"
    target = random.randrange(1, STEPS // CHUNK // 2) * CHUNK
    process = start(run_dir)
    wait_for_checkpoint(process, run_dir, target)
    process.kill()  # SIGKILL: no handler, no last save
    process.wait()
    assert not (run_dir / "summary.json").exists()
    killed_at = checkpoint_step(newest_checkpoint(run_dir))

    process = start(run_dir)
    wait_for_checkpoint(process, run_dir, killed_at + 2 * CHUNK)
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert f"resumed from step {killed_at}" in out, (target, out)
    assert code == Preemption.EXIT_CODE, err[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+): checkpoint saved", out)
    assert stopped, out
    step = int(stopped.group(1))
    assert checkpoint_step(newest_checkpoint(run_dir)) == step and killed_at < step < STEPS
    assert not (run_dir / "summary.json").exists()
    clock = float(np.load(newest_checkpoint(run_dir) / "arrays.npz")["trace_chunk_ends"][-1, 1])

    code, out, err = finish(start(run_dir))
    assert code == 0, err[-3000:]
    assert f"resumed from step {step}" in out
    assert_same_numbers(uninterrupted(), run_dir)
    curve = pd.read_csv(run_dir / "curve.csv")
    assert curve.groupby("seed").train_time_s.apply(lambda t: t.is_monotonic_increasing).all()
    assert json.loads((run_dir / "summary.json").read_text())["train_time_s"] > clock  # the clock continued
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert len(provenance["previous_attempts"]) == 2
    assert provenance["pid"] not in [attempt["pid"] for attempt in provenance["previous_attempts"]]


@pytest.mark.slow
def test_other_settings_in_the_same_folder_are_refused(uninterrupted, tmp_path):
    run_dir = uninterrupted()
    result = subprocess.run([sys.executable, "-m", "lodo.run", *RUN, "optimizer.beta=0.5", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert (f"error: {run_dir} holds a finished run with other settings (optimizer.beta: 0.195 -> 0.5)"
            in result.stderr), result.stderr[-2000:]

"""Never lose or damage a user's work: foreign folders, locks, damaged checkpoints, signals, a full disk.

Nearly everything runs in this process, through ``cli.execute`` (what the
command line runs once Hydra has made the run folder) on a 4-parameter bowl;
one subprocess checks what only a process can show: Ctrl-C's checkpoint and
that the exit status is the one printed, whatever signals follow.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lodo.experiment import checkpoints, cli, job, outputs, registry, run_folder
from lodo.experiment.checkpoints import CheckpointError, RunCheckpoint
from lodo.experiment.engine import Engine
from lodo.experiment.preemption import Interrupted, Preemption

ROOT = Path(__file__).resolve().parent.parent
TINY = ["task.dim=4", "num_seeds=1", "optimizer.num_layers=1", "progress=false", "hessian_every=0"]
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)


def composed(*overrides):
    with initialize_config_dir(str(registry.CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


@pytest.fixture(autouse=True)
def signal_handlers():
    """``cli.execute`` leaves its handlers in place when it exits with a status (a process is leaving then);
    this process goes on, with its own."""
    before = {s: signal.getsignal(s) for s in HANDLED}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def execute(cfg, folder: Path, capture) -> tuple:
    """``cli.execute``: (exit status, stdout, the stderr lines), read from ``capture`` (capsys or capfd)."""
    try:
        cli.execute(cfg, folder)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capture.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- a folder that is not a run folder --------------------------------------------------------------

def users_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    (folder / "tb").mkdir(parents=True)
    (folder / "config.yaml").write_text("my: settings\n")
    (folder / "tb" / "notes.txt").write_text("my notes\n")
    (folder / ".hydra").mkdir()  # what Hydra writes before the runner's code runs
    (folder / "run.log").write_text("")
    return folder


@pytest.mark.parametrize("resume", [True, False])
def test_a_folder_the_runner_did_not_make_is_refused_untouched(tmp_path, capsys, resume):
    folder = users_folder(tmp_path)
    before = snapshot(folder)
    code, out, err = execute(composed("steps=5", f"checkpoint.resume={str(resume).lower()}"), folder, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {folder} is not a run folder of this runner (it holds config.yaml, tb/)")
    assert "hydra.run.dir=" in err[0]
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == [
        ".hydra", "config.yaml", "run.log", "tb"]


def test_run_folders_of_the_previous_version_and_hydras_fresh_ones_are_the_runners(tmp_path):
    legacy = tmp_path / "legacy"  # provenance.json and config.yaml, no marker
    legacy.mkdir()
    (legacy / "provenance.json").write_text(json.dumps({"config": {"steps": 5}, "start_time": "t", "packages": {},
                                                        "command_line": "python -m lodo.run"}))
    fresh = tmp_path / "fresh"  # what Hydra makes
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / "run.log").write_text("")
    for folder in (legacy, fresh):
        with run_folder.claim(folder):
            assert (folder / run_folder.MARKER).is_file()
    fake = tmp_path / "fake"  # a provenance.json that the runner did not write is no proof
    fake.mkdir()
    (fake / "provenance.json").write_text('{"author": "me"}')
    with pytest.raises(run_folder.FolderError, match="is not a run folder of this runner"):
        run_folder.claim(fake).__enter__()
    assert not (fake / run_folder.MARKER).exists() and not (fake / run_folder.LOCK).exists()


def test_a_fresh_start_in_a_run_folder_removes_only_what_the_runner_wrote(tmp_path):
    runners = ["config.yaml", "summary.json", "seed_0.json", "tb/seed_0/events.out.tfevents.1.host",
               "checkpoints/ckpt-00000002/metadata.json", "checkpoints/seed_0/ckpt-00000001.damaged/metadata.json",
               "checkpoints/.tmp-ckpt-00000003-99/state.index"]
    users = ["tb/notes.txt", "analysis.ipynb", "checkpoints/seed_0/README"]
    for name in [run_folder.MARKER, *runners, *users]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    with run_folder.claim(tmp_path):
        run_folder.start_fresh(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([run_folder.LOCK, run_folder.MARKER, *users])
    assert not (tmp_path / "tb" / "seed_0").exists()  # emptied runner folders go too


def test_a_run_refused_after_it_claimed_a_fresh_folder_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from lodo.experiment.config import ConfigError

    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)

    def refused(cfg, out_dir):
        raise ConfigError("a setting only the optimizer's code can check")

    monkeypatch.setattr(job, "run", refused)
    code, _, err = execute(composed("steps=5"), folder, capsys)
    assert code == 2 and err == ["error: a setting only the optimizer's code can check"]
    assert not folder.exists()


# -- two runs in one folder -------------------------------------------------------------------------

def test_a_folder_in_use_is_refused_with_the_holders_pid_and_a_dead_holder_blocks_nothing(tmp_path, capsys):
    folder = tmp_path / "run"
    cfg = composed("steps=20", "chunk_size=10")
    with run_folder.claim(folder):  # another run holds it (flock: one per open file, even in one process)
        code, _, err = execute(cfg, folder, capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: folder {folder} in use by PID {os.getpid()} (on ")
    assert not (folder / "checkpoints").exists()  # the refused run touched nothing

    # A holder killed with -9 leaves its lock file, but the kernel released its lock.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(folder / run_folder.LOCK)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"%d elsewhere now" % os.getpid(), 0)
        print("locked", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(run_folder.FolderError, match=f"in use by PID {holder.pid} "):
        run_folder.claim(folder).__enter__()
    holder.kill()
    holder.wait()
    # Two jobs of a sweep, one after the other in one process: the first released the folder.
    assert execute(cfg, folder, capsys)[0] == 0
    code, out, _ = execute(cfg, folder, capsys)
    assert code == 0 and f"already finished: {folder}" in out


# -- a damaged newest checkpoint --------------------------------------------------------------------

def damage(folder: Path, how: str) -> None:
    if how == "truncated_arrays":
        path = folder / "arrays.npz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbled_arrays":
        path = folder / "arrays.npz"
        path.write_bytes(b"\x13" * path.stat().st_size)
    elif how == "missing_array":
        meta = json.loads((folder / "metadata.json").read_text())
        (folder / "metadata.json").write_text(json.dumps({**meta, "_arrays": meta["_arrays"] + ["lost"]}))
    elif how == "truncated_state":
        path = folder / "state.index"
        path.write_bytes(path.read_bytes()[:7])
    elif how == "garbled_state":
        path = next(folder.glob("state.data-*"))
        path.write_bytes(b"\x13" * path.stat().st_size)
    elif how == "truncated_metadata":
        path = folder / "metadata.json"
        path.write_text(path.read_text()[:20])


DAMAGE = ["truncated_arrays", "garbled_arrays", "missing_array", "truncated_state", "garbled_state",
          "truncated_metadata"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how):
    v = tf.Variable([0.0, 0.0])
    checkpoint = RunCheckpoint(tmp_path, keep=2, v=v)
    for step in (10, 20, 30):
        v.assign([step, -step])
        checkpoint.save(step, {"losses": np.full(3, float(step))})
    damage(tmp_path / "ckpt-00000003", how)
    v.assign([0.0, 0.0])
    restored = RunCheckpoint(tmp_path, v=v)
    metadata = restored.restore()
    assert metadata["step"] == 20 and v.numpy().tolist() == [20.0, -20.0]
    assert metadata["losses"].tolist() == [20.0] * 3
    assert restored.restored_from.name == "ckpt-00000002"
    [(name, why, kept)] = restored.skipped
    assert name == "ckpt-00000003" and kept == "ckpt-00000003.damaged" and why and "\n" not in why
    assert (tmp_path / "ckpt-00000003.damaged").is_dir()  # kept aside, never deleted
    restored.save(30, {"losses": np.full(3, 30.0)})  # numbering goes on after the newest intact one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002", "ckpt-00000003",
                                                         "ckpt-00000003.damaged"]


def test_only_when_every_checkpoint_is_damaged_is_it_an_error(tmp_path):
    checkpoint = RunCheckpoint(tmp_path, keep=2, v=tf.Variable([1.0]))
    for step in (1, 2):
        checkpoint.save(step, {"losses": np.ones(2)})
    damage(tmp_path / "ckpt-00000001", "garbled_arrays")
    damage(tmp_path / "ckpt-00000002", "truncated_state")
    with pytest.raises(CheckpointError) as err:
        RunCheckpoint(tmp_path, v=tf.Variable([0.0])).restore()
    text = str(err.value)
    assert text.startswith(f"every checkpoint in {tmp_path} is damaged (ckpt-00000002 is corrupt")
    assert "ckpt-00000001 has unreadable arrays" in text and "\n" not in text and "resume=false" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "ckpt-00000002"]  # nothing moved


def stop_after_chunks(monkeypatch, chunks: int) -> None:
    """What a kill -9 after ``chunks`` chunks leaves (their checkpoints, nothing else)."""
    train = Engine.train
    calls = {"n": 0}

    def train_then_die(self, count):
        calls["n"] += 1
        if calls["n"] > chunks:
            raise KeyboardInterrupt
        return train(self, count)

    monkeypatch.setattr(Engine, "train", train_then_die)


def test_a_run_resumes_from_the_older_checkpoint_when_the_newest_is_damaged(tmp_path, capsys, monkeypatch):
    args = ["steps=60", "chunk_size=10", "checkpoint.every_s=0", "checkpoint.keep=2"]
    stop_after_chunks(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        cli.execute(composed(*args), tmp_path)
    monkeypatch.undo()
    assert [json.loads(p.read_text())["step"] for p in sorted(tmp_path.glob("checkpoints/ckpt-*/metadata.json"))] \
        == [20, 30]
    damage(tmp_path / "checkpoints" / "ckpt-00000003", "truncated_metadata")  # the config check cannot read it
    code, out, err = execute(composed(*args), tmp_path, capsys)
    assert code == 0, err
    assert ("resumed from step 20 (checkpoint ckpt-00000002, the newest intact one; skipped ckpt-00000003 has "
            "unreadable metadata") in out and "kept as ckpt-00000003.damaged)" in out
    assert (tmp_path / "checkpoints" / "ckpt-00000003.damaged").is_dir()
    summary = json.loads((tmp_path / "summary.json").read_text())  # (bit for bit as uninterrupted: test_resume)
    assert summary["completed"] and summary["steps_done"] == 60


# -- changed settings on resume ---------------------------------------------------------------------

@pytest.fixture
def toy_image():
    registry.add_task("toy_image", **{"class": "toy_image_task.ToyImageTask"})
    yield
    registry.remove("task", "toy_image")


def image_config(*overrides, steps=20, learning_rate=0.001, **task):
    with initialize_config_dir(str(registry.CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", "num_seeds=1", "optimizer=adam", "eval_every=5",
                                           "checkpoint.every_s=0", "artifacts=false", *overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.task = {"name": "toy_image", "batch_size": 8, "steps": 20, **task}
    cfg.steps = steps
    cfg.optimizer.learning_rate = learning_rate
    return cfg


def test_an_image_run_resumed_with_other_settings_is_refused_untouched(tmp_path, capsys, monkeypatch, toy_image):
    from lodo.experiment.keras_trainer import KerasSeedRunner

    train = KerasSeedRunner.train
    calls = {"n": 0}

    def die_after_one_chunk(self, count):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return train(self, count)

    monkeypatch.setattr(KerasSeedRunner, "train", die_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        cli.execute(image_config(), tmp_path)
    monkeypatch.undo()
    before = snapshot(tmp_path)
    changes = {  # an optimizer hyperparameter, a task option, run settings (seed: a checkpoint folder of its own)
        "optimizer.learning_rate: 0.001 -> 0.01": image_config(learning_rate=0.01),
        "task.batch_size: 8 -> 4": image_config(batch_size=4),
        "seed: 0 -> 1": image_config("seed=1"),
        "steps: 20 -> 30": image_config(steps=30),
        "eval_every: 5 -> 10": image_config("eval_every=10"),
    }
    for change, cfg in changes.items():
        code, out, err = execute(cfg, tmp_path, capsys)
        assert code == 2 and len(err) == 1, (change, err)
        assert f"error: {tmp_path} holds a run with other settings ({change})" in err[0], err[0]
        assert "resumed" not in out
    assert snapshot(tmp_path) == before


# -- signals ----------------------------------------------------------------------------------------

def test_a_second_signal_neither_interrupts_nor_changes_the_status_and_the_third_ctrl_c_stops_at_once(capfd):
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.signal_name == "SIGTERM" and preemption.status == 144
    assert "SIGTERM received again: finishing the checkpoint first, then exiting with status 144" in \
        capfd.readouterr().err
    with pytest.raises(Interrupted):
        with Preemption() as preemption:
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
    assert preemption.status == 130
    assert "Ctrl-C 1 more time to stop at once" in capfd.readouterr().err


def test_a_process_that_exits_with_a_status_ignores_the_signals_that_follow():
    """The status printed stands: SIGTERM's default action during the interpreter's shutdown made it 143."""
    with pytest.raises(SystemExit) as exit_:
        with Preemption(process=True) as preemption:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            preemption.exit_for_requeue()
    assert exit_.value.code == 144
    os.kill(os.getpid(), signal.SIGTERM)  # without the handler still in place, pytest would die here
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)


def test_a_signal_before_training_exits_at_once_and_one_after_it_lets_the_run_finish_writing(tmp_path, capsys,
                                                                                             monkeypatch):
    cfg = composed("steps=20", "chunk_size=10")
    monkeypatch.setattr(job, "set_determinism", lambda cfg: os.kill(os.getpid(), signal.SIGINT))
    code, out, _ = execute(cfg, tmp_path / "early", capsys)
    assert code == 130 and "stopped by SIGINT before its first step: nothing to save; exiting with status 130" in out

    write_csv = outputs.write_csv

    def signalled_while_writing(path, frame):  # after training: the tables still come out whole
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        write_csv(path, frame)

    monkeypatch.setattr(outputs, "write_csv", signalled_while_writing)
    monkeypatch.setattr(job, "set_determinism", lambda cfg: None)
    code, out, _ = execute(cfg, tmp_path / "late", capsys)
    assert code == 144, out
    assert f"stopped by SIGTERM after the run finished (complete in {tmp_path / 'late'}); exiting with status 144" \
        in out
    assert json.loads((tmp_path / "late" / "summary.json").read_text())["completed"]
    assert len((tmp_path / "late" / "curve.csv").read_text().splitlines()) > 1


def test_a_third_ctrl_c_stops_at_once_even_mid_save_and_leaves_the_checkpoints_as_they_were(tmp_path, capfd,
                                                                                          monkeypatch):
    train, write = Engine.train, RunCheckpoint._write
    calls = {"n": 0}

    def ctrl_c_twice_in_chunk_three(self, count):
        calls["n"] += 1
        if calls["n"] == 3:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.02)
        return train(self, count)

    def ctrl_c_again_mid_save(self, tmp, step, metadata):
        if step == 30:
            (tmp / "state.index").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return write(self, tmp, step, metadata)

    monkeypatch.setattr(Engine, "train", ctrl_c_twice_in_chunk_three)
    monkeypatch.setattr(RunCheckpoint, "_write", ctrl_c_again_mid_save)
    code, out, err = execute(composed("steps=60", "chunk_size=10", "checkpoint.every_s=0", "checkpoint.keep=3"),
                             tmp_path, capfd)
    assert code == 130 and ("stopped at once by a third Ctrl-C, without a last checkpoint (the newest one on disk is "
                            "kept); exiting with status 130") in out
    assert any("SIGINT received again" in line and "Ctrl-C 1 more time" in line for line in err), err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000001", "ckpt-00000002"]


CTRL_C = """
import atexit, os, signal, sys, time
from lodo.experiment import cli
from lodo.experiment.checkpoints import RunCheckpoint
from lodo.experiment.engine import Engine

train, save = Engine.train, RunCheckpoint.save
calls = {"train": 0}

def train_then_ctrl_c(self, count):
    calls["train"] += 1
    if calls["train"] == 3:
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, while chunk 3 trains
    return train(self, count)

def save_while_signalled(self, step, metadata):
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal, and a second Ctrl-C, during the save
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    return save(self, step, metadata)

def signals_while_exiting():
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)

Engine.train, RunCheckpoint.save = train_then_ctrl_c, save_while_signalled
atexit.register(signals_while_exiting)
sys.argv = ["lodo.run", *sys.argv[1:]]
cli.cli()
"""


@pytest.mark.slow  # a subprocess: only a process shows its exit status
def test_ctrl_c_saves_a_checkpoint_says_so_and_exits_with_the_status_it_printed(tmp_path, capsys):
    folder = tmp_path / "run"
    args = [*TINY, "steps=400", "chunk_size=10", "checkpoint.every_s=100000"]  # no checkpoint but the signal's
    result = subprocess.run([sys.executable, "-c", CTRL_C, *args, f"hydra.run.dir={folder}"], cwd=ROOT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 130, result.stderr[-3000:]
    assert (f"stopped by SIGINT at step 30: checkpoint saved in {folder / 'checkpoints'}; exiting with status 130; "
            f"rerun the same command to resume") in result.stdout, result.stdout
    assert "SIGTERM received again" in result.stderr and "Traceback" not in result.stderr
    [metadata] = [json.loads(p.read_text()) for p in folder.glob("checkpoints/ckpt-*/metadata.json")]
    assert metadata["step"] == 30
    code, out, _ = execute(composed(*args[len(TINY):]), folder, capsys)  # the same command again, resumed
    assert code == 0 and "resumed from step 30" in out
    assert json.loads((folder / "summary.json").read_text())["steps_done"] == 400


# -- a full disk ------------------------------------------------------------------------------------

def full_disk_at(monkeypatch, where: str, code: int = errno.ENOSPC) -> None:
    """The third checkpoint's arrays, curve.csv, or TensorBoard's events file meet a full disk."""
    if where == "checkpoint":
        savez, calls = np.savez, {"n": 0}

        def savez_until_full(file, **arrays):
            calls["n"] += 1
            if calls["n"] == 3:
                file.write(b"partial")
                raise OSError(code, os.strerror(code))
            return savez(file, **arrays)

        monkeypatch.setattr(checkpoints.np, "savez", savez_until_full)
    elif where == "csv":
        replace = os.replace

        def replace_onto_full_disk(src, dst):
            if str(dst).endswith("curve.csv"):
                raise OSError(code, os.strerror(code))
            return replace(src, dst)

        monkeypatch.setattr(outputs.os, "replace", replace_onto_full_disk)
    else:
        from lodo.experiment import loop

        scalar, calls = loop.tf.summary.scalar, {"n": 0}

        def scalar_until_full(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise tf.errors.UnknownError(None, None, f"tb/events.out.tfevents.1; {os.strerror(code)}")
            return scalar(*args, **kwargs)

        monkeypatch.setattr(loop.tf.summary, "scalar", scalar_until_full)


@pytest.mark.parametrize("where, written, code", [
    ("checkpoint", "checkpoints/ckpt-00000003", errno.ENOSPC),
    ("csv", "curve.csv", errno.ENOSPC),
    ("tensorboard", "tb", errno.EDQUOT),
])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch, where, written, code):
    folder = tmp_path / "run"
    cfg = composed("steps=50", "chunk_size=10", "checkpoint.every_s=0", "checkpoint.keep=2")
    full_disk_at(monkeypatch, where, code)
    status, _, err = execute(cfg, folder, capsys)
    reason = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
    assert status == 2 and err == [f"error: {reason} while writing {folder / written}; free space and rerun the same "
                                   f"command to resume"], err
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert names == (["ckpt-00000001", "ckpt-00000002"] if where != "csv" else ["ckpt-00000005"])  # no partial one
    assert not [p for p in folder.rglob("*.tmp")]
    if where == "checkpoint":  # the previous checkpoint is intact: the same command resumes from it
        monkeypatch.undo()
        status, out, _ = execute(cfg, folder, capsys)
        assert status == 0 and "resumed from step 20" in out
        assert json.loads((folder / "summary.json").read_text())["completed"]

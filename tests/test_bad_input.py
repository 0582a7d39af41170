"""Bad input through the real command line: exit status 2, one `error:` line on stderr, nothing written.

Every case runs ``python -m lodo.run …`` in a subprocess, all of them at
once (a few at a time) in one module fixture, since each process spends
most of its time importing TensorFlow. Each case writes into its own run
folder under a temporary directory; none may leave a run folder behind
(except the one that already held a corrupted checkpoint) or touch
``results/``.
"""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# One worker runs the whole file: its module fixture is computed once (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("bad_input")

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
ENV.pop("HYDRA_FULL_ERROR", None)
# TensorFlow's C++ libraries print these while they load, before Python can configure any logging.
LOADER_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                          r"STDERR|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] .*)$")
TINY = ["steps=3", "num_seeds=1", "task.dim=4", "optimizer.num_layers=1", "progress=false"]

# name -> (arguments, text the error line must contain). An optimizer the registry refuses reaches the command line
# through one path (ConfigError -> one line, exit 2), shown by learning_rate_not_a_number; the other refusals of that
# kind are checked in-process (test_the_registry_refuses_bad_hyperparameters_in_one_line), without a TensorFlow import
# per case.
CASES = {
    "unknown_task": (["task=mnist"], "unknown task 'mnist'; valid task names: noisy_quadratic_bowl"),
    "unknown_optimizer": (["optimizer=sgdd"], "unknown optimizer 'sgdd'; valid optimizer names: adam,"),
    "unknown_experiment": (["experiment=table9"], "unknown experiment 'table9'; valid experiment names:"),
    "unknown_distribute": (["distribute=foo"], "unknown distribute 'foo'; valid distribute names:"),
    "unknown_scale": (["scale=huge"], "unknown scale 'huge'; valid scale names:"),
    "unknown_launcher": (["hydra/launcher=nope"], "valid hydra/launcher options: basic, joblib"),
    "steps_zero": (["steps=0"], "steps must be a positive integer, got 0 (e.g. steps=1000)"),
    "steps_negative": (["steps=-5"], "steps must be a positive integer, got -5"),
    "learning_rate_not_a_number": (["optimizer=adam", "optimizer.learning_rate=abc"],
                                   "optimizer.learning_rate must be a number, got 'abc'"),
    "num_seeds_zero": (["num_seeds=0"], "num_seeds must be a positive integer, got 0 (e.g. num_seeds=8)"),
    "unknown_key_without_plus": (["optimizer.foo=1"], "Could not override 'optimizer.foo'"),
    "time_budget_negative": (["time_budget_s=-5"], "time_budget_s must be a positive number of seconds or null"),
    "checkpoint_every_negative": (["checkpoint.every_s=-1"], "checkpoint.every_s must be a non-negative number"),
    "malformed_override": (["steps=["], "malformed override 'steps=['"),
    "unwritable_output_folder": ([], "cannot create the run folder"),
    "corrupted_checkpoint": (TINY, "has unreadable metadata"),
    "image_dataset_missing": (["task=pixelcnn_mnist", "task.data.source=files", "task.data.path=/nonexistent",
                               "scale=smoke"], "/nonexistent"),
    "image_no_cpu_devices": (["task=pixelcnn_mnist", "scale=smoke", "distribute=mirrored",
                              "distribute.num_cpu_devices=0"], "num_cpu_devices"),
}


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lodo.run", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and not LOADER_NOISE.match(line)]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its modification time."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def unwritable_folder(tmp: Path) -> Path:
    """A run folder that cannot be created: under a read-only folder, or (as root, who may write
    anywhere chmod allows) under /sys."""
    read_only = tmp / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):
        return read_only / "run"
    target = Path("/sys/lodo-bad-input-test/run")
    try:
        target.mkdir(parents=True)
    except OSError:
        return target
    pytest.skip("no folder here is unwritable")


def corrupted_run(tmp: Path) -> Path:
    """A run folder whose newest checkpoint has a metadata file cut off mid-way."""
    run = tmp / "corrupted"
    checkpoint = run / "checkpoints" / "ckpt-00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "metadata.json").write_text('{"step": 3, "format": 1, "config": {"seed"')
    return run


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    folders = {name: tmp / name for name in CASES}
    folders["unwritable_output_folder"] = unwritable_folder(tmp)
    folders["corrupted_checkpoint"] = corrupted_run(tmp)
    names = list(CASES)
    workdir = tmp / "workdir"  # the runs' working directory: relative paths (outputs/, results/) land here
    workdir.mkdir()
    before = snapshot(ROOT / "results")

    def run(name):
        args, _ = CASES[name]
        return name, cli(*args, f"hydra.run.dir={folders[name]}", cwd=workdir)

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(pool.map(run, names))
    (tmp / "read_only").chmod(0o755)
    return {"results": done, "folders": folders, "results_dir_before": before, "workdir": workdir}


@pytest.mark.slow  # the command line in subprocesses
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_exit_status_2(results, name):
    result = results["results"][name]
    _, expected = CASES[name]
    lines = error_lines(result)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "summary" not in result.stdout
    folder = results["folders"][name]
    if name == "corrupted_checkpoint":
        assert "checkpoint.resume=false" in lines[0] and str(folder / "checkpoints") in lines[0]
    else:
        assert not folder.exists(), f"a rejected run left {sorted(p.name for p in folder.iterdir())}"


@pytest.mark.slow  # the command line in subprocesses
def test_nothing_is_written_under_results(results):
    assert not any(results["workdir"].iterdir())  # where a relative results/ (or outputs/) would have gone
    # The repository's results/: no file changed. (New files are not checked: a tuning run on the same
    # machine may be exporting into results/tuning/ meanwhile.)
    after = snapshot(ROOT / "results")
    assert {p: t for p, t in results["results_dir_before"].items() if after.get(p) != t} == {}


@pytest.mark.slow  # the command line in subprocesses
def test_fresh_start_replaces_a_corrupted_checkpoint(results):
    folder = results["folders"]["corrupted_checkpoint"]
    result = cli(*TINY, "checkpoint.resume=false", f"hydra.run.dir={folder}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 3
    metadata = [json.loads(p.read_text()) for p in (folder / "checkpoints").glob("ckpt-*/metadata.json")]
    assert [m["step"] for m in metadata] == [3]  # the corrupted one is gone, the new final one is there


# The registry's refusals, each also what the command line prints (after "error: ").
REGISTRY_CASES = {
    "unknown_hyperparameter": (["+optimizer.foo=1"], "optimizer 'lodo' has no hyperparameter foo; it takes:"),
    "block_size_zero": (["optimizer.block_size=0"], "block_size must be a positive integer, got 0"),
    "block_size_fraction": (["optimizer.block_size=2.5"], "block_size must be a positive integer, got 2.5"),
    "beta_above_one": (["optimizer.beta=1.5"], "beta must be in [0, 1), got 1.5"),
}


@pytest.mark.parametrize("name", list(REGISTRY_CASES))
def test_the_registry_refuses_bad_hyperparameters_in_one_line(name, tmp_path):
    from hydra import compose, initialize_config_dir

    from lodo.experiment import job
    from lodo.experiment.config import ConfigError
    from lodo.experiment.registry import CONFIG_DIR

    overrides, expected = REGISTRY_CASES[name]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides])
    with pytest.raises(ConfigError) as err:
        job.run(cfg, tmp_path / "run")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()

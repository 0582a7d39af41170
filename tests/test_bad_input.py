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

# name -> (arguments, text the error line must contain). These are refused before TensorFlow starts, so they
# all run in one process (tests/cli_batch.py), which must never import TensorFlow. A bad hyperparameter that
# only the optimizer's own code can see (one its YAML does not list) is checked in-process below
# (test_the_registry_refuses_bad_hyperparameters_in_one_line).
BEFORE_TENSORFLOW = {
    # names of choices and the shape of the command line
    "unknown_task": (["task=mnist"], "unknown task 'mnist'; valid task names: noisy_quadratic_bowl"),
    "unknown_optimizer": (["optimizer=sgdd"], "unknown optimizer 'sgdd'; valid optimizer names: adafactor, adam,"),
    "unknown_experiment": (["experiment=table9"], "unknown experiment 'table9'; valid experiment names:"),
    "unknown_distribute": (["distribute=foo"], "unknown distribute 'foo'; valid distribute names:"),
    "unknown_scale": (["scale=huge"], "unknown scale 'huge'; valid scale names:"),
    "unknown_launcher": (["hydra/launcher=nope"], "valid hydra/launcher options: basic, joblib"),
    "unknown_key_without_plus": (["optimizer.foo=1"], "optimizer 'lodo' has no hyperparameter 'foo'; its "
                                                       "hyperparameters: initial_lr, meta_lr, beta"),
    "unknown_task_option": (["experiment=table8", "task.dim=3"], "task 'rosenbrock' has no option 'dim'; its options: "
                                                                 "start, scale, window"),
    "unknown_top_level_key": (["+foo.bar=1"], "unknown setting 'foo'; the settings are"),
    "unknown_checkpoint_key": (["+checkpoint.every=5"], "unknown setting 'checkpoint.every'; checkpoint has"),
    "malformed_override": (["steps=["], "malformed override 'steps=['"),
    "empty_run_dir": (["hydra.run.dir="], "hydra.run.dir is empty; give a folder"),
    "refused_at_the_default_folder": (["steps=0"], "steps must be a positive integer"),  # outputs/… is not made
    "a_users_folder": ([], "is not a run folder of this runner (it holds notes.txt); nothing in it was changed"),
    # run settings: non-finite, huge, wrong type, out of range
    "steps_zero": (["steps=0"], "steps must be a positive integer, got 0 (e.g. steps=1000)"),
    "steps_negative": (["steps=-5"], "steps must be a positive integer, got -5"),
    "steps_huge": (["steps=99999999999999999999"], "steps must be a positive integer, at most 2**62"),
    "steps_float": (["steps=1e3"], "steps must be a positive integer, got 1000.0"),
    "steps_text": (["steps=abc"], "steps must be a positive integer, got 'abc'"),
    "steps_memory": (["steps=100000000000"], "this run needs at least"),
    "num_seeds_zero": (["num_seeds=0"], "num_seeds must be a positive integer, got 0 (e.g. num_seeds=8)"),
    "num_seeds_fraction": (["num_seeds=1.5"], "num_seeds must be a positive integer, got 1.5"),
    "seed_negative": (["seed=-1"], "seed must be a non-negative integer <= 2147483647, got -1"),
    "seed_huge": (["seed=99999999999999999999"], "seed must be a non-negative integer <= 2147483647"),
    "seed_range_overflows": (["seed=2147483647", "num_seeds=2"], "seed + num_seeds - 1 must be at most 2147483647"),
    "time_budget_negative": (["time_budget_s=-5"], "time_budget_s must be a positive number"),
    "time_budget_inf": (["time_budget_s=inf"], "time_budget_s must be a positive number <= 10000000 or null"),
    "time_budget_nan": (["time_budget_s=nan"], "time_budget_s must be a positive number <= 10000000 or null"),
    "log_every_huge": (["log_every=99999999999999999999"], "log_every must be a non-negative integer"),
    "hessian_every_negative": (["hessian_every=-1"], "hessian_every must be a non-negative integer"),
    "chunk_size_zero": (["chunk_size=0"], "chunk_size must be a positive integer"),
    "checkpoint_every_negative": (["checkpoint.every_s=-1"], "checkpoint.every_s must be a number in [0, 10000000]"),
    "checkpoint_every_nan": (["checkpoint.every_s=nan"], "checkpoint.every_s must be a number in [0, 10000000]"),
    "checkpoint_keep_zero": (["checkpoint.keep=0"], "checkpoint.keep must be a positive integer"),
    "checkpoint_resume_text": (["checkpoint.resume=maybe"], "checkpoint.resume must be true or false, got 'maybe'"),
    "progress_number": (["progress=2"], "progress must be true or false, got 2"),
    "frozen_factor_one": (["frozen.divergence_factor=1"], "frozen.divergence_factor must be a finite number > 1"),
    "test_size_zero": (["test_size=0"], "test_size must be a positive integer or null"),
    # task options
    "noise_variance_inf": (["task.noise_variance=inf"], "task.noise_variance must be a non-negative number, got inf"),
    "noise_variance_text": (["task.noise_variance=abc"], "task.noise_variance must be a non-negative number, got 'abc'"),
    "dim_boolean": (["task.dim=true"], "task.dim must be a positive integer <= 1000000, got true"),
    "dim_memory": (["task.dim=1000000", "num_seeds=1"], "this run needs at least"),
    "eig_max_below_eig_min": (["task.eig_max=0.0001"], "task.eig_max must be a finite number >= 0.001 (eig_min)"),
    "rosenbrock_start_short": (["task=rosenbrock", "task.start=[1.0]"], "task.start must be a list of 2 finite numbers"),
    "rosenbrock_window_reversed": (["task=rosenbrock", "task.window=[200,180]"],
                                   "task.window must be a list of 2 integers >= 0, increasing, got [200, 180]"),
    "image_source_unknown": (["task=pixelcnn_mnist", "task.data.source=web"],
                             "task.data.source must be one of tfds, files, synthetic, got 'web'"),
    "image_batch_zero": (["task=resnet18_cifar10", "task.batch_size=0"], "task.batch_size must be a positive integer"),
    # optimizer hyperparameters
    "learning_rate_not_a_number": (["optimizer=adam", "optimizer.learning_rate=abc"],
                                   "optimizer.learning_rate must be a positive number, got 'abc'"),
    "adam_learning_rate_nan": (["optimizer=adam", "optimizer.learning_rate=nan"],
                               "optimizer.learning_rate must be a positive number, got nan"),
    "adam_beta_1_negative": (["optimizer=adam", "optimizer.beta_1=-0.1"], "optimizer.beta_1 must be a number in [0, 1)"),
    "momentum_one": (["optimizer=momentum", "optimizer.momentum=1.0"], "optimizer.momentum must be a number in [0, 1)"),
    "rmsprop_rho_negative": (["optimizer=rmsprop", "optimizer.rho=-0.5"], "optimizer.rho must be a number in [0, 1)"),
    "lbfgs_memory_fraction": (["optimizer=lbfgs", "optimizer.memory=2.5"], "optimizer.memory must be a positive integer"),
    "lodo_block_size_memory": (["optimizer.block_size=100000"], "this run needs at least"),
    "lodo_meta_optimizer_unknown": (["optimizer.meta_optimizer=rmsprop"],
                                    "optimizer.meta_optimizer must be one of adam, sgd, got 'rmsprop'"),
    "lodo_initial_lr_inf": (["optimizer.initial_lr=inf"], "optimizer.initial_lr must be a positive number, got inf"),
    "added_hyperparameter_nan": (["optimizer=adam", "+optimizer.weight_decay=nan"],
                                 "optimizer.weight_decay must be finite, got nan"),
    "per_seed_list_wrong_length": (["optimizer=adam", "num_seeds=2", "optimizer.learning_rate=[0.1,0.2,0.3]"],
                                   "optimizer.learning_rate holds 3 per-seed values for num_seeds=2"),
    "unwritable_output_folder": ([], "cannot create the run folder"),
    "image_no_cpu_devices": (["task=pixelcnn_mnist", "scale=smoke", "distribute=mirrored",
                              "distribute.num_cpu_devices=0"], "distribute.num_cpu_devices must be a positive integer"),
    "cluster_resolver_unknown": (["task=pixelcnn_mnist", "distribute=multi_worker", "distribute.cluster_resolver=k8s"],
                                 "distribute.cluster_resolver must be one of tf_config, slurm, got 'k8s'"),
}
# These need TensorFlow (a checkpoint or a dataset is opened): one process each.
WITH_TENSORFLOW = {
    "corrupted_checkpoint": (TINY, "has unreadable metadata"),
    "image_dataset_missing": (["task=pixelcnn_mnist", "task.data.source=files", "task.data.path=/nonexistent",
                               "scale=smoke"], "/nonexistent"),
}
CASES = {**BEFORE_TENSORFLOW, **WITH_TENSORFLOW}


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


def batch(cases: list[list[str]], cwd: Path) -> dict:
    """tests/cli_batch.py: many command lines in one process."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch.py")], input=json.dumps(cases), cwd=cwd,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    folders = {name: tmp / name for name in CASES}
    folders["unwritable_output_folder"] = unwritable_folder(tmp)
    folders["corrupted_checkpoint"] = corrupted_run(tmp)
    folders["a_users_folder"].mkdir()
    (folders["a_users_folder"] / "notes.txt").write_text("a user's file\n")
    workdir = tmp / "workdir"  # the runs' working directory: relative paths (outputs/, results/) land here
    workdir.mkdir()
    before = snapshot(ROOT / "results")

    def arguments(name):
        args, _ = CASES[name]
        own_folder = name not in ("empty_run_dir", "refused_at_the_default_folder")
        return [*args, f"hydra.run.dir={folders[name]}"] if own_folder else args

    def run(name):
        return name, cli(*arguments(name), cwd=workdir)

    with ThreadPoolExecutor(max_workers=3) as pool:
        early = pool.submit(batch, [arguments(name) for name in BEFORE_TENSORFLOW], workdir)
        done = dict(pool.map(run, WITH_TENSORFLOW))
        together = early.result()
    for name, record in zip(BEFORE_TENSORFLOW, together["results"]):
        done[name] = subprocess.CompletedProcess([], record["code"], record["stdout"], record["stderr"])
    (tmp / "read_only").chmod(0o755)
    return {"results": done, "folders": folders, "results_dir_before": before, "workdir": workdir,
            "tensorflow_imported": together["tensorflow_imported"]}


@pytest.mark.slow  # the command line in subprocesses
def test_there_are_at_least_40_command_lines_refused_before_tensorflow_starts(results):
    assert len(BEFORE_TENSORFLOW) >= 40
    assert results["tensorflow_imported"] is False


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
    elif name == "a_users_folder":  # not even Hydra's .hydra/ and run.log were added
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
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
    quiet = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    result = subprocess.run([sys.executable, "-m", "lodo.run", *TINY, "checkpoint.resume=false",
                             f"hydra.run.dir={folder}"], cwd=ROOT, env=quiet, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The console: no line of TensorFlow's C++ or absl logging, and the run ends by saying where it went.
    noise = [line for line in (result.stdout + result.stderr).splitlines() if LOADER_NOISE.match(line.strip())
             or "absl" in line or "cuInit" in line or "oneDNN" in line]
    assert noise == [], noise
    assert result.stdout.rstrip().endswith(f"run folder: {folder}"), result.stdout
    assert "hyperparameters: initial_lr=" in result.stdout
    log = (folder / "run.log").read_text()
    assert "loss over steps" in log and f"run folder: {folder}" in log  # run.log holds the console summary
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

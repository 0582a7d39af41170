"""The Hydra runner: composition, run folders, multirun, reports, and one-line errors for bad input."""

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from lodo.experiment import job
from lodo.experiment.config import ConfigError, check_group_choices, group_options, validate
from lodo.experiment.registry import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def composed(*overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lodo.run", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_defaults_are_lodo_on_the_bowl_with_the_papers_hyperparameters():
    cfg = composed()
    assert cfg.task.name == "noisy_quadratic_bowl" and cfg.optimizer.name == "lodo"
    assert (cfg.optimizer.initial_lr, cfg.optimizer.meta_lr, cfg.optimizer.beta) == (0.270, 0.00096, 0.195)
    assert (cfg.optimizer.num_layers, cfg.optimizer.block_size) == (16, 4)
    assert cfg.steps == 100000 and cfg.num_seeds == 8


def test_an_experiment_overrides_the_main_config():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=table1"], return_hydra_config=True)
    assert (cfg.steps, cfg.num_seeds, cfg.time_budget_s) == (100000, 8, 300)
    assert cfg.hydra.sweep.dir == "runs/table1"


def test_tuned_values_follow_the_task_and_command_line_overrides_win():
    cfg = composed("task=rosenbrock", "optimizer=adam")
    assert (cfg.optimizer.learning_rate, cfg.optimizer.beta_1, cfg.optimizer.beta_2) == (0.9704, 0.864, 0.99804)
    assert cfg.steps == 200
    cfg = composed("task=rosenbrock", "optimizer=lodo", "optimizer.meta_lr=0.5")
    assert cfg.optimizer.meta_lr == 0.5 and cfg.optimizer.beta == 0.897


@pytest.mark.slow
def test_a_run_writes_its_folder(tmp_path):
    cfg = composed("steps=300", "num_seeds=2", "seed=3", "hessian_every=100", "progress=false", "chunk_size=100",
                   "optimizer.num_layers=2")  # 2 layers compile in a second, 16 in ten
    summary = job.run(cfg, tmp_path)
    for name in ("config.yaml", "curve.csv", "summary.json"):
        assert (tmp_path / name).is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("task", "optimizer", "steps", "seeds", "loss_final_mean", "loss_final_std", "loss_final_per_seed",
                "diverged", "num_params", "train_time_s", "seed_steps_per_s"):
        assert key in on_disk, key
    assert on_disk["seeds"] == [3, 4] and on_disk["steps"] == 300 and on_disk["num_params"] == 100
    assert on_disk["diverged"] == 0 and on_disk["loss_final_mean"] == pytest.approx(summary["loss_final_mean"])
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert set(curve.seed) == {3, 4} and curve.step.max() == 300
    assert curve.hessian_error.notna().sum() == 2 * 4  # steps 0, 100, 200, 300 for both seeds
    per_seed = curve[curve.step > 0].dropna(subset=["loss"]).groupby("seed").loss.last()
    assert per_seed.notna().all()
    assert "optimizer:\n  name: lodo" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("overrides, message", [
    (["steps=0"], "steps must be a positive integer"),
    (["num_seeds=-2"], "num_seeds must be a positive integer"),
    (["time_budget_s=-5"], "time_budget_s must be a positive number"),
    (["seed=-1"], "seed must be a non-negative integer"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(composed(*overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["task=mnist"], "unknown task 'mnist'; valid task names: noisy_quadratic_bowl, pixelcnn_mnist, "
                     "resnet18_cifar10, rosenbrock"),
    (["optimizer=sgdd"], "unknown optimizer 'sgdd'; valid optimizer names: adafactor, adam, adamw, bfgs, "
                         "l2lbgdbgd, lamb, lars, lbfgs, levenberg_marquardt, lion, lodo, lodo_diagonal, "),
    (["-m", "optimizer=adam,sgdd"], "unknown optimizer 'sgdd'"),
    (["experiment=table9"], "unknown experiment 'table9'"),
])
def test_unknown_names_are_rejected_before_composition(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        check_group_choices(argv)
    assert "\n" not in str(err.value)


def test_every_optimizer_and_task_config_is_a_complete_registry_entry():
    from lodo.experiment import registry

    assert group_options("optimizer") == registry.names("optimizer")
    assert group_options("task") == registry.names("task")
    for name in registry.names("optimizer"):
        entry = registry.optimizer(name)
        assert entry.runs_on_small_tasks or entry.runs_on_models, name
        for path in (entry.keras, entry.engine):
            if path not in (None, "keras"):
                assert callable(registry.resolve(path, name)), (name, path)
        assert entry.label and set(entry.tune) <= set(entry.defaults), name
    for name in registry.names("task"):
        assert registry.task(name).task_class.name == name


@pytest.mark.slow
def test_multirun_and_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # deterministic=true: op determinism on, in every job of the sweep
    result = cli("-m", "optimizer=adam,momentum", "seed=0,1", "num_seeds=1", "steps=60", "chunk_size=30",
                 "deterministic=true", "progress=false", f"hydra.sweep.dir={sweep}",
                 "hydra.sweep.subdir=${optimizer.name}_${seed}")
    assert result.returncode == 0, result.stderr[-2000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert folders == ["adam_0", "adam_1", "momentum_0", "momentum_1"]
    assert json.loads((sweep / "momentum_1" / "summary.json").read_text())["seeds"] == [1]
    provenance = json.loads((sweep / "momentum_1" / "provenance.json").read_text())
    assert provenance["config"]["seed"] == 1 and provenance["op_determinism"] is True and "end_time" in provenance

    # The same sweep again: every job already finished, nothing is trained or rewritten.
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("summary.json")}
    again = cli("-m", "optimizer=adam,momentum", "seed=0,1", "num_seeds=1", "steps=60", "chunk_size=30",
                "deterministic=true", "progress=false", f"hydra.sweep.dir={sweep}",
                "hydra.sweep.subdir=${optimizer.name}_${seed}")
    assert again.returncode == 0, again.stderr[-2000:]
    skipped = [line.split("/")[-1] for line in again.stdout.splitlines() if line.startswith("already finished: ")]
    assert sorted(skipped) == ["adam_0", "adam_1", "momentum_0", "momentum_1"]
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("summary.json")} == before

    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("adam", "momentum"):
        (sweep / f"{name}_0").rename(runs / name)
    (runs / "crashed").mkdir()  # a job that left no summary.json
    out = tmp_path / "results"
    spec = importlib.util.spec_from_file_location("report_table1", ROOT / "scripts" / "report_table1.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)  # in this process: no second start of Python and its libraries
    assert report.main([str(runs), str(out), "--steps", "60", "--seeds", "1"]) == 0
    assert "skipped unfinished or crashed runs: crashed" in capsys.readouterr().err
    table = pd.read_csv(out / "table1.csv")
    assert list(table.optimizer) == ["adam", "momentum"]
    assert {"loss_100k_mean", "diverged", "seed_steps_per_s"} <= set(table.columns)
    assert "| Momentum |" in (out / "table1.md").read_text() and "\\begin{tabular}" in (out / "table1.tex").read_text()
    assert (out / "figure2.png").stat().st_size > 10_000 and (out / "figure2.pdf").exists()


def test_provenance_names_code_packages_hardware_and_keeps_earlier_attempts(tmp_path):
    import tensorflow as tf

    from lodo.experiment import provenance

    cfg = composed("steps=7")
    (tmp_path / "provenance.json").write_text(json.dumps({"pid": -1, "start_time": "earlier", "hostname": "a"}))
    first = provenance.write(tmp_path, cfg)
    assert first["config"]["steps"] == 7 and first["packages"]["tensorflow"] == tf.__version__
    assert re.fullmatch(r"[0-9a-f]{40}", first["git_commit"]) and isinstance(first["git_dirty"], bool)
    hardware = first["hardware"]
    assert hardware["cpu_count"] >= 1 and hardware["cpu_model"] and hardware["gpu_count"] == len(hardware["gpus"])
    for key in ("python", "hostname", "start_time", "command_line", "packages"):
        assert first[key], key
    assert {"numpy", "keras", "hydra-core", "tensorflow-datasets", "pandas"} <= set(first["packages"])
    second = provenance.write(tmp_path, cfg, end_time="now")  # the same attempt: updated, not appended
    on_disk = json.loads((tmp_path / "provenance.json").read_text())
    assert on_disk["start_time"] == first["start_time"] == second["start_time"] and on_disk["end_time"] == "now"
    assert [a["hostname"] for a in on_disk["previous_attempts"]] == ["a"]


WRITER = """
import importlib.util, sys
import numpy as np, pandas as pd
spec = importlib.util.spec_from_file_location("outputs", sys.argv[2])
outputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outputs)
frame = pd.DataFrame(np.random.default_rng(0).standard_normal((20000, 4)), columns=list("abcd"))
print("writing", flush=True)
i = 0
while True:
    frame["version"] = i
    outputs.write_csv(sys.argv[1] + "/curve.csv", frame)
    outputs.write_json(sys.argv[1] + "/summary.json", {"version": i, "values": list(range(20000))})
    i += 1
"""


@pytest.mark.slow
def test_a_kill_never_leaves_a_truncated_csv_or_json(tmp_path):
    """kill -9 a process that rewrites a 1.5 MB CSV and a JSON file without pause, at random moments:
    each file is always one complete version."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    versions = set()
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(ROOT / "lodo" / "experiment" / "outputs.py")],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "writing"
        time.sleep(random.uniform(0.2, 1.5))
        writer.kill()
        writer.wait()
        if (tmp_path / "curve.csv").exists():
            curve = pd.read_csv(tmp_path / "curve.csv")
            assert len(curve) == 20000 and curve.version.nunique() == 1
            versions.add(int(curve.version[0]))
        if (tmp_path / "summary.json").exists():
            assert len(json.loads((tmp_path / "summary.json").read_text())["values"]) == 20000
    assert versions, "no file was ever completed"



def test_a_loss_beyond_float32_range_is_logged_as_inf_not_a_crash(tmp_path):
    """A runaway individual of a GA generation once crashed TensorBoard logging, and with it the whole generation."""
    import tensorflow as tf

    from lodo.experiment.loop import loggable_mean

    with pytest.raises(ValueError):  # what the runner used to pass
        tf.summary.scalar("loss", float(np.mean([3e100, 1.0])), step=0)
    assert loggable_mean([3e100, 1.0]) == np.inf and loggable_mean([np.nan, 2.0, 4.0]) == 3.0
    with tf.summary.create_file_writer(str(tmp_path)).as_default(step=0):
        assert tf.summary.scalar("loss", loggable_mean([3e100, 1.0]))

"""Image tasks through the one training loop, on a toy task: run folder, milestones, divergence, resume, and the losses it reports."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lodo.experiment import job, registry
from lodo.experiment.config import ConfigError
from lodo.experiment.keras_trainer import KerasSeedRunner

CONFIG_DIR = registry.CONFIG_DIR



@pytest.fixture(autouse=True)
def toy_task(monkeypatch):
    registry.add_task("toy_image", **{"class": "toy_image_task.ToyImageTask"})
    yield
    registry.remove("task", "toy_image")


def config(*overrides, steps=20, **task):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", "num_seeds=1", *overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.task = {"name": "toy_image", "batch_size": 8, "steps": steps, **task}
    cfg.steps = steps
    return cfg


def run(cfg, folder):
    return job.run(cfg, Path(folder))


def trace_of(folder, seed=0) -> dict:
    """A finished seed's trace as its seed_<s>.json holds it, losses flattened to one list."""
    trace = json.loads((Path(folder) / f"seed_{seed}.json").read_text())["trace"]
    return {**trace, "losses": [row[0] for row in trace["trace_losses"]]}


@pytest.mark.slow
def test_a_run_writes_its_folder_and_reports_the_last_percent_of_its_losses(tmp_path):
    summary = run(config("optimizer=lodo", "optimizer.num_layers=2", "num_seeds=2", "log_every=5"), tmp_path)
    for name in ("config.yaml", "curve.csv", "validation.csv", "summary.json", "seed_0.json", "seed_1.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text())["optimizer"] == "lodo"
    records = [trace_of(tmp_path, s) for s in (0, 1)]
    assert [len(r["losses"]) for r in records] == [20, 20]
    # Loss at 20 steps = mean of the last 1% of steps (at least one step): step 20's loss.
    assert summary["loss_final_per_seed"] == pytest.approx([r["losses"][-1] for r in records])
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve.step[curve.seed == 0]) == [5, 10, 15, 20]
    assert curve.loss[curve.seed == 1].iloc[0] == pytest.approx(np.mean(records[1]["losses"][:5]))
    assert summary["test_loss_per_seed"] and summary["test_images"] == 64
    assert 0.0 <= summary["test_accuracy_mean"] <= 1.0
    assert summary["num_params"] == 16 * 3 + 3
    assert summary["optimizer_state_bytes_per_param"] > 100  # φ alone is 128 floats per parameter
    validation = pd.read_csv(tmp_path / "validation.csv")
    assert list(validation.step[validation.seed == 0]) == list(range(21))  # at θ0, then every eval_every=1 steps
    # Other processes' CPU use during every training chunk, so a report can tell a run that shared its cores.
    assert all(len(r["trace_others_cpu"]) == len(r["trace_chunk_ends"]) for r in records)
    assert set(summary["cpu_sharing"]) == {"others_cores_mean", "cpus", "shared"}


def test_cpu_sharing_flags_a_run_whose_cores_other_processes_used(monkeypatch):
    from lodo.experiment import provenance
    from lodo.experiment.chunks import Trace

    monkeypatch.setattr(provenance.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    # 10 s of training; others used 3 CPU s: 0.3 cores of 2, below the 0.2 × 2 = 0.4 limit.
    assert provenance.cpu_sharing([[4.0, 1.0], [6.0, 2.0]]) == {"others_cores_mean": 0.3, "cpus": 2, "shared": False}
    assert provenance.cpu_sharing([[10.0, 9.0], [1.0, None]])["shared"]  # 0.9 cores: shared
    assert provenance.cpu_sharing([]) is None
    # Busy machine seconds minus this process's own: what others used.
    assert provenance.others_cpu((100.0, 20.0), (112.0, 29.5)) == pytest.approx(2.5)
    assert provenance.others_cpu(None, (1.0, 1.0)) is None
    sample = provenance.cpu_seconds()
    assert sample is None or (sample[0] > 0 and sample[1] > 0)
    old = {"trace_losses": np.ones((1, 1)), "trace_chunk_ends": np.array([[1, 0.5]]),
           "trace_compile_time_s": np.array(0.1)}  # a trace written before others' CPU use was kept
    assert Trace.from_arrays([3], old).others_cpu == []


@pytest.mark.slow
def test_training_goes_on_until_both_the_step_and_the_time_milestones(tmp_path):
    summary = run(config("optimizer=adam", "num_seeds=1", "time_budget_s=0.5", "eval_every=10"), tmp_path)
    record = trace_of(tmp_path)
    assert record["trace_milestones"]["steps"]["step"] == 20
    assert record["trace_milestones"]["time"]["train_time_s"] >= 0.5
    assert record["trace_chunk_ends"][-1][1] >= 0.5
    assert summary["time_budget"]["test_loss_mean"] is not None


def test_a_diverging_run_is_recorded_as_diverged(tmp_path):
    summary = run(config("optimizer=momentum", "optimizer.learning_rate=inf", "num_seeds=2"), tmp_path)
    assert summary["diverged"] == 2
    assert all(step is not None and step < 20 for step in summary["diverged_at_per_seed"])
    assert summary["loss_final_mean"] is None


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    whole = run(config("optimizer=lodo", "optimizer.num_layers=2", "eval_every=5", "checkpoint.every_s=0"), tmp_path / "whole")

    calls = {"n": 0}
    train = KerasSeedRunner.train

    def killed_after_three_chunks(self, count):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # what a kill between two chunks leaves: checkpoints up to chunk 3
        return train(self, count)

    monkeypatch.setattr(KerasSeedRunner, "train", killed_after_three_chunks)
    with pytest.raises(KeyboardInterrupt):
        run(config("optimizer=lodo", "optimizer.num_layers=2", "eval_every=5", "checkpoint.every_s=0"), tmp_path / "killed")
    monkeypatch.setattr(KerasSeedRunner, "train", train)
    resumed = run(config("optimizer=lodo", "optimizer.num_layers=2", "eval_every=5", "checkpoint.every_s=0"), tmp_path / "killed")

    first, second = trace_of(tmp_path / "whole"), trace_of(tmp_path / "killed")
    assert second["losses"] == first["losses"]  # bitwise: the same batches, the same state
    assert resumed["test_loss_per_seed"] == whole["test_loss_per_seed"]


def test_quasi_newton_optimizers_refuse_image_tasks_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot be run on tasks of this scale"):
        run(config("optimizer=bfgs"), tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_a_batch_that_the_replicas_cannot_share_is_refused(tmp_path):
    class TwoReplicas:
        num_replicas_in_sync = 2

    cfg = config("optimizer=adam")
    task = registry.build_task("toy_image", batch_size=7)
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas"):
        KerasSeedRunner(cfg, task, TwoReplicas(), seed=0)


@pytest.mark.slow
def test_a_termination_signal_checkpoints_exits_for_requeue_and_the_rerun_finishes_identically(tmp_path, monkeypatch):
    import os
    import signal

    from lodo.experiment.preemption import Preemption

    whole = run(config("optimizer=lodo", "optimizer.num_layers=2", "eval_every=5"), tmp_path / "whole")

    calls = {"n": 0}
    train = KerasSeedRunner.train

    def signalled_during_chunk_two(self, count):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends before preemption
        return train(self, count)

    monkeypatch.setattr(KerasSeedRunner, "train", signalled_during_chunk_two)
    with pytest.raises(SystemExit) as stopped:
        run(config("optimizer=lodo", "optimizer.num_layers=2", "eval_every=5"), tmp_path / "stopped")
    assert stopped.value.code == Preemption.EXIT_CODE
    assert list((tmp_path / "stopped" / "checkpoints" / "seed_0").glob("ckpt-*"))
    monkeypatch.setattr(KerasSeedRunner, "train", train)
    resumed = run(config("optimizer=lodo", "optimizer.num_layers=2", "eval_every=5"), tmp_path / "stopped")
    first, second = trace_of(tmp_path / "whole"), trace_of(tmp_path / "stopped")
    assert second["losses"] == first["losses"]
    assert resumed["test_loss_per_seed"] == whole["test_loss_per_seed"]


def test_an_interrupted_run_resumed_with_other_settings_is_refused(tmp_path, monkeypatch):
    """The image run's checkpoints carry the run's settings: a rerun with other ones would relabel the steps
    already trained, so it is refused, and config.yaml keeps the settings the steps were trained with."""
    train = KerasSeedRunner.train

    def killed_after_one_chunk(self, count):
        if killed_after_one_chunk.calls:
            raise KeyboardInterrupt
        killed_after_one_chunk.calls += 1
        return train(self, count)

    killed_after_one_chunk.calls = 0
    monkeypatch.setattr(KerasSeedRunner, "train", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(config("optimizer=adam", "eval_every=5", "checkpoint.every_s=0"), tmp_path)
    monkeypatch.setattr(KerasSeedRunner, "train", train)
    stored = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds a checkpoint with other settings \(optimizer.learning_rate: "
                                          r"[0-9.]+ -> 0.01\)") as err:
        run(config("optimizer=adam", "optimizer.learning_rate=0.01", "eval_every=5", "checkpoint.every_s=0"), tmp_path)
    assert "checkpoint.resume=false" in str(err.value)
    assert (tmp_path / "config.yaml").read_text() == stored


def test_the_console_summary_survives_missing_and_null_figures():
    """Every key may be missing or null (a diverged run, a run without test metrics): one summary line each."""
    from lodo.experiment.summary import format_summary

    keys = ("optimizer", "task", "seeds", "steps", "train_time_s", "seed_steps_per_s", "num_params", "report_window",
            "loss_final_mean", "loss_final_std", "diverged", "test_loss_mean", "test_loss_std", "test_accuracy_mean",
            "optimum_loss", "optimum_label")
    text = format_summary(dict.fromkeys(keys) | {"time_budget": {"seconds": 5, "loss_mean": None}})
    assert "diverged" in text and "test loss: diverged" in text and "at 5 s of training" in text
    assert format_summary({}).startswith("None on None: 0 seeds")

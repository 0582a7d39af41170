"""The small-task experiments of SPEC §5 beyond Table 1: configs, run-folder extras and their reports.

Tiny settings throughout (a few steps, 2 seeds, small bowls); the real runs
are ``make reproduce-table7 / reproduce-frozen / reproduce-table8``.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir
from hydra.types import RunMode

from lodo.experiment import metrics
from lodo.experiment.engine import Engine
from lodo.experiment.frozen import growth_rate
from lodo.experiment import job
from lodo.experiment.config import ConfigError
from lodo.experiment.registry import CONFIG_DIR
from lodo.experiment import registry

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def composed(*overrides, hydra=False):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def report_script(name):
    """A ``scripts/report_*.py`` as a module, so its ``main`` runs in this process (no second TF import)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep(cfg, key):
    return str(cfg.hydra.sweeper.params[key]).split(",")


def test_table7_config_sweeps_optimizers_and_five_log_spaced_variances():
    cfg = composed("experiment=table7", "optimizer=adam", "task.noise_variance=0.1", hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweep.dir == "runs/table7"
    assert cfg.hydra.sweep.subdir == "adam_0.1"
    assert set(sweep(cfg, "optimizer")) == {"adam", "momentum", "rmsprop", "yogi", "lodo"}  # Newton: its own sweep
    assert set(sweep(cfg, "optimizer")) <= set(registry.names("optimizer"))
    variances = np.array([float(v) for v in sweep(cfg, "task.noise_variance")])
    assert len(variances) == 5 and 1.0 in variances
    np.testing.assert_allclose(np.diff(np.log10(variances)), np.log10(variances[1] / variances[0]))
    assert (cfg.num_seeds, cfg.steps, cfg.time_budget_s, cfg.frozen.steps) == (8, 100000, None, 0)
    assert cfg.optimizer.learning_rate == 1.164  # tuned on the bowl, applied automatically
    assert "experiment=table7 optimizer=newton steps=10000" in (ROOT / "Makefile").read_text()


def test_frozen_and_table8_configs():
    cfg = composed("experiment=frozen", "optimizer=lodo", hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN and sweep(cfg, "optimizer") == ["lodo"]
    assert (cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir) == ("runs/frozen", "lodo")
    assert (cfg.steps, cfg.num_seeds, cfg.task.name) == (100000, 8, "noisy_quadratic_bowl")
    assert cfg.frozen.steps >= 10 and cfg.frozen.problem_offset > 0 and cfg.frozen.control

    cfg = composed("experiment=table8", "optimizer=lodo", hydra=True)
    assert (cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir) == ("runs/table8", "lodo")
    assert set(sweep(cfg, "optimizer")) == {"adam", "rmsprop", "momentum", "momentum_ema", "yogi", "lodo"}
    assert (cfg.task.name, cfg.steps, cfg.num_seeds, cfg.record_trajectory) == ("rosenbrock", 200, 8, True)
    assert list(cfg.task.window) == [180, 200] and list(cfg.task.start) == [-0.5, 2.0]
    assert cfg.optimizer.meta_lr == 0.0001394  # Rosenbrock's tuned LODO


def test_problem_offset_draws_a_new_bowl_and_offset_zero_keeps_the_old_one():
    old, new = registry.build_task("noisy_quadratic_bowl", dim=5), registry.build_task("noisy_quadratic_bowl", dim=5, problem_offset=1)
    same = registry.build_task("noisy_quadratic_bowl", dim=5, problem_offset=0)
    np.testing.assert_array_equal(old.hessian_matrix(3), same.hessian_matrix(3))
    assert np.abs(old.hessian_matrix(3) - new.hessian_matrix(3)).max() > 0.1
    np.testing.assert_allclose(np.linalg.eigvalsh(new.hessian_matrix(3)), old.eigenvalues, rtol=1e-9)
    step = tf.constant(0, tf.int64)
    moves = [t.next_batch(t.setup([3]), tf.zeros([1, 5], tf.float64), step).numpy() for t in (old, new)]
    assert np.abs(moves[0] - moves[1]).max() > 1e-3
    with pytest.raises(ValueError, match="problem_offset"):
        registry.build_task("noisy_quadratic_bowl", problem_offset=-1)


def test_divergence_steps():
    losses = np.array([[1.0, 2.0, 1.0], [5.0, np.inf, 1.0], [20.0, np.nan, 1.0]])
    assert metrics.divergence_steps(losses, losses[0], 10.0) == [2, 1, None]
    assert metrics.divergence_steps(losses, losses[0], np.inf) == [None, 1, None]


@pytest.mark.slow
@pytest.mark.long
def test_tiny_table7_multirun_and_report(tmp_path, capsys):
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "lodo.run", "experiment=table7", "optimizer=adam,momentum", "task.noise_variance=0.1,10",
         "task.dim=12", "num_seeds=2", "steps=40", "chunk_size=40", "progress=false", f"hydra.sweep.dir={runs}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["adam_0.1", "adam_10", "momentum_0.1", "momentum_10"]
    assert not (runs / "adam_10" / "trajectory.csv").exists()  # 12 parameters: no trajectory by default
    (runs / "lodo_1").mkdir()  # a job that never finished
    out = tmp_path / "results"
    assert report_script("report_table7").main([str(runs), str(out), "--steps", "40", "--seeds", "2"]) == 0
    assert "skipped unfinished or crashed runs: lodo_1" in capsys.readouterr().err
    assert report_script("report_table7").main([str(runs), str(out), "--note", "Two runs shared the CPU.", "--steps", "40", "--seeds", "2"]) == 0
    assert (out / "table7.md").read_text().endswith("\n\nNote: Two runs shared the CPU.\n")

    table = pd.read_csv(out / "table7.csv")
    assert list(table.optimizer) == ["adam", "momentum"]
    for column in ("loss_over_sigma2_0.1_mean", "loss_over_sigma2_10_mean", "max_min_ratio", "diverged"):
        assert column in table.columns
    summary = json.loads((runs / "adam_10" / "summary.json").read_text())
    adam = table.set_index("optimizer").loc["adam"]
    assert adam["loss_over_sigma2_10_mean"] == pytest.approx(np.mean(summary["loss_final_per_seed"]) / 10, rel=1e-6)
    # Momentum is linear in the noise and the seeds draw the same ξ/σ at every σ²: loss/σ² is exactly flat.
    assert table.set_index("optimizer").loc["momentum", "max_min_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert "| Momentum |" in (out / "table7.md").read_text() and "tabular" in (out / "table7.tex").read_text()
    assert (out / "figure8.png").stat().st_size > 10_000 and (out / "figure8.pdf").exists()


@pytest.mark.slow
def test_frozen_run_records_divergence_and_matches_numpy(tmp_path, capsys):
    # One training step leaves φ untouched (m0 = 0, so the first hypergradient is 0): G = α0·I exactly.
    # With α0 = 3, β = 0 and eigenvalues up to 1, the frozen step multiplies the top direction's
    # error by |1 − 3| = 2 on any bowl: provable divergence, up to overflow within the 600 steps.
    alpha, steps, dim = 3.0, 600, 6
    cfg = composed("steps=1", "num_seeds=2", f"task.dim={dim}", "progress=false", "hessian_every=0",
                   f"optimizer.initial_lr={alpha}", "optimizer.beta=0.0", "optimizer.num_layers=4",
                   f"frozen.steps={steps}", "frozen.divergence_factor=1e6", "chunk_size=200")
    run_dir = tmp_path / "runs" / "lodo"
    summary = job.run(cfg, run_dir)
    frozen = summary["frozen"]
    assert frozen["after_steps"] == 1 and frozen["diverged_seeds"] == 2 and frozen["control"]["diverged_seeds"] == 2
    assert all(s is not None and s < steps for s in frozen["nonfinite_step_per_seed"])  # overflowed, no crash
    np.testing.assert_allclose(frozen["growth_rate_per_seed"], 2.0, rtol=1e-9)
    on_disk = json.loads((run_dir / "summary.json").read_text())["frozen"]
    assert on_disk["divergence_step_per_seed"] == frozen["divergence_step_per_seed"]
    assert len(on_disk["loss_curve_first_50"]) == 2 and len(on_disk["loss_curve_first_50"][0]) == 50

    # The same steps in NumPy on the new bowl: θ ← θ − α0·H(θ − c), with the task's own center walk.
    curve = pd.read_csv(run_dir / "frozen_curve.csv")
    new_bowl = registry.build_task("noisy_quadratic_bowl", dim=dim, problem_offset=1)
    for j, seed in enumerate(cfg_seeds := [0, 1]):
        problem = new_bowl.setup([seed])
        hess = new_bowl.hessian_matrix(seed)
        theta, center, losses = np.zeros(dim), problem.initial_batch_state, []
        for t in range(60):
            center = new_bowl.next_batch(problem, center, tf.constant(t, tf.int64))
            d = theta - center.numpy()[0]
            losses.append(0.5 * d @ hess @ d)
            theta = theta - alpha * hess @ d
        recorded = curve[(curve.problem == "new") & (curve.seed == seed)].sort_values("step").loss.to_numpy()
        np.testing.assert_allclose(recorded[:60], losses, rtol=1e-7)
        expected = next(t for t, loss in enumerate(losses) if loss > 1e6 * losses[0])
        assert frozen["divergence_step_per_seed"][j] == expected
        np.testing.assert_allclose(growth_rate(alpha * np.eye(dim)[None], hess[None], 0.0), 2.0, rtol=1e-9)
    assert cfg_seeds == summary["seeds"]

    out = tmp_path / "results"
    (tmp_path / "runs" / "lodo_sgd").mkdir()
    assert report_script("report_frozen").main([str(tmp_path / "runs"), str(out), "--steps", "1", "--seeds", "2"]) == 0
    assert "skipped unfinished or crashed runs: lodo_sgd" in capsys.readouterr().err
    table = pd.read_csv(out / "frozen.csv")
    assert list(table.optimizer) == ["lodo"] and table.frozen_diverged_seeds[0] == 2
    assert table.paper_divergence_within_steps[0] == 10 and "| LODO |" in (out / "frozen.md").read_text()
    assert (out / "frozen.png").stat().st_size > 10_000


def test_frozen_test_needs_a_learned_preconditioner(tmp_path):
    with pytest.raises(ConfigError, match="learned preconditioner") as err:
        job.run(composed("optimizer=adam", "frozen.steps=10", "steps=5", "progress=false"), tmp_path)
    assert "\n" not in str(err.value)


def test_rosenbrock_trajectory_and_table8_report(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("adam", "momentum"):
        cfg = composed("task=rosenbrock", f"optimizer={name}", "steps=30", "num_seeds=2", "progress=false")
        job.run(cfg, runs / name)
    points = pd.read_csv(runs / "momentum" / "trajectory.csv")
    assert list(points.columns) == ["seed", "step", "theta_0", "theta_1"]
    assert len(points) == 2 * 31 and set(points.seed) == {0, 1}
    first = points[points.step == 0][["theta_0", "theta_1"]].to_numpy()
    np.testing.assert_array_equal(first, [[-0.5, 2.0], [-0.5, 2.0]])

    # The same run again, engine only: its parameters after the last step are the trajectory's last row.
    task = registry.build_task("rosenbrock")
    hp = registry.optimizer_options(composed("task=rosenbrock", "optimizer=momentum").optimizer)
    engine = Engine(task, registry.build_engine_optimizer("momentum", **hp), [0, 1], chunk_size=30)
    engine.run(30)
    last = points[points.step == 30].sort_values("seed")[["theta_0", "theta_1"]].to_numpy()
    np.testing.assert_allclose(last, engine.params.numpy(), rtol=1e-7)
    # Row t is θ_t, where step t's loss was measured (curve.csv logs every step here: its row k is step k − 1).
    x, y = points.theta_0.to_numpy(), points.theta_1.to_numpy()
    points["f"] = 0.01 * (1 - x) ** 2 + (y - x**2) ** 2
    curve = pd.read_csv(runs / "momentum" / "curve.csv")
    seed0 = points[(points.seed == 0) & (points.step < 30)].f.to_numpy()
    np.testing.assert_allclose(curve[curve.seed == 0].sort_values("step").loss.to_numpy(), seed0, rtol=1e-6)

    (runs / "yogi").mkdir()  # still running
    out = tmp_path / "results"
    assert report_script("report_table8").main([str(runs), str(out), "--steps", "30", "--seeds", "2"]) == 0
    assert "skipped unfinished or crashed runs: yogi" in capsys.readouterr().err
    table = pd.read_csv(out / "table8.csv").set_index("optimizer")
    assert list(table.index) == ["adam", "momentum"] and "diverged" in table.columns
    assert table.loc["adam", "paper_loss"] == pytest.approx(0.00005342)
    assert table.loc["adam", "ratio_to_paper"] == pytest.approx(table.loc["adam", "loss_mean"] / 0.00005342)
    for figure in ("figure3", "figure11"):
        assert (out / f"{figure}.png").stat().st_size > 10_000 and (out / f"{figure}.pdf").exists()

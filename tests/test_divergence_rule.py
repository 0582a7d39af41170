"""The divergence rule: a seed has diverged when its loss is non-finite or worse than never moving from θ0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lodo.experiment import metrics, report, summary
from lodo.experiment.chunks import Trace
from lodo.experiment.engine import Engine
from lodo.functional import EngineOptimizer
from tasks.noisy_quadratic_bowl import NoisyQuadraticBowl
from tasks.rosenbrock import Rosenbrock


class StandStill(EngineOptimizer):
    name = "stand_still"

    def build(self, params, seeds):
        pass

    def step(self, params, grad, oracle):
        pass


def test_the_bowls_bar_is_what_standing_still_costs():
    """½·tr(H)·σ²·(t + 1) at step t, against 64 seeds that never move (the centre's real random walk)."""
    task = NoisyQuadraticBowl(dim=10, noise_variance=0.5)
    steps, window = 200, (150, 200)
    losses, _ = Engine(task, StandStill(), range(64), chunk_size=steps).train(steps)
    per_seed = losses[window[0]:window[1]].mean(axis=0)
    expected = task.never_moving_loss(losses[0], *window)
    assert expected == pytest.approx(0.5 * task.eigenvalues.sum() * 0.5 * (150 + 199 + 2) / 2)
    # The seeds' mean against its standard error; per step, too, the mean loss grows as t + 1.
    assert abs(per_seed.mean() - expected) < 4 * per_seed.std() / math.sqrt(per_seed.size)
    slope = np.polyfit(np.arange(steps) + 1, losses.mean(axis=1), 1)[0]
    assert slope == pytest.approx(0.5 * task.eigenvalues.sum() * 0.5, rel=0.15)


def trace(columns) -> Trace:
    losses = np.array(columns, dtype=np.float64).T  # [steps, seeds]
    return Trace(seeds=tuple(range(losses.shape[1])), losses=[losses], chunk_ends=[(len(losses), 1.0)])


def test_each_seed_is_judged_against_its_own_start():
    # Rosenbrock's bar is the loss at θ0, each seed's first loss; the report window is the last 10% here.
    task = Rosenbrock()
    healthy = [3.0] + [1.0] * 19
    worse = [3.0] + [5.0] * 19  # finite, but above where it started
    nan = [3.0] * 10 + [np.nan] * 10
    barely = [3.0] + [1.0] * 17 + [3.0, 3.0]  # the window mean equals the bar: not worse
    result = metrics.loss_at(trace([healthy, worse, nan, barely]), task, 20)
    assert result["diverged_per_seed"] == [None, metrics.WORSE_THAN_NEVER_MOVING, metrics.NON_FINITE, None]
    assert result["diverged"] == 2
    assert result["loss_per_seed"][1] == 5.0 and math.isnan(result["loss_per_seed"][2])
    assert result["loss_mean"] == pytest.approx(2.0) and result["diverged_loss_mean"] == 5.0
    assert result["never_moving_loss"] == [3.0] * 4


def test_pooling_keeps_the_verdicts_and_the_finite_diverged_mean():
    task = Rosenbrock()
    first = metrics.loss_at(trace([[3.0] + [9.0] * 19]), task, 20)
    second = metrics.loss_at(trace([[3.0] + [1.0] * 19]), task, 20)
    both = metrics.pooled([first, second])
    assert both["diverged"] == 1 and both["diverged_per_seed"] == [metrics.WORSE_THAN_NEVER_MOVING, None]
    assert both["loss_mean"] == 1.0 and both["diverged_loss_mean"] == 9.0


def test_tables_print_the_verdict_with_the_number_beside_it():
    assert report.cell(float("nan"), float("nan"), 8, 8, diverged_mean=6.49e11) == "diverged (8/8): 6.49e+11"
    assert report.cell(float("nan"), float("nan"), 8, 8, diverged_mean=float("nan")) == "diverged (8/8)"
    assert report.cell(1.0, 0.5, 2, 8, diverged_mean=7.0) == "1.000 ± 0.500 (2/8 diverged)"
    assert report.cell(2.836, 0.0, 0, 1) == "2.836" and report.cell(2.836, 0.0, 1, 2) == "2.836 (1/2 diverged)"


def test_healthy_losses_leave_out_every_diverged_seed():
    new = {"seeds": [0, 1, 2], "loss_final_per_seed": [1.0, 9.0, None],
           "diverged_per_seed": [None, metrics.WORSE_THAN_NEVER_MOVING, metrics.NON_FINITE]}
    assert summary.healthy_losses(new) == [1.0, None, None]
    old = {"seeds": [0, 1], "loss_final_per_seed": [1.0, None]}  # before the rule: nulls were the non-finite
    assert summary.healthy_losses(old) == [1.0, None]
    assert summary.healthy_losses({"seeds": [0, 1], "loss_final_mean": 2.0}) == [2.0, 2.0]

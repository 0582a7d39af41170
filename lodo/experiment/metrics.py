"""How a trace becomes reported figures (SPEC §5), written down once.

- The loss at N steps is the mean training loss over the task's report
  window ending at N (default: the last 1% of steps).
- A seed has diverged when its loss became NaN or inf by then, or when its
  window mean is worse than never moving: above what staying at θ0 would
  have cost over the same window (``task.never_moving_loss``; on the bowl,
  whose centre random-walks away, ½·tr(H)·σ²·(t + 1) at step t; elsewhere
  the loss at θ0). A diverged seed is counted and left out of the mean and
  standard deviation; the window mean of one that stayed finite is kept
  (``diverged_loss_mean``), so a table can print it beside the verdict.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lodo.experiment.chunks import Trace


NON_FINITE, WORSE_THAN_NEVER_MOVING = "non-finite", "worse than never moving"


def never_moving(task, first_losses: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Per seed, the mean loss over steps [start, stop) of a run that stays at θ0 (the divergence bar)."""
    bar = getattr(task, "never_moving_loss", None)
    reference = bar(first_losses, start, stop) if bar else first_losses
    return np.broadcast_to(np.asarray(reference, np.float64), first_losses.shape)


def verdicts(losses: np.ndarray, window_means: np.ndarray, reference: np.ndarray) -> list:
    """Per seed: None (healthy), ``NON_FINITE`` or ``WORSE_THAN_NEVER_MOVING``."""
    finite = np.isfinite(losses).all(axis=0)
    with np.errstate(invalid="ignore"):
        worse = window_means > reference
    return [None if ok and not bad else NON_FINITE if not ok else WORSE_THAN_NEVER_MOVING
            for ok, bad in zip(finite, worse)]


def loss_at(trace: Trace, task, steps: int) -> dict:
    """Per-seed window means for the first ``steps`` steps, with divergence accounting (module docstring)."""
    losses = trace.loss_matrix()[:steps]
    start, stop = task.report_window(steps)
    window = losses[start:stop]
    with np.errstate(invalid="ignore", over="ignore"):
        means = window.mean(axis=0) if len(window) else np.full(losses.shape[1], np.nan)
    finite = np.isfinite(losses).all(axis=0)
    per_seed = np.where(finite, means, np.nan)
    reference = never_moving(task, losses[0] if len(losses) else np.full(losses.shape[1], np.nan), start, stop)
    verdict = verdicts(losses, per_seed, reference)
    diverged = np.array([v is not None for v in verdict], bool)
    ok = per_seed[~diverged]
    kept = per_seed[diverged & finite]  # diverged by the rule, yet finite: its number is worth printing
    return {
        "steps": int(steps),
        "train_time_s": float(trace.time_at_step(steps)),
        "window": [int(start), int(stop)],
        "loss_mean": float(ok.mean()) if ok.size else float("nan"),
        "loss_std": float(ok.std()) if ok.size else float("nan"),
        "loss_per_seed": per_seed.tolist(),
        "diverged": int(diverged.sum()),
        "diverged_per_seed": verdict,
        "diverged_loss_mean": float(kept.mean()) if kept.size else float("nan"),
        "never_moving_loss": reference.tolist(),
    }


def pooled(results: list[dict]) -> dict:
    """``loss_at`` of several traces (seeds trained one after another) as one: the seeds side by side."""
    if len(results) == 1:
        return results[0]
    per_seed = np.array([v for r in results for v in r["loss_per_seed"]], dtype=np.float64)
    verdict = [v for r in results for v in r["diverged_per_seed"]]
    diverged = np.array([v is not None for v in verdict], bool)
    ok, kept = per_seed[~diverged], per_seed[diverged & np.isfinite(per_seed)]
    return {
        "steps": max(r["steps"] for r in results),
        "train_time_s": float(np.mean([r["train_time_s"] for r in results])),
        "window": results[0]["window"],
        "loss_mean": float(ok.mean()) if ok.size else float("nan"),
        "loss_std": float(ok.std()) if ok.size else float("nan"),
        "loss_per_seed": per_seed.tolist(),
        "diverged": sum(r["diverged"] for r in results),
        "diverged_per_seed": verdict,
        "diverged_loss_mean": float(kept.mean()) if kept.size else float("nan"),
        "never_moving_loss": [v for r in results for v in r["never_moving_loss"]],
    }


def divergence_steps(losses: np.ndarray, reference: np.ndarray, factor: float) -> list:
    """Per seed, the first step whose loss is non-finite or above ``factor`` × ``reference``; None if none.

    ``losses`` is ``[steps, S]`` (step t: the loss at θ_t); ``factor = inf``
    finds the first non-finite loss only.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.isfinite(losses) | (losses > factor * np.asarray(reference)[None])
    return [int(np.argmax(column)) if column.any() else None for column in bad.T]


def trajectory(trace: Trace) -> pd.DataFrame:
    """Long table (seed, step, theta_0 … theta_{n−1}): θ_t for t = 0 … steps, per seed."""
    points = trace.trajectory()  # [T + 1, S, n]
    steps, num_seeds, n = points.shape
    frame = pd.DataFrame(points.transpose(1, 0, 2).reshape(-1, n), columns=[f"theta_{i}" for i in range(n)])
    frame.insert(0, "step", np.tile(np.arange(steps), num_seeds))
    frame.insert(0, "seed", np.repeat(np.array(trace.seeds), steps))
    return frame


def learning_curve(trace: Trace, log_every: int) -> pd.DataFrame:
    """Long table (seed, step, train_time_s, loss, hessian_error).

    ``loss`` at a logged step is the mean training loss over the steps since
    the previous logged step; ``hessian_error`` is filled where it was measured.
    """
    losses = trace.loss_matrix()
    total = losses.shape[0]
    ends = np.unique(np.append(np.arange(log_every, total + 1, log_every), total)) if total else np.array([], int)
    starts = np.concatenate([[0], ends[:-1]])
    sums = np.vstack([np.zeros((1, losses.shape[1])), np.cumsum(losses, axis=0)])
    means = (sums[ends] - sums[starts]) / (ends - starts)[:, None]
    times = trace.time_at_step(ends)
    rows = {"seed": [], "step": [], "train_time_s": [], "loss": []}
    for j, seed in enumerate(trace.seeds):
        rows["seed"].extend([seed] * len(ends))
        rows["step"].extend(ends.tolist())
        rows["train_time_s"].extend(times.tolist())
        rows["loss"].extend(means[:, j].tolist())
    curve = pd.DataFrame(rows)
    curve["hessian_error"] = np.nan
    if trace.hessian_errors:
        errors = pd.DataFrame(
            [(seed, step, t, err[j]) for step, t, err in trace.hessian_errors for j, seed in enumerate(trace.seeds)],
            columns=["seed", "step", "train_time_s", "hessian_error"],
        )
        curve = pd.concat([curve.drop(columns="hessian_error"), errors]).groupby(["seed", "step"], as_index=False).agg(
            {"train_time_s": "first", "loss": "first", "hessian_error": "first"}
        )
    return curve.sort_values(["seed", "step"]).reset_index(drop=True)

"""The frozen-preconditioner test (SPEC §1.4): a trained G(φ), no more meta-updates, on a new problem.

If LODO's G has learned the inverse Hessian of *its* bowl, it should be a
bad preconditioner for a bowl with other eigenvectors: the paper reports
that the loss diverges within 10 steps. The trained optimizer is only read
(its state variables are shared, never written), so the test needs no hook
inside LODO and works for every optimizer with ``preconditioner_times``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from lodo import algorithm, meta_optimizers
from lodo.experiment import metrics, outputs
from lodo.experiment.engine import Engine, Trace
from lodo.functional import EngineOptimizer, FunctionalOptimizer
from lodo.preconditioners import as_columns


@dataclass(frozen=True)
class TrainedPreconditioner:
    """A trained optimizer's G in the interface of ``lodo.preconditioners``, with no weights of its own.

    ``apply`` asks the trained optimizer, whose G already includes its α0, so ``alpha`` is not used;
    there is nothing to learn, so the hypergradient is empty.
    """

    trained: EngineOptimizer
    per_seed_alpha = True  # never scaled by algorithm.update: the trained G has its own α0

    def init(self, n, seeds, dtype):
        return (), ()

    def apply(self, weights, constants, alpha, v):
        x, columns = as_columns(v)
        y = self.trained.preconditioner_times(x)
        return y if columns else y[..., 0]

    def hypergradient(self, weights, constants, alpha, m, g):
        return ()


class FrozenPreconditioner(FunctionalOptimizer):
    """LODO's step without its meta-update: m ← βm + (1 − β)g, θ ← θ − G(φ)m, φ fixed.

    That is ``lodo.algorithm.update`` with the trained G and the ``Frozen`` meta-optimizer.
    G and β come from the trained optimizer; the momentum restarts at 0
    because the new problem starts afresh (θ0 = 0, center 0).
    """

    name = "frozen"

    def __init__(self, trained: EngineOptimizer):
        self.trained = trained
        self.beta = float(getattr(trained, "beta", 0.0))
        self.preconditioner = TrainedPreconditioner(trained)
        meta = meta_optimizers.Frozen()

        def init(n, seeds, dtype):
            return algorithm.init(n, seeds, self.preconditioner, meta, dtype)

        def update(state, grad, params, oracle):
            # alpha = 1: unused, the trained G carries its own α0 (see TrainedPreconditioner).
            return algorithm.update(state, grad, alpha=1.0, beta=self.beta, preconditioner=self.preconditioner,
                                    meta_optimizer=meta)

        super().__init__(self.name, init, update)

    def build(self, params, seeds):
        probe = tf.zeros([params.shape[0], params.shape[1], 1], params.dtype)
        if self.trained.preconditioner_times(probe) is None:
            raise ValueError(f"optimizer {self.trained.name!r} has no learned preconditioner to freeze")
        super().build(params, seeds)

    def preconditioner_times(self, matrix):
        return self.trained.preconditioner_times(matrix)


def dense_preconditioner(optimizer: EngineOptimizer, num_seeds: int, n: int, dtype=tf.float64) -> np.ndarray:
    """G as ``[S, n, n]`` (G applied to the identity's columns); small n only."""
    eye = tf.eye(n, batch_shape=[num_seeds], dtype=dtype)
    return optimizer.preconditioner_times(eye).numpy()


def growth_rate(g: np.ndarray, h: np.ndarray, beta: float) -> np.ndarray:
    """Per seed, the spectral radius ρ of the frozen iteration on a quadratic with Hessian ``h``.

    The error e = θ − c and the momentum evolve linearly:
    m' = βm + (1 − β)He, e' = e − Gm' (the center's moves enter additively),
    so ρ > 1 means the loss grows like ρ^(2t) and ρ < 1 that it settles.
    """
    rates = []
    for gs, hs in zip(g, h):
        n = gs.shape[0]
        eye = np.eye(n)
        step = np.block([[eye - (1 - beta) * gs @ hs, -beta * gs], [(1 - beta) * hs, beta * eye]])
        rates.append(float(np.max(np.abs(np.linalg.eigvals(step)))))
    return np.array(rates)


def run_frozen(task, trained: EngineOptimizer, seeds, steps: int, chunk_size: int = 1000) -> tuple[Engine, Trace]:
    """``steps`` steps of the frozen preconditioner on ``task`` (θ0 and the batch state fresh)."""
    engine = Engine(task, FrozenPreconditioner(trained), seeds, chunk_size=min(chunk_size, steps))
    return engine, engine.run(steps)


def frozen_summary(task, trained: EngineOptimizer, seeds, steps: int, divergence_factor: float,
                   chunk_size: int = 1000, curve_steps: int = 50) -> tuple[dict, np.ndarray]:
    """Run the frozen preconditioner on ``task`` and describe what happened, per seed.

    Returns the summary and the full ``[steps, S]`` loss matrix (NaN after
    the run stopped because every seed had diverged).
    """
    engine, trace = run_frozen(task, trained, seeds, steps, chunk_size)
    losses = np.full((steps, len(seeds)), np.nan)
    done = trace.loss_matrix()
    losses[: len(done)] = done
    reference = losses[0]  # at θ0, before the frozen G acted at all
    divergence = metrics.divergence_steps(losses, reference, divergence_factor)
    summary = {
        "diverged_seeds": sum(step is not None for step in divergence),
        "divergence_step_per_seed": divergence,
        "nonfinite_step_per_seed": metrics.divergence_steps(losses, reference, np.inf),
        "initial_loss_per_seed": reference.tolist(),
        "hessian_error_per_seed": engine._hessian_error().numpy().tolist() if engine.task.num_params <= 1000 else None,
    }
    if task.num_params <= 500:  # a dense eigenproblem of size 2n
        hessian = task.hessian(engine.problem, engine.params, engine.batch_state).numpy()
        g = dense_preconditioner(trained, len(seeds), task.num_params, task.dtype)
        summary["growth_rate_per_seed"] = growth_rate(g, hessian, engine.optimizer.beta).tolist()
    summary[f"loss_curve_first_{curve_steps}"] = losses[:curve_steps].T.tolist()
    return summary, losses


def frozen_test(frozen, new_task, task, optimizer, seeds, chunk_size, out_dir: Path) -> dict:
    """SPEC §1.4: the trained G(φ), frozen, on a new problem and (as a control) on the one it learned.

    Both start afresh (θ0, batch state and momentum reset); the trained
    optimizer's state is only read. Writes ``frozen_curve.csv``.
    """
    result = {"steps": frozen.steps, "problem_offset": frozen.problem_offset,
              "divergence_factor": float(frozen.divergence_factor)}
    frames = []
    runs = [("new", new_task)] + ([("same", task)] if frozen.get("control", True) else [])
    for label, problem in runs:
        summary, losses = frozen_summary(problem, optimizer, seeds, frozen.steps, frozen.divergence_factor, chunk_size)
        if label == "new":
            result.update(summary)
        else:
            result["control"] = summary
        steps, num_seeds = losses.shape
        frames.append(pd.DataFrame({"problem": label, "seed": np.repeat(seeds, steps),
                                    "step": np.tile(np.arange(steps), num_seeds), "loss": losses.T.reshape(-1)}))
    outputs.write_csv(out_dir / "frozen_curve.csv", pd.concat(frames, ignore_index=True))
    return result

"""What a small task offers the multi-seed engine.

A small task is a loss over a parameter vector ``[S, n]`` for S independent
seeds at once. Every seed draws its problem (from ``problem_rng``) and its
noise (from stateless RNG keyed by seed and step) on its own streams, so a
seed's trajectory does not depend on which other seeds run beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

PROBLEM_STREAM = 0x7A5C  # the task's fixed constants (e.g. the bowl's eigenvectors)
NOISE_STREAM = 0x0A15E  # per-step minibatch randomness


def last_one_percent(steps_done: int) -> tuple[int, int]:
    """The paper's report window (SPEC §5): steps [start, stop) of the last 1% of a run, at least one step."""
    return steps_done - max(1, steps_done // 100), steps_done


def problem_rng(seed: int, offset: int = 0) -> np.random.Generator:
    """Seed ``seed``'s problem constants; ``offset`` k > 0 draws the seed's k-th other problem."""
    return np.random.default_rng([int(seed), PROBLEM_STREAM] + ([int(offset)] if offset else []))


def noise_key(seed: int) -> int:
    return int(seed) * 1_000_003 + NOISE_STREAM


@dataclass
class Problem:
    """One group of seeds' constants plus the mutable minibatch state."""

    seeds: tuple
    constants: dict  # name -> tensor [S, ...]
    initial_params: tf.Tensor  # [S, n]
    initial_batch_state: tf.Tensor  # [S, ...] (e.g. the bowl's center)


class SmallTask:
    name: str = "small_task"
    dtype = tf.float64
    num_params: int
    steps: int = 100_000

    def setup(self, seeds: Sequence[int]) -> Problem:
        raise NotImplementedError

    def next_batch(self, problem: Problem, batch_state: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """The minibatch for ``step``; it becomes the new batch state."""
        return batch_state

    def loss(self, problem: Problem, params: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
        """Per-seed loss ``[S]`` on one minibatch."""
        raise NotImplementedError

    def loss_and_grad(self, problem, params, batch):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = self.loss(problem, params, batch)
        return loss, tape.gradient(loss, params)

    def hessian(self, problem, params, batch) -> tf.Tensor:
        """Per-seed Hessian ``[S, n, n]``; seeds are independent, so a batch Jacobian."""
        with tf.GradientTape() as outer:
            outer.watch(params)
            _, grad = self.loss_and_grad(problem, params, batch)
        return outer.batch_jacobian(grad, params)

    def report_window(self, steps_done: int) -> tuple[int, int]:
        """Steps [start, stop) whose mean training loss is the reported figure (last 1%)."""
        return last_one_percent(steps_done)

    def never_moving_loss(self, first_losses: np.ndarray, start: int, stop: int):
        """The mean loss over steps [start, stop) of a run that never leaves θ0; a seed above it has diverged.

        The default is the loss at θ0 (each seed's first loss), exact for a task whose loss at a
        fixed point does not change with the step; a task whose loss does (the bowl) says so.
        """
        return first_losses

    # How the run's summary names ``optimum_loss`` (None: not printed, e.g. a minimum of 0 that says nothing).
    optimum_label: str | None = None

    def optimum_loss(self) -> float | None:
        """The analytic best expected loss, where one is known."""
        return None

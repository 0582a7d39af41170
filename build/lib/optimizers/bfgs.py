"""Dense BFGS on stochastic gradients (Broyden 1970), as the paper ran it.

H_0 = c·I; each step s = −lr·H g. The pair (s, y) is completed one step later
with y = g_new − g, where g_new is the gradient the engine hands over at the
next step: at the new parameters but on the *next* minibatch. That is the
paper's setup (one gradient per step); the minibatch noise in y breaks the
secant information (sᵀy can turn negative and H indefinite), which is why the
paper reports BFGS as diverging on the noisy bowl. (In float64 its loss there
grows without bound, to ~1e5 after 100k steps, yet stays finite.) Nothing here guards
against that (no curvature check, no line search): a NaN/inf shows up in the
loss and the engine counts the seed as diverged. The one exception is an
undefined update, sᵀy = 0 exactly, which is skipped: otherwise a
deterministic run that reaches its minimum exactly (g = s = y = 0) would turn
into NaN and be miscounted as diverged.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from lodo.functional import FunctionalOptimizer


class BFGSState(NamedTuple):
    h: tf.Tensor  # [S, n, n] inverse-Hessian estimate
    grad: tf.Tensor  # [S, n] the previous step's gradient
    step: tf.Tensor  # [S, n] the previous step's s (θ_t − θ_{t−1})
    t: tf.Tensor  # scalar int64: steps taken


def init(n: int, seeds, dtype, initial_scale: float) -> BFGSState:
    eye = tf.eye(n, batch_shape=[len(seeds)], dtype=dtype)
    zeros = tf.zeros([len(seeds), n], dtype)
    return BFGSState(initial_scale * eye, zeros, zeros, tf.constant(0, tf.int64))


def bfgs_update(h, s, y):
    """H + (sᵀy + yᵀHy)(s sᵀ)/(sᵀy)² − (H y sᵀ + s yᵀH)/(sᵀy), per seed; satisfies H_new y = s."""
    sy = tf.reduce_sum(s * y, axis=-1)[:, None, None]
    hy = tf.linalg.matvec(h, y)
    yh = tf.linalg.matvec(h, y, transpose_a=True)
    yhy = tf.reduce_sum(y * hy, axis=-1)[:, None, None]
    ss = s[:, :, None] * s[:, None, :]
    cross = hy[:, :, None] * s[:, None, :] + s[:, :, None] * yh[:, None, :]
    return h + (sy + yhy) * ss / tf.square(sy) - cross / sy


def update(state: BFGSState, grad, params, oracle, *, learning_rate: float):
    """The step to subtract from θ, and the new state."""
    y = grad - state.grad
    # Skipped only where the update is 0/0 (sᵀy = 0, e.g. s = y = 0 at an exact minimum).
    defined = tf.logical_and(state.t > 0, tf.reduce_sum(state.step * y, axis=-1) != 0)[:, None, None]
    h = tf.where(defined, bfgs_update(state.h, state.step, y), state.h)
    s = -learning_rate * tf.linalg.matvec(h, grad)
    return -s, BFGSState(h, grad, s, state.t + 1)


class BFGS(FunctionalOptimizer):
    name = "bfgs"

    def __init__(self, learning_rate=1.0, initial_scale=1.0):
        if not learning_rate > 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {learning_rate}")
        if not initial_scale > 0:
            raise ValueError(f"optimizer.initial_scale must be > 0, got {initial_scale}")
        self.learning_rate, self.initial_scale = float(learning_rate), float(initial_scale)
        super().__init__(
            self.name,
            lambda n, seeds, dtype: init(n, seeds, dtype, self.initial_scale),
            lambda state, grad, params, oracle: update(state, grad, params, oracle, learning_rate=self.learning_rate),
        )

    def preconditioner_times(self, matrix):
        """lr·H·M: the preconditioner the next step applies (before the pending pair is folded in)."""
        return self.learning_rate * tf.matmul(self.state().h, matrix)

"""Stochastic L-BFGS and O-LBFGS without line search (Schraudolph, Yu & Günter 2007).

Each step: p = −H_t g by the two-loop recursion over the last M pairs,
s = η_t p with η_t = η0·τ/(τ + t), and y = ∇L(θ + s) − ∇L(θ) + λs with both
gradients on the *same* minibatch (a second oracle call), so y measures
curvature rather than minibatch noise. The two variants differ only in the
initial scaling γ of H_t: the newest pair's sᵀy/yᵀy (L-BFGS) or its mean over
the memory (O-LBFGS); before the first pair γ = ε.

The two loops are triangular recurrences in their coefficients. With the
pairs as the rows of S and Y in age order and R the upper triangle of
[s_iᵀy_j] (R_ij for i older than or equal to j), the first loop computes
α = R⁻¹ S g and the second δ = α − β = R⁻ᵀ(D α − Y r₀), with D = diag(s_iᵀy_i)
and r₀ = γ(g − Yᵀα); the direction is r₀ + Sᵀδ. R⁻¹ is kept in the state and updated in O(M·n) per new
pair (dropping the oldest pair drops its row and column of R⁻¹ exactly, since
it comes first in age order), so a step costs a few [M, n] matrix–vector
products. Looping over the pairs (unrolled, or as two triangular solves over
a fresh SYᵀ) was 2–5x slower under XLA on CPU: per-op overhead and an
M×M×n matrix product per step.

The memory is a ring buffer per seed indexed by slot, not age; R⁻¹ is stored
in slot order too. Unfilled slots hold zeros (also in R⁻¹), which makes them
exact no-ops, so no masking is needed while the memory fills.

η0, τ and λ may be lists with one value per seed; they then enter ``update``
as ``[S, 1]`` float64 columns and give each seed its scalar run's numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from lodo.functional import FunctionalOptimizer, any_per_seed, is_per_seed, seed_values

INITIAL_SCALE = 1e-10  # γ before any (s, y) pair exists


class LBFGSState(NamedTuple):
    s: tf.Tensor  # [S, M, n] steps, ring buffer
    y: tf.Tensor  # [S, M, n] gradient differences
    r_inv: tf.Tensor  # [S, M, M] R⁻¹ in slot order (zero rows/columns for unfilled slots)
    sy: tf.Tensor  # [S, M] s_iᵀy_i (0 in unfilled slots)
    ratio: tf.Tensor  # [S, M] s_iᵀy_i / y_iᵀy_i (0 in unfilled slots)
    count: tf.Tensor  # [S] int64: pairs stored so far, per seed
    t: tf.Tensor  # scalar int64: steps taken (drives η_t)


def init(n: int, seeds, dtype, memory: int) -> LBFGSState:
    shape = [len(seeds), int(memory)]
    return LBFGSState(tf.zeros(shape + [n], dtype), tf.zeros(shape + [n], dtype), tf.zeros(shape + [memory], dtype),
                      tf.zeros(shape, dtype), tf.zeros(shape, dtype), tf.zeros([len(seeds)], tf.int64),
                      tf.constant(0, tf.int64))


def _dot(a, b):
    return tf.reduce_sum(a * b, axis=-1)


def initial_scaling(state: LBFGSState, mean_scaling: bool) -> tf.Tensor:
    """γ per seed [S]: newest pair's sᵀy/yᵀy, or its mean over the filled memory; ε before any pair."""
    memory = state.s.shape[1]
    if mean_scaling:
        filled = tf.cast(tf.minimum(state.count, memory), state.ratio.dtype)
        gamma = tf.reduce_sum(state.ratio, axis=1) / tf.maximum(filled, 1)
    else:
        gamma = tf.gather(state.ratio, (state.count - 1) % memory, axis=1, batch_dims=1)
    return tf.where(state.count > 0, gamma, tf.constant(INITIAL_SCALE, state.ratio.dtype))


def inverse_hessian_times(state: LBFGSState, g: tf.Tensor, mean_scaling: bool) -> tf.Tensor:
    """H_t g (two-loop recursion in triangular form, see the module docstring); g is [S, n]."""
    gamma = initial_scaling(state, mean_scaling)[:, None]
    alpha = tf.linalg.matvec(state.r_inv, tf.linalg.matvec(state.s, g))
    r = gamma * (g - tf.linalg.matvec(state.y, alpha, transpose_a=True))
    delta = tf.linalg.matvec(state.r_inv, state.sy * alpha - tf.linalg.matvec(state.y, r), transpose_a=True)
    return r + tf.linalg.matvec(state.s, delta, transpose_a=True)


def push(state: LBFGSState, s: tf.Tensor, y: tf.Tensor) -> LBFGSState:
    """Store (s, y) over each seed's oldest pair.

    A pair with sᵀy = 0 exactly (e.g. s = y = 0 once a deterministic run has
    reached its minimum) makes the update 0/0 and is skipped for that seed.
    Nothing else is guarded: sᵀy < 0, or overflow, is left to show.
    """
    memory = state.s.shape[1]
    sy = _dot(s, y)
    store = sy != 0  # [S]
    slot = tf.logical_and(tf.one_hot(state.count % memory, memory, on_value=True, off_value=False), store[:, None])
    old_s = tf.where(slot[..., None], tf.zeros_like(state.s), state.s)
    # Dropping the oldest pair: its row and column of R⁻¹ go; the rest is the smaller inverse.
    r_inv = tf.where(tf.logical_or(slot[:, :, None], slot[:, None, :]), tf.zeros_like(state.r_inv), state.r_inv)
    # The newest pair comes last in age order: R gains the column c_j = s_jᵀy (j older) and
    # the diagonal d = sᵀy, so R⁻¹ gains the column (−R⁻¹c/d, 1/d).
    onehot = tf.cast(slot, s.dtype)
    column = (onehot - tf.linalg.matvec(r_inv, tf.linalg.matvec(old_s, y))) / sy[:, None]
    return LBFGSState(
        tf.where(slot[..., None], s[:, None], state.s),
        tf.where(slot[..., None], y[:, None], state.y),
        tf.where(slot[:, None, :], column[:, :, None], r_inv),
        tf.where(slot, sy[:, None], state.sy),
        tf.where(slot, (sy / _dot(y, y))[:, None], state.ratio),
        state.count + tf.cast(store, tf.int64),
        state.t + 1,
    )


def update(state: LBFGSState, grad, params, oracle, *, eta0: float, tau: float, lam: float, mean_scaling: bool):
    """The step to subtract from θ, and the new state. Costs one extra gradient on this minibatch."""
    t = tf.cast(state.t, grad.dtype)
    if isinstance(eta0, np.ndarray):  # per-seed [S, 1] columns; η0·τ in float64, as Python computes it below
        eta = tf.constant(eta0 * tau, grad.dtype) / (tf.constant(tau, grad.dtype) + t)
        lam = tf.constant(lam, grad.dtype)
    else:
        eta = eta0 * tau / (tau + t)
    s = -eta * inverse_hessian_times(state, grad, mean_scaling)
    _, grad_new = oracle.loss_and_grad(params + s)
    y = grad_new - grad + lam * s
    return -s, push(state, s, y)


def _check(eta0, tau, memory, lam):
    def each(value):
        return value if is_per_seed(value) else [value]

    if not all(v > 0 for v in each(eta0)):
        raise ValueError(f"optimizer.eta0 must be > 0, got {eta0}")
    if not all(v > 0 for v in each(tau)):
        raise ValueError(f"optimizer.tau must be > 0, got {tau}")
    if isinstance(memory, bool) or int(memory) != memory or memory < 1:
        raise ValueError(f"optimizer.memory must be a positive integer, got {memory}")
    if not all(v >= 0 for v in each(lam)):
        raise ValueError(f"optimizer.lam must be >= 0, got {lam}")


class LBFGS(FunctionalOptimizer):
    """L-BFGS: initial scaling from the newest pair."""

    name = "lbfgs"
    mean_scaling = False

    def __init__(self, eta0=0.1, tau=10000.0, memory=48):
        self._configure(eta0, tau, memory, 0.0)

    def _configure(self, eta0, tau, memory, lam):
        _check(eta0, tau, memory, lam)
        self.memory = int(memory)
        if any_per_seed(eta0, tau, lam):
            self.eta0, self.tau, self.lam = eta0, tau, lam
            hp = dict(mean_scaling=self.mean_scaling)

            def make_state(n, seeds, dtype):
                hp.update({k: seed_values(v, len(seeds), k)[:, None] for k, v in (("eta0", eta0), ("tau", tau),
                                                                                   ("lam", lam))})
                return init(n, seeds, dtype, self.memory)
        else:
            self.eta0, self.tau, self.lam = float(eta0), float(tau), float(lam)
            hp = dict(eta0=self.eta0, tau=self.tau, lam=self.lam, mean_scaling=self.mean_scaling)

            def make_state(n, seeds, dtype):
                return init(n, seeds, dtype, self.memory)
        super().__init__(
            self.name,
            make_state,
            lambda state, grad, params, oracle: update(state, grad, params, oracle, **hp),
        )


class OLBFGS(LBFGS):
    """O-LBFGS: initial scaling averaged over the memory, y = Δg + λs."""

    name = "olbfgs"
    mean_scaling = True

    def __init__(self, eta0=0.1, tau=10000.0, memory=48, lam=0.0):
        self._configure(eta0, tau, memory, lam)

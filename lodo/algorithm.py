"""Algorithm 1 of the paper as a pair of pure functions, ``init`` and ``update``.

The state is explicit (a ``LODOState`` of tensors), every tensor carries a
leading axis of independent seeds, and nothing here knows about Keras or
tasks. G(φ) is any preconditioner of ``lodo.preconditioners`` (LODO's own by default)
and φ's optimizer any of ``lodo.meta_optimizers``. The Keras optimizers
(``lodo.keras_optimizer``) and the multi-seed engine's (``lodo.multi_seed``) are thin
adapters over these two functions, which is why they follow the same trajectory;
``lodo.layerwise`` is the same update fused layer by layer for LODO's own preconditioner.

One call of ``update`` with the gradient g_{t+1} = ∇L_{t+1}(θ_{t+1}) does:
  3–4. h_t = ∂L_{t+1}(θ_t − G(φ_t)m_t)/∂φ_t, φ_{t+1} = meta_optimizer(φ_t, h_t)
  5.   m_{t+1} = β m_t + (1 − β) g_{t+1}
  1.   returns the step G(φ_{t+1}) m_{t+1}, to be subtracted from θ_{t+1}.
On the first call m_0 = 0, so h_0 = 0 and the step is α0(1 − β)g_1.

A step may leave coordinates out (``mask``): those of a variable with no gradient this step, a
layer frozen after compiling, or one Keras overwrites with its gradient. G mixes coordinates, so
zeroing their gradient is not enough: the step runs on the kept coordinates alone, with G
restricted to them (D G D, D = diag(mask)). A left-out coordinate's m is neither read nor
advanced, and its step is exactly 0, as Keras's per-variable optimizers leave an absent
variable and its slots alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from lodo import meta_optimizers, preconditioners

class LODOState(NamedTuple):
    weights: tuple  # φ: the preconditioner's learned tensors, each [S, ...]
    constants: tuple  # fixed per seed (permutations), never updated
    momentum: tf.Tensor  # m_t, [S, n]
    meta: tuple  # the meta-optimizer's state for φ


@dataclass(frozen=True)
class LODOHyperparams:
    initial_lr: float = 0.270
    meta_lr: float = 0.00096
    beta: float = 0.195

    def __post_init__(self):
        for name in ("initial_lr", "meta_lr", "beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"LODO {name} must be a finite number, got {value!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"LODO beta must be in [0, 1), got {self.beta}")
        if self.initial_lr <= 0:
            raise ValueError(f"LODO initial_lr must be positive (it scales the first preconditioner), got "
                             f"{self.initial_lr}")
        # meta_lr = 0 is allowed: it freezes the preconditioner at initial_lr·I, a useful control run.
        if self.meta_lr < 0:
            raise ValueError(f"LODO meta_lr must be zero or positive, got {self.meta_lr}")


def init(
    n: int,
    seeds: Sequence[int],
    preconditioner=None,
    meta_optimizer=None,
    dtype=tf.float32,
) -> LODOState:
    """Fresh state for ``len(seeds)`` independent copies of LODO on n parameters."""
    preconditioner = preconditioner or preconditioners.BlockPermutation()
    meta_optimizer = meta_optimizer or meta_optimizers.Adam(0.00096)
    weights, constants = preconditioner.init(n, seeds, dtype)
    return LODOState(
        weights=weights,
        constants=constants,
        momentum=tf.zeros([len(seeds), n], dtype=dtype),
        meta=meta_optimizer.init(weights),
    )


def update(state: LODOState, grad, *, alpha, beta, preconditioner, meta_optimizer, mask=None):
    """One LODO step: returns ``(step, new_state)``; the caller does θ ← θ − step.

    ``mask``: booleans ``[n]`` or ``[S, n]``, the coordinates in this step (see the module
    docstring); None keeps all of them and computes exactly what the unmasked step always did.

    ``alpha`` and ``beta`` are numbers (or scalar tensors), or one value per
    seed (a list or an ``[S]`` tensor); the meta-optimizer's learning rate may
    be per seed too. G is linear in α0, so a preconditioner that takes only a
    scalar α0 runs at α0 = 1 and its outputs are scaled per seed: the same
    products in the same order, so each seed gets exactly its scalar run's numbers.
    """
    grad = tf.convert_to_tensor(grad, dtype=state.momentum.dtype)
    alpha = meta_optimizers.scalar(alpha, grad.dtype)
    beta = meta_optimizers.scalar(beta, grad.dtype)
    keep = (lambda x: x) if mask is None else _restrict(mask, grad)
    grad, old = keep(grad), keep(state.momentum)
    if alpha.shape.rank == 1 and not getattr(preconditioner, "per_seed_alpha", False):
        one = tf.ones([], grad.dtype)
        hyper = preconditioner.hypergradient(state.weights, state.constants, one, old, grad)
        hyper = tuple(h * meta_optimizers.seedwise(alpha, h.shape.rank) for h in hyper)
    else:
        hyper = preconditioner.hypergradient(state.weights, state.constants, alpha, old, grad)
    weights, meta = meta_optimizer.update(state.weights, hyper, state.meta)
    beta = meta_optimizers.seedwise(beta, 2)
    momentum = beta * state.momentum + (1 - beta) * grad
    if mask is not None:
        momentum = keep(momentum, state.momentum)  # a left-out coordinate keeps its m
    step = keep(precondition(preconditioner, weights, state.constants, alpha, keep(momentum)))
    return step, LODOState(weights, state.constants, momentum, meta)


def _restrict(mask, like: tf.Tensor):
    """``keep(x, outside=0)``: x on the coordinates of ``mask``, ``outside`` elsewhere (exactly: a select)."""
    mask = tf.broadcast_to(tf.cast(mask, tf.bool), tf.shape(like))

    def keep(x, outside=None):
        return tf.where(mask, x, tf.zeros_like(x) if outside is None else outside)

    return keep


def precondition(preconditioner, weights, constants, alpha, v):
    """G(φ)·v for ``[S, n]`` or ``[S, n, W]`` v, with α0 a scalar or per seed ``[S]`` (see ``update``)."""
    if getattr(alpha, "shape", None) is not None and alpha.shape.rank == 1 \
            and not getattr(preconditioner, "per_seed_alpha", False):
        out = preconditioner.apply(weights, constants, tf.ones([], alpha.dtype), v)
        return out * meta_optimizers.seedwise(alpha, out.shape.rank)
    return preconditioner.apply(weights, constants, alpha, v)

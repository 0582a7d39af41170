"""The preconditioners of LODO's ablations (SPEC §1.3), and the ablations' default hyperparameters.

Each preconditioner plugs into ``lodo.algorithm.update`` exactly like
``algorithm.BlockPermutationPreconditioner``: ``init`` returns the learned
weights φ and the fixed constants, every tensor with a leading axis of seeds
S; ``apply`` computes G(φ)·v for ``[S, n]`` vectors or ``[S, n, W]`` column
blocks (the engine's Hessian-error diagnostic passes ``[S, n, n]``);
``hypergradient`` is −(∂[G(φ)m]/∂φ)ᵀ g. The dataclass fields are the
preconditioner's own hyperparameters (the Keras optimizers serialize them).

The other two ablations (No-Momentum, SGD meta-optimizer) keep LODO's
preconditioner and only change ``beta`` or the meta-optimizer.

α0 may be one value per seed (an ``[S]`` tensor, ``per_seed_alpha``): each
product then takes its seed's α0 in the place where a scalar α0 would go,
so a seed's numbers equal those of a scalar run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

from lodo import algorithm, preconditioner as bp
from lodo.meta_optimizers import seedwise

# Defaults: the image-generation values of the paper's Table 6 (SPEC §4.2,
# before the halving of §4.1). Global's and Residuals' meta_lr did not survive
# in our copy of the paper; they take LODO's own image-generation meta_lr.
DIAGONAL_DEFAULTS = algorithm.LODOHyperparams(initial_lr=0.1325, meta_lr=0.0005196, beta=0.9860)
GLOBAL_DEFAULTS = algorithm.LODOHyperparams(initial_lr=0.05583, meta_lr=7.946e-6, beta=0.9525)
RESIDUALS_DEFAULTS = algorithm.LODOHyperparams(initial_lr=0.02134, meta_lr=7.946e-6, beta=0.9301)
NO_MOMENTUM_DEFAULTS = algorithm.LODOHyperparams(initial_lr=0.08459, meta_lr=7.946e-6, beta=0.0)
SGD_DEFAULTS = algorithm.LODOHyperparams(initial_lr=0.1035, meta_lr=0.0007196, beta=0.9499)


def _columns(v: tf.Tensor) -> tuple[tf.Tensor, bool]:
    """``[S, n]`` or ``[S, n, W]`` → ``([S, n, W], was_columns)``."""
    columns = v.shape.rank == 3
    return (v if columns else v[..., None]), columns


@dataclass(frozen=True)
class DiagonalPreconditioner:
    """G = α0·diag(φ), φ ∈ Rⁿ initialized to ones (an Amid et al. 2022 style learned diagonal)."""

    per_seed_alpha = True

    def init(self, n: int, seeds: Sequence[int], dtype):
        return (tf.ones([len(seeds), n], dtype),), ()

    def apply(self, weights, constants, alpha, v):
        x, columns = _columns(v)
        y = seedwise(alpha, 3) * weights[0][..., None] * x
        return y if columns else y[..., 0]

    def hypergradient(self, weights, constants, alpha, m, g):
        # G m = α0 φ ⊙ m, so ∂⟨G m, −g⟩/∂φ = −α0 m ⊙ g.
        return (-seedwise(alpha, 2) * m * g,)


@dataclass(frozen=True)
class GlobalPreconditioner:
    """G = α0·φ·I, one scalar φ per seed initialized to 1 (hypergradient descent, Baydin et al. 2017)."""

    per_seed_alpha = True

    def init(self, n: int, seeds: Sequence[int], dtype):
        return (tf.ones([len(seeds), 1], dtype),), ()

    def apply(self, weights, constants, alpha, v):
        x, columns = _columns(v)
        y = seedwise(alpha, 3) * weights[0][..., None] * x
        return y if columns else y[..., 0]

    def hypergradient(self, weights, constants, alpha, m, g):
        return (-seedwise(alpha, 2) * tf.reduce_sum(m * g, axis=-1, keepdims=True),)


@dataclass(frozen=True)
class ResidualPreconditioner:
    """G = α0·I_{n×ñ} Rᵀ D R I_{ñ×n}, R = (I + diag(w_N) P_N) ⋯ (I + diag(w_1) P_1), ñ = 2n.

    Weights are ``(D [S, ñ], w [S, N, ñ])``; constants are the permutations
    ``[S, N, ñ]`` and their inverses. D starts at ones and w_i ~ N(0, 1/N).

    The layers run in ``tf.while_loop``s rather than unrolled: every layer
    reads its input twice (x and P_i x), and XLA fuses unrolled elementwise
    layers into the next gathers, recomputing earlier layers per element
    (64 unrolled layers ran ~50x slower). A loop body also compiles once.
    """

    num_layers: int = 64
    per_seed_alpha = True  # a class attribute, not a field

    def __post_init__(self):
        value = self.num_layers
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"LODO-Residuals num_layers must be a positive integer, got {value!r}")

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One seed's permutations ``[N, 2n]`` and initial residual weights ``[N, 2n]``."""
        padded = 2 * n
        perms = np.stack([rng.permutation(padded) for _ in range(self.num_layers)]).astype(np.int32)
        w = rng.standard_normal((self.num_layers, padded)) / np.sqrt(self.num_layers)
        return perms, w

    def init(self, n: int, seeds: Sequence[int], dtype):
        # Each seed has its own generator, so its draws do not depend on the other seeds.
        draws = [self.draw(n, np.random.default_rng([int(s), algorithm.RNG_STREAM])) for s in seeds]
        perms = np.stack([d[0] for d in draws])
        w = tf.constant(np.stack([d[1] for d in draws]), dtype=dtype)
        weights = (tf.ones([len(seeds), 2 * n], dtype), w)
        return weights, (tf.constant(perms), tf.constant(bp.inverse_permutations(perms)))

    def _forward(self, w, perms, x, keep=False):
        """x ↦ R x on ``[S, ñ, W]``; with ``keep`` also each layer's P_i a_{i−1}, stacked ``[N, S, ñ, W]``."""
        kept = tf.TensorArray(x.dtype, size=self.num_layers if keep else 0, element_shape=x.shape)

        def layer(i, x, kept):
            px = bp._permute(x, bp.flat_indices(tf.gather(perms, i, axis=1)))  # one gather over all seeds
            if keep:
                kept = kept.write(i, px)
            return i + 1, x + tf.gather(w, i, axis=1)[..., None] * px, kept

        _, x, kept = tf.while_loop(lambda i, *_: i < self.num_layers, layer, (tf.constant(0), x, kept))
        return (x, kept.stack()) if keep else x

    def _transpose_layer(self, w, inverse_perms, i, y):
        """y ↦ y + P_iᵀ(w_i ⊙ y), the transpose of layer i."""
        w_i = tf.gather(w, i, axis=1)[..., None]
        return y + bp._permute(w_i * y, bp.flat_indices(tf.gather(inverse_perms, i, axis=1)))

    def _transpose(self, w, inverse_perms, y):
        """y ↦ Rᵀ y: the layers' transposes from N down to 1."""
        def layer(i, y):
            return i - 1, self._transpose_layer(w, inverse_perms, i, y)

        return tf.while_loop(lambda i, _: i >= 0, layer, (tf.constant(self.num_layers - 1), y))[1]

    def apply(self, weights, constants, alpha, v):
        d, w = weights
        perms, inverse_perms = constants
        x, columns = _columns(v)
        n = x.shape[1]
        y = d[..., None] * self._forward(w, perms, bp.pad(x, 2 * n))
        y = seedwise(alpha, 3) * self._transpose(w, inverse_perms, y)[:, :n]
        return y if columns else y[..., 0]

    def hypergradient(self, weights, constants, alpha, m, g):
        """A hand-written VJP: autodiff would turn every gather into a scatter.

        ⟨G m, g⟩ = α0 ⟨D R m̃, R g̃⟩, so m̃ and g̃ go through R together; the
        cotangent at R's output is D ⊙ (the other path's output), and layer i
        collects cotangent ⊙ P_i a_{i−1} over both paths.
        """
        d, w = weights
        perms, inverse_perms = constants
        out, inputs = self._forward(w, perms, bp.pad(tf.stack([m, g], axis=-1), 2 * m.shape[-1]), keep=True)
        grad_d = -seedwise(alpha, 2) * out[..., 0] * out[..., 1]

        def layer(i, cot, grads):
            grads = grads.write(i, -seedwise(alpha, 2) * tf.reduce_sum(cot * inputs[i], axis=-1))
            # Moves the cotangent to layer i's input (once too often, after layer 1: cheaper than a branch).
            return i - 1, self._transpose_layer(w, inverse_perms, i, cot), grads

        grads = tf.TensorArray(m.dtype, size=self.num_layers, element_shape=d.shape)
        cot = d[..., None] * tf.reverse(out, axis=[-1])
        _, _, grads = tf.while_loop(lambda i, *_: i >= 0, layer, (tf.constant(self.num_layers - 1), cot, grads))
        return grad_d, tf.transpose(grads.stack(), [1, 0, 2])

"""LODO's preconditioners G(φ) (SPEC §1.2, §1.3) as pure TensorFlow, behind one interface.

Every preconditioner is a frozen dataclass whose fields are its own hyperparameters (the
Keras optimizers serialize them) and that plugs into ``lodo.algorithm.update``:

- ``init(n, seeds, dtype) -> (weights, constants)``: the learned tensors φ and the fixed ones
  (permutations), each with a leading axis of independent seeds S.
- ``apply(weights, constants, alpha, v)``: G(φ)·v for ``[S, n]`` vectors or ``[S, n, W]`` column
  blocks (the engine's Hessian-error diagnostic passes ``[S, n, n]``).
- ``hypergradient(weights, constants, alpha, m, g)``: −(∂[G(φ)m]/∂φ)ᵀ g, one tensor per weight.
- ``per_seed_alpha``: whether ``alpha`` may be one value per seed (``[S]``). ``algorithm.update``
  runs a preconditioner without it at α0 = 1 and scales its outputs per seed instead.

``BlockPermutation`` is LODO's own G = α0·G̃ᵀG̃ with G̃ = B_N P_N ⋯ B_1 P_1 I_pad: a deep,
sparse linear network. Each layer gathers the padded vector through a fixed random
permutation, then multiplies every k-slice by its own k×k block; nothing of size n×n is ever
built, so applying G costs O(N·ñ·k). ``Diagonal``, ``Global`` and ``Residual`` are the
ablations' preconditioners.

Vectors inside the networks are laid out as ``[S, ñ, W]``: W columns that share the same
network (W = 2 lets a hypergradient push m and g through together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import tensorflow as tf

from lodo.meta_optimizers import seedwise

# Seeds index several independent random streams; this one draws the preconditioners' own
# permutations and initial weights, so they do not depend on the task's draws.
RNG_STREAM = 0x10D0


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def as_columns(v: tf.Tensor) -> tuple[tf.Tensor, bool]:
    """``[S, n]`` or ``[S, n, W]`` → ``([S, n, W], was_columns)``."""
    columns = v.shape.rank == 3
    return (v if columns else v[..., None]), columns


# --- the block-permutation network G̃ ----------------------------------------------------------

def padded_size(n: int, block_size: int) -> int:
    """ñ: the next multiple of ``block_size`` strictly above 2n (SPEC §1.2)."""
    if n < 1:
        raise ValueError(f"LODO needs at least one parameter, got n={n}")
    return 2 * n + block_size - (2 * n) % block_size


def random_orthogonal_blocks(rng: np.random.Generator, count: int, k: int) -> np.ndarray:
    """``count`` Haar-random k×k orthogonal matrices (QR with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((count, k, k)))
    signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
    signs[signs == 0] = 1.0
    return q * signs[:, None, :]


@dataclass(frozen=True)
class BlockNetwork:
    """Static shape of one G̃: n inputs, N layers of ñ/k blocks of size k."""

    n: int
    num_layers: int = 16
    block_size: int = 4

    def __post_init__(self):
        for name in ("num_layers", "block_size"):
            _check_positive_int(f"LODO {name}", getattr(self, name))

    @property
    def padded(self) -> int:
        return padded_size(self.n, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.padded // self.block_size

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
        """One seed's permutations ``[N, ñ]`` (int32) and initial blocks (N × ``[ñ/k, k, k]``).

        Orthogonal blocks make G̃ᵀG̃ = I, so G(φ0) = α0·I exactly.
        """
        perms = np.stack([rng.permutation(self.padded) for _ in range(self.num_layers)])
        blocks = [
            random_orthogonal_blocks(rng, self.num_blocks, self.block_size)
            for _ in range(self.num_layers)
        ]
        return perms.astype(np.int32), blocks

    def stream(self, rng: np.random.Generator, dtype=np.float64, chunk: int = 1 << 16):
        """The draws of ``draw``, one layer at a time: yields ``("perm", i, [ñ] int32)`` for every
        layer, then ``("blocks", i, [ñ/k, k, k] dtype)``.

        Same generator calls in the same order, so the same numbers; the blocks are drawn
        ``chunk`` at a time (a normal stream and a batched QR do not depend on how they are
        split), so at most one layer in ``dtype`` and one float64 chunk exist at once, which
        matters when a layer holds 10⁸ entries.
        """
        for i in range(self.num_layers):
            yield "perm", i, rng.permutation(self.padded).astype(np.int32)
        for i in range(self.num_layers):
            out = np.empty((self.num_blocks, self.block_size, self.block_size), dtype)
            for start in range(0, self.num_blocks, chunk):
                count = min(chunk, self.num_blocks - start)
                out[start:start + count] = random_orthogonal_blocks(rng, count, self.block_size)
            yield "blocks", i, out


def inverse_permutations(perms: np.ndarray) -> np.ndarray:
    """Inverses along the last axis, so Pᵀx is also a gather."""
    return np.argsort(perms, axis=-1).astype(perms.dtype)


def flat_indices(perms: tf.Tensor) -> tf.Tensor:
    """``[S, ñ]`` per-seed permutations → one ``[S·ñ]`` index into the flattened batch.

    One flat gather over all seeds is much cheaper than S small ones.
    """
    num_seeds, padded = tf.shape(perms)[0], tf.shape(perms)[1]
    offsets = tf.range(num_seeds, dtype=perms.dtype)[:, None] * tf.cast(padded, perms.dtype)
    return tf.reshape(perms + offsets, [-1])


def permute(x: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """P x for every seed at once: ``x [S, ñ, W]`` gathered along ñ by a ``flat_indices`` index."""
    shape = tf.shape(x)
    rows = tf.reshape(x, [shape[0] * shape[1], shape[2]])
    return tf.reshape(tf.gather(rows, index), shape)


def blocks_times(block: tf.Tensor, x: tf.Tensor, transpose: bool = False) -> tf.Tensor:
    """Block-diagonal product B·x (or Bᵀ·x); block ``[S, ñ/k, k, k]``, x ``[S, ñ, W]``.

    Written as broadcast-multiply-and-sum rather than a batched matmul: for
    k = 4 that fuses into one loop, where a matmul would be ñ/k tiny calls.
    """
    s, b, k = tf.shape(block)[0], tf.shape(block)[1], tf.shape(block)[2]
    xb = tf.reshape(x, [s, b, 1, k, -1]) if not transpose else tf.reshape(x, [s, b, k, 1, -1])
    if not transpose:
        out = tf.reduce_sum(block[..., None] * xb, axis=3)  # Σ_j B[a, j] x[j]
    else:
        out = tf.reduce_sum(block[..., None] * xb, axis=2)  # Σ_a B[a, j] x[a]
    return tf.reshape(out, tf.shape(x))


def pad(v: tf.Tensor, padded: int) -> tf.Tensor:
    """I_{ñ×n}: ``[S, n, W]`` → ``[S, ñ, W]`` with zeros below."""
    return tf.pad(v, [[0, 0], [0, padded - v.shape[1]], [0, 0]])


def network_forward(blocks: Sequence[tf.Tensor], perms: tf.Tensor, x: tf.Tensor, keep: bool = False):
    """x ↦ G̃'s trunk B_N P_N ⋯ B_1 P_1 x on padded ``[S, ñ, W]`` vectors.

    With ``keep``, also returns each layer's permuted input P_i a_{i-1}, the
    factors the hypergradient needs.
    """
    inputs = []
    for i, block in enumerate(blocks):
        x = permute(x, flat_indices(perms[:, i]))
        if keep:
            inputs.append(x)
        x = blocks_times(block, x)
    return (x, inputs) if keep else x


def network_transpose(blocks: Sequence[tf.Tensor], inverse_perms: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """y ↦ P_1ᵀ B_1ᵀ ⋯ P_Nᵀ B_Nᵀ y (the trunk's transpose) on ``[S, ñ, W]``."""
    for i in reversed(range(len(blocks))):
        y = blocks_times(blocks[i], y, transpose=True)
        y = permute(y, flat_indices(inverse_perms[:, i]))
    return y


def dense_matrix(blocks, perms, alpha, n: int) -> np.ndarray:
    """G as a dense ``[S, n, n]`` NumPy array, built independently of ``BlockPermutation.apply``.

    Only for tests and diagnostics on small n: it forms each layer's ñ×ñ
    matrix explicitly.
    """
    blocks = [np.asarray(b) for b in blocks]
    perms = np.asarray(perms)
    num_seeds, num_layers, padded = perms.shape
    out = np.empty((num_seeds, n, n))
    for s in range(num_seeds):
        a = np.eye(padded)[:, :n]
        for i in range(num_layers):
            p = np.eye(padded)[perms[s, i]]
            bdiag = np.zeros((padded, padded))
            k = blocks[i].shape[-1]
            for j, blk in enumerate(blocks[i][s]):
                bdiag[j * k:(j + 1) * k, j * k:(j + 1) * k] = blk
            a = bdiag @ p @ a
        out[s] = float(alpha) * a.T @ a
    return out


# --- the preconditioners ---------------------------------------------------------------------

@dataclass(frozen=True)
class BlockPermutation:
    """LODO's G(φ) = α0 G̃ᵀG̃ with G̃ = B_N P_N ⋯ B_1 P_1 I_pad (Equation 2).

    Weights are the N layers' blocks ``[S, ñ/k, k, k]``, initialized orthogonal (G(φ0) = α0·I);
    constants are the permutations ``[S, N, ñ]`` and their inverses.
    """

    # The fields are hyperparameters of the optimizers built on this preconditioner; "doc" describes them there.
    num_layers: int = field(default=16, metadata={"doc": "N, the number of block-permutation layers of G̃ (Eq. 2)."})
    block_size: int = field(default=4, metadata={"doc": "k, the size of G̃'s blocks (ñ is a multiple of k)."})
    per_seed_alpha = False  # a class attribute, not a field: α0 is applied as one scalar

    def __post_init__(self):
        self.network(1)  # validates num_layers and block_size at construction, not at the first step

    def network(self, n: int) -> BlockNetwork:
        return BlockNetwork(n, self.num_layers, self.block_size)

    def init(self, n: int, seeds: Sequence[int], dtype) -> tuple[tuple, tuple]:
        net = self.network(n)
        draws = [net.draw(np.random.default_rng([int(s), RNG_STREAM])) for s in seeds]
        perms = np.stack([d[0] for d in draws])  # [S, N, ñ]
        weights = tuple(
            tf.constant(np.stack([d[1][i] for d in draws]), dtype=dtype) for i in range(net.num_layers)
        )
        constants = (tf.constant(perms), tf.constant(inverse_permutations(perms)))
        return weights, constants

    def apply(self, weights, constants, alpha, v):
        perms, inverse_perms = constants
        x, columns = as_columns(v)
        n = x.shape[1]
        y = network_transpose(weights, inverse_perms, network_forward(weights, perms, pad(x, int(perms.shape[-1]))))
        y = alpha * y[:, :n]
        return y if columns else y[..., 0]

    def hypergradient(self, weights, constants, alpha, m, g):
        """h = ∂L(θ − G(φ)m)/∂φ given g = ∇L there: −(∂[G(φ)m]/∂φ)ᵀ g, per layer.

        With A = G̃: gᵀ d(α0 AᵀA m) = α0 [(Am)ᵀ dA g + (Ag)ᵀ dA m], so m and g go
        forward together and come back with their outputs swapped as cotangents.
        A layer's block gradient is cotangent ⊗ input, summed over both paths.
        This hand-written VJP avoids the scatter that autodiff through a gather makes.
        """
        perms, inverse_perms = constants
        padded = int(perms.shape[-1])
        x = pad(tf.stack([m, g], axis=-1), padded)
        out, inputs = network_forward(weights, perms, x, keep=True)
        cot = tf.reverse(out, axis=[-1])  # cotangent of the m path is Ag, of the g path Am
        grads = [None] * len(weights)
        for i in reversed(range(len(weights))):
            s, b, k = tf.shape(weights[i])[0], tf.shape(weights[i])[1], tf.shape(weights[i])[2]
            c = tf.reshape(cot, [s, b, k, 1, -1])
            p = tf.reshape(inputs[i], [s, b, 1, k, -1])
            grads[i] = -alpha * tf.reduce_sum(c * p, axis=-1)
            if i > 0:
                cot = permute(blocks_times(weights[i], cot, transpose=True), flat_indices(inverse_perms[:, i]))
        return tuple(grads)


@dataclass(frozen=True)
class Diagonal:
    """LODO-Diagonal's G = α0·diag(φ), φ ∈ Rⁿ initialized to ones (an Amid et al. 2022 style diagonal)."""

    per_seed_alpha = True

    def init(self, n: int, seeds: Sequence[int], dtype):
        return (tf.ones([len(seeds), n], dtype),), ()

    def apply(self, weights, constants, alpha, v):
        x, columns = as_columns(v)
        y = seedwise(alpha, 3) * weights[0][..., None] * x
        return y if columns else y[..., 0]

    def hypergradient(self, weights, constants, alpha, m, g):
        # G m = α0 φ ⊙ m, so ∂⟨G m, −g⟩/∂φ = −α0 m ⊙ g.
        return (-seedwise(alpha, 2) * m * g,)


@dataclass(frozen=True)
class Global:
    """LODO-Global's G = α0·φ·I, one scalar φ per seed initialized to 1 (Baydin et al. 2017's hypergradient
    descent)."""

    per_seed_alpha = True

    def init(self, n: int, seeds: Sequence[int], dtype):
        return (tf.ones([len(seeds), 1], dtype),), ()

    def apply(self, weights, constants, alpha, v):
        x, columns = as_columns(v)
        y = seedwise(alpha, 3) * weights[0][..., None] * x
        return y if columns else y[..., 0]

    def hypergradient(self, weights, constants, alpha, m, g):
        return (-seedwise(alpha, 2) * tf.reduce_sum(m * g, axis=-1, keepdims=True),)


@dataclass(frozen=True)
class Residual:
    """LODO-Residuals' G = α0·I_{n×ñ} Rᵀ D R I_{ñ×n}, R = (I + diag(w_N) P_N) ⋯ (I + diag(w_1) P_1), ñ = 2n.

    Weights are ``(D [S, ñ], w [S, N, ñ])``; constants are the permutations
    ``[S, N, ñ]`` and their inverses. D starts at ones and w_i ~ N(0, 1/N).

    The layers run in ``tf.while_loop``s rather than unrolled: every layer
    reads its input twice (x and P_i x), and XLA fuses unrolled elementwise
    layers into the next gathers, recomputing earlier layers per element
    (64 unrolled layers ran ~50x slower). A loop body also compiles once.
    """

    num_layers: int = field(default=64, metadata={"doc": "N, the number of residual permutation layers of R."})
    per_seed_alpha = True  # a class attribute, not a field

    def __post_init__(self):
        _check_positive_int("LODO-Residuals num_layers", self.num_layers)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One seed's permutations ``[N, 2n]`` and initial residual weights ``[N, 2n]``."""
        padded = 2 * n
        perms = np.stack([rng.permutation(padded) for _ in range(self.num_layers)]).astype(np.int32)
        w = rng.standard_normal((self.num_layers, padded)) / np.sqrt(self.num_layers)
        return perms, w

    def init(self, n: int, seeds: Sequence[int], dtype):
        # Each seed has its own generator, so its draws do not depend on the other seeds.
        draws = [self.draw(n, np.random.default_rng([int(s), RNG_STREAM])) for s in seeds]
        perms = np.stack([d[0] for d in draws])
        w = tf.constant(np.stack([d[1] for d in draws]), dtype=dtype)
        weights = (tf.ones([len(seeds), 2 * n], dtype), w)
        return weights, (tf.constant(perms), tf.constant(inverse_permutations(perms)))

    def _forward(self, w, perms, x, keep=False):
        """x ↦ R x on ``[S, ñ, W]``; with ``keep`` also each layer's P_i a_{i−1}, stacked ``[N, S, ñ, W]``."""
        kept = tf.TensorArray(x.dtype, size=self.num_layers if keep else 0, element_shape=x.shape)

        def layer(i, x, kept):
            px = permute(x, flat_indices(tf.gather(perms, i, axis=1)))  # one gather over all seeds
            if keep:
                kept = kept.write(i, px)
            return i + 1, x + tf.gather(w, i, axis=1)[..., None] * px, kept

        _, x, kept = tf.while_loop(lambda i, *_: i < self.num_layers, layer, (tf.constant(0), x, kept))
        return (x, kept.stack()) if keep else x

    def _transpose_layer(self, w, inverse_perms, i, y):
        """y ↦ y + P_iᵀ(w_i ⊙ y), the transpose of layer i."""
        w_i = tf.gather(w, i, axis=1)[..., None]
        return y + permute(w_i * y, flat_indices(tf.gather(inverse_perms, i, axis=1)))

    def _transpose(self, w, inverse_perms, y):
        """y ↦ Rᵀ y: the layers' transposes from N down to 1."""
        def layer(i, y):
            return i - 1, self._transpose_layer(w, inverse_perms, i, y)

        return tf.while_loop(lambda i, _: i >= 0, layer, (tf.constant(self.num_layers - 1), y))[1]

    def apply(self, weights, constants, alpha, v):
        d, w = weights
        perms, inverse_perms = constants
        x, columns = as_columns(v)
        n = x.shape[1]
        y = d[..., None] * self._forward(w, perms, pad(x, 2 * n))
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
        out, inputs = self._forward(w, perms, pad(tf.stack([m, g], axis=-1), 2 * m.shape[-1]), keep=True)
        grad_d = -seedwise(alpha, 2) * out[..., 0] * out[..., 1]

        def layer(i, cot, grads):
            grads = grads.write(i, -seedwise(alpha, 2) * tf.reduce_sum(cot * inputs[i], axis=-1))
            # Moves the cotangent to layer i's input (once too often, after layer 1: cheaper than a branch).
            return i - 1, self._transpose_layer(w, inverse_perms, i, cot), grads

        grads = tf.TensorArray(m.dtype, size=self.num_layers, element_shape=d.shape)
        cot = d[..., None] * tf.reverse(out, axis=[-1])
        _, _, grads = tf.while_loop(lambda i, *_: i >= 0, layer, (tf.constant(self.num_layers - 1), cot, grads))
        return grad_d, tf.transpose(grads.stack(), [1, 0, 2])

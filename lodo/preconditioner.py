"""LODO's preconditioner G(φ) = α0·G̃(φ)ᵀG̃(φ) (SPEC §1.2) as pure TensorFlow functions.

G̃ = B_N P_N ⋯ B_1 P_1 I_pad is a deep, sparse linear network: each layer gathers
the padded vector through a fixed random permutation, then multiplies every
k-slice by its own k×k block. Nothing of size n×n is ever built, so applying G
costs O(N·ñ·k) time and memory.

Every function works on a leading axis of independent seeds ``S`` (S = 1 for a
single model) so that the multi-seed engine and the Keras optimizer share one
implementation. Vectors are laid out as ``[S, ñ, W]``: W columns that share
the same network (W = 2 lets the hypergradient push m and g through together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf


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
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LODO {name} must be a positive integer, got {value!r}")

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


def _permute(x: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(x)
    rows = tf.reshape(x, [shape[0] * shape[1], shape[2]])
    return tf.reshape(tf.gather(rows, index), shape)


def _blocks_times(block: tf.Tensor, x: tf.Tensor, transpose: bool = False) -> tf.Tensor:
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
        x = _permute(x, flat_indices(perms[:, i]))
        if keep:
            inputs.append(x)
        x = _blocks_times(block, x)
    return (x, inputs) if keep else x


def network_transpose(blocks: Sequence[tf.Tensor], inverse_perms: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """y ↦ P_1ᵀ B_1ᵀ ⋯ P_Nᵀ B_Nᵀ y (the trunk's transpose) on ``[S, ñ, W]``."""
    for i in reversed(range(len(blocks))):
        y = _blocks_times(blocks[i], y, transpose=True)
        y = _permute(y, flat_indices(inverse_perms[:, i]))
    return y


def apply(blocks, perms, inverse_perms, alpha, v: tf.Tensor) -> tf.Tensor:
    """G(φ)·v = α0·I_{n×ñ} G̃ᵀ G̃ I_{ñ×n} v for ``v`` of shape ``[S, n]`` or ``[S, n, W]``."""
    columns = v.shape.rank == 3
    x = v if columns else v[..., None]
    n = x.shape[1]
    y = network_transpose(blocks, inverse_perms, network_forward(blocks, perms, pad(x, int(perms.shape[-1]))))
    y = alpha * y[:, :n]
    return y if columns else y[..., 0]


def hypergradient(blocks, perms, inverse_perms, alpha, m: tf.Tensor, g: tf.Tensor) -> list[tf.Tensor]:
    """h = ∂L(θ − G(φ)m)/∂φ given g = ∇L there: −(∂[G(φ)m]/∂φ)ᵀ g, per layer.

    With A = G̃: gᵀ d(α0 AᵀA m) = α0 [(Am)ᵀ dA g + (Ag)ᵀ dA m], so m and g go
    forward together and come back with their outputs swapped as cotangents.
    A layer's block gradient is cotangent ⊗ input, summed over both paths.
    This hand-written VJP avoids the scatter that autodiff through a gather makes.
    """
    padded = int(perms.shape[-1])
    x = pad(tf.stack([m, g], axis=-1), padded)
    out, inputs = network_forward(blocks, perms, x, keep=True)
    cot = tf.reverse(out, axis=[-1])  # cotangent of the m path is Ag, of the g path Am
    grads = [None] * len(blocks)
    for i in reversed(range(len(blocks))):
        s, b, k = tf.shape(blocks[i])[0], tf.shape(blocks[i])[1], tf.shape(blocks[i])[2]
        c = tf.reshape(cot, [s, b, k, 1, -1])
        p = tf.reshape(inputs[i], [s, b, 1, k, -1])
        grads[i] = -alpha * tf.reduce_sum(c * p, axis=-1)
        if i > 0:
            cot = _permute(_blocks_times(blocks[i], cot, transpose=True), flat_indices(inverse_perms[:, i]))
    return grads


def dense_matrix(blocks, perms, alpha, n: int) -> np.ndarray:
    """G as a dense ``[S, n, n]`` NumPy array, built independently of ``apply``.

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


"""Optimizers of LODO's own weights φ, as (init, update) pairs over tuples of tensors.

φ lives inside the optimizer state rather than in Keras variables, so its
optimizer is written functionally; the Adam here follows Keras's update
formula term for term (tested against ``keras.optimizers.Adam``).
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf


def scalar(value, dtype) -> tf.Tensor:
    """``value`` in ``dtype``; a Python float goes straight in (``tf.cast`` would round it through float32).

    A list or tuple (one value per seed) becomes an ``[S]`` tensor the same way.
    """
    if isinstance(value, (int, float)):
        return tf.constant(value, dtype)
    if isinstance(value, (list, tuple)):
        return tf.constant([float(v) for v in value], dtype)
    return tf.cast(value, dtype)


def seedwise(value, rank: int):
    """A hyperparameter shaped to broadcast against a rank-``rank`` tensor whose leading axis is the seeds.

    Per-seed values ``[S]`` become ``[S, 1, …]``; a scalar (tensor or number)
    is returned as it is, so the scalar path computes exactly what it always did.
    """
    shape = getattr(value, "shape", None)
    if shape is not None and shape.rank == 1:
        return tf.reshape(value, [-1] + [1] * (rank - 1))
    return value


@dataclass(frozen=True)
class Adam:
    learning_rate: float  # or a tuple of S floats, one per seed
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def init(self, params):
        zeros = tuple(tf.zeros_like(p) for p in params)
        return (tf.zeros([], tf.int64), zeros, zeros)

    def update(self, params, grads, state):
        count, ms, vs = state
        count = count + 1
        dtype = params[0].dtype
        t = tf.cast(count, dtype)
        b1, b2 = scalar(self.beta_1, dtype), scalar(self.beta_2, dtype)
        lr = scalar(self.learning_rate, dtype) * tf.sqrt(1 - b2**t) / (1 - b1**t)
        new_params, new_ms, new_vs = [], [], []
        for p, g, m, v in zip(params, grads, ms, vs):
            m = m + (g - m) * (1 - b1)
            v = v + (tf.square(g) - v) * (1 - b2)
            new_params.append(p - m * seedwise(lr, p.shape.rank) / (tf.sqrt(v) + scalar(self.epsilon, dtype)))
            new_ms.append(m)
            new_vs.append(v)
        return tuple(new_params), (count, tuple(new_ms), tuple(new_vs))


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent on φ (the LODO-SGD ablation)."""

    learning_rate: float  # or a tuple of S floats, one per seed

    def init(self, params):
        return ()

    def update(self, params, grads, state):
        lr = scalar(self.learning_rate, params[0].dtype)
        return tuple(p - seedwise(lr, g.shape.rank) * g for p, g in zip(params, grads)), state


@dataclass(frozen=True)
class Frozen:
    """No meta-update: φ stays as it is (the frozen-preconditioner test, SPEC §1.4).

    Not SGD or Adam at learning rate 0: a diverging run's hypergradient overflows to ±inf,
    and 0·inf is nan, which would corrupt φ; this returns φ without touching the hypergradient.
    """

    def init(self, params):
        return ()

    def update(self, params, grads, state):
        return params, state


def make(name: str, learning_rate: float):
    table = {"adam": Adam, "sgd": SGD}
    if name not in table:
        raise ValueError(f"unknown LODO meta-optimizer {name!r}; choose one of {sorted(table)}")
    return table[name](learning_rate)

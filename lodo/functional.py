"""Optimizers as the multi-seed engine sees them.

The engine keeps the parameters of S seeds in one variable ``[S, n]`` and asks
the optimizer to update it in place from the gradient. Everything an
optimizer may ask about the current minibatch beyond that gradient (a second
gradient, the Hessian) goes through the ``Oracle``, so tasks and optimizers
stay independent plug-ins.

Per-seed hyperparameters: an optimizer may take a number hyperparameter as a list of
S numbers, one per seed of the ``[S, n]`` variable; the helpers below read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf


def is_per_seed(value) -> bool:
    """A hyperparameter given as one value per seed (a list or tuple, as Hydra passes ``key=[a,b,…]``)."""
    return isinstance(value, (list, tuple))


def any_per_seed(*values) -> bool:
    return any(is_per_seed(v) for v in values)


def seed_values(value, num_seeds: int, name: str) -> np.ndarray:
    """A hyperparameter as ``[S]`` float64 values: a number repeated, or a per-seed list checked for length."""
    if is_per_seed(value):
        if len(value) != num_seeds:
            raise ValueError(f"optimizer.{name} has {len(value)} values but the run has {num_seeds} seeds: give one "
                             f"value per seed (num_seeds={len(value)}) or a single number")
        values = np.array([float(v) for v in value], dtype=np.float64)
    else:
        values = np.full(num_seeds, float(value), dtype=np.float64)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"optimizer.{name} must be finite, got {value!r}")
    return values


def check_range(name: str, value, low: float, high: float, high_open: bool = True) -> None:
    """Every entry of a number or per-seed list within [low, high) (or [low, high]); else a one-line error."""
    for v in (value if is_per_seed(value) else [value]):
        if not (low <= float(v) < high if high_open else low <= float(v) <= high):
            bound = f"[{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"optimizer.{name} must be in {bound}, got {v!r}")


@dataclass
class Oracle:
    """Questions about the current minibatch, answered per seed."""

    loss_and_grad: Callable  # params [S, n] -> (loss [S], grad [S, n])
    hessian: Callable  # params [S, n] -> [S, n, n]


class EngineOptimizer:
    name = "optimizer"

    def build(self, params: tf.Variable, seeds) -> None:
        raise NotImplementedError

    def step(self, params: tf.Variable, grad: tf.Tensor, oracle: Oracle) -> None:
        raise NotImplementedError

    @property
    def variables(self) -> list:
        return []

    def preconditioner_times(self, matrix: tf.Tensor):
        """G·M for ``M [S, n, W]`` if the optimizer has an explicit inverse-Hessian estimate G."""
        return None


class KerasOptimizer(EngineOptimizer):
    """A Keras optimizer on the ``[S, n]`` variable: exact per seed for element-wise rules."""

    def __init__(self, name: str, optimizer):
        self.name = name
        self.optimizer = optimizer

    def build(self, params, seeds):
        self.optimizer.build([params])

    def step(self, params, grad, oracle):
        self.optimizer.apply([grad], [params])

    @property
    def variables(self):
        return list(self.optimizer.variables)


class PerSeedKeras(EngineOptimizer):
    """One Keras optimizer per seed, each on its own ``[n]`` row: exact per seed for any Keras rule.

    Sharing one Keras optimizer over the ``[S, n]`` variable is exact only for
    element-wise rules: Lamb's trust ratio and LARS's take the norm of the whole
    variable (all seeds), Adafactor factors a 2-D variable's second moment
    across seeds, Muon orthogonalizes the 2-D variable. Here each seed's Keras
    optimizer sees a 1-D variable of its own, as it would in a one-seed run,
    and gets its own values of a per-seed hyperparameter list (a Keras class
    takes only one number per hyperparameter). The rows are copied in and out
    of the engine's variable each step, which costs O(S·n) and leaves the
    engine, its checkpoints and its evaluation unchanged.
    """

    def __init__(self, name: str, make: Callable, hparams: dict):
        self.name = name
        self.make = make
        self.hparams = dict(hparams)
        self.optimizers, self.rows = [], []

    def build(self, params, seeds):
        count = len(seeds)
        per_seed = {k: seed_values(v, count, k).tolist() for k, v in self.hparams.items() if is_per_seed(v)}
        for i in range(count):
            values = {**self.hparams, **{k: v[i] for k, v in per_seed.items()}}
            self.optimizers.append(self.make(**values))
            self.rows.append(tf.Variable(params[i], trainable=False, name=f"seed_{i}"))
            self.optimizers[-1].build([self.rows[-1]])

    def step(self, params, grad, oracle):
        for i, (optimizer, row) in enumerate(zip(self.optimizers, self.rows)):
            row.assign(params[i])
            optimizer.apply([grad[i]], [row])
        params.assign(tf.stack([row.read_value() for row in self.rows]))

    @property
    def variables(self):
        return [v for optimizer in self.optimizers for v in optimizer.variables]


class FunctionalOptimizer(EngineOptimizer):
    """Adapts a pure ``(init, update)`` pair: its explicit state is kept in variables."""

    def __init__(self, name: str, init: Callable, update: Callable):
        self.name = name
        self._init = init
        self._update = update
        self._state = None

    def build(self, params, seeds):
        initial = self._init(params.shape[-1], list(seeds), params.dtype)
        self._treedef = initial
        self._state = [tf.Variable(leaf, trainable=False) for leaf in tf.nest.flatten(initial)]

    def state(self):
        return tf.nest.pack_sequence_as(self._treedef, [v.read_value() for v in self._state])

    def step(self, params, grad, oracle):
        update, state = self._update(self.state(), grad, params, oracle)
        for var, value in zip(self._state, tf.nest.flatten(state)):
            var.assign(value)
        params.assign_sub(update)

    @property
    def variables(self):
        return list(self._state)

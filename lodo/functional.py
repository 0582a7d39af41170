"""Optimizers as the multi-seed engine sees them.

The engine keeps the parameters of S seeds in one variable ``[S, n]`` and asks
the optimizer to update it in place from the gradient. Everything an
optimizer may ask about the current minibatch beyond that gradient (a second
gradient, the Hessian) goes through the ``Oracle``, so tasks and optimizers
stay independent plug-ins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tensorflow as tf


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

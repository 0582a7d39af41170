"""Optimizers by name, as the runner's ``optimizer=`` config group names them.

Adam, Momentum (heavy ball) and RMSprop are Keras's own implementations, run on
the engine's ``[S, n]`` parameter variable; being element-wise, they treat
every seed independently.
"""

from __future__ import annotations

import inspect

import keras

from optimizers.base import EngineOptimizer, FunctionalOptimizer, KerasOptimizer, Oracle
from optimizers.newton import Newton
from lodo.multi_seed import MultiSeedLODO  # noqa: E402  (imports optimizers.base)


def _adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    return KerasOptimizer("adam", keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon))


def _momentum(learning_rate=0.01, momentum=0.9):
    return KerasOptimizer("momentum", keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=False))


def _rmsprop(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7):
    return KerasOptimizer("rmsprop", keras.optimizers.RMSprop(learning_rate, rho=rho, momentum=momentum, epsilon=epsilon))


REGISTRY = {"adam": _adam, "momentum": _momentum, "rmsprop": _rmsprop, "newton": Newton, "lodo": MultiSeedLODO}


def build(name: str, **hparams) -> EngineOptimizer:
    """The engine optimizer ``name`` with the given hyperparameters, or a one-line ValueError."""
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(sorted(REGISTRY))}")
    accepted = inspect.signature(REGISTRY[name]).parameters
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} has no hyperparameter {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )
    for key, value in hparams.items():
        default = accepted[key].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"optimizer.{key} must be a number, got {value!r}")
    return REGISTRY[name](**hparams)


__all__ = ["EngineOptimizer", "FunctionalOptimizer", "KerasOptimizer", "Oracle", "build", "REGISTRY"]

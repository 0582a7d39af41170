"""Optimizers by name, as the runner's ``optimizer=`` config group names them.

The registry maps each config name to ``"module:factory"``; a factory's
keyword arguments are the optimizer's hyperparameters (the keys of its YAML in
``configs/optimizer/``). Modules are imported on first use, so one
optimizer's dependencies never slow down or break another's.
"""

from __future__ import annotations

import importlib
import inspect

from optimizers.base import EngineOptimizer, FunctionalOptimizer, KerasOptimizer, Oracle

REGISTRY = {
    "adam": "optimizers.keras_builtins:adam",
    "momentum": "optimizers.keras_builtins:momentum",
    "momentum_ema": "optimizers.keras_builtins:momentum_ema",
    "rmsprop": "optimizers.keras_builtins:rmsprop",
    "yogi": "optimizers.yogi:engine_yogi",
    "lars": "optimizers.lars:engine_lars",
    "lbfgs": "optimizers.lbfgs:LBFGS",
    "olbfgs": "optimizers.lbfgs:OLBFGS",
    "bfgs": "optimizers.bfgs:BFGS",
    "levenberg_marquardt": "optimizers.levenberg_marquardt:LevenbergMarquardt",
    "newton": "optimizers.newton:Newton",
    "l2lbgdbgd": "optimizers.l2lbgdbgd:L2LBGDBGD",
    "lodo": "lodo.multi_seed:MultiSeedLODO",
    "lodo_diagonal": "lodo.multi_seed:MultiSeedLODODiagonal",
    "lodo_global": "lodo.multi_seed:MultiSeedLODOGlobal",
    "lodo_residuals": "lodo.multi_seed:MultiSeedLODOResiduals",
    "lodo_no_momentum": "lodo.multi_seed:MultiSeedLODONoMomentum",
    "lodo_sgd": "lodo.multi_seed:MultiSeedLODOSGD",
}


def factory(name: str):
    """The callable that builds optimizer ``name``, or a one-line ValueError listing valid names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(sorted(REGISTRY))}")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build(name: str, **hparams) -> EngineOptimizer:
    """The engine optimizer ``name`` with the given hyperparameters, or a one-line ValueError."""
    make = factory(name)
    accepted = inspect.signature(make).parameters
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
    return make(**hparams)


# The Keras optimizers this package adds, for ``from optimizers import Yogi, LARS``
# (imported on first access, like the registry's modules).
KERAS_OPTIMIZERS = {"Yogi": "optimizers.yogi", "LARS": "optimizers.lars"}


def __getattr__(name):
    if name in KERAS_OPTIMIZERS:
        return getattr(importlib.import_module(KERAS_OPTIMIZERS[name]), name)
    raise AttributeError(f"module 'optimizers' has no attribute {name!r}")


__all__ = ["EngineOptimizer", "FunctionalOptimizer", "KerasOptimizer", "Oracle", "build", "factory", "REGISTRY",
           *KERAS_OPTIMIZERS]

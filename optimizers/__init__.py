"""Optimizers by name, as the runner's ``optimizer=`` config group names them.

The registry maps each config name to ``"module:factory"``; a factory's
keyword arguments are the optimizer's hyperparameters (the keys of its YAML in
``configs/optimizer/``). Modules are imported on first use, so one
optimizer's dependencies never slow down or break another's.

Per-seed hyperparameters: the optimizers in ``PER_SEED`` also take a number
hyperparameter as a list of S numbers (one per seed of the engine's ``[S, n]``
variable), so one compiled program can train S different settings at once
(the genetic tuner runs a whole generation this way). Seed i then follows
exactly the trajectory of a scalar run with the i-th values.
"""

from __future__ import annotations

import importlib
import inspect

from lodo.functional import EngineOptimizer, FunctionalOptimizer, KerasOptimizer, Oracle, is_per_seed

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
    """The engine optimizer ``name`` with the given hyperparameters, or a one-line ValueError.

    A ``tune`` entry (an optimizer config's search space for the genetic
    tuner) is not a hyperparameter and is left out, so a config group can be
    passed whole.
    """
    hparams.pop("tune", None)
    make = factory(name)
    check_hyperparameters(name, hparams, inspect.signature(make).parameters, per_seed=True)
    return make(**hparams)


def check_hyperparameters(name: str, hparams: dict, parameters, per_seed: bool = False) -> None:
    """One-line ValueError for a hyperparameter ``name``'s factory lacks, or a non-number where it wants one.

    ``parameters``: the factory's signature parameters (the hyperparameters it
    takes). With ``per_seed``, a float hyperparameter may also be a list of
    numbers, one per seed, for the optimizers in ``PER_SEED``.
    """
    unknown = sorted(set(hparams) - set(parameters))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} has no hyperparameter {', '.join(unknown)}; it takes: {', '.join(parameters)}"
        )
    for key, value in hparams.items():
        default = parameters[key].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if per_seed and is_per_seed(value) and isinstance(default, float):
                if name not in PER_SEED:
                    raise ValueError(f"optimizer.{key} must be one number: {name!r} takes no per-seed lists "
                                     f"(those that do: {', '.join(sorted(PER_SEED))})")
                if not value or not all(_is_number(v) for v in value):
                    raise ValueError(f"optimizer.{key} must be a number or a non-empty list of numbers (one per "
                                     f"seed), got {value!r}")
            elif not _is_number(value):
                raise ValueError(f"optimizer.{key} must be a number, got {value!r}")


# Optimizers whose float hyperparameters may be per-seed lists.
PER_SEED = frozenset({"adam", "momentum", "momentum_ema", "rmsprop", "yogi", "lbfgs", "olbfgs", "lodo",
                      "lodo_diagonal", "lodo_global", "lodo_residuals", "lodo_no_momentum", "lodo_sgd"})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The Keras optimizers this package adds, for ``from optimizers import Yogi, LARS``
# (imported on first access, like the registry's modules).
KERAS_OPTIMIZERS = {"Yogi": "optimizers.yogi", "LARS": "optimizers.lars"}


def __getattr__(name):
    if name in KERAS_OPTIMIZERS:
        return getattr(importlib.import_module(KERAS_OPTIMIZERS[name]), name)
    raise AttributeError(f"module 'optimizers' has no attribute {name!r}")


__all__ = ["EngineOptimizer", "FunctionalOptimizer", "KerasOptimizer", "Oracle", "build", "factory", "REGISTRY",
           "PER_SEED", *KERAS_OPTIMIZERS]

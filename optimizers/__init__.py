"""The baselines: engine (multi-seed) forms and Keras optimizers that ``lodo`` does not provide.

Each optimizer is a module here and a YAML in ``configs/optimizer/`` that names its
factories (``lodo.experiment.registry`` reads them); there is no list to edit.

Per-seed hyperparameters: an optimizer whose YAML says ``per_seed: true`` also takes a
number hyperparameter as a list of S numbers (one per seed of the engine's ``[S, n]``
variable), so one compiled program can train S different settings at once (the
genetic tuner runs a whole generation this way). Seed i then follows exactly the
trajectory of a scalar run with the i-th values.
"""

from __future__ import annotations

import importlib
import math

import numpy as np


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


# The Keras optimizers this package adds, for ``from optimizers import Yogi, LARS``
# (imported on first access, like the registry's modules).
KERAS_OPTIMIZERS = {"Yogi": "optimizers.yogi", "LARS": "optimizers.lars"}


def __getattr__(name):
    if name in KERAS_OPTIMIZERS:
        return getattr(importlib.import_module(KERAS_OPTIMIZERS[name]), name)
    raise AttributeError(f"module 'optimizers' has no attribute {name!r}")


__all__ = ["is_per_seed", "seed_values", *KERAS_OPTIMIZERS]

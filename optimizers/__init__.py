"""The baselines: engine (multi-seed) forms and Keras optimizers that ``lodo`` does not provide.

Each optimizer is a module here and a YAML in ``configs/optimizer/`` that names its
factories (``lodo.experiment.registry`` reads them); there is no list to edit.

Per-seed hyperparameters: an optimizer whose YAML says ``per_seed: true`` also takes a
number hyperparameter as a list of S numbers (one per seed of the engine's ``[S, n]``
variable), so one compiled program can train S different settings at once (the
genetic tuner runs a whole generation this way). Seed i then follows exactly the
trajectory of a scalar run with the i-th values. ``lodo.functional`` has the helpers
that read such values (``is_per_seed``, ``seed_values``, …).
"""

from __future__ import annotations

import importlib

# The Keras optimizers this package adds, for ``from optimizers import Yogi, LARS``
# (imported on first access, like the registry's modules).
KERAS_OPTIMIZERS = {"Yogi": "optimizers.yogi", "LARS": "optimizers.lars", "PSGDKron": "optimizers.psgd_kron", "SOAP": "optimizers.soap"}


def __getattr__(name):
    if name in KERAS_OPTIMIZERS:
        return getattr(importlib.import_module(KERAS_OPTIMIZERS[name]), name)
    raise AttributeError(f"module 'optimizers' has no attribute {name!r}")


__all__ = [*KERAS_OPTIMIZERS]

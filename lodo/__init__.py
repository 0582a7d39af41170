"""LODO: learning to optimize during optimization.

``LODO`` is the Keras optimizer and the ``LODO*`` classes its ablations
(SPEC §1.3); ``lodo.algorithm`` holds the same update as pure functions over
explicit, multi-seed state.

The Keras classes are imported on first access, so ``python -m lodo.run``
and ``python -m lodo.experiment.aggregate`` can reject bad input before paying for
TensorFlow's import.
"""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["LODO", "LODODiagonal", "LODOGlobal", "LODOResiduals", "LODONoMomentum", "LODOSGD"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("lodo.keras_optimizer"), name)
    raise AttributeError(f"module 'lodo' has no attribute {name!r}")

"""LODO: learning to optimize during optimization.

``LODO`` is the Keras optimizer and the ``LODO*`` classes its ablations
(SPEC §1.3), one per row of ``lodo.variants.VARIANTS``; ``lodo.algorithm`` holds
the same update as pure functions over explicit, multi-seed state, and
``lodo.preconditioners`` the preconditioners G(φ) it can use.

The Keras classes (and ``__all__``, their names) are looked up in
``lodo.keras_optimizer`` on first access, so ``python -m lodo.run`` and
``python -m lodo.experiment.aggregate`` can reject bad input before paying for
TensorFlow's import.
"""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def __getattr__(name):
    if name == "__all__" or name.startswith("LODO"):
        keras_optimizer = importlib.import_module("lodo.keras_optimizer")
        if name == "__all__":
            return keras_optimizer.__all__
        if name in keras_optimizer.__all__:
            return getattr(keras_optimizer, name)
    raise AttributeError(f"module 'lodo' has no attribute {name!r}")

"""LODO: learning to optimize during optimization.

``LODO`` is the Keras optimizer; ``lodo.algorithm`` holds the same update as
pure functions over explicit, multi-seed state.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lodo.keras_optimizer import LODO  # noqa: E402

__all__ = ["LODO"]

"""LODO: learning to optimize during optimization.

``LODO`` is the Keras optimizer and the ``LODO*`` classes its ablations
(SPEC §1.3); ``lodo.algorithm`` holds the same update as pure functions over
explicit, multi-seed state.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lodo.keras_optimizer import (  # noqa: E402
    LODO,
    LODOSGD,
    LODODiagonal,
    LODOGlobal,
    LODONoMomentum,
    LODOResiduals,
)

__all__ = ["LODO", "LODODiagonal", "LODOGlobal", "LODOResiduals", "LODONoMomentum", "LODOSGD"]

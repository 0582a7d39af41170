"""Fixtures shared by the test files."""

import keras
import pytest


@pytest.fixture
def float64_keras():
    """Keras layers and optimizer variables in float64, for comparisons with NumPy at 1e-9.

    Both settings are needed: once any layer has been built, Keras caches a
    global dtype policy, which ``set_floatx`` alone no longer changes.
    """
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)

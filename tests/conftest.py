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


def pytest_collection_modifyitems(items):
    """The longest work first. ``make test`` runs pytest-xdist with ``--dist loadgroup``: a test is handed to
    the next free worker, except that a module marked ``xdist_group`` (one whose module fixture runs many
    subprocesses) goes to one worker whole. Started last, such a module, or any slow test, would keep one
    core busy while the other idles."""
    def weight(item):
        return (item.get_closest_marker("xdist_group") is None, item.get_closest_marker("slow") is None)

    items.sort(key=weight)  # stable: within each kind, the collection order

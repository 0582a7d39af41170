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
    """Files with the most slow tests first: pytest-xdist (``--dist loadfile``) hands out whole files in
    collection order, and a long file started last would keep one core busy while the other idles."""
    slow = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    first_seen = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))

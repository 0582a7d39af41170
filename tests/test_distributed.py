"""LODO under MirroredStrategy on 2 logical CPUs equals one device, and replicas stay identical."""

import two_devices

SCRIPT = """
from lodo import LODO
from two_devices import compare_fit

r = compare_fit(lambda: LODO(initial_lr=0.05, meta_lr=0.01, beta=0.5, seed=2), batch_size=64, epochs=6)
print(f"RESULT moved={r['moved']} gap={r['gap']} drift={r['drift']}")
"""


def test_mirrored_lodo_matches_single_device_and_replicas_agree():
    (values,) = two_devices.run(SCRIPT)
    assert float(values["moved"]) > 1e-3  # training changed the weights
    assert float(values["gap"]) < 1e-5  # float32 all-reduce vs single-device sum
    assert float(values["drift"]) == 0.0  # every replica holds the same LODO state

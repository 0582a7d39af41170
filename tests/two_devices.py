"""What the MirroredStrategy tests share: a fresh process with the CPU split into 2 logical devices.

Logical devices must be configured before TensorFlow starts its runtime,
which the test process has already done, so each check runs a script in a
subprocess. The script prints ``RESULT [label] key=value ...`` lines;
``run`` returns them parsed. ``compare_fit`` (imported by those scripts) is
the comparison they make: ``model.fit`` on one device against the same fit
under ``MirroredStrategy``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""


def run(script: str, *args: str) -> list[dict]:
    """Run ``script`` on 2 logical CPUs; each RESULT line as a dict (``label`` for a bare word)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "TF_CPP_MIN_LOG_LEVEL": "3"}  # tests' helper modules
    out = subprocess.run([sys.executable, "-c", PRELUDE + script, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = []
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            items = line.split()[1:]
            result = dict(item.split("=", 1) for item in items if "=" in item)
            result.update({"label": item for item in items if "=" not in item})
            results.append(result)
    assert results, out.stdout[-3000:]
    return results


def replica_drift(optimizer) -> float:
    """Largest difference between the two replicas' copies of any optimizer variable."""
    import numpy as np

    return max(np.abs(v.value.values[0].numpy() - v.value.values[1].numpy()).max() for v in optimizer.variables)


def compare_fit(make_optimizer, *, batch_size: int, epochs: int) -> dict:
    """Fit a small regression model with ``make_optimizer()`` on one device and under MirroredStrategy.

    ``moved``: how far training moved the weights; ``gap``: largest weight
    difference between the two fits; ``drift``: see ``replica_drift``.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    x = np.random.default_rng(0).standard_normal((64, 6)).astype("float32")
    y = (x @ np.linspace(-1, 1, 6)[:, None]).astype("float32")

    def make():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        model.compile(optimizer=make_optimizer(), loss="mse")
        return model

    single = make()
    single.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        mirrored = make()
    mirrored.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return {
        "moved": max(np.abs(a - b).max() for a, b in zip(single.get_weights(), make().get_weights())),
        "gap": max(np.abs(a - b).max() for a, b in zip(single.get_weights(), mirrored.get_weights())),
        "drift": replica_drift(mirrored.optimizer),
        "optimizer": mirrored.optimizer,
    }

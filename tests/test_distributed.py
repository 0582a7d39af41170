"""LODO under MirroredStrategy on 2 logical CPUs equals one device, and replicas stay identical.

Runs in a subprocess: logical devices must be configured before TensorFlow
initializes its runtime, which the rest of the suite has already done.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from lodo import LODO

    x = np.random.default_rng(0).standard_normal((64, 6)).astype("float32")
    y = (x @ np.linspace(-1, 1, 6)[:, None]).astype("float32")

    def make():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        model.compile(optimizer=LODO(initial_lr=0.05, meta_lr=0.01, beta=0.5, seed=2), loss="mse")
        return model

    single = make()
    single.fit(x, y, batch_size=64, epochs=6, shuffle=False, verbose=0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make()
    mirrored.fit(x, y, batch_size=64, epochs=6, shuffle=False, verbose=0)

    moved = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), make().get_weights()))
    gap = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), mirrored.get_weights()))
    drift = max(np.abs(v.value.values[0].numpy() - v.value.values[1].numpy()).max()
                for v in mirrored.optimizer.variables)
    print(f"RESULT moved={moved} gap={gap} drift={drift}")
""")


def test_mirrored_lodo_matches_single_device_and_replicas_agree():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    values = dict(item.split("=") for item in line.split()[1:])
    assert float(values["moved"]) > 1e-3  # training changed the weights
    assert float(values["gap"]) < 1e-5  # float32 all-reduce vs single-device sum
    assert float(values["drift"]) == 0.0  # every replica holds the same LODO state

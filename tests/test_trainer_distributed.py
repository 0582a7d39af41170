"""The image trainer's custom loop under MirroredStrategy on 2 logical CPUs equals one device.

Runs in a subprocess: logical devices must be configured before TensorFlow
starts its runtime, which the rest of the suite has already done.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from omegaconf import OmegaConf
    from lodo import distribute
    strategy = distribute.make_strategy(OmegaConf.create({"name": "mirrored", "num_cpu_devices": 2}))
    import tensorflow as tf
    sys.path.insert(0, "tests")
    from toy_image_task import ToyImageTask
    from lodo.trainer import SeedTrainer

    name = sys.argv[1]
    hparams = {"lodo": {"initial_lr": 0.1, "meta_lr": 0.01, "beta": 0.5},
               "adam": {"learning_rate": 0.05}}[name]
    cfg = OmegaConf.create({"optimizer": {"name": name, **hparams}, "distribute": {"name": "mirrored"}})
    task = ToyImageTask(batch_size=8)
    task.load()

    def train(strat):
        trainer = SeedTrainer(cfg, task, strat, seed=4)
        iterator = trainer.dataset(0)
        losses = np.concatenate([trainer.train(iterator, 3), trainer.train(iterator, 4)])
        return trainer, losses

    single, single_losses = train(tf.distribute.get_strategy())
    mirrored, mirrored_losses = train(strategy)
    initial = ToyImageTask(batch_size=8).build_model(4).get_weights()
    moved = max(np.abs(a - b).max() for a, b in zip(single.model.get_weights(), initial))
    gap = max(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)
              for a, b in zip(single.model.get_weights(), mirrored.model.get_weights()))
    loss_gap = np.abs(single_losses - mirrored_losses).max()
    drift = max(np.abs(v.value.values[0].numpy() - v.value.values[1].numpy()).max()
                for v in mirrored.optimizer.variables)
    replicas = strategy.num_replicas_in_sync
    print(f"RESULT replicas={replicas} moved={moved} gap={gap} loss_gap={loss_gap} drift={drift}")
""")


@pytest.mark.parametrize("optimizer", ["lodo", "adam"])
def test_custom_loop_under_mirrored_strategy_matches_one_device(optimizer):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, optimizer], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    values = dict(item.split("=") for item in line.split()[1:])
    assert int(values["replicas"]) == 2
    assert float(values["moved"]) > 1e-3  # training changed the weights
    assert float(values["gap"]) < 1e-6  # relative: float32 all-reduce vs single-device sum
    assert float(values["loss_gap"]) < 1e-6
    assert float(values["drift"]) == 0.0  # every replica holds the same optimizer state

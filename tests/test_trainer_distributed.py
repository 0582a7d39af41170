"""The Keras chunk runner's custom loop under MirroredStrategy on 2 logical CPUs equals one device."""

import pytest

import two_devices

SCRIPT = """
import numpy as np
from omegaconf import OmegaConf
from lodo.experiment import distribute
from lodo.experiment.keras_trainer import KerasSeedRunner
from toy_image_task import ToyImageTask
from two_devices import replica_drift

# The prelude split the CPU already; the trainer's own strategy builder must accept that.
strategy = distribute.make_strategy(OmegaConf.create({"name": "mirrored", "num_cpu_devices": 2}))
name = sys.argv[1]
hparams = {"lodo": {"initial_lr": 0.1, "meta_lr": 0.01, "beta": 0.5},
           "adam": {"learning_rate": 0.05}}[name]
cfg = OmegaConf.create({"optimizer": {"name": name, **hparams}, "distribute": {"name": "mirrored"}})
task = ToyImageTask(batch_size=8)
task.load()


def train(strat):
    trainer = KerasSeedRunner(cfg, task, strat, seed=4)
    losses = np.concatenate([trainer.train(3)[0], trainer.train(4)[0]])
    return trainer, losses


single, single_losses = train(tf.distribute.get_strategy())
mirrored, mirrored_losses = train(strategy)
initial = ToyImageTask(batch_size=8).build_model(4).get_weights()
moved = max(np.abs(a - b).max() for a, b in zip(single.model.get_weights(), initial))
gap = max(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)
          for a, b in zip(single.model.get_weights(), mirrored.model.get_weights()))
loss_gap = np.abs(single_losses - mirrored_losses).max()
drift = replica_drift(mirrored.optimizer)
replicas = strategy.num_replicas_in_sync
print(f"RESULT replicas={replicas} moved={moved} gap={gap} loss_gap={loss_gap} drift={drift}")
"""


@pytest.mark.parametrize("optimizer", ["lodo", "adam"])
def test_custom_loop_under_mirrored_strategy_matches_one_device(optimizer):
    (values,) = two_devices.run(SCRIPT, optimizer)
    assert int(values["replicas"]) == 2
    assert float(values["moved"]) > 1e-3  # training changed the weights
    assert float(values["gap"]) < 1e-6  # relative: float32 all-reduce vs single-device sum
    assert float(values["loss_gap"]) < 1e-6
    assert float(values["drift"]) == 0.0  # every replica holds the same optimizer state

"""Every optimizer path under MirroredStrategy on 2 logical CPUs equals one device, and replicas stay identical.

Logical devices must be set up before TensorFlow starts, so the checks run in
subprocesses (``two_devices.run``), many checks to a script: the process start
and TensorFlow's import are paid once per script. Each check prints one
``RESULT`` line with its label. LODO runs with few layers: the all-reduce and
the replica-identical state do not depend on depth, and compiling 16 layers
twice (one device, then two) costs half a minute per check.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

import two_devices

# One worker runs the whole file: its module fixture is computed once (--dist loadgroup). Its two
# MirroredStrategy processes take over a minute, so it is in make test-long.
pytestmark = [pytest.mark.xdist_group("distributed"), pytest.mark.long]

FIT_SCRIPT = """
from lodo import LODO
from optimizers.lars import LARS
from optimizers.yogi import Yogi
from two_devices import compare_fit

fits = [
    ("lodo", lambda: LODO(initial_lr=0.05, meta_lr=0.01, beta=0.5, num_layers=2, seed=2), 64, 6),
    ("lodo_lean", lambda: LODO(initial_lr=0.05, meta_lr=0.01, beta=0.5, num_layers=5, seed=2, plan="lean"), 64, 5),
    ("yogi", lambda: Yogi(learning_rate=0.05, beta_1=0.8, beta_2=0.99), 32, 3),
    ("lars", lambda: LARS(learning_rate=0.05, momentum=0.8, weight_decay=1e-3, total_steps=8), 32, 3),
]
for label, make, batch_size, epochs in fits:
    r = compare_fit(make, batch_size=batch_size, epochs=epochs)
    segments = len(r["optimizer"].plan.segments(5)) if label == "lodo_lean" else 0
    print(f"RESULT {label} moved={r['moved']} gap={r['gap']} drift={r['drift']} segments={segments}", flush=True)
"""

# The image tasks' custom loop (KerasSeedRunner). It runs in a process of its own: a MirroredStrategy made after
# compare_fit's, over the same devices, reuses their collective instance keys, and TensorFlow aborts ("Shape mismatch
# in the collective instance 100").
LOOP_SCRIPT = """
import numpy as np
from omegaconf import OmegaConf

from lodo.experiment import distribute
from lodo.experiment.keras_trainer import KerasSeedRunner
from toy_image_task import ToyImageTask
from two_devices import replica_drift

# The prelude split the CPU already; the framework's own strategy builder must accept that.
strategy = distribute.make_strategy(OmegaConf.create({"name": "mirrored", "num_cpu_devices": 2}))
task = ToyImageTask(batch_size=8)
task.load()
initial = ToyImageTask(batch_size=8).build_model(4).get_weights()
for name, hparams in [("lodo", {"initial_lr": 0.1, "meta_lr": 0.01, "beta": 0.5, "num_layers": 2}),
                      ("adam", {"learning_rate": 0.05})]:
    cfg = OmegaConf.create({"optimizer": {"name": name, **hparams}, "distribute": {"name": "mirrored"}})

    def train(strat):
        trainer = KerasSeedRunner(cfg, task, strat, seed=4)
        return trainer, np.concatenate([trainer.train(3)[0], trainer.train(4)[0]])

    single, single_losses = train(tf.distribute.get_strategy())
    mirrored, mirrored_losses = train(strategy)
    moved = max(np.abs(a - b).max() for a, b in zip(single.model.get_weights(), initial))
    gap = max(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)
              for a, b in zip(single.model.get_weights(), mirrored.model.get_weights()))
    loss_gap = np.abs(single_losses - mirrored_losses).max()
    print(f"RESULT loop_{name} replicas={strategy.num_replicas_in_sync} moved={moved} gap={gap} "
          f"loss_gap={loss_gap} drift={replica_drift(mirrored.optimizer)}", flush=True)
"""


@pytest.fixture(scope="module")
def results() -> dict:
    with ThreadPoolExecutor(max_workers=2) as pool:
        lines = [r for done in pool.map(two_devices.run, [FIT_SCRIPT, LOOP_SCRIPT]) for r in done]
    return {r["label"]: {k: float(v) for k, v in r.items() if k != "label"} for r in lines}


@pytest.mark.slow
@pytest.mark.parametrize("label", ["lodo", "lodo_lean", "yogi", "lars"])
def test_model_fit_under_mirrored_strategy_matches_one_device(results, label):
    values = results[label]
    assert values["moved"] > 1e-3  # training changed the weights
    assert values["gap"] < 1e-5  # float32 all-reduce vs single-device sum
    assert values["drift"] == 0.0  # every replica holds the same optimizer state
    if label == "lodo_lean":
        assert values["segments"] == 3  # five layers, updated as three programs per step


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["lodo", "adam"])
def test_custom_loop_under_mirrored_strategy_matches_one_device(results, optimizer):
    values = results[f"loop_{optimizer}"]
    assert values["replicas"] == 2
    assert values["moved"] > 1e-3
    assert values["gap"] < 1e-6  # relative: float32 all-reduce vs single-device sum
    assert values["loss_gap"] < 1e-6
    assert values["drift"] == 0.0

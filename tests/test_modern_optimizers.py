"""Keras 3's modern optimizers on the multi-seed engine (``engine: keras``, ``lodo.functional.PerSeedKeras``).

Three claims, each against a reference that does not share the adapter's code:
- the adapter runs Keras's own rule: Lion and AdamW on Rosenbrock (deterministic, analytic gradient) equal
  NumPy transcriptions of the published updates over 30 steps;
- one Keras optimizer per seed: in a run with per-seed hyperparameter lists, seed i equals a one-seed run
  with the i-th values, also for Lamb and Adafactor, whose rules are not element-wise (a shared optimizer on
  the ``[S, n]`` variable would mix the seeds through Lamb's norms and Adafactor's factored moments);
- Muon on a vector: exactly Keras's AdamW with Muon's ``adam_*`` values (what the YAML says).
"""

from __future__ import annotations

import numpy as np
import pytest

from lodo.experiment import registry
from lodo.experiment.engine import Engine

MODERN = ["adamw", "nadam", "lamb", "lion", "adafactor", "muon", "schedule_free_adamw"]
STEPS = 30
START = np.array([-0.5, 2.0])


def rosenbrock_grad(p):
    x, y = p
    return np.array([-0.02 * (1 - x) - 4 * x * (y - x * x), 2 * (y - x * x)])


def rosenbrock_loss(p):
    x, y = p
    return 0.01 * (1 - x) ** 2 + (y - x * x) ** 2


def engine_run(task_name: str, optimizer: str, seeds, steps=STEPS, **hparams):
    task = registry.build_task(task_name, **registry.task(task_name).defaults)
    values = {**registry.optimizer(optimizer).defaults, **hparams}
    engine = Engine(task, registry.build_engine_optimizer(optimizer, **values), seeds, chunk_size=steps,
                    record_params=True)
    losses, visited = engine.train(steps)
    return losses, visited


def test_every_modern_optimizer_is_a_per_seed_keras_entry():
    for name in MODERN:
        entry = registry.optimizer(name)
        assert entry.engine == "keras" and entry.keras.startswith("keras.optimizers.") and entry.per_seed
        assert set(entry.tune) <= set(entry.defaults) and set(entry.limits) <= set(entry.defaults)


def lion_reference(lr, beta_1, beta_2, steps):
    p, m, losses = START.copy(), np.zeros(2), []
    for _ in range(steps):
        losses.append(rosenbrock_loss(p))
        g = rosenbrock_grad(p)
        p = p - lr * np.sign(beta_1 * m + (1 - beta_1) * g)
        m = beta_2 * m + (1 - beta_2) * g
    return np.array(losses)


def adamw_reference(lr, wd, beta_1, beta_2, eps, steps):
    p, m, v, losses = START.copy(), np.zeros(2), np.zeros(2), []
    for t in range(1, steps + 1):
        losses.append(rosenbrock_loss(p))
        g = rosenbrock_grad(p)
        p = p - p * wd * lr  # decoupled weight decay, applied before the Adam step
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        p = p - alpha * m / (np.sqrt(v) + eps)
    return np.array(losses)


def test_lion_and_adamw_follow_their_published_updates():
    # The learning rates live in float32 Keras variables: compare with the float32-rounded values.
    lr32 = float(np.float32(0.01))
    losses, _ = engine_run("rosenbrock", "lion", [0], learning_rate=0.01, beta_1=0.9, beta_2=0.99)
    np.testing.assert_allclose(losses[:, 0], lion_reference(lr32, 0.9, 0.99, STEPS), rtol=1e-6)
    losses, _ = engine_run("rosenbrock", "adamw", [0], learning_rate=0.01, weight_decay=0.1, beta_1=0.8,
                           beta_2=0.99, epsilon=1e-7)
    expected = adamw_reference(lr32, float(np.float32(0.1)), float(np.float32(0.8)), float(np.float32(0.99)),
                               float(np.float32(1e-7)), STEPS)
    np.testing.assert_allclose(losses[:, 0], expected, rtol=1e-6)


PER_SEED = {  # two settings each, different enough that the seeds' paths part
    "lamb": dict(learning_rate=[0.05, 0.2], beta_1=[0.5, 0.9]),
    "adafactor": dict(learning_rate=[0.05, 0.2], epsilon_2=[1e-3, 0.1]),
    "lion": dict(learning_rate=[0.05, 0.01], beta_2=[0.9, 0.99]),
    "schedule_free_adamw": dict(learning_rate=[0.05, 0.2], beta_1=[0.5, 0.9]),
}


# Lamb (its trust ratio is not element-wise) in make test, the others in make test-long.
@pytest.mark.parametrize("name", [n if n == "lamb" else pytest.param(n, marks=pytest.mark.long) for n in PER_SEED])
def test_each_seed_of_a_per_seed_run_is_its_own_one_seed_run(name):
    lists = PER_SEED[name]
    seeds = [3, 5]
    losses, visited = engine_run("noisy_quadratic_bowl", name, seeds, **lists)
    assert not np.allclose(visited[:, 0], visited[:, 1])  # the settings (and bowls) differ
    for i, seed in enumerate(seeds):
        alone, path = engine_run("noisy_quadratic_bowl", name, [seed], **{k: v[i] for k, v in lists.items()})
        # XLA may pick other kernels for another batch of seeds: last-bit differences only.
        np.testing.assert_allclose(visited[:, i], path[:, 0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(losses[:, i], alone[:, 0], rtol=1e-12)


def test_lamb_on_a_shared_variable_would_mix_the_seeds():
    """Why one optimizer per seed: Keras's Lamb on the whole [S, n] variable couples the seeds' steps."""
    import keras
    import tensorflow as tf

    grad = tf.constant([[1.0, 2.0], [30.0, -40.0]], tf.float64)
    start = tf.constant([[1.0, 1.0], [5.0, 5.0]], tf.float64)
    shared = tf.Variable(start)
    keras.optimizers.Lamb(0.1).apply([grad], [shared])
    separate = []
    for i in range(2):
        row = tf.Variable(start[i])
        keras.optimizers.Lamb(0.1).apply([grad[i]], [row])
        separate.append(row.numpy())
    assert not np.allclose(shared.numpy(), np.stack(separate))


def test_muon_on_a_vector_is_its_adamw_path():
    muon = dict(learning_rate=0.02, adam_beta_1=0.8, adam_beta_2=0.99, adam_weight_decay=0.01, epsilon=1e-7,
                momentum=0.5)
    _, path = engine_run("rosenbrock", "muon", [0], **muon)
    _, adamw = engine_run("rosenbrock", "adamw", [0], learning_rate=0.02, beta_1=0.8, beta_2=0.99,
                          weight_decay=0.01, epsilon=1e-7)
    np.testing.assert_array_equal(path, adamw)


# Muon (orthogonalized dense kernels, AdamW elsewhere) and Adafactor (factored moments) in make test, the rest
# in make test-long: each costs a compiled engine and a model.
@pytest.mark.parametrize("name", [n if n == "muon" else pytest.param(n, marks=pytest.mark.long) for n in MODERN])
def test_runs_on_the_bowl_and_a_model(name):
    """A few steps through the engine (finite losses) and through model.fit (the variables move)."""
    import keras

    losses, _ = engine_run("noisy_quadratic_bowl", name, [0, 1], steps=5)
    assert np.isfinite(losses).all()
    model = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Conv2D(2, 2), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    model.compile(optimizer=registry.build_keras_optimizer(name, **registry.optimizer(name).defaults), loss="mse")
    before = [w.numpy().copy() for w in model.trainable_weights]
    x = np.random.default_rng(0).standard_normal((8, 3, 3, 1)).astype("float32")
    model.fit(x, np.ones((8, 2), "float32"), epochs=2, verbose=0)
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


def test_the_tuner_keeps_a_value_inside_the_optimizers_limit():
    """The decay coordinate reaches β = 0 exactly; Keras's Lion refuses β1 = 0, so the tuner proposes the next
    float above it (the same update: sign(g), to the last bit)."""
    import keras

    from hydra_plugins.lodo_ga_sweeper.ga_sweeper import GASweeper, _numeric_limits

    sweeper = GASweeper.__new__(GASweeper)
    keys = ["learning_rate", "beta_1", "beta_2"]
    sweeper._bounds = _numeric_limits(registry.optimizer("lion").limits, keys)
    values = sweeper._values([[0.0, 0.0, 0.0], [-1.0, -50.0, -1.0]], keys, ["rate", "decay", "decay"])
    assert values[0] == [1.0, 5e-324, 0.0]  # β2 = 0 is inside its limit [0, 1]
    assert 0.99 < values[1][1] < 1.0
    keras.optimizers.Lion(learning_rate=values[0][0], beta_1=values[0][1], beta_2=values[0][2])

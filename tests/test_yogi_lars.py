"""Yogi and LARS: the Keras optimizers and the engine adapters against plain NumPy rules."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from lodo.experiment import registry
from lodo.experiment.engine import Engine
from optimizers.lars import LARS
from optimizers.yogi import Yogi



def numpy_yogi(lr, b1, b2, eps):
    state = {}

    def update(key, w, g):
        m, v = state.get(key, (0.0, 0.0))
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * np.sign(v - g * g) * g * g
        state[key] = (m, v)
        return w - lr * m / (np.sqrt(v) + eps)
    return update


def numpy_lars(lr, mu, wd, total_steps, axis=None):
    """``axis=None``: one layer per array; ``axis=-1``: one layer per row."""
    state = {}

    def update(key, w, g, t):
        wn = np.linalg.norm(w, axis=axis, keepdims=axis is not None)
        gn = np.linalg.norm(g, axis=axis, keepdims=axis is not None)
        ok = (wn > 0) & (gn > 0)
        local = np.where(ok, wn / np.where(ok, gn + wd * wn, 1.0), 1.0)
        global_lr = lr * (1 - min(t / total_steps, 1.0)) ** 2
        buf = mu * state.get(key, 0.0) + global_lr * local * (g + wd * w)
        state[key] = buf
        return w - buf
    return update


# A separable quadratic ½ Σ a (w − c)² over variables of different shapes.
SHAPES = [(3,), (2, 4), ()]


def quadratic(rng):
    return [(rng.uniform(0.5, 3.0, s), rng.standard_normal(s)) for s in SHAPES]


def run_keras(optimizer, inits, problem, steps):
    variables = [tf.Variable(w) for w in inits]
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(0.5 * a * tf.square(v - c)) for v, (a, c) in zip(variables, problem))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return [v.numpy() for v in variables]


def run_numpy(update, inits, problem, steps, with_step=False):
    ws = [np.array(w, dtype=np.float64) for w in inits]
    for t in range(steps):
        ws = [update(i, w, a * (w - c), *([t] if with_step else [])) for i, (w, (a, c)) in enumerate(zip(ws, problem))]
    return ws


def test_yogi_matches_numpy_on_variables_of_several_shapes(float64_keras):
    rng = np.random.default_rng(0)
    problem = quadratic(rng)
    inits = [c + rng.choice([-1.0, 1.0], np.shape(c)) * rng.uniform(1, 2, np.shape(c)) for _, c in problem]
    hp = dict(learning_rate=0.2, beta_1=0.6, beta_2=0.7, epsilon=1e-3)  # small β2: v both grows and shrinks
    got = run_keras(Yogi(**hp), inits, problem, 25)
    expected = run_numpy(numpy_yogi(0.2, 0.6, 0.7, 1e-3), inits, problem, 25)
    for g, e, w0 in zip(got, expected, inits):
        assert np.abs(e - w0).max() > 0.1  # it moved
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)


def test_lars_matches_numpy_with_layerwise_norms_decay_and_momentum(float64_keras):
    rng = np.random.default_rng(1)
    shapes = [(3, 2), (2,)]
    problem = [(rng.uniform(0.5, 3.0, s), rng.standard_normal(s)) for s in shapes]
    inits = [rng.standard_normal(shapes[0]), np.zeros(shapes[1])]  # a zero bias: local_lr = 1 at first
    # 9 steps over a budget of 6: the global rate decays, reaches 0 and the buffer coasts.
    got = run_keras(LARS(learning_rate=0.3, momentum=0.7, weight_decay=0.01, total_steps=6), inits, problem, 9)
    expected = run_numpy(numpy_lars(0.3, 0.7, 0.01, 6), inits, problem, 9, with_step=True)
    for g, e, w0 in zip(got, expected, inits):
        assert np.abs(e - w0).max() > 0.1
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)
    whole = run_numpy(numpy_lars(0.3, 0.7, 0.01, 6), [np.concatenate([w.ravel() for w in inits])],
                      [tuple(np.concatenate([x.ravel() for x in pair]) for pair in zip(*problem))], 9, with_step=True)
    assert np.abs(whole[0][-2:] - got[1]).max() > 1e-3  # one norm over both variables would differ


def test_lars_without_a_budget_keeps_its_rate_and_a_polynomial_schedule_is_the_budget(float64_keras):
    """``LARS(learning_rate=…)`` alone is a constant global rate; the Keras way to the built-in decay,
    ``PolynomialDecay(lr, T, 0, power=2)``, follows the ``total_steps=T`` trajectory."""
    rng = np.random.default_rng(3)
    problem = [(rng.uniform(0.5, 3.0, s), rng.standard_normal(s)) for s in [(3, 2), (2,)]]
    inits = [rng.standard_normal((3, 2)), rng.standard_normal(2)]
    got = run_keras(LARS(learning_rate=0.3, momentum=0.7, weight_decay=0.01), inits, problem, 9)
    expected = run_numpy(numpy_lars(0.3, 0.7, 0.01, np.inf), inits, problem, 9, with_step=True)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)
    schedule = keras.optimizers.schedules.PolynomialDecay(0.3, 6, end_learning_rate=0.0, power=2)
    scheduled = run_keras(LARS(learning_rate=schedule, momentum=0.7, weight_decay=0.01), inits, problem, 9)
    budget = run_keras(LARS(learning_rate=0.3, momentum=0.7, weight_decay=0.01, total_steps=6), inits, problem, 9)
    for a, b, e in zip(scheduled, budget, got):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)  # Keras's schedules compute in float32
        assert np.abs(a - e).max() > 1e-3  # the decay made a difference


def test_lars_checks_values():
    with pytest.raises(ValueError, match="total_steps"):
        LARS(total_steps=0)
    with pytest.raises(ValueError, match="LARS momentum must be a finite number, got nan"):
        LARS(momentum=float("nan"))
    with pytest.raises(ValueError, match="beta_2"):
        Yogi(beta_2=1.0)
    assert LARS(weight_decay=0.1, total_steps=5).weight_decay is None  # not Keras's decoupled decay


@pytest.mark.parametrize("make", [lambda: Yogi(learning_rate=0.05),
                                  lambda: LARS(learning_rate=0.05, momentum=0.9, total_steps=150)],
                         ids=["yogi", "lars"])
@pytest.mark.slow
def test_model_fit_reduces_the_loss(make):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((128, 5)).astype("float32")
    y = (x @ rng.standard_normal((5, 1)) + 0.3).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=make(), loss="mse")
    # 120 steps, within LARS's budget.
    history = model.fit(x, y, batch_size=32, epochs=30, verbose=0).history["loss"]
    assert np.isfinite(history[-1]) and history[-1] < 0.3 * history[0]


def test_config_round_trip_and_saved_model_reload(tmp_path):
    for optimizer in (Yogi(learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-4, clipnorm=1.0),
                      LARS(learning_rate=0.002, momentum=0.8, weight_decay=1e-3, total_steps=1234)):
        config = optimizer.get_config()
        assert type(optimizer).from_config(config).get_config() == config
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        assert type(restored) is type(optimizer) and restored.get_config() == config

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=LARS(learning_rate=0.01, total_steps=10), loss="mse")
    model.fit(np.ones((4, 3), "float32"), np.ones((4, 1), "float32"), verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, LARS) and loaded.optimizer.total_steps == 10
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def bowl_numpy(bowl, seeds, steps, update):
    """NumPy trajectory of the stacked ``[S, n]`` parameters; ``update(theta, grad, t)``."""
    problem = bowl.setup(seeds)
    hess = problem.constants["hessian"].numpy()
    theta, center = np.zeros((len(seeds), bowl.num_params)), problem.initial_batch_state
    for t in range(steps):
        center = bowl.next_batch(problem, center, tf.constant(t, tf.int64))
        theta = update(theta, np.einsum("sij,sj->si", hess, theta - center.numpy()), t)
    return theta


def run_engine(bowl, name, seeds, steps, **hp):
    engine = Engine(bowl, registry.build_engine_optimizer(name, **hp), seeds, chunk_size=steps)
    engine.run(steps)
    return engine.params.numpy()


def test_engine_yogi_matches_numpy_per_seed(float64_keras):
    bowl = registry.build_task("noisy_quadratic_bowl", dim=12)
    got = run_engine(bowl, "yogi", [2, 7], 30, learning_rate=0.3, beta_1=0.5, beta_2=0.9, epsilon=1e-3)
    rule = numpy_yogi(0.3, 0.5, 0.9, 1e-3)
    expected = bowl_numpy(bowl, [2, 7], 30, lambda theta, g, t: rule(0, theta, g))
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_engine_lars_uses_per_seed_norms():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=12)
    got = run_engine(bowl, "lars", [2, 7], 30, learning_rate=0.3, momentum=0.5, weight_decay=0.01, total_steps=40)
    per_seed, whole = numpy_lars(0.3, 0.5, 0.01, 40, axis=-1), numpy_lars(0.3, 0.5, 0.01, 40)
    expected = bowl_numpy(bowl, [2, 7], 30, lambda theta, g, t: per_seed(0, theta, g, t))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    alone = run_engine(bowl, "lars", [7], 30, learning_rate=0.3, momentum=0.5, weight_decay=0.01, total_steps=40)
    np.testing.assert_allclose(alone[0], got[1], rtol=1e-12, atol=1e-14)  # a seed ignores its neighbours
    coupled = bowl_numpy(bowl, [2, 7], 30, lambda theta, g, t: whole(0, theta, g, t))
    assert np.abs(coupled - got).max() > 1e-3  # one norm over all seeds would differ

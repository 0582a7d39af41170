"""LODO's ablations (SPEC §1.3): G against dense NumPy matrices, hypergradients against finite
differences, the pinned hyperparameters, and both front ends."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import lodo
from lodo import LODO, LODOSGD, LODODiagonal, LODOGlobal, LODONoMomentum, LODOResiduals, variants
from lodo import preconditioners as pc
from lodo.experiment.engine import Engine
from lodo.experiment import registry

SEEDS = [3, 11]
ALPHA = 0.3


def dense_reference(kind, weights, constants, alpha, n):
    """G as ``[S, n, n]``, built from φ and the permutations with explicit matrices."""
    weights = [np.asarray(w) for w in weights]
    if kind == "diagonal":
        return np.stack([alpha * np.diag(phi) for phi in weights[0]])
    if kind == "global":
        return np.stack([alpha * phi[0] * np.eye(n) for phi in weights[0]])
    d, w = weights
    perms = np.asarray(constants[0])
    padded = 2 * n
    out = []
    for s in range(perms.shape[0]):
        r = np.eye(padded)
        for i in range(perms.shape[1]):
            r = (np.eye(padded) + np.diag(w[s, i]) @ np.eye(padded)[perms[s, i]]) @ r
        pad = np.eye(padded)[:, :n]
        out.append(alpha * pad.T @ r.T @ np.diag(d[s]) @ r @ pad)
    return np.stack(out)


PRECONDITIONERS = {
    "diagonal": pc.Diagonal(),
    "global": pc.Global(),
    "residuals": pc.Residual(num_layers=5),
}


def perturbed(weights, rng, scale=0.3):
    """φ moved away from its initialization (diagonals stay positive), so tests see a generic G."""
    return tuple(
        tf.constant(w.numpy() * np.exp(scale * rng.standard_normal(w.shape)) if i == 0 else
                    w.numpy() + scale * rng.standard_normal(w.shape) / np.sqrt(w.shape[1]))
        for i, w in enumerate(weights)
    )


@pytest.mark.parametrize("kind", sorted(PRECONDITIONERS))
@pytest.mark.parametrize("n", [5, 7])
def test_g_times_v_matches_a_dense_matrix_and_is_symmetric_psd(kind, n):
    pre = PRECONDITIONERS[kind]
    rng = np.random.default_rng(n)
    weights, constants = pre.init(n, SEEDS, tf.float64)
    for phi in (weights, perturbed(weights, rng)):
        dense = dense_reference(kind, phi, constants, ALPHA, n)
        v = rng.standard_normal((len(SEEDS), n))
        np.testing.assert_allclose(pre.apply(phi, constants, ALPHA, tf.constant(v)), np.einsum("sij,sj->si", dense, v),
                                   rtol=1e-12, atol=1e-12)
        # The column form, as the Hessian-error diagnostic calls it.
        g = pre.apply(phi, constants, ALPHA, tf.eye(n, batch_shape=[len(SEEDS)], dtype=tf.float64)).numpy()
        np.testing.assert_allclose(g, dense, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g, np.swapaxes(g, 1, 2), atol=1e-12)
        assert np.linalg.eigvalsh(g).min() > -1e-12
    if kind != "residuals":
        np.testing.assert_allclose(dense_reference(kind, weights, constants, ALPHA, n), ALPHA * np.eye(n)[None].repeat(2, 0))
        np.testing.assert_array_equal(pre.apply(weights, constants, ALPHA, tf.constant(v)), ALPHA * v)


def test_residual_layout_and_per_seed_independence():
    pre = pc.Residual(num_layers=64)
    (d, w), (perms, inverse) = pre.init(300, [4, 9], tf.float64)
    assert d.shape == (2, 600) and w.shape == (2, 64, 600) and perms.shape == (2, 64, 600)
    np.testing.assert_array_equal(d, 1.0)
    assert abs(np.std(w) * 8 - 1) < 0.02  # σ = 1/√N
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(perms), np.asarray(inverse), -1),
                                  np.broadcast_to(np.arange(600), (2, 64, 600)))
    (_, w_alone), (perms_alone, _) = pre.init(300, [9], tf.float64)
    np.testing.assert_array_equal(w_alone[0], w[1])
    np.testing.assert_array_equal(perms_alone[0], perms[1])
    assert not np.array_equal(perms[0], perms[1])
    with pytest.raises(ValueError, match="num_layers"):
        pc.Residual(num_layers=0)


@pytest.mark.parametrize("kind", sorted(PRECONDITIONERS))
def test_hypergradient_matches_finite_differences_of_the_next_loss(kind):
    """h = ∂L(θ − G(φ)m)/∂φ on a quadratic, each entry by a central difference (float64)."""
    pre = PRECONDITIONERS[kind]
    n, rng = 6, np.random.default_rng(1)
    weights, constants = pre.init(n, SEEDS, tf.float64)
    weights = perturbed(weights, rng)
    a = rng.standard_normal((len(SEEDS), n, n))
    hess = a @ np.swapaxes(a, 1, 2) / n + 0.1 * np.eye(n)
    theta, center, m = (rng.standard_normal((len(SEEDS), n)) for _ in range(3))

    x = theta - pre.apply(weights, constants, ALPHA, tf.constant(m)).numpy() - center
    grad = np.einsum("sij,sj->si", hess, x)
    hyper = pre.hypergradient(weights, constants, ALPHA, tf.constant(m), tf.constant(grad))
    hyper = np.concatenate([h.numpy().reshape(len(SEEDS), -1) for h in hyper], axis=1)  # [S, P]

    # Every ±ε perturbation of one entry of φ becomes a block of extra "seeds", so
    # one batched call evaluates them all (losses and G are per seed).
    eps, sizes = 1e-6, [int(np.prod(w.shape[1:])) for w in weights]
    flat = np.concatenate([w.numpy().reshape(len(SEEDS), -1) for w in weights], axis=1)
    steps = eps * np.eye(flat.shape[1])[:, None, :]  # [P, 1, P]

    def loss(phi):  # phi [P, S, P] → L per (perturbation, seed)
        count = phi.shape[0]
        pieces = np.split(phi.reshape(count * len(SEEDS), -1), np.cumsum(sizes)[:-1], axis=1)
        batch = tuple(tf.constant(p.reshape((-1,) + tuple(w.shape[1:]))) for p, w in zip(pieces, weights))
        tile = lambda a: np.concatenate([np.asarray(a)] * count)
        x = tile(theta) - pre.apply(batch, tuple(tf.constant(tile(c)) for c in constants), ALPHA,
                                    tf.constant(tile(m))).numpy() - tile(center)
        return (0.5 * np.einsum("si,sij,sj->s", x, tile(hess), x)).reshape(count, len(SEEDS))

    expected = (loss(flat[None] + steps) - loss(flat[None] - steps)) / (2 * eps)  # [P, S]
    np.testing.assert_allclose(hyper, expected.T, rtol=1e-6, atol=1e-8)


def snapshot(optimizer):
    """The optimizer's state as NumPy copies (``state()`` reads live variables)."""
    return tf.nest.map_structure(lambda t: np.copy(t.numpy()), optimizer.state())


def keras_bowl_trajectory(optimizer, bowl, seed, steps):
    problem = bowl.setup([seed])
    theta = tf.Variable(tf.zeros([bowl.num_params], tf.float64))
    center, states = problem.initial_batch_state, []
    for t in range(steps):
        center = bowl.next_batch(problem, center, tf.constant(t, tf.int64))
        _, grad = bowl.loss_and_grad(problem, theta[None], center)
        previous = snapshot(optimizer) if optimizer.built else None
        optimizer.apply_gradients([(grad[0], theta)])
        states.append((previous, grad.numpy(), snapshot(optimizer)))
    return theta.numpy(), states


HP = dict(initial_lr=0.27, meta_lr=1e-3, beta=0.3)
FRONT_ENDS = {  # small networks: LODO's unrolled block network compiles slowly
    "lodo_diagonal": (LODODiagonal, HP),
    "lodo_global": (LODOGlobal, HP),
    "lodo_residuals": (LODOResiduals, dict(HP, num_layers=6)),
    "lodo_no_momentum": (LODONoMomentum, dict(initial_lr=0.27, meta_lr=1e-3, num_layers=3)),
    "lodo_sgd": (LODOSGD, dict(HP, num_layers=3)),
}


@pytest.mark.parametrize("variant", variants.VARIANTS, ids=lambda v: v.name)
def test_both_front_ends_are_generated_from_the_variant_table(variant):
    """Each row is a registered Keras class and an engine class (the ones its YAML names) with the row's
    keywords and defaults: the preconditioner's fields, less the pinned hyperparameters (and the
    Keras-only seed, name, plan)."""
    entry = registry.optimizer(variant.name)
    keras_cls, engine_cls = (registry.resolve(entry.keras, "keras"), registry.resolve(entry.engine, "engine"))
    assert keras_cls is getattr(lodo, variant.class_name) and entry.label == variant.label
    assert keras_cls.__name__ == variant.class_name and engine_cls.__name__ == "MultiSeed" + variant.class_name
    assert keras.saving.get_registered_object(f"lodo>{variant.class_name}") is keras_cls
    assert issubclass(keras_cls, LODO) and keras_cls.variant is variant and engine_cls.variant is variant
    engine = {k: p.default for k, p in inspect.signature(engine_cls).parameters.items()}
    keras_keywords = {k: p.default for k, p in inspect.signature(keras_cls).parameters.items() if k != "kwargs"}
    assert engine == variant.hyperparameters()
    assert list(engine) == [k for k in ("initial_lr", "meta_lr", "beta", *variant.preconditioner_fields,
                                        "meta_optimizer") if k not in variant.pinned]
    assert keras_keywords == dict(engine, seed=0, name=None, plan="auto")
    assert not set(variant.pinned) & set(keras_cls().get_config())
    assert variant.label in keras_cls.__doc__ and variant.label in engine_cls.__doc__
    for key, value in variant.pinned.items():
        assert getattr(keras_cls(), {"meta_optimizer": "meta_optimizer_name"}.get(key, key)) == value
        with pytest.raises(ValueError, match=f"pins {key}"):
            keras_cls(**{key: value})
        with pytest.raises(TypeError):
            engine_cls(**{key: value})


def test_variant_defaults_are_the_papers():
    """LODO's bowl values and the ablations' image-generation values (Table 6, before halving)."""
    defaults = {v.name: (v.defaults.initial_lr, v.defaults.meta_lr, v.defaults.beta) for v in variants.VARIANTS}
    assert defaults == {"lodo": (0.270, 0.00096, 0.195), "lodo_diagonal": (0.1325, 0.0005196, 0.9860),
                        "lodo_global": (0.05583, 7.946e-6, 0.9525), "lodo_residuals": (0.02134, 7.946e-6, 0.9301),
                        "lodo_no_momentum": (0.08459, 7.946e-6, 0.0), "lodo_sgd": (0.1035, 0.0007196, 0.9499)}
    assert variants.RESIDUALS.preconditioner_fields == {"num_layers": 64}
    assert variants.NO_MOMENTUM.pinned == {"beta": 0.0} and variants.SGD.pinned == {"meta_optimizer": "sgd"}


@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
def test_config_lists_every_hyperparameter_with_the_class_defaults(name):
    entry = registry.optimizer(name)
    config = entry.defaults
    engine_defaults = {k: p.default for k, p in inspect.signature(registry.resolve(entry.engine, name)).parameters.items()}
    assert config == engine_defaults
    keras_defaults = {k: p.default for k, p in inspect.signature(FRONT_ENDS[name][0]).parameters.items()}
    assert all(keras_defaults[k] == v for k, v in config.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
def test_engine_ablation_matches_its_keras_front_end_and_trains_the_bowl(float64_keras, name):
    keras_cls, hp = FRONT_ENDS[name]
    config = registry.optimizer(name).defaults
    optimizer = registry.build_engine_optimizer(name, **dict(config, **hp))
    assert optimizer.name == name and type(optimizer).__name__ == "MultiSeed" + keras_cls.__name__
    bowl = registry.build_task("noisy_quadratic_bowl", dim=20)
    engine = Engine(bowl, optimizer, [3, 5], chunk_size=100)
    trace = engine.run(25, hessian_every=25)

    theta, _ = keras_bowl_trajectory(keras_cls(**hp, seed=5), bowl, 5, 25)
    assert np.abs(theta).max() > 1.0  # it moved
    np.testing.assert_allclose(engine.params.numpy()[1], theta, rtol=1e-9, atol=1e-11)

    errors = np.array([e for _, _, e in trace.hessian_errors])
    assert errors.shape == (2, 2) and np.isfinite(errors).all()
    if name in ("lodo_diagonal", "lodo_global"):  # G(φ0) = α0·I
        np.testing.assert_allclose(errors[0], np.sqrt(np.mean((1 - 0.27 * bowl.eigenvalues) ** 2)), rtol=1e-9)
    losses = engine.run(275).loss_matrix()
    assert losses.shape == (275, 2) and np.isfinite(losses).all()


@pytest.mark.slow
def test_no_momentum_is_lodo_with_beta_zero(float64_keras):
    bowl = registry.build_task("noisy_quadratic_bowl", dim=12)
    hp = dict(initial_lr=0.27, meta_lr=0.01, num_layers=3)
    expected, _ = keras_bowl_trajectory(LODO(**hp, beta=0.0, seed=2), bowl, 2, 15)
    theta, states = keras_bowl_trajectory(LODONoMomentum(**hp, seed=2), bowl, 2, 15)
    np.testing.assert_array_equal(theta, expected)
    for _, grad, state in states:
        np.testing.assert_array_equal(state.momentum, grad)  # m_t = g_t


@pytest.mark.slow
def test_lodo_sgd_meta_step_is_plain_gradient_descent(float64_keras):
    bowl = registry.build_task("noisy_quadratic_bowl", dim=12)
    hp = dict(initial_lr=0.27, meta_lr=1e-3, beta=0.3, num_layers=3)
    expected, _ = keras_bowl_trajectory(LODO(**hp, meta_optimizer="sgd", seed=2), bowl, 2, 15)
    theta, states = keras_bowl_trajectory(LODOSGD(**hp, seed=2), bowl, 2, 15)
    np.testing.assert_array_equal(theta, expected)
    pre = pc.BlockPermutation(num_layers=3)
    for previous, grad, state in states[1:]:
        hyper = pre.hypergradient(*(tf.nest.map_structure(tf.constant, (previous.weights, previous.constants))),
                                  hp["initial_lr"], tf.constant(previous.momentum), tf.constant(grad))
        for before, h, after in zip(previous.weights, hyper, state.weights):
            np.testing.assert_allclose(after, before - hp["meta_lr"] * h.numpy(), rtol=1e-12, atol=1e-15)
    assert not np.allclose(states[-1][2].weights[0], states[0][2].weights[0])  # φ did move


KERAS_ABLATIONS = {
    LODODiagonal: dict(initial_lr=0.05, meta_lr=1e-3, beta=0.5),
    LODOGlobal: dict(initial_lr=0.05, meta_lr=1e-3, beta=0.5),
    LODOResiduals: dict(initial_lr=0.05, meta_lr=1e-3, beta=0.5, num_layers=8),
    LODONoMomentum: dict(initial_lr=0.05, meta_lr=1e-3, num_layers=3),
    LODOSGD: dict(initial_lr=0.05, meta_lr=1e-4, beta=0.5, num_layers=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("cls", list(KERAS_ABLATIONS), ids=lambda c: c.__name__)
def test_keras_ablation_trains_a_model_and_its_config_round_trips(cls):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 1.0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    optimizer = cls(**KERAS_ABLATIONS[cls], seed=1)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert np.isfinite(history).all() and history[-1] < 0.5 * history[0]

    config = optimizer.get_config()
    again = cls.from_config(config)
    assert again.get_config() == config and type(again) is cls
    assert type(keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))) is cls
    accepted = set(inspect.signature(cls).parameters) - {"kwargs"}
    assert {"initial_lr", "meta_lr", "seed"} <= set(config) and set(config) - accepted <= set(
        keras.optimizers.Optimizer(learning_rate=0.1).get_config())

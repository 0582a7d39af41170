"""LODO's core against independent references: dense matrices, finite differences, autodiff, Keras Adam."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from lodo import LODO, algorithm, meta_optimizers
from lodo import preconditioners as pc
from lodo.experiment import registry


def random_state(n, seeds=(0, 1), num_layers=5, block_size=4, perturb=0.3):
    """Permutations and blocks of ``len(seeds)`` seeds; ``perturb`` moves the blocks off orthogonal."""
    pre = pc.BlockPermutation(num_layers, block_size)
    weights, constants = pre.init(n, list(seeds), tf.float64)
    rng = np.random.default_rng(42)
    weights = tuple(w + perturb * rng.standard_normal(w.shape) for w in weights)
    return pre, weights, constants


@pytest.mark.parametrize("n", [1, 5, 8, 13])
def test_padded_size_is_the_next_multiple_of_k_strictly_above_2n(n):
    padded = pc.padded_size(n, 4)
    assert padded % 4 == 0 and 2 * n < padded <= 2 * n + 4
    assert (pc.padded_size(100, 4), pc.padded_size(2, 4), pc.padded_size(94_696, 4)) == (204, 8, 189_396)


def test_initial_preconditioner_is_alpha_times_identity():
    pre = pc.BlockPermutation()  # the paper's N = 16, k = 4
    weights, constants = pre.init(37, [0, 3], tf.float64)
    dense = pc.dense_matrix(weights, constants[0], 0.27, 37)
    np.testing.assert_allclose(dense, 0.27 * np.eye(37)[None].repeat(2, 0), atol=1e-12)
    v = tf.constant(np.random.default_rng(0).standard_normal((2, 37)))
    np.testing.assert_allclose(pre.apply(weights, constants, 0.27, v).numpy(), 0.27 * v.numpy(), atol=1e-12)


@pytest.mark.parametrize("n", [3, 6, 10, 17])
def test_apply_equals_the_dense_matrix_which_is_symmetric_psd(n):
    pre, weights, constants = random_state(n)
    dense = pc.dense_matrix(weights, constants[0], 0.5, n)
    for g in dense:
        np.testing.assert_allclose(g, g.T, atol=1e-12)
        assert np.linalg.eigvalsh(g).min() > -1e-10
    assert not np.allclose(dense[0], dense[1])  # each seed has its own network
    v = np.random.default_rng(1).standard_normal((2, n))
    np.testing.assert_allclose(pre.apply(weights, constants, 0.5, tf.constant(v)).numpy(),
                               np.einsum("sij,sj->si", dense, v), rtol=1e-10, atol=1e-12)
    cols = np.random.default_rng(2).standard_normal((2, n, 3))  # several columns at once
    np.testing.assert_allclose(pre.apply(weights, constants, 0.5, tf.constant(cols)).numpy(),
                               dense @ cols, rtol=1e-10, atol=1e-12)


def test_hypergradient_equals_central_finite_differences():
    n, alpha = 6, 0.4
    pre, weights, constants = random_state(n, seeds=(7,), num_layers=3)
    rng = np.random.default_rng(3)
    hess = rng.standard_normal((n, n))
    hess = hess @ hess.T / n + np.eye(n)
    theta, m = rng.standard_normal(n), rng.standard_normal(n)

    def loss(ws):
        dense = pc.dense_matrix(ws, constants[0], alpha, n)[0]
        x = theta - dense @ m
        return 0.5 * x @ hess @ x

    g = hess @ (theta - pc.dense_matrix(weights, constants[0], alpha, n)[0] @ m)
    hyper = pre.hypergradient(weights, constants, alpha, tf.constant(m[None]), tf.constant(g[None]))
    eps = 1e-6
    for layer in range(len(weights)):
        base = weights[layer].numpy()
        for index in [(0, 0, 0, 0), (0, 1, 2, 3), (0, base.shape[1] - 1, 3, 1)]:
            shifted = []
            for sign in (1, -1):
                w = base.copy()
                w[index] += sign * eps
                shifted.append(loss(tuple(w if i == layer else weights[i] for i in range(len(weights)))))
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            np.testing.assert_allclose(hyper[layer].numpy()[index], numeric, rtol=1e-6, atol=1e-9)


def test_one_gradient_per_step_equals_backprop_through_the_step(float64_keras):
    """Algorithm 1 written literally: θ_{t+1} = θ_t − G(φ_t)m_t differentiated by one tape per step.

    The reference uses autodiff through the permutation network (not the
    hand-written VJP) and a NumPy Adam on φ (not ``meta_optimizers.Adam``).
    Keras's own Adam cannot serve here: it rounds β through float32 in its
    bias correction, which moves the trajectory by ~1e-7.
    """
    bowl = registry.build_task("noisy_quadratic_bowl", dim=10)
    problem = bowl.setup([4])
    alpha, beta, meta_lr, steps = 0.3, 0.6, 0.01, 50
    pre = pc.BlockPermutation(num_layers=4, block_size=4)

    def batch(t, center):
        return bowl.next_batch(problem, center, tf.constant(t, tf.int64))

    # Reference: the paper's order of operations, one tape per step.
    weights, constants = pre.init(bowl.num_params, [4], tf.float64)
    phi = [tf.Variable(w) for w in weights]
    first, second = [np.zeros(w.shape) for w in weights], [np.zeros(w.shape) for w in weights]

    def adam(grads, t, b1=0.9, b2=0.999, eps=1e-7):  # Keras's defaults and update formula
        for p, g, m1, m2 in zip(phi, grads, first, second):
            m1 += (1 - b1) * (g - m1)
            m2 += (1 - b2) * (g * g - m2)
            p.assign_sub(meta_lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m1 / (np.sqrt(m2) + eps))
    theta, m, center = tf.zeros([1, bowl.num_params], tf.float64), tf.zeros([1, bowl.num_params], tf.float64), \
        problem.initial_batch_state
    @tf.function
    def reference_step(theta, m, center):
        with tf.GradientTape(persistent=True) as tape:
            theta_next = theta - pre.apply(phi, constants, alpha, m)
            loss = bowl.loss(problem, theta_next, center)
        return theta_next, tape.gradient(loss, phi), tape.gradient(loss, theta_next)

    reference = []
    for t in range(steps):
        center = batch(t, center)
        theta_next, hyper, g = reference_step(theta, m, center)
        adam([np.zeros(p.shape) if h is None else h.numpy() for h, p in zip(hyper, phi)], t + 1)
        m = beta * m + (1 - beta) * g
        theta = theta_next
        reference.append(theta.numpy()[0])

    # The one-gradient-per-step form: the hypergradient of step t arrives with g_{t+1}.
    meta = meta_optimizers.Adam(meta_lr)
    state = algorithm.init(bowl.num_params, [4], pre, meta, tf.float64)
    update = tf.function(lambda state, g: algorithm.update(state, g, alpha=alpha, beta=beta, preconditioner=pre,
                                                           meta_optimizer=meta))
    theta, center, ours = tf.zeros([1, bowl.num_params], tf.float64), problem.initial_batch_state, []
    for t in range(steps):
        center = batch(t, center)
        ours.append(theta.numpy()[0])
        _, g = bowl.loss_and_grad(problem, theta, center)
        step, state = update(state, g)
        theta = theta - step
    assert np.abs(reference[-1]).max() > 1.0  # it moved
    np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_keras_lodo_trains_with_fit_and_matches_the_functional_form(float64_keras):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 5))
    y = np.tanh(x @ rng.standard_normal((5, 1)))
    hp = dict(initial_lr=0.1, meta_lr=0.003, beta=0.5, num_layers=6, block_size=4)

    def model():
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(1)])

    fitted = model()
    fitted.compile(optimizer=LODO(**hp, seed=9), loss="mse")
    history = fitted.fit(x, y, batch_size=32, epochs=30, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]

    manual = model()
    variables = manual.trainable_variables
    pre = pc.BlockPermutation(hp["num_layers"], hp["block_size"])
    meta = meta_optimizers.Adam(hp["meta_lr"])
    n = sum(int(np.prod(v.shape)) for v in variables)
    state = algorithm.init(n, [9], pre, meta, tf.float64)
    for _ in range(30):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(manual(x) - y))
        flat = tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, variables)], 0)[None]
        step, state = algorithm.update(state, flat, alpha=hp["initial_lr"], beta=hp["beta"], preconditioner=pre,
                                       meta_optimizer=meta)
        for v, piece in zip(variables, tf.split(step[0], [int(np.prod(v.shape)) for v in variables])):
            v.assign_sub(tf.reshape(piece, v.shape))
    for a, b in zip(fitted.get_weights(), manual.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


def test_keras_lodo_config_round_trips_and_rejects_bad_shapes():
    opt = LODO(initial_lr=0.2, meta_lr=1e-3, beta=0.8, num_layers=3, block_size=2, seed=5)
    clone = LODO.from_config(opt.get_config())
    assert (clone.meta_lr, clone.beta, clone.num_layers, clone.block_size, clone.seed) == (1e-3, 0.8, 3, 2, 5)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        LODO(block_size=0)
    with pytest.raises(ValueError, match="beta must be in"):
        LODO(beta=1.5)
    with pytest.raises(ValueError, match="initial_lr must be positive"):
        LODO(initial_lr=0.0)
    with pytest.raises(ValueError, match="meta_lr must be zero or positive, got -0.001"):
        LODO(meta_lr=-1e-3)
    assert LODO(meta_lr=0.0).meta_lr == 0.0  # a frozen preconditioner is a valid control run


def test_frozen_meta_optimizer_keeps_phi_even_when_the_hypergradient_overflows():
    """A diverging run's gradient is inf; φ must stay bit for bit (Adam or SGD at rate 0 would make 0·inf = nan)."""
    pre, weights, constants = random_state(6, seeds=(2,), num_layers=3)
    state = algorithm.LODOState(weights, constants, tf.ones([1, 6], tf.float64), ())
    grad = tf.constant([[np.inf, -np.inf, 1.0, 2.0, 3.0, 4.0]], tf.float64)
    step, new = algorithm.update(state, grad, alpha=0.3, beta=0.5, preconditioner=pre,
                                 meta_optimizer=meta_optimizers.Frozen())
    for before, after in zip(weights, new.weights):
        np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(new.momentum, 0.5 * np.ones([1, 6]) + 0.5 * grad.numpy())
    hyper = pre.hypergradient(weights, constants, 0.3, state.momentum, grad)
    zero_rate, _ = meta_optimizers.SGD(0.0).update(weights, hyper, ())
    assert np.isnan(zero_rate[0].numpy()).any()  # why Frozen exists


@pytest.mark.slow
def test_memory_is_n_log_n_not_n_squared():
    """n = 10⁵: every tensor in one compiled LODO update is O(N·ñ·k); an n×n one would be 10¹⁰ entries."""
    n = 100_000
    pre = pc.BlockPermutation()
    meta = meta_optimizers.Adam(1e-3)
    state = algorithm.init(n, [0], pre, meta, tf.float32)

    @tf.function
    def update(state, grad):
        return algorithm.update(state, grad, alpha=0.1, beta=0.9, preconditioner=pre, meta_optimizer=meta)

    grad = tf.random.stateless_normal([1, n], seed=[1, 2])
    step, state = update(state, grad)  # runs: an n×n float32 tensor (40 GB) could not even be allocated
    graph = update.get_concrete_function(state, grad).graph
    largest = max(
        (int(np.prod(t.shape.as_list())) for op in graph.get_operations() for t in op.outputs
         if t.shape.rank is not None and t.shape.is_fully_defined()),
        default=0,
    )
    padded = pc.padded_size(n, 4)
    assert largest <= 2 * padded * 4 * 2  # a layer's blocks times two columns: O(ñ·k), far below n²
    assert np.isfinite(step.numpy()).all()


def test_a_masked_step_is_the_update_restricted_to_its_coordinates():
    """One ``algorithm.update`` with a mask against dense NumPy: the hypergradient of
    −g̃ᵀG(φ)m̃ (m̃, g̃ zero outside the mask) by central differences of the dense G, one meta-Adam
    step, m advanced only inside the mask, and the step D G(φ') D m' (zero outside it, exactly)."""
    n, alpha, beta, lr = 5, 0.3, 0.6, 0.01
    pre, meta = pc.BlockPermutation(num_layers=2, block_size=2), meta_optimizers.Adam(lr)
    state = algorithm.init(n, [3], pre, meta, tf.float64)
    rng = np.random.default_rng(5)
    kwargs = dict(alpha=alpha, beta=beta, preconditioner=pre, meta_optimizer=meta)
    _, state = algorithm.update(state, rng.standard_normal((1, n)), **kwargs)  # every coordinate: m ≠ 0
    mask = np.array([True, False, True, True, False])
    g = rng.standard_normal(n)  # what it holds outside the mask must not matter
    step, new = algorithm.update(state, g[None], mask=mask[None], **kwargs)

    perms = state.constants[0].numpy()
    blocks = [w.numpy() for w in state.weights]
    m, kept_m, kept_g = state.momentum.numpy()[0], np.where(mask, state.momentum.numpy()[0], 0), np.where(mask, g, 0)
    objective = lambda bs: -kept_g @ pc.dense_matrix(bs, perms, alpha, n)[0] @ kept_m
    hyper, eps = [], 1e-6
    for i, b in enumerate(blocks):
        h = np.zeros_like(b)
        for index in np.ndindex(b.shape):
            up, down = [x.copy() for x in blocks], [x.copy() for x in blocks]
            up[i][index] += eps
            down[i][index] -= eps
            h[index] = (objective(up) - objective(down)) / (2 * eps)
        hyper.append(h)
    count, firsts, seconds = 2, [x.numpy() for x in state.meta[1]], [x.numpy() for x in state.meta[2]]
    rate = lr * np.sqrt(1 - 0.999**count) / (1 - 0.9**count)
    phi = []
    for b, h, f, s in zip(blocks, hyper, firsts, seconds):
        f, s = f + (h - f) * 0.1, s + (h * h - s) * 0.001
        phi.append(b - f * rate / (np.sqrt(s) + 1e-7))
    for got, want, b in zip(new.weights, phi, blocks):
        assert np.abs(want - b).max() > 1e-4  # φ moved
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9)
    momentum = np.where(mask, beta * m + (1 - beta) * g, m)
    np.testing.assert_allclose(new.momentum.numpy()[0], momentum, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(new.momentum.numpy()[0][~mask], m[~mask])  # kept bit for bit
    want = pc.dense_matrix([p.numpy() for p in new.weights], perms, alpha, n)[0] @ np.where(mask, momentum, 0)
    np.testing.assert_allclose(step.numpy()[0][mask], want[mask], rtol=1e-10, atol=1e-12)
    assert not np.any(step.numpy()[0][~mask])  # exactly 0
    full, _ = algorithm.update(state, g[None], **kwargs)
    assert np.abs(full.numpy()[0][~mask]).min() > 1e-6  # unmasked, G mixes the others into these


def test_keras_lodo_takes_schedules_and_rejects_bad_learning_rates():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=3, decay_rate=0.5)
    opt = LODO(initial_lr=schedule, num_layers=2)
    clone = LODO.from_config(opt.get_config())
    assert isinstance(clone._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert clone.get_config() == opt.get_config()
    assert isinstance(LODO(initial_lr=lambda: 0.1)._learning_rate, type(lambda: 0))
    assert LODO(initial_lr=1).get_config()["initial_lr"] == 1.0  # an int is a number too
    with pytest.raises(ValueError, match="^LODO initial_lr must be a finite number, got nan$"):
        LODO(initial_lr=float("nan"))
    with pytest.raises(ValueError, match="^LODO initial_lr must be a finite number, got 'fast'$"):
        LODO(initial_lr="fast")
    with pytest.raises(ValueError, match="takes its learning rate as initial_lr .* pass initial_lr=0.1$"):
        LODO(learning_rate=0.1)
    with pytest.raises(ValueError, match="meta_lr must be a finite number, got inf"):
        LODO(initial_lr=schedule, meta_lr=float("inf"))

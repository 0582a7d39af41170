"""The Keras LODO's layerwise core against the functional reference, and its memory accounting.

``lodo.algorithm.update`` (itself checked against dense matrices and finite
differences in test_lodo.py) is the reference: the Keras optimizer, whose
block-permutation variants run on ``lodo.layerwise`` (the fused form of that
update), must follow it step for step under every memory plan, for LODO and
every variant of ``lodo.variants``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import lodo
from lodo import LODO, LODOSGD, LODODiagonal, LODOGlobal, LODONoMomentum, LODOResiduals, algorithm, layerwise
from lodo import meta_optimizers, variants
from lodo import preconditioners as pc

HP = dict(initial_lr=0.2, meta_lr=0.01, beta=0.6)


def model(dtype):
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh", dtype=dtype),
                             keras.layers.Dense(1, dtype=dtype)])  # 50 parameters


def reference_parts(optimizer):
    """The preconditioner, meta-optimizer and β that ``algorithm.update`` needs for ``optimizer``."""
    return optimizer.preconditioner, meta_optimizers.make(optimizer.meta_optimizer_name,
                                                                  optimizer.meta_lr), optimizer.beta


def trajectories(optimizer, dtype, steps, absent=lambda step: ()):
    """Yields (Keras LODO state, reference state, Keras weights, reference weights) after every step.

    ``absent(step)``: the indices of the variables that get no gradient at that step (None for
    Keras, the reference's ``mask`` for the functional form)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 5)).astype(dtype)
    y = np.tanh(x @ rng.standard_normal((5, 1))).astype(dtype)
    keras_model, manual = model(dtype), model(dtype)
    preconditioner, meta, beta = reference_parts(optimizer)
    variables = manual.trainable_variables
    sizes = [int(np.prod(v.shape)) for v in variables]
    state = algorithm.init(sum(sizes), [optimizer.seed], preconditioner, meta, tf.as_dtype(dtype))

    def gradients(m):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(m(x) - y))
        return tape.gradient(loss, m.trainable_variables)

    for t in range(steps):
        left_out = set(absent(t))
        grads = [None if i in left_out else g for i, g in enumerate(gradients(keras_model))]
        optimizer.apply_gradients(zip(grads, keras_model.trainable_variables))
        flat = tf.concat([tf.reshape(g, [-1]) for g in gradients(manual)], 0)[None]
        mask = np.concatenate([np.full(k, i not in left_out) for i, k in enumerate(sizes)])[None]
        step, state = algorithm.update(state, flat, alpha=optimizer.learning_rate, beta=beta,
                                       preconditioner=preconditioner, meta_optimizer=meta,
                                       mask=mask if left_out else None)
        for v, piece in zip(variables, tf.split(step[0], sizes)):
            v.assign_sub(tf.reshape(piece, v.shape))  # exactly 0 outside the mask
        yield optimizer.state(), state, keras_model.get_weights(), manual.get_weights()


def assert_same(keras_state, reference, ours, theirs, rtol, atol):
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    for a, b in zip(tf.nest.flatten(keras_state), tf.nest.flatten(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


PLANS = {
    "fast": "fast",  # one program per step, every layer's input kept, both permutation directions
    "lean": "lean",  # segments 0-1, 2-3, 4, each recomputing the layers below it; p rebuilt from p⁻¹
    "uneven": layerwise.Plan(segment=3, inverse=False),  # segments 0-2, 3-4
    "single": layerwise.Plan(segment=1, inverse=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_keras_lodo_follows_the_functional_reference_in_float64(float64_keras, plan):
    optimizer = LODO(**HP, num_layers=5, seed=4, plan=PLANS[plan])
    for states in trajectories(optimizer, "float64", steps=6):
        assert_same(*states, rtol=1e-12, atol=1e-14)
    assert optimizer.layerwise and isinstance(optimizer.plan, layerwise.Plan)
    moved = np.abs(states[0].weights[0] - algorithm.init(50, [4], optimizer.preconditioner)
                   .weights[0].numpy()).max()
    assert moved > 1e-4  # φ was trained, so the comparison covers the meta-steps


@pytest.mark.slow
def test_keras_lodo_follows_the_functional_reference_in_float32():
    optimizer = LODO(**HP, num_layers=5, seed=4, plan="lean")
    for states in trajectories(optimizer, "float32", steps=6):
        assert_same(*states, rtol=2e-6, atol=1e-7)


@pytest.mark.slow
def test_keras_lodo_follows_the_masked_reference_when_variables_have_no_gradient(float64_keras):
    """Steps that leave variables out (the first layer for two steps, then the last bias) follow
    ``algorithm.update``'s mask in every segment program of the lean plan; the left-out variables'
    weights do not move at all."""
    optimizer = LODO(**HP, num_layers=3, seed=4, plan="lean")
    absent = {1: (0, 1), 2: (0, 1), 4: (3,)}
    previous = None
    for t, states in enumerate(trajectories(optimizer, "float64", steps=6, absent=lambda t: absent.get(t, ()))):
        assert_same(*states, rtol=1e-12, atol=1e-14)
        weights = states[2]
        for i in absent.get(t, ()):
            np.testing.assert_array_equal(weights[i], previous[i])
        previous = weights
    assert len(optimizer.plan.segments(3)) == 2


ABLATIONS = {
    LODONoMomentum: dict(initial_lr=0.2, meta_lr=0.01, num_layers=3),
    LODOSGD: dict(HP, meta_lr=0.05, num_layers=3),
    LODODiagonal: HP,
    LODOGlobal: HP,
    LODOResiduals: dict(HP, num_layers=4),
}


def test_every_variant_of_the_table_has_a_parity_case():
    assert {LODO, *ABLATIONS} == {getattr(lodo, v.class_name) for v in variants.VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("cls", list(ABLATIONS), ids=lambda c: c.__name__)
def test_every_ablation_follows_the_functional_reference(float64_keras, cls):
    optimizer = cls(**ABLATIONS[cls], seed=2, plan="lean")
    # The block-permutation ablations run on the layerwise core; the others on algorithm.update itself.
    assert optimizer.layerwise == (cls in (LODONoMomentum, LODOSGD))
    assert optimizer.layerwise == (cls.variant.preconditioner is pc.BlockPermutation)
    for states in trajectories(optimizer, "float64", steps=5):
        assert_same(*states, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_layers_are_updated_top_down_one_segment_at_a_time(float64_keras):
    """Run one step program by program: each program sets exactly its own layers' φ (and moments)
    to the reference φ_{t+1}, top segment first, while the layers below (and m, θ) still hold
    their old values, which the cotangent handed down must have been computed with."""
    n = 40
    theta = keras.Variable(np.zeros(n))
    optimizer = LODO(**HP, num_layers=5, seed=1, plan=layerwise.Plan(segment=2, inverse=False))
    optimizer.build([theta])
    preconditioner, meta, beta = reference_parts(optimizer)
    state = algorithm.init(n, [1], preconditioner, meta, tf.float64)
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(n) for _ in range(2)]
    optimizer.apply_gradients([(tf.constant(grads[0]), theta)])  # m_1 ≠ 0, so the hypergradient is not 0
    step, state = algorithm.update(state, grads[0][None], alpha=HP["initial_lr"], beta=beta,
                                   preconditioner=preconditioner, meta_optimizer=meta)
    second, expected = algorithm.update(state, grads[1][None], alpha=HP["initial_lr"], beta=beta,
                                        preconditioner=preconditioner, meta_optimizer=meta)

    core, layers = optimizer._core, optimizer._layer_state
    before = optimizer.state()
    # Every layer moves in this step, so "updated" and "not yet updated" are told apart.
    assert min(np.abs(a - b).max() for a, b in zip(expected.weights, before.weights)) > 1e-4
    plain = [v.value for v in layers.flatten()]
    count = layers.count[0].value.read_value()
    cotangent, done = None, set()
    assert core.segments == [(0, 2), (2, 4), (4, 5)]
    for index in reversed(range(len(core.segments))):
        cotangent = core._programs[index](plain, [theta.value], tf.constant(grads[1]), tf.constant(HP["initial_lr"],
                                          tf.float64), count, cotangent)
        done |= set(range(*core.segments[index]))
        now = optimizer.state()
        for i in range(5):
            target = expected if i in done else before
            np.testing.assert_allclose(now.weights[i], target.weights[i], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(now.meta[1][i], target.meta[1][i], rtol=1e-12, atol=1e-15)
        if index > 0:
            np.testing.assert_array_equal(now.momentum, before.momentum)
    np.testing.assert_allclose(optimizer.state().momentum, expected.momentum, rtol=1e-12)
    np.testing.assert_allclose(theta.numpy(), -(step[0] + second[0]).numpy(), rtol=1e-12)  # θ_0 = 0


def test_streamed_draws_are_the_reference_draws_in_any_chunk():
    network = pc.BlockNetwork(37, num_layers=3, block_size=4)
    perms, blocks = network.draw(np.random.default_rng([5, pc.RNG_STREAM]))
    streamed = list(network.stream(np.random.default_rng([5, pc.RNG_STREAM]), np.float32, chunk=5))
    assert [(kind, i) for kind, i, _ in streamed] == [("perm", i) for i in range(3)] + [("blocks", i) for i in range(3)]
    for i in range(3):
        np.testing.assert_array_equal(streamed[i][2], perms[i])
        assert streamed[3 + i][2].dtype == np.float32  # built in the state dtype, never as a float64 layer
        np.testing.assert_array_equal(streamed[3 + i][2], blocks[i].astype(np.float32))


def test_built_state_is_the_reference_initial_state(float64_keras):
    optimizer = LODO(num_layers=4, seed=6, plan="fast")
    optimizer.build(model("float64").trainable_variables)
    reference = algorithm.init(50, [6], pc.BlockPermutation(4), meta_optimizers.Adam(1e-3),
                               tf.float64)
    for a, b in zip(tf.nest.flatten(optimizer.state()), tf.nest.flatten(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="plan must be 'auto', 'fast', 'lean'"):
        LODO(plan="small")


@pytest.mark.parametrize("plan", ["fast", "lean"])
def test_state_bytes_per_parameter(plan):
    """φ and two Adam moments (N·ñ·k floats each), int32 permutations (one or both directions), m."""
    n, num_layers, k = 1000, 16, 4
    optimizer = LODO(num_layers=num_layers, block_size=k, plan=plan)
    optimizer.build([keras.Variable(np.zeros(n, np.float32))])
    padded = pc.padded_size(n, k)
    permutations = 2 * num_layers if plan == "fast" else num_layers + 1  # p and p⁻¹, or p⁻¹ and 0…ñ−1
    expected = 3 * num_layers * padded * k * 4 + permutations * padded * 4 + n * 4 + 8
    assert optimizer.state_bytes == expected
    assert expected / n == pytest.approx(1536 + 8 * permutations, rel=0.01)


def test_plan_choice_switches_to_lean_for_big_models():
    small, big = pc.BlockNetwork(94_696), pc.BlockNetwork(11_200_000)  # the PixelCNN and ResNet-18
    assert layerwise.Plan.choose(small, 4) == layerwise.Plan(segment=16, inverse=True)
    assert layerwise.Plan.choose(big, 4) == layerwise.Plan(segment=2, inverse=False)
    assert layerwise.Plan(segment=4, inverse=False).segments(16) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert layerwise.Plan(segment=3, inverse=False).segments(7) == [(0, 3), (3, 6), (6, 7)]


@pytest.mark.slow
def test_lean_step_updates_in_place_and_holds_only_a_segment_of_activations():
    """No copy of any layer's φ or moments is made, and each program's scratch memory is a few
    vectors of length ñ: one segment's inputs, never the whole hypergradient (N·k vectors)."""
    n, num_layers, k = 3000, 8, 4
    variables = [keras.Variable(np.zeros(n, np.float32))]
    optimizer = LODO(num_layers=num_layers, block_size=k, plan="lean")
    optimizer.build(variables)
    padded = pc.padded_size(n, k)
    programs = optimizer._core.compiled(optimizer._layer_state, variables)
    assert list(programs) == [f"segment {lo}-{lo + 1}" for lo in range(0, num_layers, 2)]
    for name, proto in programs.items():
        copies = [i for c in proto.hlo_module.computations for i in c.instructions if i.opcode == "copy"
                  and list(i.shape.dimensions) == [padded // k, k, k]]
        assert not copies, name  # φ_i, m_i and v_i are all updated in place
        size = layerwise.scratch_bytes(proto) / (padded * 4)
        assert size <= 2 * 2 + 12, (name, size)  # 2 layers' inputs (2 columns each) + scratch, in vectors
        assert size < num_layers * k / 2  # the whole hypergradient alone would be N·k vectors

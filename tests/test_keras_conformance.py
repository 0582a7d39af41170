"""Keras's generic optimizer checks, on every Keras optimizer this project ships.

Keras tests its own optimizers with a suite of checks that hold for any optimizer (its
``optimizer_test.py``): the iteration counter, missing gradients, clipping, EMA, loss scaling,
gradient accumulation, ``overwrite_with_gradient``, schedules and callables as learning rates,
names, serialization, checkpoints. Here they are restated for this project's optimizers, the
ones a ``configs/optimizer/*.yaml`` names under ``keras:`` from this project's own code (LODO and
its ablations, Yogi, LARS, Momentum-EMA's factory), with Keras's Adam as the control that shows
what Keras itself does. Where Keras's checks use SGD's hand-computed numbers, these compare an
optimizer with a twin fed the equivalent input (the clipped gradient, the mean of the accumulated
ones, the schedule's value), so they apply to any update rule.

A variable outside a step's update (a ``None`` gradient, a layer frozen after compiling, one that
Keras overwrites with its gradient) must not change at all, bit for bit, as under Adam.

Everything is tiny (a 9-parameter model, a handful of steps) and eager where Keras allows, so
the file stays within seconds; LODO's segment programs compile once per setting and shape.
"""

from __future__ import annotations

import inspect
import pickle
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from lodo import variants
from lodo.experiment import registry

# Small settings, so that every optimizer moves visibly in a few steps and LODO's φ learns; one layer
# of 2×2 blocks still mixes coordinates, and compiles fastest.
LODO_SMALL = dict(initial_lr=0.1, meta_lr=0.01, seed=1)
SMALL = {
    "lodo": dict(LODO_SMALL, beta=0.5, num_layers=1, block_size=2),
    "lodo_diagonal": dict(LODO_SMALL, beta=0.5),
    "lodo_global": dict(LODO_SMALL, beta=0.5),
    "lodo_residuals": dict(LODO_SMALL, beta=0.5, num_layers=1),
    "lodo_no_momentum": dict(LODO_SMALL, num_layers=1, block_size=2),
    "lodo_sgd": dict(LODO_SMALL, beta=0.5, num_layers=1, block_size=2),
    "yogi": dict(learning_rate=0.05),
    "lars": dict(learning_rate=0.05, momentum=0.5),
    "momentum_ema": dict(learning_rate=0.05, momentum=0.5),
    "psgd_kron": dict(learning_rate=0.05, seed=1),
    "soap": dict(learning_rate=0.05, precondition_frequency=2),
}
RATE = {name: "initial_lr" if name in variants.BY_NAME else "learning_rate" for name in SMALL}
CASES = ["adam", *SMALL]


def project_keras_optimizers() -> set:
    """The optimizers whose YAML's ``keras:`` is this project's code (not ``keras.…`` itself)."""
    return {name for name in registry.names("optimizer")
            if registry.optimizer(name).keras and not registry.optimizer(name).keras.startswith("keras.")}


def factory(case):
    return keras.optimizers.Adam if case == "adam" else registry.resolve(registry.optimizer(case).keras, case)


def make(case, rate=None, **options):
    """``case``'s optimizer with its small settings, ``rate`` as its learning rate (the class's own
    keyword for it) and Keras's ``options`` (``clipnorm``, ``use_ema``, …)."""
    hparams = dict(SMALL.get(case, dict(learning_rate=0.05)))
    make_it = factory(case)
    parameters = inspect.signature(make_it).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        if rate is not None:
            hparams[RATE.get(case, "learning_rate")] = rate
        return make_it(**hparams, **options)
    # A factory of a Keras class that takes only its own hyperparameters (Momentum-EMA's, which
    # rescales a float rate): its optimizer, rebuilt through the class's constructor with the
    # options, and ``rate`` as that class's learning rate.
    built = make_it(**hparams)
    config = {**built.get_config(), **options}
    if rate is not None:
        config["learning_rate"] = rate
    return type(built).from_config(config)


# The tiny model's variables (the kernels of two Dense layers). Every check uses these shapes, and
# those that leave a variable out of a step leave out the first, as freezing the first layer does:
# LODO's compiled programs depend on the shapes and on which variables are in the step, so each
# layerwise class compiles twice in all.
SHAPES = [(2, 3), (3, 1)]


def fresh(kind=keras.Variable):
    """The variables every check uses, fresh."""
    rng = np.random.default_rng(100)
    return [kind(rng.standard_normal(shape).astype("float32")) for shape in SHAPES]


def gradients(step: int):
    """Deterministic, step-dependent gradients for ``fresh()``."""
    rng = np.random.default_rng(step)
    return [tf.constant(rng.standard_normal(shape), tf.float32) for shape in SHAPES]


def without_first_layer(step: int):
    return [None, *gradients(step)[1:]]


def apply(optimizer, grads, variables):
    """``optimizer.apply_gradients`` in the replica context that Keras's training loop steps in (that
    of the default strategy), so that LODO's programs trace once for these loops and for ``fit``."""
    pairs = list(zip(grads, variables))
    tf.distribute.get_strategy().run(lambda: optimizer.apply_gradients(pairs))


def run(optimizer, variables, steps, start=0, grads=gradients):
    for t in range(start, start + steps):
        apply(optimizer, grads(t), variables)
    return [v.numpy() for v in variables]


def tiny_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, use_bias=False),
                             keras.layers.Dense(1, use_bias=False)])


DATA = (np.random.default_rng(0).standard_normal((8, 2)).astype("float32"),
        np.random.default_rng(1).standard_normal((8, 1)).astype("float32"))


def bits(values):
    return [np.array(v.numpy() if hasattr(v, "numpy") else v) for v in values]


def moved(values, before) -> bool:
    """Whether every one of ``values`` has moved from ``before`` by more than rounding."""
    return all(np.abs(np.asarray(a) - b).max() > 1e-4 for a, b in zip(bits(values), before))


def same_bits(a, b) -> bool:
    """Equal bit for bit (so -0.0 differs from 0.0 and a NaN equals itself)."""
    a, b = bits(a), bits(b)
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                                    for x, y in zip(a, b))


cases = pytest.mark.parametrize("case", list(SMALL))
# With Keras's Adam as well, where what Keras itself does is the point (absent variables, rates, names).
with_control = pytest.mark.parametrize("case", CASES)


def test_every_project_keras_optimizer_is_checked():
    assert project_keras_optimizers() == set(SMALL)


# --- steps and iterations ---------------------------------------------------------------------

@cases
def test_iterations_count_the_applied_steps(case):
    optimizer, variables = make(case), fresh()
    assert int(optimizer.iterations) == 0
    before = bits(variables)
    run(optimizer, variables, 2)
    assert int(optimizer.iterations) == 2 and moved(variables, before)


@cases
def test_no_gradient_at_all_is_refused(case):
    with pytest.raises(ValueError, match="No gradients provided for any variable"):
        apply(make(case), [None] * len(SHAPES), fresh())


@with_control
def test_a_variable_without_a_gradient_stays_exactly_as_it_is(case):
    """After steps that gave it momentum, steps without a gradient leave the first layer's kernel bit
    for bit unchanged (with Keras's warning), while the other goes on moving."""
    optimizer, variables = make(case), fresh()
    run(optimizer, variables, 2)
    before = bits(variables)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        run(optimizer, variables, 5, start=2, grads=without_first_layer)
    assert same_bits(variables[:1], before[:1]) and moved(variables[1:], before[1:])
    assert int(optimizer.iterations) == 7


@cases
def test_keras_and_tf_variables_mix(case):
    optimizer = make(case)
    variables = fresh(tf.Variable)[:1] + fresh()[1:]
    start = bits(variables)
    run(optimizer, variables, 1)
    assert int(optimizer.iterations) == 1 and moved(variables, start)
    before = bits(variables)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        run(optimizer, variables, 1, start=1, grads=without_first_layer)
    assert int(optimizer.iterations) == 2 and same_bits(variables[:1], before[:1])


@cases
def test_constraints_are_applied_after_the_step(case):
    variables = fresh()
    variables[0].constraint = keras.constraints.NonNeg()
    assert variables[0].numpy().min() < 0
    run(make(case), variables, 1)
    assert variables[0].numpy().min() >= 0.0


# --- variables outside the update -------------------------------------------------------------

@with_control
def test_a_layer_frozen_after_compiling_stays_exactly_as_it_is(case):
    """``trainable = False`` and a recompile with the same optimizer: the layer does not move, bit for
    bit, however much momentum it had; the other layer trains on."""
    model, optimizer = tiny_model(), make(case)
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)
    for _ in range(2):
        model.train_on_batch(*DATA)
    first, second = model.layers
    first.trainable = False
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)
    frozen, moving = bits(first.weights), bits(second.weights)
    for _ in range(2):
        model.train_on_batch(*DATA)
    assert same_bits(first.weights, frozen) and moved(second.weights, moving)


@with_control
def test_a_variable_overwritten_with_its_gradient_equals_it_after_every_step(case):
    optimizer, variables = make(case), fresh()
    variables[0].overwrite_with_gradient = True
    start = bits(variables)
    for t in range(3):
        run(optimizer, variables, 1, start=t)
        assert same_bits(variables[:1], gradients(t)[:1])
    assert moved(variables[1:], start[1:])


@with_control
def test_overwrite_with_gradient_under_accumulation_takes_the_largest(case):
    """Keras accumulates such a gradient by its maximum and writes it on the update step."""
    optimizer, variables = make(case, gradient_accumulation_steps=2), fresh()
    variables[0].overwrite_with_gradient = True
    start = bits(variables)
    run(optimizer, variables, 1)
    assert same_bits(variables, start) and int(optimizer.iterations) == 0
    run(optimizer, variables, 1, start=1)
    largest = [np.maximum(a, b) for a, b in zip(bits(gradients(0)[:1]), bits(gradients(1)[:1]))]
    assert same_bits(variables[:1], largest) and int(optimizer.iterations) == 1
    assert moved(variables[1:], start[1:])
    run(optimizer, variables, 1, start=2)
    assert same_bits(variables[:1], largest)  # accumulating again, not yet written


# --- the gradient on its way in ---------------------------------------------------------------

@cases
def test_clipping_arguments_are_kept_and_exclusive(case):
    for key in ("clipnorm", "clipvalue", "global_clipnorm"):
        assert getattr(make(case, **{key: 0.1}), key) == 0.1
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"):
        make(case, clipnorm=0.1, clipvalue=0.1)
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"):
        make(case, clipnorm=0.1, global_clipnorm=0.1)


def clipped(key, grads):
    """NumPy's clipping of ``grads`` at 0.5: per tensor by norm, by value, or by the global norm."""
    grads = [np.asarray(g, np.float64) for g in grads]
    if key == "clipnorm":
        return [g * min(1.0, 0.5 / np.linalg.norm(g)) for g in grads]
    if key == "clipvalue":
        return [np.clip(g, -0.5, 0.5) for g in grads]
    total = np.sqrt(sum(np.sum(g * g) for g in grads))
    return [g * min(1.0, 0.5 / total) for g in grads]


@cases
@pytest.mark.parametrize("key", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_clipping_reaches_the_update(case, key):
    """Big gradients under ``key`` = 0.5 move the variables as the clipped gradients do unclipped."""
    big = lambda t: tuple(20.0 * g for g in gradients(t))
    got = run(make(case, **{key: 0.5}), fresh(), 1, grads=big)
    want = run(make(case), fresh(), 1,
               grads=lambda t: tuple(tf.constant(c, tf.float32) for c in clipped(key, [g.numpy() for g in big(t)])))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@cases
def test_loss_scale_factor_unscales_the_gradients(case):
    optimizer = make(case, loss_scale_factor=1024.0)
    assert float(optimizer.scale_loss(1.0)) == 1024.0
    got = run(optimizer, fresh(), 2, grads=lambda t: tuple(1024.0 * g for g in gradients(t)))
    assert same_bits(got, run(make(case), fresh(), 2))  # ×1024 then ÷1024 is exact


@cases
def test_gradient_accumulation_applies_the_mean_every_k_steps(case):
    optimizer, variables = make(case, gradient_accumulation_steps=3), fresh()
    assert optimizer.gradient_accumulation_steps == 3
    start = bits(variables)
    for t in range(2):
        apply(optimizer, gradients(t), variables)
        assert same_bits(variables, start) and int(optimizer.iterations) == 0
        assert int(optimizer._iterations) == t + 1
    for accumulated, g0, g1 in zip(optimizer._accumulated_gradients, gradients(0), gradients(1)):
        np.testing.assert_allclose(accumulated.numpy(), g0.numpy() + g1.numpy(), rtol=1e-6)
    apply(optimizer, gradients(2), variables)
    assert int(optimizer.iterations) == 1
    assert all(not np.any(a.numpy()) for a in optimizer._accumulated_gradients)
    mean = lambda t: tuple((g2 + (g0 + g1)) / 3 for g0, g1, g2 in zip(gradients(0), gradients(1), gradients(2)))
    for a, b in zip(bits(variables), run(make(case), fresh(), 1, grads=mean)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@cases
def test_gradient_accumulation_with_weight_decay_equals_the_mean(case):
    """Weight decay (Keras's decoupled one; LARS's own coupled term for LARS) under accumulation of 3
    follows the run fed the means."""
    accumulating, plain = make(case, weight_decay=0.05, gradient_accumulation_steps=3), make(case, weight_decay=0.05)
    a, b = fresh(), fresh()
    batches = [gradients(i) for i in range(3)]
    for grads in batches:
        apply(accumulating, grads, a)
    apply(plain, [sum(g) / 3 for g in zip(*batches)], b)
    assert moved(a, bits(fresh()))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6)


# --- learning rates ---------------------------------------------------------------------------

@with_control
def test_a_callable_learning_rate_is_called_every_step(case):
    calls = []
    rate = lambda: calls.append(1) or 0.05
    got = run(make(case, rate=rate), fresh(), 2)
    assert len(calls) >= 2
    for a, b in zip(got, run(make(case, rate=0.05), fresh(), 2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@with_control
def test_a_schedule_in_the_constructor_sets_each_steps_rate(case):
    """A ``LearningRateSchedule`` as the rate equals a float rate set to the schedule's value before each step."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.08, decay_steps=1, decay_rate=0.5)
    scheduled, variables = make(case, rate=schedule), fresh()
    assert scheduled._learning_rate is schedule
    got = run(scheduled, variables, 2)
    manual, others = make(case, rate=0.08), fresh()
    for t in range(2):
        manual.learning_rate = float(schedule(t))
        apply(manual, gradients(t), others)
    for a, b in zip(got, others):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-7)


@cases
def test_setting_a_schedule_untracks_the_rate_variable(case):
    optimizer = make(case)
    count = len(optimizer.variables)
    optimizer.learning_rate = keras.optimizers.schedules.PolynomialDecay(0.05, 4)
    assert len(optimizer.variables) == count - 1
    run(optimizer, fresh(), 1)


@with_control
def test_saved_model_with_a_schedule_loads_with_its_state(case, tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.7)
    model = tiny_model()
    model.compile(optimizer=make(case, rate=schedule), loss="mse")
    run(model.optimizer, model.trainable_variables, 2)  # builds the optimizer, and gives it state
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is type(model.optimizer)
    assert isinstance(loaded.optimizer._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    assert same_bits(loaded.optimizer.variables, model.optimizer.variables)
    assert same_bits(loaded.weights, model.weights)


# --- EMA --------------------------------------------------------------------------------------

@cases
def test_ema_averages_the_trajectory_and_overwrites_every_third_step(case):
    ema, variables = make(case, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3), fresh()
    twin, twins = make(case), fresh()
    average = None
    for t in range(3):
        apply(ema, gradients(t), variables)
        apply(twin, gradients(t), twins)
        values = [v.numpy().astype(np.float64) for v in twins]
        average = values if average is None else [0.9 * a + 0.1 * x for a, x in zip(average, values)]
        for a, m in zip(average, ema._model_variables_moving_average):
            np.testing.assert_allclose(m.numpy(), a, rtol=1e-5, atol=1e-6)
        if t < 2:
            assert same_bits(variables, twins)  # the average does not feed back before it is written
    for v, a in zip(variables, average):
        np.testing.assert_allclose(v.numpy(), a, rtol=1e-5, atol=1e-6)


@cases
def test_finalizing_ema_writes_the_average_into_the_variables(case):
    """Without an overwrite frequency the average is written once, by ``finalize_variable_values``
    (which ``fit`` calls at the end of training)."""
    optimizer, variables = make(case, use_ema=True, ema_momentum=0.9), fresh()
    run(optimizer, variables, 3)
    average = bits(optimizer._model_variables_moving_average)
    assert not same_bits(variables, average)
    optimizer.finalize_variable_values(variables)
    assert same_bits(variables, average)


# --- state, names and serialization -----------------------------------------------------------

@cases
def test_set_weights_needs_a_built_optimizer_and_then_continues_identically(case):
    first, variables = make(case), fresh()
    run(first, variables, 1)
    second = make(case)
    with pytest.raises(ValueError, match="You are calling `set_weights"):
        second.set_weights(first.variables)
    copies = [keras.Variable(v.numpy()) for v in variables]
    second.build(copies)
    second.set_weights(first.variables)
    assert same_bits(second.variables, first.variables)
    assert same_bits(run(second, copies, 1, start=1), run(first, variables, 1, start=1))


@cases
def test_tf_checkpoint_restores_the_variables_and_the_optimizer(case, tmp_path):
    optimizer, variables = make(case), fresh()
    run(optimizer, variables, 1)
    checkpoint = tf.train.Checkpoint(variables=variables, optimizer=optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    saved = bits(variables + optimizer.variables)
    after = run(optimizer, variables, 2, start=1)
    assert moved(variables, saved)
    checkpoint.restore(path)
    assert same_bits(variables + optimizer.variables, saved)
    assert same_bits(run(optimizer, variables, 2, start=1), after)  # the whole state came back: the same steps


def auto_base(case) -> str:
    if case in variants.BY_NAME:
        return case
    return {"momentum_ema": "sgd"}.get(case, case)  # its factory makes Keras's SGD


@with_control
def test_unnamed_optimizers_are_auto_named_and_names_survive_serialization(case):
    base = auto_base(case)
    first, second = make(case), make(case)
    match = re.fullmatch(rf"{base}(?:_(\d+))?", first.name)
    assert match, first.name
    assert second.name == f"{base}_{int(match.group(1) or 0) + 1}"
    named = make(case, name="my_optimizer")
    assert named.name == "my_optimizer"
    for optimizer in (second, named):
        assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).name == optimizer.name


@cases
def test_config_round_trips_and_rebuilds_the_same_optimizer(case):
    optimizer = make(case, clipnorm=2.0)
    config = optimizer.get_config()
    again = type(optimizer).from_config(config)
    assert type(again) is type(optimizer) and again.get_config() == config
    for rebuilt in (keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)),
                    keras.optimizers.get(keras.optimizers.serialize(optimizer))):
        assert type(rebuilt) is type(optimizer) and rebuilt.get_config() == config
    assert same_bits(run(again, fresh(), 1), run(optimizer, fresh(), 1))


@cases
def test_pickling_keeps_the_config(case):
    optimizer = make(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # h5py's deprecation notes
        assert pickle.loads(pickle.dumps(optimizer)).get_config() == optimizer.get_config()


# --- compiled training ------------------------------------------------------------------------

# A jit-compiled fit costs seconds, so one case: LODO's layerwise core, the one update that nests
# compiled programs of its own inside the fit's XLA program (NoMomentum and SGD run it too). The
# other ablations' lodo.algorithm.update, Yogi's and LARS's steps are plain TensorFlow ops, which
# XLA compiles as it does any Keras optimizer's.
JIT_CASES = ["lodo"]


@pytest.mark.slow
@pytest.mark.parametrize("case", JIT_CASES)
def test_jit_compiled_fit_with_a_frozen_layer_follows_eager_training(case):
    """Two eager steps, the first layer frozen, then a jit-compiled fit (the restricted step inside
    the fit's XLA program): the frozen layer keeps its bits and the other follows an eager twin."""
    def trained(**compile_options):
        model = tiny_model()
        model.compile(optimizer=make(case), loss="mse", run_eagerly=True)
        for _ in range(2):
            model.train_on_batch(*DATA)
        model.layers[0].trainable = False
        model.compile(optimizer=model.optimizer, loss="mse", **compile_options)
        return model, bits(model.weights)

    model, before = trained(jit_compile=True)
    model.fit(*DATA, batch_size=4, epochs=1, shuffle=False, verbose=0)
    eager, _ = trained(run_eagerly=True)
    for batch in (slice(0, 4), slice(4, 8)):
        eager.train_on_batch(DATA[0][batch], DATA[1][batch])
    assert same_bits(model.weights[:1], before[:1]) and moved(model.weights[1:], before[1:])
    for a, b in zip(bits(model.weights), bits(eager.weights)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

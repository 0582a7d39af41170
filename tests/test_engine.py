"""The multi-seed engine: per-seed correctness, the Keras front end's trajectory, budgets, divergence."""

import numpy as np
import pytest
import tensorflow as tf

from lodo import LODO
from lodo.experiment import metrics
from lodo.experiment.checkpoints import RunCheckpoint
from lodo.experiment.engine import Engine, Trace
from lodo.multi_seed import MultiSeedLODO
from reference import numpy_bowl
from lodo.experiment import registry


def bowl_reference(bowl, seed, steps, update):
    """Plain NumPy loop over one seed's bowl; ``update(theta, grad, t)`` returns the new theta."""
    return numpy_bowl(bowl, seed, steps, lambda theta, grad, t: update(theta, grad(theta), t))


def engine_params(name, seeds, steps, task=None, **hp):
    task = task or registry.build_task("noisy_quadratic_bowl", dim=12)
    engine = Engine(task, registry.build_engine_optimizer(name, **hp), seeds, chunk_size=steps)
    trace = engine.run(steps)
    return engine.params.numpy(), trace


@pytest.mark.slow
def test_keras_optimizers_in_the_engine_match_numpy_per_seed():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=12)
    lr = float(np.float32(0.3))  # Keras keeps the learning rate in float32

    def adam(b1=0.5, b2=0.99, eps=1e-7):
        state = {"m": 0.0, "v": 0.0}

        def update(theta, g, t):
            state["m"] = state["m"] + (g - state["m"]) * (1 - b1)
            state["v"] = state["v"] + (g * g - state["v"]) * (1 - b2)
            # Keras casts β to the variable's dtype via float32 in the bias correction only.
            p1, p2 = float(np.float32(b1)) ** (t + 1), float(np.float32(b2)) ** (t + 1)
            alpha = lr * np.sqrt(1 - p2) / (1 - p1)
            return theta - state["m"] * alpha / (np.sqrt(state["v"]) + eps)
        return update

    def momentum(mu=0.6):
        state = {"m": 0.0}

        def update(theta, g, t):
            state["m"] = float(np.float32(mu)) * state["m"] - lr * g  # Keras casts μ via float32
            return theta + state["m"]
        return update

    def rmsprop(rho=0.3, mu=0.5, eps=1e-7):
        state = {"v": 0.0, "m": 0.0}

        def update(theta, g, t):
            state["v"] = rho * state["v"] + (1 - rho) * g * g
            state["m"] = mu * state["m"] + lr * g / np.sqrt(state["v"] + eps)
            return theta - state["m"]
        return update

    cases = [
        ("adam", dict(learning_rate=0.3, beta_1=0.5, beta_2=0.99), adam),
        ("momentum", dict(learning_rate=0.3, momentum=0.6), momentum),
        ("rmsprop", dict(learning_rate=0.3, rho=0.3, momentum=0.5), rmsprop),
    ]
    for name, hp, reference in cases:
        params, _ = engine_params(name, [2, 7], 30, task=bowl, **hp)
        for row, seed in enumerate([2, 7]):
            expected = bowl_reference(bowl, seed, 30, reference())[-1]
            np.testing.assert_allclose(params[row], expected, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_newton_jumps_to_the_current_center_and_reaches_the_analytic_optimum():
    bowl = registry.build_task("noisy_quadratic_bowl")
    engine = Engine(bowl, registry.build_engine_optimizer("newton"), range(8), chunk_size=500)
    trace = engine.run(2000)
    center = engine.batch_state.numpy()
    np.testing.assert_allclose(engine.params.numpy(), center, atol=1e-8)
    measured = trace.loss_matrix()[1:].mean()  # step 0 is at θ0 = 0, before the first jump
    assert abs(measured - bowl.optimum_loss()) / bowl.optimum_loss() < 0.03


@pytest.mark.slow
def test_keras_front_end_and_engine_follow_the_same_trajectory(float64_keras):
    bowl = registry.build_task("noisy_quadratic_bowl", dim=20)
    hp = dict(initial_lr=0.27, meta_lr=0.01, beta=0.3, num_layers=6, block_size=4)
    engine = Engine(bowl, MultiSeedLODO(**hp), [3, 5], chunk_size=40)
    engine.run(40)

    problem = bowl.setup([5])
    theta = tf.Variable(tf.zeros([bowl.num_params], tf.float64))
    optimizer = LODO(**hp, seed=5)
    center = problem.initial_batch_state
    for t in range(40):
        center = bowl.next_batch(problem, center, tf.constant(t, tf.int64))
        _, grad = bowl.loss_and_grad(problem, theta[None], center)
        optimizer.apply_gradients([(grad[0], theta)])
    assert np.abs(theta.numpy()).max() > 1.0  # it moved
    np.testing.assert_allclose(engine.params.numpy()[1], theta.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_lodo_learns_the_preconditioner_and_tracks_the_hessian_error():
    bowl = registry.build_task("noisy_quadratic_bowl")
    engine = Engine(bowl, registry.build_engine_optimizer("lodo"), [0, 1], chunk_size=500)
    trace = engine.run(1500, hessian_every=750)
    errors = [e for _, _, e in trace.hessian_errors]
    assert len(errors) == 3 and np.all(errors[-1] < errors[0])  # the preconditioner learns
    np.testing.assert_allclose(errors[0], np.sqrt(np.mean((1 - 0.27 * np.geomspace(1e-3, 1, 100)) ** 2)), rtol=1e-9)


def test_divergence_is_recorded_per_seed_without_stopping_the_others():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=10)
    engine = Engine(bowl, registry.build_engine_optimizer("momentum", learning_rate=50.0, momentum=0.9), [0, 1], chunk_size=400)
    trace = engine.run(400)
    result = metrics.loss_at(trace, bowl, 400)
    assert result["diverged"] == 2 and np.isnan(result["loss_mean"])
    engine = Engine(bowl, registry.build_engine_optimizer("momentum", learning_rate=0.5, momentum=0.5), [0, 1], chunk_size=400)
    result = metrics.loss_at(engine.run(400), bowl, 400)
    assert result["diverged"] == 0 and np.isfinite(result["loss_mean"])


def test_time_budget_extends_the_run_and_is_reported_separately():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=10)
    engine = Engine(bowl, registry.build_engine_optimizer("adam"), [0], chunk_size=100)
    trace = engine.run(100, time_budget_s=0.5)
    assert trace.steps_done > 100 and trace.train_time_s >= 0.5
    within = trace.steps_within(0.5)
    assert 100 <= within <= trace.steps_done
    assert trace.time_at_step(np.array([within]))[0] <= 0.5 + 1e-9


def test_learning_curve_windows_are_means_of_the_per_step_losses():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=10)
    engine = Engine(bowl, registry.build_engine_optimizer("adam"), [4, 6], chunk_size=70)
    trace = engine.run(250)
    curve = metrics.learning_curve(trace, log_every=100)
    losses = trace.loss_matrix()
    seed6 = curve[curve.seed == 6]
    assert list(seed6.step) == [100, 200, 250]
    np.testing.assert_allclose(seed6.loss, [losses[:100, 1].mean(), losses[100:200, 1].mean(), losses[200:, 1].mean()])
    result = metrics.loss_at(trace, bowl, 250)
    np.testing.assert_allclose(result["loss_per_seed"], losses[-2:].mean(axis=0))


@pytest.mark.parametrize("task_name, optimizer_name, hp", [
    ("noisy_quadratic_bowl", "lodo", {"num_layers": 2}),  # functional state: φ, meta-Adam moments, momentum
    ("noisy_quadratic_bowl", "adam", {}),  # Keras state, including its step counter (bias correction)
    ("rosenbrock", "yogi", {}),  # a recorded trajectory
])
@pytest.mark.slow
def test_stop_after_a_chunk_checkpoint_restore_and_continue_bit_for_bit(tmp_path, task_name, optimizer_name, hp):
    task = registry.build_task(task_name, **({"dim": 8} if task_name == "noisy_quadratic_bowl" else {}))
    record = task_name == "rosenbrock"

    def engine():
        return Engine(task, registry.build_engine_optimizer(optimizer_name, **hp), [3, 4], chunk_size=10, record_params=record)

    whole = engine()
    reference = whole.run(60, hessian_every=20)
    first = engine()
    stopped = first.run(60, hessian_every=20, after_chunk=lambda trace: trace.steps_done >= 30)
    assert stopped.steps_done == 30
    RunCheckpoint(tmp_path, **first.trackables()).save(30, stopped.to_arrays())

    second = engine()
    restored = RunCheckpoint(tmp_path, **second.trackables()).restore()
    assert restored["step"] == 30
    trace = second.run(60, hessian_every=20, trace=Trace.from_arrays([3, 4], restored))
    np.testing.assert_array_equal(second.params.numpy(), whole.params.numpy())
    np.testing.assert_array_equal(trace.loss_matrix(), reference.loss_matrix())
    assert [s for s, _, _ in trace.hessian_errors] == [s for s, _, _ in reference.hessian_errors]
    for (_, _, a), (_, _, b) in zip(trace.hessian_errors, reference.hessian_errors):
        np.testing.assert_array_equal(a, b)
    assert [s for s, _ in trace.chunk_ends] == [s for s, _ in reference.chunk_ends]
    assert trace.train_time_s > stopped.train_time_s  # the clock continues from the checkpoint
    if record:
        np.testing.assert_array_equal(trace.trajectory(), reference.trajectory())

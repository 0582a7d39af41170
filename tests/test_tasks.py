"""Small tasks against closed forms and NumPy."""

import numpy as np
import tensorflow as tf

import tasks
from lodo.experiment import registry


def test_bowl_hessian_has_the_specified_spectrum_and_optimum():
    bowl = registry.build_task("noisy_quadratic_bowl")
    hess = bowl.hessian_matrix(seed=4)
    np.testing.assert_allclose(hess, hess.T, atol=1e-14)
    np.testing.assert_allclose(np.linalg.eigvalsh(hess), np.geomspace(1e-3, 1.0, 100), rtol=1e-9, atol=1e-12)
    assert abs(bowl.optimum_loss() - 7.41) < 0.005  # SPEC: ½ tr(H) σ² = 7.41
    assert not np.allclose(hess, bowl.hessian_matrix(seed=5))


def test_bowl_loss_gradient_and_moving_center():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=6, noise_variance=2.0)
    problem = bowl.setup([1, 2])
    theta = tf.constant(np.random.default_rng(0).standard_normal((2, 6)))
    center = bowl.next_batch(problem, problem.initial_batch_state, tf.constant(0, tf.int64))
    loss, grad = bowl.loss_and_grad(problem, theta, center)
    hess = problem.constants["hessian"].numpy()
    d = theta.numpy() - center.numpy()
    np.testing.assert_allclose(loss.numpy(), 0.5 * np.einsum("si,sij,sj->s", d, hess, d), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), np.einsum("sij,sj->si", hess, d), rtol=1e-12)
    # autodiff of the generic loss agrees with the closed-form gradient
    _, auto = tasks.base.SmallTask.loss_and_grad(bowl, problem, theta, center)
    np.testing.assert_allclose(auto.numpy(), grad.numpy(), rtol=1e-12)


def test_bowl_noise_is_per_seed_and_has_the_configured_variance():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=100, noise_variance=4.0)
    pair = bowl.setup([3, 9])
    alone = bowl.setup([9])
    step = tf.constant(17, tf.int64)
    a = bowl.next_batch(pair, pair.initial_batch_state, step).numpy()
    b = bowl.next_batch(alone, alone.initial_batch_state, step).numpy()
    np.testing.assert_array_equal(a[1], b[0])  # a seed's noise ignores its neighbours
    draws = np.stack([bowl.next_batch(alone, alone.initial_batch_state, tf.constant(t, tf.int64)).numpy()
                      for t in range(50)])
    assert abs(draws.var() - 4.0) < 0.3


def test_rosenbrock_matches_its_formula_gradient_and_hessian():
    rosen = registry.build_task("rosenbrock")
    problem = rosen.setup([0])
    p = tf.constant([[-0.5, 2.0]], tf.float64)
    loss, grad = rosen.loss_and_grad(problem, p, problem.initial_batch_state)
    x, y = -0.5, 2.0
    assert abs(loss.numpy()[0] - (0.01 * (1 - x) ** 2 + (y - x**2) ** 2)) < 1e-14
    np.testing.assert_allclose(grad.numpy()[0], [-0.02 * (1 - x) - 4 * x * (y - x**2), 2 * (y - x**2)], rtol=1e-12)
    hess = rosen.hessian(problem, p, problem.initial_batch_state).numpy()[0]
    expected = [[0.02 - 4 * (y - x**2) + 8 * x**2, -4 * x], [-4 * x, 2.0]]
    np.testing.assert_allclose(hess, expected, rtol=1e-12)
    np.testing.assert_array_equal(problem.initial_params.numpy(), [[-0.5, 2.0]])
    assert rosen.report_window(200) == (180, 200)


def test_unknown_task_is_one_line_and_lists_names():
    try:
        registry.build_task("mnist_foo")
    except ValueError as err:
        assert "\n" not in str(err) and "noisy_quadratic_bowl" in str(err) and "rosenbrock" in str(err)
    else:
        raise AssertionError("expected ValueError")

"""PSGD-Kron (optimizers.psgd_kron) against a NumPy reference written here from the papers' equations.

The reference keeps every Q as a full matrix (a diagonal Q as a diagonal matrix, whose terms are the
diagonals of T1 and T2), applies Q⁻ᵀ and Q⁻¹ with general solves, and takes its random probes and
coins from ``probes``/``update_coins``: it checks the maths, not the random number generator.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from lodo.experiment import registry
from optimizers import psgd_kron as pk

ROOT = Path(__file__).resolve().parent.parent
TINY = np.finfo(np.float64).tiny


# -- the reference ------------------------------------------------------------------------------------

def lower_bound(a):
    """‖A x‖/‖x‖ with x = A·(the column of A of largest norm): a lower bound of the spectral norm."""
    largest = np.abs(a).max()
    if largest == 0:
        return 0.0
    column = a[:, np.argmax(np.sum(a * a, axis=0))]
    x = a @ column
    return float(np.linalg.norm(a @ x) / np.linalg.norm(x))


class Reference:
    """PSGD-Kron on one tensor, float64. ``hp``: the hyperparameters of one run (one seed)."""

    def __init__(self, shape, hp):
        shape = tuple(shape)
        self.shape, self.hp = shape, hp
        self.view = (shape[0] if shape else 1, 1) if len(shape) <= 1 else (math.prod(shape[:-1]), shape[-1])
        self.sides = [self.view[0]] if len(shape) <= 1 else list(self.view)  # the sizes of Q_L (and Q_R)
        self.dense = [size <= hp["max_size_triangular"] for size in self.sides]
        self.q = None
        self.m = np.zeros(self.view)

    def step(self, theta, g, t, v, coin):
        hp = self.hp
        g = np.asarray(g, np.float64).reshape(self.view)
        if self.q is None:
            scale = hp["preconditioner_init_scale"] or np.mean(np.abs(g) ** 4) ** (-1 / 8)
            self.q = [scale ** (1 / len(self.sides)) * np.eye(size) for size in self.sides]
        self.m = hp["beta_1"] * self.m + (1 - hp["beta_1"]) * g
        h = self.m / (1 - hp["beta_1"] ** (t + 1))
        if coin < hp["preconditioner_update_probability"]:
            self.fit(h, np.asarray(v, np.float64).reshape(self.view))
        left = self.q[0]
        right = self.q[1] if len(self.q) == 2 else np.eye(1)
        u = left.T @ left @ h @ right.T @ right
        u = u * min(1.0, 1.1 / (np.sqrt(np.mean(u * u)) + 1e-6))
        return theta - hp["learning_rate"] * u.reshape(theta.shape)

    def fit(self, h, v):
        left = self.q[0]
        right = self.q[1] if len(self.q) == 2 else np.eye(1)
        a = left @ h @ right.T
        b = np.linalg.solve(left.T, v)  # Q_L⁻ᵀ V
        b = np.linalg.solve(right.T, b.T).T  # · Q_R⁻¹
        terms = [(a @ a.T, b @ b.T), (a.T @ a, b.T @ b)]
        for i, (q, dense, (t1, t2)) in enumerate(zip(self.q, self.dense, terms)):
            lr = self.hp["preconditioner_lr"]
            if dense:
                self.q[i] = q - lr / (lower_bound(t1 + t2) + TINY) * np.triu(t1 - t2) @ q
            else:
                d1, d2 = np.diag(t1), np.diag(t2)
                self.q[i] = q - lr / (np.abs(d1 + d2).max() + TINY) * np.diag(d1 - d2) @ q


DEFAULTS = dict(learning_rate=0.3, beta_1=0.9, preconditioner_lr=0.1, preconditioner_update_probability=1.0,
                max_size_triangular=8192, preconditioner_init_scale=0.0)


def draws(key_pairs, t, shape):
    """The probes ``[K, *shape]`` and coins ``[K]`` the optimizer uses at step t, for (probe, coin) key pairs."""
    probe_keys = tf.constant([k[0] for k in key_pairs], tf.int64)
    coin_keys = tf.constant([k[1] for k in key_pairs], tf.int64)
    t = tf.constant(t, tf.int64)  # a tensor, so that each step does not compile anew
    return (pk.probes(probe_keys, t, tuple(shape), tf.float64).numpy(),
            pk.update_coins(coin_keys, t, tf.float64).numpy())


# -- the engine -----------------------------------------------------------------------------------------

N, STEPS, SEEDS = 6, 25, [3, 4, 5]
_rng = np.random.default_rng(7)
_basis = np.linalg.qr(_rng.standard_normal((N, N)))[0]
HESSIAN = (_basis * np.geomspace(0.05, 2.0, N)) @ _basis.T
CENTERS = np.cumsum(0.3 * _rng.standard_normal((STEPS, len(SEEDS), N)), axis=0)  # a random walk, per seed


def engine_trajectory(hp):
    """The engine optimizer on ½(θ − c_t)ᵀH(θ − c_t) from θ = 0, under XLA: θ after each step."""
    optimizer = registry.build_engine_optimizer("psgd_kron", **hp)
    params = tf.Variable(tf.zeros([len(SEEDS), N], tf.float64))
    optimizer.build(params, SEEDS)
    hessian, centers = tf.constant(HESSIAN), tf.constant(CENTERS)

    @tf.function(jit_compile=True)
    def run():
        out = tf.TensorArray(tf.float64, size=STEPS)
        for t in tf.range(STEPS):
            optimizer.step(params, tf.linalg.matvec(hessian, params - centers[t]), None)
            out = out.write(t, params.read_value())
        return out.stack()

    return run().numpy()


def reference_trajectory(hp, seed_index):
    """The reference for seed ``SEEDS[seed_index]``, with that seed's value of every per-seed list."""
    mine = {k: (v[seed_index] if isinstance(v, list) else v) for k, v in {**DEFAULTS, **hp}.items()}
    ref, theta, out = Reference((N,), mine), np.zeros(N), []
    keys = [pk.draw_keys(SEEDS[seed_index])]
    for t in range(STEPS):
        v, coin = draws(keys, t, (N, 1))
        theta = ref.step(theta, HESSIAN @ (theta - CENTERS[t, seed_index]), t, v[0], coin[0])
        out.append(theta)
    return np.array(out)


PER_SEED = dict(learning_rate=[0.3, 0.1, 0.5], beta_1=[0.9, 0.0, 0.5], preconditioner_lr=[0.1, 0.3, 0.05],
                preconditioner_update_probability=[1.0, 0.5, 0.8], preconditioner_init_scale=[0.0, 0.5, 0.0])
DIAGONAL = dict(learning_rate=0.2, max_size_triangular=4, preconditioner_update_probability=0.6,
                preconditioner_init_scale=0.5, beta_1=0.5)


@pytest.fixture(scope="module")
def per_seed_run():
    return engine_trajectory(PER_SEED)


def test_engine_with_per_seed_lists_matches_numpy_seed_by_seed(per_seed_run):
    """Dense Q; the seeds differ in every float setting (p = 1 and p < 1, Q from the gradient and given)."""
    assert len({round(float(v), 6) for v in per_seed_run[-1, :, 0]}) == len(SEEDS)  # the seeds ran differently
    assert np.abs(per_seed_run[-1]).max() > 0.1  # and moved
    for i in range(len(SEEDS)):
        # Triangular solves and matrix products round differently from NumPy's general solves.
        np.testing.assert_allclose(per_seed_run[:, i], reference_trajectory(PER_SEED, i), rtol=1e-8, atol=1e-10,
                                   err_msg=f"seed {SEEDS[i]}")


def test_engine_with_diagonal_q_matches_numpy():
    got = engine_trajectory(DIAGONAL)
    assert np.abs(got[-1]).max() > 0.1
    for i in range(len(SEEDS)):
        np.testing.assert_allclose(got[:, i], reference_trajectory(DIAGONAL, i), rtol=1e-8, atol=1e-10)


# Each scalar run is an XLA compilation of its own: one seed in the quick tests, the others with the slow ones.
@pytest.mark.parametrize("i", [1, pytest.param(0, marks=[pytest.mark.slow, pytest.mark.long]),
                               pytest.param(2, marks=[pytest.mark.slow, pytest.mark.long])])
def test_a_per_seed_run_equals_the_scalar_run_of_each_seed(per_seed_run, i):
    scalar = engine_trajectory({k: v[i] for k, v in PER_SEED.items()})
    np.testing.assert_allclose(per_seed_run[:, i], scalar[:, i], rtol=1e-13, atol=1e-14)


def test_engine_skips_the_fit_without_cost_when_no_seed_updates():
    """With p tiny no coin comes up in 25 steps: Q stays at its initial scale·I (and is never fitted)."""
    optimizer = registry.build_engine_optimizer("psgd_kron", preconditioner_update_probability=1e-9)
    params = tf.Variable(tf.zeros([len(SEEDS), N], tf.float64))
    optimizer.build(params, SEEDS)
    grad = tf.constant(np.arange(1.0, 1.0 + len(SEEDS) * N).reshape(len(SEEDS), N))
    optimizer.step(params, grad, None)  # eagerly: the probes alone are compiled
    scale = np.mean(grad.numpy() ** 4, axis=1) ** (-1 / 8)
    np.testing.assert_allclose(optimizer.state()["q"].numpy(), scale[:, None, None] * np.eye(N), rtol=1e-12)


# -- the Keras class --------------------------------------------------------------------------------------

SHAPES = [(5,), (4, 3), (2, 2, 3, 2)]  # a bias, a dense kernel, a conv kernel (viewed as 12 × 2)
KERAS_CASES = {
    "all dense": dict(learning_rate=0.05),
    "mixed, p < 1": dict(learning_rate=0.05, max_size_triangular=4, preconditioner_update_probability=0.7,
                         beta_1=0.8, preconditioner_lr=0.2),
}


def keras_gradient(values, t):
    """A deterministic, trajectory-dependent gradient: a diagonal quadratic plus per-step noise."""
    rng = np.random.default_rng(100 + t)
    return [np.linspace(0.2, 2.0, x.size).reshape(x.shape) * (x - 1.0) + 0.1 * rng.standard_normal(x.shape)
            for x in values]


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_keras_class_matches_numpy_on_tensors_of_rank_1_2_and_4(float64_keras, case):
    hp = {**DEFAULTS, **KERAS_CASES[case]}
    seed = 11
    optimizer = pk.PSGDKron(**hp, seed=seed)
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s) for s in SHAPES]
    variables = [keras.Variable(x, dtype="float64") for x in start]
    refs, thetas = [Reference(s, hp) for s in SHAPES], [x.copy() for x in start]
    for t in range(22):
        grads = keras_gradient([v.numpy() for v in variables], t)
        optimizer.apply_gradients(zip([tf.constant(g) for g in grads], variables))
        for i, (ref, g) in enumerate(zip(refs, keras_gradient(thetas, t))):
            v, coin = draws([pk.draw_keys(seed, i)], t, ref.view)
            thetas[i] = ref.step(thetas[i], g, t, v[0], coin[0])
    for variable, theta, x in zip(variables, thetas, start):
        assert np.abs(theta - x).max() > 0.1
        np.testing.assert_allclose(variable.numpy(), theta, rtol=1e-9, atol=1e-11)


def test_a_variable_first_trained_late_starts_from_its_own_first_gradient(float64_keras):
    """No gradient at steps 0 and 1 (Keras skips the variable); from step 2 on it follows the reference started
    there, its Q from that step's gradient, its bias correction from the optimizer's step count (as Adam's)."""
    hp = {**DEFAULTS, "learning_rate": 0.05}
    optimizer = pk.PSGDKron(**hp, seed=2)
    late, other = keras.Variable(np.ones((3, 2))), keras.Variable(np.ones(4))
    ref, theta = Reference((3, 2), hp), np.ones((3, 2))
    for t in range(6):
        g_other = tf.constant(np.full(4, 0.5 + t))
        if t < 2:
            with pytest.warns(UserWarning, match="Gradients do not exist"):
                optimizer.apply_gradients([(None, late), (g_other, other)])
            continue
        optimizer.apply_gradients([(tf.constant(np.sin(3.0 * late.numpy() + t)), late), (g_other, other)])
        v, coin = draws([pk.draw_keys(2, 0)], t, ref.view)
        theta = ref.step(theta, np.sin(3.0 * theta + t), t, v[0], coin[0])
    assert np.abs(theta - 1.0).max() > 0.02
    np.testing.assert_allclose(late.numpy(), theta, rtol=1e-9, atol=1e-11)


@pytest.mark.long  # end-to-end: make test-long
@pytest.mark.slow
def test_keras_fit_compiled_follows_eager_training():
    """The probes are XLA-drawn in every mode, so a jit-compiled fit follows an eager one."""
    x = np.random.default_rng(0).standard_normal((32, 3)).astype("float32")
    y = np.tanh(x @ np.array([[1.0], [-2.0], [0.5]], "float32"))

    def fitted(**options):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
        model.compile(optimizer=pk.PSGDKron(learning_rate=0.02, seed=3), loss="mse", **options)
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return model.get_weights(), history.history["loss"]

    eager, eager_loss = fitted(run_eagerly=True)
    compiled, compiled_loss = fitted(jit_compile=True)
    assert eager_loss[-1] < eager_loss[0]
    for a, b in zip(compiled, eager):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.long  # two processes of MirroredStrategy, as in test_distributed.py
def test_mirrored_strategy_fit_matches_one_device():
    sys.path.insert(0, str(ROOT / "tests"))
    import two_devices

    script = ("from optimizers.psgd_kron import PSGDKron\nfrom two_devices import compare_fit\n"
              "r = compare_fit(lambda: PSGDKron(learning_rate=0.02, seed=1), batch_size=32, epochs=3)\n"
              "print(f\"RESULT moved={r['moved']} gap={r['gap']} drift={r['drift']}\", flush=True)\n")
    (result,) = two_devices.run(script)
    assert float(result["moved"]) > 1e-2
    assert float(result["gap"]) < 1e-5 and float(result["drift"]) == 0.0


def test_config_round_trip():
    optimizer = pk.PSGDKron(learning_rate=0.01, beta_1=0.5, preconditioner_update_probability=0.25,
                            max_size_triangular=16, preconditioner_init_scale=None, seed=4, clipnorm=1.0)
    config = optimizer.get_config()
    assert config["preconditioner_init_scale"] == 0.0 and config["seed"] == 4
    assert pk.PSGDKron.from_config(config).get_config() == config


# -- bad input ------------------------------------------------------------------------------------------

BAD = [
    (dict(learning_rate=0.0), "learning_rate must be a number > 0"),
    (dict(learning_rate=[0.1, -1.0]), "learning_rate must be a number > 0"),
    (dict(beta_1=1.0), r"beta_1 must be a number in \[0, 1\)"),
    (dict(preconditioner_lr=float("nan")), "preconditioner_lr must be a number > 0"),
    (dict(preconditioner_update_probability=0.0), r"preconditioner_update_probability must be a number in \(0, 1\]"),
    (dict(preconditioner_update_probability=[0.5, 1.5]), r"preconditioner_update_probability must be a number in"),
    (dict(max_size_triangular=0), "max_size_triangular must be a positive integer"),
    (dict(max_size_triangular=2.5), "max_size_triangular must be a positive integer"),
    (dict(preconditioner_init_scale=-1.0), "preconditioner_init_scale must be a number >= 0"),
]


@pytest.mark.parametrize("settings, message", BAD)
def test_bad_hyperparameters_are_refused_in_one_line(settings, message):
    makers = [pk.engine_psgd_kron]
    if not any(isinstance(v, list) for v in settings.values()):
        makers.append(pk.PSGDKron)
    for make in makers:
        with pytest.raises(ValueError, match=message) as error:
            make(**settings)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        pk.PSGDKron(seed=-1)


def test_a_per_seed_list_of_the_wrong_length_is_refused():
    optimizer = pk.engine_psgd_kron(learning_rate=[0.1, 0.2])
    with pytest.raises(ValueError, match="optimizer.learning_rate has 2 values but the run has 3 seeds"):
        optimizer.build(tf.Variable(tf.zeros([3, 2], tf.float64)), [0, 1, 2])


def test_footprint_counts_what_init_allocates():
    from lodo.experiment import memory

    entry = registry.optimizer("psgd_kron")
    for n, max_size in ((6, 8192), (6, 4)):
        optimizer = pk.engine_psgd_kron(max_size_triangular=max_size)
        optimizer.build(tf.Variable(tf.zeros([1, n], tf.float64)), [0])
        allocated = sum(int(np.prod(v.shape)) for v in optimizer.variables)
        names = {"n": n, **entry.defaults, "max_size_triangular": max_size}
        assert memory.evaluate(entry.footprint["state"], names) == allocated - 1  # the step count aside


# -- through the framework -------------------------------------------------------------------------------

@pytest.mark.long  # end-to-end: make test-long
@pytest.mark.slow
@pytest.mark.parametrize("task", ["noisy_quadratic_bowl", "rosenbrock"])
def test_a_short_run_through_the_framework(tmp_path, task):
    out = subprocess.run([sys.executable, "-m", "lodo.run", f"task={task}", "optimizer=psgd_kron", "steps=300",
                          "num_seeds=2", "progress=false", f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["loss_final_mean"])

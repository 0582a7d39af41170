"""SOAP: the engine and the Keras class against a NumPy reference written from the paper's algorithm."""

import json
import math
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from lodo.experiment import registry
from lodo.experiment.engine import Engine
from optimizers.soap import SOAP, engine_soap, gram_schmidt_columns, jacobi_eigh
from reference import numpy_bowl

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-4  # the tie-breaker's size, as documented in optimizers/soap.py


def tie_broken(a):
    k = len(a)
    scale = np.trace(a) / k if np.trace(a) > 0 else 1.0
    return a + np.diag(DELTA * scale * np.arange(1, k + 1) / k)


def eigenvectors(a):
    w, q = np.linalg.eigh(tie_broken(a))
    return q[:, np.argsort(-w, kind="stable")]


def power_step(a, q):
    aq = tie_broken(a) @ q
    order = np.argsort(-np.einsum("ij,ij->j", q, aq), kind="stable")
    return np.linalg.qr(aq[:, order])[0], order


class NumpySOAP:
    """One array's SOAP step in float64, from the paper's algorithm and the module's documented choices."""

    def __init__(self, shape, lr, b1, b2, bs, eps, freq, max_dim=2048, precondition_1d=True):
        shape = tuple(shape)
        self.shape, self.hp = shape, (lr, b1, b2, bs, eps, freq)
        self.rows, self.cols = (math.prod(shape[:-1]), shape[-1]) if len(shape) >= 2 else (
            shape[0] if shape else 1, 1)
        use_left = 1 < self.rows <= max_dim and (len(shape) >= 2 or precondition_1d)
        use_right = 1 < self.cols <= max_dim and len(shape) >= 2
        self.L = np.zeros((self.rows, self.rows)) if use_left else None
        self.R = np.zeros((self.cols, self.cols)) if use_right else None
        self.QL, self.QR = np.eye(self.rows), np.eye(self.cols)  # the identity is also "not rotated"
        self.m, self.v, self.t = np.zeros((self.rows, self.cols)), np.zeros((self.rows, self.cols)), 0

    def step(self, w, g):
        lr, b1, b2, bs, eps, freq = self.hp
        G = np.asarray(g, np.float64).reshape(self.rows, self.cols)
        self.t += 1
        t = self.t
        self.m = b1 * self.m + (1 - b1) * G
        self.v = b2 * self.v + (1 - b2) * (self.QL.T @ G @ self.QR) ** 2
        m_hat = (self.QL.T @ self.m @ self.QR) / (1 - b1 ** t)
        direction = self.QL @ (m_hat / (np.sqrt(self.v / (1 - b2 ** t)) + eps)) @ self.QR.T
        w = w - lr * direction.reshape(self.shape)
        if self.L is not None:
            self.L = bs * self.L + (1 - bs) * G @ G.T
        if self.R is not None:
            self.R = bs * self.R + (1 - bs) * G.T @ G
        if t == 1:
            self.QL = eigenvectors(self.L) if self.L is not None else self.QL
            self.QR = eigenvectors(self.R) if self.R is not None else self.QR
            self.v = (1 - b2) * (self.QL.T @ G @ self.QR) ** 2
        elif t % freq == 0:
            if self.L is not None:
                self.QL, order = power_step(self.L, self.QL)
                self.v = self.v[order]
            if self.R is not None:
                self.QR, order = power_step(self.R, self.QR)
                self.v = self.v[:, order]
        return w


HP = dict(learning_rate=0.05, beta_1=0.9, beta_2=0.8, shampoo_beta=0.7, epsilon=1e-8, precondition_frequency=3)
SEEDS = [2, 7]
STEPS = 30


def reference_hp(hp):
    return (hp["learning_rate"], hp["beta_1"], hp["beta_2"], hp["shampoo_beta"], hp["epsilon"],
            hp["precondition_frequency"])


def numpy_seed(bowl, seed, hp, steps=STEPS):
    soap = NumpySOAP((bowl.num_params,), *reference_hp(hp))
    return numpy_bowl(bowl, seed, steps, lambda theta, grad, t: soap.step(theta, grad(theta)))


def engine_run(bowl, hp, seeds=SEEDS, steps=STEPS):
    engine = Engine(bowl, registry.build_engine_optimizer("soap", **hp), seeds, chunk_size=steps)
    trace = engine.run(steps)
    return engine.params.numpy(), trace.loss_matrix()


@pytest.fixture(scope="module")
def bowl():
    return registry.build_task("noisy_quadratic_bowl", dim=6)


def test_engine_follows_numpy_on_the_bowl(bowl):
    """30 steps of noisy gradients: the first basis from a rank-1 statistic (its null space set by the
    tie-breaker), nine power-iteration refreshes; the Jacobi/Gram-Schmidt path against LAPACK's."""
    params, _ = engine_run(bowl, HP)
    for row, seed in enumerate(SEEDS):
        expected = numpy_seed(bowl, seed, HP)
        assert np.abs(expected[-1] - expected[0]).max() > 0.3  # it moved
        np.testing.assert_allclose(params[row], expected[-1], rtol=1e-9, atol=1e-10)


@pytest.mark.long  # three compiled SOAP engines; make test-long (CI runs it)
def test_per_seed_lists_give_each_seed_its_scalar_run(bowl):
    """Every seed equals NumPy with its values; the second (every value changed) also equals its scalar run
    (one compilation per scalar run: the first seed's is the test above, nearly)."""
    lists = dict(HP, learning_rate=[0.05, 0.02], beta_1=[0.9, 0.5], beta_2=[0.8, 0.99], shampoo_beta=[0.7, 0.95],
                 epsilon=[1e-8, 1e-3])
    params, losses = engine_run(bowl, lists)
    assert abs(losses[-1, 0] - losses[-1, 1]) > 1e-3
    values = [{k: (v[row] if isinstance(v, list) else v) for k, v in lists.items()} for row in range(2)]
    for row, seed in enumerate(SEEDS):
        np.testing.assert_allclose(params[row], numpy_seed(bowl, seed, values[row])[-1], rtol=1e-9, atol=1e-10)
    scalar, scalar_losses = engine_run(bowl, values[1])
    np.testing.assert_allclose(params[1], scalar[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(losses[:, 1], scalar_losses[:, 1], rtol=1e-12, atol=0)


def test_without_rotation_the_engine_is_adam(bowl):
    """precondition_1d false: Adam (textbook bias corrections), no factor kept; nor with n > max_precond_dim."""
    optimizer = registry.build_engine_optimizer("soap", **HP, precondition_1d=False)
    engine = Engine(bowl, optimizer, SEEDS, chunk_size=20)
    engine.run(20)
    assert len(optimizer.variables) == 3  # count, m, v
    soap = NumpySOAP((bowl.num_params,), *reference_hp(HP), precondition_1d=False)
    expected = numpy_bowl(bowl, SEEDS[0], 20, lambda theta, grad, t: soap.step(theta, grad(theta)))
    np.testing.assert_allclose(engine.params.numpy()[0], expected[-1], rtol=1e-12, atol=1e-14)
    small = registry.build_engine_optimizer("soap", max_precond_dim=5)
    small.build(tf.Variable(tf.zeros([2, 6], tf.float64)), SEEDS)
    assert len(small.variables) == 3


def test_jacobi_and_gram_schmidt_against_lapack():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 7, 2))
    a = g @ np.swapaxes(g, 1, 2) + np.diag(np.arange(1.0, 8.0)) * 1e-6  # odd size, clustered small eigenvalues
    w, v = (x.numpy() for x in tf.function(jacobi_eigh, jit_compile=True)(tf.constant(a)))
    for i in range(3):
        order = np.argsort(w[i])
        np.testing.assert_allclose(w[i][order], np.linalg.eigvalsh(a[i]), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(a[i] @ v[i], v[i] * w[i], atol=1e-14)
        np.testing.assert_allclose(v[i].T @ v[i], np.eye(7), atol=1e-14)
    b = rng.standard_normal((2, 5, 5))
    q = tf.function(gram_schmidt_columns, jit_compile=True)(tf.constant(b)).numpy()
    for i in range(2):
        householder = np.linalg.qr(b[i])[0]
        np.testing.assert_allclose(np.abs(q[i]), np.abs(householder), atol=1e-13)  # Q is unique up to signs
        np.testing.assert_allclose(q[i].T @ q[i], np.eye(5), atol=1e-14)


# Ranks 0-4: a scalar (Adam), a vector (one factor), a matrix (two), a conv kernel viewed as [12, 4], and a
# [8, 3] view whose long side exceeds max_precond_dim = 5 (only its columns are rotated).
SHAPES = [(), (5,), (4, 3), (2, 2, 3, 4), (2, 4, 3)]


def run_keras(optimizer, inits, problem, steps):
    variables = [tf.Variable(w) for w in inits]
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(0.5 * a * tf.square(v - c)) + 0.1 * tf.reduce_sum(v) ** 2
                       for v, (a, c) in zip(variables, problem))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return [v.numpy() for v in variables]


def quadratic_problem(seed):
    rng = np.random.default_rng(seed)
    problem = [(rng.uniform(0.5, 3.0, s), rng.standard_normal(s)) for s in SHAPES]
    inits = [c + rng.uniform(1, 2, np.shape(c)) for _, c in problem]
    return problem, inits


def run_reference(inits, problem, steps, hp, max_dim, precondition_1d=True):
    steppers = [NumpySOAP(np.shape(w), *reference_hp(hp), max_dim=max_dim, precondition_1d=precondition_1d)
                for w in inits]
    ws = [np.array(w, np.float64) for w in inits]
    for _ in range(steps):
        ws = [s.step(w, a * (w - c) + 0.2 * np.sum(w)) for s, w, (a, c) in zip(steppers, ws, problem)]
    return ws


@pytest.mark.parametrize("precondition_1d", [True, False])
def test_keras_class_follows_numpy_on_every_rank(float64_keras, precondition_1d):
    problem, inits = quadratic_problem(1)
    hp = dict(HP, precondition_frequency=4)
    got = run_keras(SOAP(**hp, max_precond_dim=5, precondition_1d=precondition_1d), inits, problem, 25)
    expected = run_reference(inits, problem, 25, hp, 5, precondition_1d)
    for g, e, w0 in zip(got, expected, inits):
        assert np.abs(e - w0).max() > 0.2  # it moved
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-10)


def test_keras_weight_decay_is_decoupled(float64_keras):
    problem, inits = quadratic_problem(2)
    got = run_keras(SOAP(**HP, weight_decay=0.1), inits[2:3], problem[2:3], 1)
    # Keras shrinks the weights by lr·wd·w, then step 1 is Adam's, lr·g/(|g| + ε) elementwise, with the
    # gradient taken before the shrinking.
    (a, c), w = problem[2], inits[2]
    g = a * (w - c) + 0.2 * np.sum(w)
    decay = 0.05 * float(np.float32(0.1))  # Keras casts the decay through float32
    np.testing.assert_allclose(got[0], w - w * decay - 0.05 * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_keras_class_in_float32_under_a_compiled_step():
    """float32, the step compiled by XLA (its eigh and QR), on square views: their statistics have full rank
    from step 1, so float32 rounding is not amplified through an undetermined null space."""
    rng = np.random.default_rng(3)
    shapes = [(3, 3), (1, 1, 4, 4)]
    problem = [(rng.uniform(0.5, 3.0, s), rng.standard_normal(s)) for s in shapes]
    inits = [c + rng.uniform(1, 2, np.shape(c)) for _, c in problem]
    variables = [tf.Variable(np.float32(w)) for w in inits]
    constants = [(tf.constant(a, tf.float32), tf.constant(c, tf.float32)) for a, c in problem]
    optimizer = SOAP(**dict(HP, precondition_frequency=2))

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(0.5 * a * tf.square(v - c)) + 0.1 * tf.reduce_sum(v) ** 2
                       for v, (a, c) in zip(variables, constants))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    optimizer.build(variables)
    for _ in range(8):
        step()
    expected = run_reference(inits, problem, 8, dict(HP, precondition_frequency=2), 2048)
    for v, e, w0 in zip(variables, expected, inits):
        assert np.abs(e - w0).max() > 0.2
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.long  # end-to-end: make test-long
@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_fit_trains_a_model(jit_compile):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((64, 5)).astype("float32")
    y = x @ np.random.default_rng(1).standard_normal((5, 2)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    model.compile(optimizer=SOAP(learning_rate=0.01), loss="mse", jit_compile=jit_compile)
    loss = model.fit(x, y, batch_size=16, epochs=8, verbose=0).history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < 0.5 * loss[0]


@pytest.mark.long  # end-to-end: make test-long
@pytest.mark.slow
def test_mirrored_strategy_keeps_the_replicas_identical_and_follows_one_device():
    """2 logical CPUs: the replicas' optimizer states agree exactly; the fit follows a single device to
    float32 accuracy as SOAP amplifies it (a gradient rotated onto a statistic's null space is rounding
    noise, which ε = 1e-8 normalises), against a 0.13 move of the weights."""
    from two_devices import run

    script = """
from two_devices import compare_fit
from optimizers.soap import SOAP
r = compare_fit(lambda: SOAP(learning_rate=0.01, precondition_frequency=2), batch_size=16, epochs=3)
print("RESULT", f"moved={r['moved']}", f"gap={r['gap']}", f"drift={r['drift']}")
"""
    (result,) = run(script)
    moved, gap, drift = (float(result[k]) for k in ("moved", "gap", "drift"))
    assert moved > 0.05 and gap < 0.02 * moved and drift == 0.0


BAD = [
    (dict(learning_rate=0.0), r"learning_rate must be > 0"),
    (dict(beta_1=1.0), r"beta_1 must be in \[0, 1\)"),
    (dict(beta_2=-0.1), r"beta_2 must be in \[0, 1\)"),
    (dict(shampoo_beta=[0.5, 1.0]), r"shampoo_beta must be in \[0, 1\)"),
    (dict(epsilon=0.0), r"epsilon must be > 0"),
    (dict(precondition_frequency=0), r"precondition_frequency must be an integer >= 1"),
    (dict(precondition_frequency=2.5), r"precondition_frequency must be an integer >= 1"),
    (dict(max_precond_dim=[4, 8]), r"max_precond_dim must be an integer >= 1"),
    (dict(precondition_1d="yes"), r"precondition_1d must be true or false"),
    (dict(beta_1=float("nan")), r"beta_1 must be a finite number"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_hyperparameters_are_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match="optimizer." + message) as err:
        engine_soap(**bad)
    assert "\n" not in str(err.value)
    if not any(isinstance(v, list) for v in bad.values()):
        with pytest.raises(ValueError, match="SOAP " + message) as err:
            SOAP(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="one value per seed"):
        Engine(registry.build_task("noisy_quadratic_bowl", dim=3), engine_soap(beta_1=[0.5, 0.6]), [0, 1, 2])


@pytest.mark.long  # end-to-end: make test-long
@pytest.mark.slow
def test_runs_through_the_framework(tmp_path):
    """``lodo.run`` on the bowl and Rosenbrock finishes with a finite loss; a bad setting is refused first."""
    cases = [["task=noisy_quadratic_bowl", "optimizer=soap", "steps=300", "num_seeds=2",
              f"hydra.run.dir={tmp_path / 'bowl'}"],
             ["task=rosenbrock", "optimizer=soap", "steps=300", "num_seeds=2", f"hydra.run.dir={tmp_path / 'rb'}"],
             ["optimizer=soap", "optimizer.precondition_frequency=0", "steps=10", f"hydra.run.dir={tmp_path / 'x'}"]]
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_batch.py")], input=json.dumps(cases),
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    records = json.loads(result.stdout.strip().splitlines()[-1])["results"]
    for record, folder in zip(records[:2], ("bowl", "rb")):
        assert record["code"] in (0, None), record["stderr"][-2000:]
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        assert math.isfinite(summary["loss_final_mean"])
    assert records[2]["code"] not in (0, None) and "precondition_frequency" in records[2]["stderr"]

"""Per-seed hyperparameters: a list of S values gives seed i exactly the run of a scalar config with the i-th values.

The reference for the per-seed path is the scalar path itself (Keras's own
Adam/SGD/RMSprop, the Keras Yogi class, the scalar L-BFGS and LODO code),
run once per seed with that seed's values; the NumPy references of the scalar
paths live in test_engine.py, test_quasi_newton.py, test_lodo.py and
test_ablations.py. The scalar runs use the same group of seeds (column i is
compared): XLA may pick other kernels for another batch size, and L-BFGS's
ill-conditioned two-loop recursion amplifies that last-bit difference to
~1e-6 within 20 steps, which has nothing to do with per-seed values.
"""

import numpy as np
import pytest
import tensorflow as tf

from lodo.experiment.engine import Engine
from lodo.experiment import registry

SEEDS = [3, 5]
STEPS = 200
LODO = dict(initial_lr=[0.27, 0.5], meta_lr=[1e-3, 1e-2], beta=[0.2, 0.9])
# One case per distinct per-seed code path (each costs three XLA compilations); the optimizers
# that share a path with one of these are checked more cheaply below.
CASES = {
    "adam": dict(learning_rate=[0.3, 1.1], beta_1=[0.5, 0.0], beta_2=[0.99, 0.9]),
    "momentum": dict(learning_rate=[0.3, 0.7], momentum=[0.0, 0.9]),
    "rmsprop": dict(learning_rate=[0.05, 0.2], rho=[0.3, 0.05], momentum=[0.0, 0.9]),
    "yogi": dict(learning_rate=[0.3, 0.05], beta_1=[0.0, 0.9], beta_2=[0.99, 0.9999]),
    "olbfgs": dict(eta0=[0.5, 0.2], tau=[100.0, 50.0], lam=[0.0, 0.1], memory=8),
    "lodo": dict(LODO, beta=[0.0, 0.9], num_layers=2),  # tiny networks: LODO's unrolled layers compile slowly
    "lodo_diagonal": LODO,
    "lodo_global": LODO,
    "lodo_residuals": dict(LODO, num_layers=2),
    "lodo_sgd": dict(LODO, num_layers=2),
    # Keras's own optimizers, one per seed (lodo.functional.PerSeedKeras); Lamb's rule is not element-wise.
    "lamb": dict(learning_rate=[0.05, 0.2], beta_1=[0.5, 0.9]),
}
# Checked the same way (each seed equals its scalar run, and the NumPy reference) in their own test files.
OWN_FILES = {"soap": "test_soap.py", "psgd_kron": "test_psgd_kron.py"}
SHARED = {  # same per-seed code as the case named
    "momentum_ema": ("momentum", dict(learning_rate=[0.9, 1.3], momentum=[0.0, 0.95])),
    "lbfgs": ("olbfgs", dict(eta0=[0.5, 0.2], tau=[100.0, 50.0], memory=8)),
    "lodo_no_momentum": ("lodo", dict(initial_lr=[0.27, 0.5], meta_lr=[1e-3, 1e-2], num_layers=2)),
    **{name: ("lamb", dict(learning_rate=[0.05, 0.2])) for name in
       ("adamw", "nadam", "lion", "adafactor", "muon", "schedule_free_adamw")},
}


def run(name, seeds, hp, task):
    engine = Engine(task, registry.build_engine_optimizer(name, **hp), seeds, chunk_size=STEPS)
    trace = engine.run(STEPS)
    return trace.loss_matrix(), engine.params.numpy()


def seed_hp(hp, i):
    return {k: v[i] if isinstance(v, list) else v for k, v in hp.items()}


def test_every_tunable_small_task_optimizer_takes_per_seed_lists():
    assert set(CASES) | set(SHARED) | set(OWN_FILES) == {n for n in registry.names("optimizer")
                                                         if registry.optimizer(n).per_seed}
    from pathlib import Path

    for name, file in OWN_FILES.items():
        assert "per_seed" in (Path(__file__).parent / file).read_text(), (name, file)
    for name, (same_as, hp) in SHARED.items():
        optimizer = registry.build_engine_optimizer(name, **hp)
        tested = registry.build_engine_optimizer(same_as, **CASES[same_as])
        assert isinstance(optimizer, type(tested)) or isinstance(tested, type(optimizer))  # one class family
        optimizer.build(tf.Variable(tf.zeros([2, 3], tf.float64)), SEEDS)
    ema = registry.build_engine_optimizer("momentum_ema", **SHARED["momentum_ema"][1])
    ema.build(tf.Variable(tf.zeros([2, 3], tf.float64)), SEEDS)
    # Heavy ball with rate lr·(1 − μ), computed in float64 as the scalar path does before Keras stores it.
    assert ema.columns["heavy_ball_rate"][:, 0].tolist() == [0.9 * (1 - 0.0), 1.3 * (1 - 0.95)]
    assert registry.build_engine_optimizer("lodo_no_momentum", **SHARED["lodo_no_momentum"][1]).beta == 0.0


# Lamb's per-seed path is also checked in test_modern_optimizers.py, and LODO-Residuals' and LODO-SGD's run
# through LODO's own per-seed core (checked here for lodo): these three only in make test-long (CI runs it).
LONG_ONLY = {"lamb", "lodo_residuals", "lodo_sgd"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long) if n in LONG_ONLY else n
                                  for n in sorted(CASES)])
def test_per_seed_run_equals_scalar_runs_seed_by_seed(name):
    bowl = registry.build_task("noisy_quadratic_bowl", dim=10)
    hp = CASES[name]
    losses, params = run(name, SEEDS, hp, bowl)
    assert np.isfinite(losses).all()
    assert len({round(float(v), 6) for v in losses[-1]}) == len(SEEDS)  # the seeds really ran differently
    for i, seed in enumerate(SEEDS):
        scalar_losses, scalar_params = run(name, SEEDS, seed_hp(hp, i), bowl)
        np.testing.assert_allclose(losses[:, i], scalar_losses[:, i], rtol=1e-12, atol=0, err_msg=f"{name} seed {seed}")
        np.testing.assert_allclose(params[i], scalar_params[i], rtol=1e-12, atol=1e-13, err_msg=f"{name} seed {seed}")


def test_scalars_mix_with_lists_and_rosenbrock_runs_per_seed():
    rosenbrock = registry.build_task("rosenbrock")
    hp = dict(learning_rate=[0.97, 0.3], beta_1=0.864, beta_2=0.99804)
    losses, params = run("adam", [0, 1], hp, rosenbrock)
    for i in range(2):
        scalar_losses, scalar_params = run("adam", [0, 1], seed_hp(hp, i), rosenbrock)
        np.testing.assert_allclose(losses[:, i], scalar_losses[:, i], rtol=1e-12, atol=0)
        np.testing.assert_allclose(params[i], scalar_params[i], rtol=1e-12, atol=1e-15)


def test_bad_per_seed_lists_fail_with_one_line():
    bowl = registry.build_task("noisy_quadratic_bowl", dim=4)
    with pytest.raises(ValueError, match=r"has 2 values but the run has 3 seeds"):
        Engine(bowl, registry.build_engine_optimizer("adam", learning_rate=[0.1, 0.2]), [0, 1, 2], chunk_size=2)
    with pytest.raises(ValueError, match=r"has 2 values but the run has 3 seeds"):
        Engine(bowl, registry.build_engine_optimizer("lodo", meta_lr=[0.1, 0.2], num_layers=2), [0, 1, 2], chunk_size=2)
    with pytest.raises(ValueError, match=r"'lars' takes no per-seed lists"):
        registry.build_engine_optimizer("lars", learning_rate=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"list of numbers"):
        registry.build_engine_optimizer("adam", learning_rate=[0.1, "x"])
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        registry.build_engine_optimizer("momentum", momentum=[0.5, 1.5])
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        registry.build_engine_optimizer("lodo", beta=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"memory must be a number"):
        registry.build_engine_optimizer("lbfgs", memory=[4, 8])

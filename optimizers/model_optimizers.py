"""Keras optimizers that train a Keras model (the image tasks), by the same config names as the engine's.

The small-task engine wraps optimizers around a ``[S, n]`` variable
(``optimizers.build``); a model is trained by an ordinary Keras optimizer
instead, which is what a user would pass to ``model.compile``. The config's
hyperparameters are the same keys in both cases.
"""

from __future__ import annotations

import functools
import inspect

import keras

# Optimizers that need the exact Hessian or a dense n×n estimate, or an LSTM meta-trained on bowls:
# SPEC §2 expects "cannot be run on tasks of this scale" for them on the image tasks.
SMALL_TASK_ONLY = ("lbfgs", "olbfgs", "bfgs", "levenberg_marquardt", "newton", "l2lbgdbgd")


def _adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    return keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon)


def _momentum(learning_rate=0.01, momentum=0.9):
    return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=False)


def _momentum_ema(learning_rate=0.01, momentum=0.9):
    # m ← μm + (1 − μ)g, θ ← θ − lr·m is heavy ball with rate lr·(1 − μ) (see optimizers.keras_builtins).
    return keras.optimizers.SGD(learning_rate * (1 - momentum), momentum=momentum, nesterov=False)


def _rmsprop(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7):
    return keras.optimizers.RMSprop(learning_rate, rho=rho, momentum=momentum, epsilon=epsilon)


def _yogi(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-3):
    from optimizers.yogi import Yogi

    return Yogi(learning_rate, beta_1, beta_2, epsilon)


def _lars(learning_rate=0.001, momentum=0.9, weight_decay=5e-4, total_steps=100_000):
    from optimizers.lars import LARS

    return LARS(learning_rate, momentum, weight_decay, total_steps=total_steps)


FACTORIES = {
    "adam": _adam,
    "momentum": _momentum,
    "momentum_ema": _momentum_ema,
    "rmsprop": _rmsprop,
    "yogi": _yogi,
    "lars": _lars,
}
# LODO and its ablations are the Keras classes of ``lodo`` themselves; they also take the run's seed.
LODO_CLASSES = {
    "lodo": "LODO",
    "lodo_diagonal": "LODODiagonal",
    "lodo_global": "LODOGlobal",
    "lodo_residuals": "LODOResiduals",
    "lodo_no_momentum": "LODONoMomentum",
    "lodo_sgd": "LODOSGD",
}
NAMES = sorted([*FACTORIES, *LODO_CLASSES])


def build(name: str, *, seed: int = 0, **hparams) -> keras.optimizers.Optimizer:
    """The Keras optimizer ``name`` with the config's hyperparameters, or a one-line ValueError.

    ``seed`` draws the randomness an optimizer owns (LODO's permutations and
    initial blocks); the others ignore it.
    """
    if name in SMALL_TASK_ONLY:
        raise ValueError(f"optimizer {name!r} cannot be run on tasks of this scale (it needs the exact Hessian, a "
                         f"dense n×n matrix or a second gradient per step); use it on noisy_quadratic_bowl or rosenbrock")
    if name in LODO_CLASSES:
        import lodo

        make = functools.partial(getattr(lodo, LODO_CLASSES[name]), seed=seed)
        accepted = inspect.signature(make.func).parameters
    elif name in FACTORIES:
        make = FACTORIES[name]
        accepted = inspect.signature(make).parameters
    else:
        raise ValueError(f"unknown optimizer {name!r}; optimizers for image tasks: {', '.join(NAMES)}")
    from optimizers import check_hyperparameters

    hyperparameters = {k: p for k, p in accepted.items()
                       if p.kind is p.POSITIONAL_OR_KEYWORD and k not in ("self", "name", "seed")}
    check_hyperparameters(name, hparams, hyperparameters)
    return make(**hparams)

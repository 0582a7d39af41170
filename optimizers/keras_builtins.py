"""Adam, Momentum (heavy ball) and RMSprop on the multi-seed engine: Keras's own classes on its ``[S, n]`` variable.

Their rules are element-wise, so one Keras optimizer on the stacked variable
treats every seed independently and exactly.

Per-seed hyperparameters (a list with one value per seed) cannot go through
Keras 3.15's classes: ``SGD`` rejects a non-float momentum in its constructor,
and ``SGD`` and ``RMSprop`` branch on ``momentum != 0`` / ``momentum > 0`` in
Python, which a ``[S, 1]`` tensor cannot answer. (Adam alone would take
tensors, since its β's may be tensors and its learning rate a callable.) So
lists select ``PerSeedRule``: the same update written out as a pure function
over ``[S, 1]`` hyperparameter columns, term by term in Keras's order and with
Keras's roundings (the learning rate lives in a floatx variable; ``ops.cast``
of a Python float goes through float32), so seed i equals a Keras run with the
i-th values (tests/test_per_seed_hyperparameters.py).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from lodo.functional import FunctionalOptimizer, KerasOptimizer, any_per_seed, check_range, seed_values


class PerSeedRule(FunctionalOptimizer):
    """An element-wise rule with ``[S, 1]`` hyperparameter columns; its state: a step count and ``slots`` ``[S, n]``.

    ``rule(h, count, slots, grad, rate) -> (step, slots)`` gets ``h``, the
    hyperparameters as float64 NumPy columns (plus ``derived(h)``), and
    ``rate(values, dtype)``, a learning rate as Keras would hold it; it
    returns the step to subtract from θ.
    """

    def __init__(self, name: str, hparams: dict, slots: int, rule, derived=None):
        self.hparams = dict(hparams)
        self.floatx = keras.config.floatx()  # Keras reads it when the optimizer is made, so do we
        self.columns = None

        def init(n, seeds, dtype):
            columns = {k: seed_values(v, len(seeds), k)[:, None] for k, v in self.hparams.items()}
            self.columns = {**columns, **(derived(columns) if derived else {})}
            return tf.zeros([], tf.int64), tuple(tf.zeros([len(seeds), n], dtype) for _ in range(slots))

        def update(state, grad, params, oracle):
            count, slot_values = state
            step, slot_values = rule(self.columns, count, slot_values, grad, self.learning_rate)
            return step, (count + 1, tuple(slot_values))

        super().__init__(name, init, update)

    def learning_rate(self, values: np.ndarray, dtype) -> tf.Tensor:
        """Keras keeps the learning rate in a floatx variable and casts it to the variable's dtype."""
        return tf.cast(tf.constant(values, self.floatx), dtype)


def via_float32(values: np.ndarray, dtype) -> tf.Tensor:
    """What ``keras.ops.cast(python_float, dtype)`` gives: the float converted to float32 first."""
    return tf.cast(tf.constant(values, tf.float32), dtype)


def _const(values: np.ndarray, dtype) -> tf.Tensor:
    """A Python float in an op with a ``dtype`` tensor: converted straight to ``dtype``."""
    return tf.constant(values, dtype)


def adam_rule(h, count, slots, g, rate):
    m, v = slots
    dtype = g.dtype
    lr = rate(h["learning_rate"], dtype)
    local_step = tf.cast(count + 1, dtype)
    beta_1_power = tf.pow(via_float32(h["beta_1"], dtype), local_step)
    beta_2_power = tf.pow(via_float32(h["beta_2"], dtype), local_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = m + (g - m) * _const(1 - h["beta_1"], dtype)
    v = v + (tf.square(g) - v) * _const(1 - h["beta_2"], dtype)
    return (m * alpha) / (tf.sqrt(v) + _const(h["epsilon"], dtype)), (m, v)


def heavy_ball_rule(h, count, slots, g, rate):
    (m,) = slots
    dtype = g.dtype
    # Keras: m ← m·μ − g·lr, θ ← θ + m. With μ = 0 this is θ − g·lr exactly (0·m = ±0).
    m = m * via_float32(h["momentum"], dtype) - g * rate(h["heavy_ball_rate"], dtype)
    return -m, (m,)


def rmsprop_rule(h, count, slots, g, rate):
    velocity, momentum = slots
    dtype = g.dtype
    velocity = _const(h["rho"], dtype) * velocity + _const(1 - h["rho"], dtype) * tf.square(g)
    increment = (rate(h["learning_rate"], dtype) * g) / tf.sqrt(velocity + _const(h["epsilon"], dtype))
    # Keras skips the momentum slot when μ = 0; 0·m + increment is the increment exactly.
    momentum = _const(h["momentum"], dtype) * momentum + increment
    return momentum, (velocity, momentum)


def adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    if any_per_seed(learning_rate, beta_1, beta_2, epsilon):
        hp = dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
        return PerSeedRule("adam", hp, 2, adam_rule)
    return KerasOptimizer("adam", keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon))


def momentum(learning_rate=0.01, momentum=0.9):
    if any_per_seed(learning_rate, momentum):
        check_range("momentum", momentum, 0.0, 1.0, high_open=False)  # as Keras's SGD checks a scalar
        return PerSeedRule("momentum", dict(learning_rate=learning_rate, momentum=momentum), 1, heavy_ball_rule,
                           derived=lambda h: {"heavy_ball_rate": h["learning_rate"]})
    return KerasOptimizer("momentum", keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=False))


def momentum_ema(learning_rate=0.01, momentum=0.9):
    """Momentum as an average of gradients: m ← μm + (1 − μ)g, θ ← θ − lr·m.

    Exactly heavy ball with learning rate lr·(1 − μ) (substitute v = −lr·m),
    so it is Keras's SGD with that rate. The paper's Rosenbrock value for
    Momentum (Table 8) is reproduced by this form with its tuned
    hyperparameters, not by heavy ball with the same numbers.
    """
    if any_per_seed(learning_rate, momentum):
        check_range("momentum", momentum, 0.0, 1.0, high_open=False)
        # lr·(1 − μ) in float64, as Python computes it before Keras stores it in floatx.
        return PerSeedRule("momentum_ema", dict(learning_rate=learning_rate, momentum=momentum), 1, heavy_ball_rule,
                           derived=lambda h: {"heavy_ball_rate": h["learning_rate"] * (1 - h["momentum"])})
    return KerasOptimizer("momentum_ema", keras.optimizers.SGD(learning_rate * (1 - momentum), momentum=momentum,
                                                              nesterov=False))


def rmsprop(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7):
    if any_per_seed(learning_rate, rho, momentum, epsilon):
        hp = dict(learning_rate=learning_rate, rho=rho, momentum=momentum, epsilon=epsilon)
        return PerSeedRule("rmsprop", hp, 2, rmsprop_rule)
    return KerasOptimizer("rmsprop", keras.optimizers.RMSprop(learning_rate, rho=rho, momentum=momentum, epsilon=epsilon))


def keras_momentum_ema(learning_rate=0.01, momentum=0.9):
    """``momentum_ema`` for a model: Keras's SGD with rate lr·(1 − μ) (see ``momentum_ema``)."""
    return keras.optimizers.SGD(learning_rate * (1 - momentum), momentum=momentum, nesterov=False)

"""Yogi (Zaheer et al. 2018) as a Keras 3 optimizer, and its multi-seed engine adapter.

The rule (SPEC §2):

    m ← β1·m + (1 − β1)·g
    v ← v − (1 − β2)·sign(v − g²)·g²
    θ ← θ − lr · m / (√v + ε)

with m = v = 0 at the start and no bias correction. Unlike Adam's
exponential average, v moves by at most (1 − β2)·g² per step in either
direction, so a sudden run of small gradients does not shrink the
denominator (and blow up the step) as fast as it would under Adam.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from lodo.functional import KerasOptimizer, any_per_seed, check_range, is_per_seed


@keras.saving.register_keras_serializable(package="lodo_baselines")
class Yogi(keras.optimizers.Optimizer):
    """Yogi for ``model.compile``/``model.fit``, ``apply_gradients`` loops and ``tf.distribute``.

    The update is element-wise and per variable, so Keras's standard
    per-variable ``update_step`` (which all-reduces gradients across
    replicas first) is all it needs. ``epsilon`` defaults to 1e-3 as in the
    paper: a much smaller ε lets coordinates with v ≈ 0 take huge steps.
    Other keyword arguments (``clipnorm``, ``weight_decay``, ``use_ema``, …)
    are Keras's own.
    """

    def __init__(self, learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-3, name=None, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"Yogi {key} must be in [0, 1), got {value!r}")
        if float(epsilon) <= 0.0:
            raise ValueError(f"Yogi epsilon must be positive, got {epsilon!r}")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._momentums = [self.add_variable_from_reference(v, name="momentum") for v in variables]
        self._velocities = [self.add_variable_from_reference(v, name="velocity") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        if isinstance(gradient, tf.IndexedSlices):
            # Rows without a gradient still see g = 0 in the rule (m decays), so densify.
            gradient = tf.convert_to_tensor(gradient)
        g = tf.cast(gradient, dtype)
        lr = tf.cast(learning_rate, dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        g2 = tf.square(g)
        m_new = self.beta_1 * tf.convert_to_tensor(m) + (1.0 - self.beta_1) * g
        v_old = tf.convert_to_tensor(v)
        v_new = v_old - (1.0 - self.beta_2) * tf.sign(v_old - g2) * g2
        self.assign(m, m_new)
        self.assign(v, v_new)
        self.assign_sub(variable, lr * m_new / (tf.sqrt(v_new) + self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return config


def yogi_rule(h, count, slots, g, rate):
    """``Yogi.update_step`` with ``[S, 1]`` hyperparameter columns, in the same order of operations."""
    m, v = slots
    dtype = g.dtype
    b1 = tf.constant(h["beta_1"], dtype)
    g2 = tf.square(g)
    m_new = b1 * m + tf.constant(1.0 - h["beta_1"], dtype) * g
    v_new = v - tf.constant(1.0 - h["beta_2"], dtype) * tf.sign(v - g2) * g2
    step = rate(h["learning_rate"], dtype) * m_new / (tf.sqrt(v_new) + tf.constant(h["epsilon"], dtype))
    return step, (m_new, v_new)


def engine_yogi(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-3):
    """Yogi on the engine's ``[S, n]`` variable: element-wise, hence exact per seed.

    A list (one value per seed) for any hyperparameter selects the functional
    ``yogi_rule``, which equals the Keras class seed by seed.
    """
    if any_per_seed(learning_rate, beta_1, beta_2, epsilon):
        from optimizers.keras_builtins import PerSeedRule

        for key, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            check_range(key, value, 0.0, 1.0)
        for value in (epsilon if is_per_seed(epsilon) else [epsilon]):
            if not float(value) > 0.0:
                raise ValueError(f"Yogi epsilon must be positive, got {value!r}")
        hp = dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
        return PerSeedRule("yogi", hp, 2, yogi_rule)
    return KerasOptimizer("yogi", Yogi(learning_rate, beta_1, beta_2, epsilon))

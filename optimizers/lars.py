"""LARS (You et al. 2017) as a Keras 3 optimizer, and its multi-seed engine adapter.

The rule (SPEC §2), for each layer ℓ (here: each variable):

    local_lr  = ‖w_ℓ‖ / (‖g_ℓ‖ + wd·‖w_ℓ‖)
    global_lr = lr · (1 − progress)²,  progress = min(step / total_steps, 1)
    buf_ℓ    ← μ·buf_ℓ + global_lr · local_lr · (g_ℓ + wd·w_ℓ)
    w_ℓ      ← w_ℓ − buf_ℓ

``step`` counts the updates already applied (0 at the first one). The local
rate makes each layer's step a fixed fraction of its own norm whatever the
gradient's scale, which is the point of LARS; where ‖w_ℓ‖ = 0 or ‖g_ℓ‖ = 0
(zero-initialized biases, a layer that received no gradient) that ratio is
meaningless, so local_lr = 1 there, the usual convention.

Both front ends use ``lars_buffer`` below; they differ only in what a "layer"
is: a whole variable for the Keras optimizer, one row (one seed) of the
engine's ``[S, n]`` variable for the engine.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from lodo.functional import FunctionalOptimizer


def _norm(x, axis):
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis, keepdims=True))


def lars_buffer(weights, grad, buffer, learning_rate, momentum, weight_decay, progress, axis=None):
    """The new momentum buffer (the caller subtracts it from the weights).

    Norms are taken over ``axis`` (``None``: the whole tensor, one layer);
    ``progress`` is the fraction of the step budget done, clipped to [0, 1].
    """
    w_norm, g_norm = _norm(weights, axis), _norm(grad, axis)
    usable = tf.logical_and(w_norm > 0, g_norm > 0)
    denominator = tf.where(usable, g_norm + weight_decay * w_norm, tf.ones_like(g_norm))
    local_lr = tf.where(usable, w_norm / denominator, tf.ones_like(w_norm))
    remaining = 1.0 - tf.clip_by_value(progress, 0.0, 1.0)
    global_lr = learning_rate * tf.square(remaining)
    return momentum * buffer + global_lr * local_lr * (grad + weight_decay * weights)


def _check(learning_rate, momentum, weight_decay, total_steps):
    for key, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"LARS {key} must be a finite number, got {value!r}")
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"LARS momentum must be in [0, 1), got {momentum!r}")
    if float(weight_decay) < 0.0:
        raise ValueError(f"LARS weight_decay must be non-negative, got {weight_decay!r}")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, (int, float))
                                    or int(total_steps) != total_steps or total_steps < 1):
        raise ValueError(f"LARS total_steps must be a positive integer (the step budget) or None, got {total_steps!r}")


@keras.saving.register_keras_serializable(package="lodo_baselines")
class LARS(keras.optimizers.Optimizer):
    """LARS for ``model.compile``/``model.fit``, ``apply_gradients`` loops and ``tf.distribute``.

    ``total_steps``, if given, is the step budget over which the global
    learning rate decays as lr·(1 − step/total_steps)², reaching 0 at the end
    (and staying 0 if training goes on); with ``model.fit`` it is
    epochs × steps per epoch. Without it the global rate is ``learning_rate``
    itself, so a Keras schedule decays it the Keras way: the same decay is
    ``PolynomialDecay(lr, total_steps, end_learning_rate=0.0, power=2)``. A
    schedule given together with ``total_steps`` is multiplied by that decay.

    ``weight_decay`` is LARS's own coupled term (it enters both the local rate
    and the step); it is *not* passed on to Keras's decoupled weight decay.
    Each variable is one layer, so the norms need only the variable itself and
    the all-reduced gradient: Keras's standard per-variable ``update_step``
    is correct under ``MirroredStrategy``.
    """

    def __init__(self, learning_rate=0.001, momentum=0.9, weight_decay=5e-4, total_steps=None, name=None, **kwargs):
        _check(learning_rate, momentum, weight_decay, total_steps)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)  # `weight_decay` would switch on Keras's decoupled decay
        self.total_steps = None if total_steps is None else int(total_steps)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._buffers = [self.add_variable_from_reference(v, name="momentum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)  # the norm needs every row
        buffer = self._buffers[self._get_variable_index(variable)]
        if self.total_steps is None:
            progress = tf.zeros([], dtype)  # (1 − 0)² = 1: the rate is the learning rate (or schedule) itself
        else:
            progress = tf.cast(self.iterations, dtype) / self.total_steps
        new = lars_buffer(tf.convert_to_tensor(variable), tf.cast(gradient, dtype), tf.convert_to_tensor(buffer),
                          tf.cast(learning_rate, dtype), self.momentum, self.lars_weight_decay, progress)
        self.assign(buffer, new)
        self.assign_sub(variable, new)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.lars_weight_decay, total_steps=self.total_steps)
        return config


class EngineLARS(FunctionalOptimizer):
    """S independent LARS runs on the engine's ``[S, n]`` variable: norms per row (seed).

    A small task has one "layer", so each seed's local rate comes from its own
    row; a whole-variable norm would couple the seeds. ``total_steps``
    defaults to 100000 (the bowl's budget); the runner's config passes the
    run's ``steps``. None: no decay, as in the Keras class.
    """

    def __init__(self, learning_rate=0.001, momentum=0.9, weight_decay=5e-4, total_steps=100_000):
        _check(learning_rate, momentum, weight_decay, total_steps)
        lr, mu, wd = float(learning_rate), float(momentum), float(weight_decay)
        budget = None if total_steps is None else int(total_steps)

        def init(n, seeds, dtype):
            return {"buffer": tf.zeros([len(seeds), n], dtype), "step": tf.zeros([], tf.int64)}

        def update(state, grad, params, oracle):
            weights = params.read_value()
            progress = tf.zeros([], weights.dtype) if budget is None else tf.cast(state["step"], weights.dtype) / budget
            buffer = lars_buffer(weights, grad, state["buffer"], lr, mu, wd, progress, axis=-1)
            return buffer, {"buffer": buffer, "step": state["step"] + 1}

        super().__init__("lars", init, update)


def engine_lars(learning_rate=0.001, momentum=0.9, weight_decay=5e-4, total_steps=100_000):
    """LARS for the multi-seed engine (see ``EngineLARS``)."""
    return EngineLARS(learning_rate, momentum, weight_decay, total_steps)

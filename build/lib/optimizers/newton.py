"""Newton's method with the exact Hessian: θ ← θ − H⁻¹g (the optimal reference on the bowl)."""

from __future__ import annotations

import tensorflow as tf

from lodo.functional import EngineOptimizer


class Newton(EngineOptimizer):
    name = "newton"

    def __init__(self, learning_rate: float = 1.0):
        self.learning_rate = float(learning_rate)

    def build(self, params, seeds):
        pass

    def step(self, params, grad, oracle):
        hessian = oracle.hessian(params)
        direction = tf.linalg.solve(hessian, grad[..., None])[..., 0]
        params.assign_sub(tf.constant(self.learning_rate, params.dtype) * direction)  # no float32 detour

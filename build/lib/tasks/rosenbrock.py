"""The rescaled Rosenbrock function (SPEC §3.2): f = 0.01(1 − x)² + (y − x²)², from (−0.5, 2)."""

from __future__ import annotations

import tensorflow as tf

from tasks.base import Problem, SmallTask


class Rosenbrock(SmallTask):
    name = "rosenbrock"

    def __init__(self, start=(-0.5, 2.0), scale=0.01, steps=200, window=(180, 200)):
        self.num_params = 2
        self.start = tuple(float(v) for v in start)
        self.scale = float(scale)
        self.steps = int(steps)
        self.window = tuple(int(v) for v in window)

    def setup(self, seeds):
        start = tf.constant([self.start] * len(seeds), self.dtype)
        return Problem(tuple(seeds), {}, start, tf.zeros([len(seeds), 0], self.dtype))

    def loss(self, problem, params, batch):
        x, y = params[:, 0], params[:, 1]
        return self.scale * (1 - x) ** 2 + (y - x**2) ** 2

    def report_window(self, steps_done):
        start, stop = self.window
        if steps_done < stop:  # shortened runs (smoke tests) report their last 10%
            return steps_done - max(1, steps_done // 10), steps_done
        return start, stop

    def optimum_loss(self):
        return 0.0

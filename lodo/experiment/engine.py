"""The multi-seed engine for small tasks: all seeds of a configuration in one XLA program.

The engine is a chunk runner (``lodo.experiment.chunks``): it trains a given
number of steps in one compiled call (a ``tf.while_loop`` under ``jit_compile``)
and hands back the per-step losses; its evaluation is the Hessian
approximation error of a learned preconditioner. The timed loop around it,
with its timing rules, is ``chunks.train``; ``Engine.run`` is that loop alone,
without the run folder around it.

For tiny tasks (Rosenbrock's 2 parameters) the chunk can also stack the
parameters of every step (``record_params``), so a run can save its whole
trajectory; big tasks leave it off, and their compiled chunk is unchanged.

A run can stop after any chunk and continue later: ``Engine.trackables()`` is
what a checkpoint must hold on the device and ``Trace.to_arrays`` what it
must hold on the host. The bowl's noise is a pure function of (seed, step)
and chunk boundaries depend only on the step count, so a resumed run
repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from lodo.experiment import chunks
from lodo.experiment.chunks import Trace
from lodo.functional import EngineOptimizer, Oracle
from tasks.base import SmallTask

__all__ = ["Engine", "Trace"]


class Engine:
    """Runs one optimizer on one small task for a group of seeds."""

    def __init__(self, task: SmallTask, optimizer: EngineOptimizer, seeds, chunk_size: int = 1000,
                 record_params: bool = False):
        self.task, self.optimizer, self.seeds = task, optimizer, tuple(int(s) for s in seeds)
        self.chunk_size = self.max_chunk = int(chunk_size)
        self.record_params = bool(record_params)
        self.eval_every = 0  # the Hessian error every this many steps (track_hessian)
        self.problem = task.setup(self.seeds)
        self.params = tf.Variable(self.problem.initial_params, trainable=False, name="params")
        self.batch_state = tf.Variable(self.problem.initial_batch_state, trainable=False, name="batch")
        self.step_count = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        optimizer.build(self.params, self.seeds)
        chunk = self._train_chunk_recording if self.record_params else self._train_chunk
        self._chunk = tf.function(chunk, jit_compile=True)
        self._hessian_error = tf.function(self._compute_hessian_error, jit_compile=True)

    @property
    def num_params(self) -> int:
        return self.task.num_params

    def trackables(self) -> dict:
        """Every variable a resumed run needs, as ``tf.train.Checkpoint`` keyword arguments."""
        return {"params": self.params, "batch_state": self.batch_state, "step": self.step_count,
                "optimizer": list(self.optimizer.variables)}

    def _oracle(self, batch) -> Oracle:
        return Oracle(
            loss_and_grad=lambda p: self.task.loss_and_grad(self.problem, p, batch),
            hessian=lambda p: self.task.hessian(self.problem, p, batch),
        )

    def _train_step(self):
        """One step on a fresh minibatch; returns the loss at the parameters before the step."""
        batch = self.task.next_batch(self.problem, self.batch_state.read_value(), self.step_count.read_value())
        self.batch_state.assign(batch)
        oracle = self._oracle(batch)
        loss, grad = oracle.loss_and_grad(self.params.read_value())
        self.optimizer.step(self.params, grad, oracle)
        self.step_count.assign_add(1)
        return loss

    def _steps(self, num_steps, body, arrays):
        """Runs ``body(k, arrays)`` for k < ``num_steps``.

        The static ``maximum_iterations`` matters: a loop over ``tf.range(num_steps)``
        makes XLA treat the trip count as a compile-time constant, so every new
        chunk length recompiled (about a second each, inside the timed region).
        """
        _, arrays = tf.while_loop(lambda k, _: k < num_steps, lambda k, a: (k + 1, body(k, a)),
                                  (tf.constant(0), arrays), maximum_iterations=self.chunk_size)
        return arrays

    def _array(self, shape):
        return tf.TensorArray(self.task.dtype, size=self.chunk_size, element_shape=shape)

    def _train_chunk(self, num_steps):
        losses = self._steps(num_steps, lambda k, losses: losses.write(k, self._train_step()),
                             self._array([len(self.seeds)]))
        return losses.stack()

    def _train_chunk_recording(self, num_steps):
        def body(k, arrays):
            losses, visited = arrays
            visited = visited.write(k, self.params.read_value())
            return losses.write(k, self._train_step()), visited

        losses, visited = self._steps(num_steps, body, (self._array([len(self.seeds)]), self._array(self.params.shape)))
        return losses.stack(), visited.stack()

    def _compute_hessian_error(self):
        """‖I − G H‖_F / √n per seed, with H the task's exact Hessian (SPEC §1.4)."""
        hessian = self._oracle(self.batch_state.read_value()).hessian(self.params.read_value())
        product = self.optimizer.preconditioner_times(hessian)
        n = hessian.shape[-1]
        residual = tf.eye(n, dtype=hessian.dtype)[None] - product
        return tf.sqrt(tf.reduce_sum(tf.square(residual), axis=[1, 2]) / n)

    @functools.cached_property
    def has_preconditioner(self) -> bool:
        probe = tf.zeros([len(self.seeds), self.task.num_params, 1], self.task.dtype)
        return self.optimizer.preconditioner_times(probe) is not None

    def track_hessian(self, every: int) -> None:
        """The Hessian approximation error every ``every`` steps (0: never; only a learned preconditioner has one)."""
        self.eval_every = int(every) if every and self.has_preconditioner else 0

    def compile(self) -> None:
        [t.numpy() for t in tf.nest.flatten(self._chunk(tf.constant(0)))]
        if self.eval_every:
            self._hessian_error().numpy()

    def train(self, count: int):
        result = [t.numpy()[:count] for t in tf.nest.flatten(self._chunk(tf.constant(count)))]
        return result[0], (result[1] if self.record_params else None)

    def evaluate(self) -> dict:
        return {"hessian_error": self._hessian_error().numpy()} if self.has_preconditioner else {}

    def run(self, steps: int, time_budget_s: float | None = None, hessian_every: int = 0,
            trace: Trace | None = None, after_chunk=None) -> Trace:
        """Train until ``steps`` steps are done and, if given, ``time_budget_s`` seconds of training
        (``chunks.train``), measuring the Hessian error every ``hessian_every`` steps.

        ``trace``: the trace of a run restored to its last chunk (``trackables()`` already loaded).
        """
        self.track_hessian(hessian_every)
        return chunks.train(self, steps, time_budget_s, trace=trace, after_chunk=after_chunk)

    def finish(self, trace: Trace) -> None:
        if self.record_params:
            trace.final_params = self.params.numpy()

"""The multi-seed engine for small tasks: all seeds of a configuration in one XLA program.

Training runs in compiled chunks of steps (a ``tf.while_loop`` under
``jit_compile``); between chunks the host reads the per-step losses and may
evaluate diagnostics. Timing rules live here, once: the clock covers only the
compiled training chunks (read after their results are on the host),
never compilation and never metric evaluation. Seeds run concurrently, so
every seed is charged the group's wall-clock time.

For tiny tasks (Rosenbrock's 2 parameters) the chunk can also stack the
parameters of every step (``record_params``), so a run can save its whole
trajectory; big tasks leave it off, and their compiled chunk is unchanged.

A run can stop after any chunk and continue later: ``Engine.state()`` is
what a checkpoint must hold on the device and ``Trace.to_arrays`` what it
must hold on the host. The bowl's noise is a pure function of (seed, step)
and chunk boundaries depend only on the step count, so a resumed run
repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from lodo.functional import EngineOptimizer, Oracle
from tasks.base import SmallTask


class ChunkClock:
    """Steps and training time read off ``chunk_ends``, the (steps_done, train_time_s) after each chunk.

    Shared by the small-task ``Trace`` and the image trainer's per-seed record.
    """

    chunk_ends: list

    @property
    def steps_done(self) -> int:
        return self.chunk_ends[-1][0] if self.chunk_ends else 0

    @property
    def train_time_s(self) -> float:
        return self.chunk_ends[-1][1] if self.chunk_ends else 0.0

    def time_at_step(self, steps: np.ndarray) -> np.ndarray:
        """Training time after ``steps`` steps, linear within a chunk (its steps cost the same)."""
        ends = np.array([(0, 0.0)] + [tuple(e) for e in self.chunk_ends], dtype=np.float64)
        return np.interp(steps, ends[:, 0], ends[:, 1])


@dataclass
class Trace(ChunkClock):
    """Everything a run measured, on the host."""

    seeds: tuple
    losses: list = field(default_factory=list)  # per chunk: [k, S] training loss at each step
    chunk_ends: list = field(default_factory=list)  # (steps_done, train_time_s) after each chunk
    hessian_errors: list = field(default_factory=list)  # (step, train_time_s, [S])
    compile_time_s: float = 0.0
    params: list = field(default_factory=list)  # with record_params, per chunk: [k, S, n] params before each step
    final_params: np.ndarray | None = None  # with record_params: [S, n] after the last step

    def loss_matrix(self) -> np.ndarray:
        return np.concatenate(self.losses) if self.losses else np.zeros((0, len(self.seeds)))

    def trajectory(self) -> np.ndarray:
        """``[steps_done + 1, S, n]``: row t holds θ_t, the point where step t's loss was measured."""
        if self.final_params is None:
            raise ValueError("the run did not record its parameters (Engine(record_params=True))")
        return np.concatenate(self.params + [self.final_params[None]])

    def steps_within(self, seconds: float) -> int:
        """How many steps were done within ``seconds`` of training time."""
        ends = np.array([(0, 0.0)] + self.chunk_ends)
        return int(math.floor(np.interp(seconds, ends[:, 1], ends[:, 0])))

    @property
    def all_diverged(self) -> bool:
        """Every seed's latest loss is NaN or inf: nothing left to learn."""
        return bool(self.losses) and len(self.losses[-1]) > 0 and not np.isfinite(self.losses[-1][-1]).any()

    def to_arrays(self) -> dict:
        """The trace as plain arrays (for a checkpoint); ``from_arrays`` inverts it exactly."""
        num_seeds = len(self.seeds)
        arrays = {
            "trace_losses": self.loss_matrix(),
            "trace_chunk_ends": np.array(self.chunk_ends, dtype=np.float64).reshape(-1, 2),
            "trace_hessian_steps": np.array([h[0] for h in self.hessian_errors], dtype=np.int64),
            "trace_hessian_times": np.array([h[1] for h in self.hessian_errors], dtype=np.float64),
            "trace_hessian_errors": np.array([h[2] for h in self.hessian_errors]).reshape(-1, num_seeds),
            "trace_compile_time_s": np.array(self.compile_time_s),
        }
        if self.params:
            arrays["trace_params"] = np.concatenate(self.params)
        return arrays

    @classmethod
    def from_arrays(cls, seeds, arrays: dict) -> "Trace":
        losses = arrays["trace_losses"]
        trace = cls(tuple(seeds), compile_time_s=float(arrays["trace_compile_time_s"]))
        trace.losses = [losses] if len(losses) else []
        trace.chunk_ends = [(int(step), float(clock)) for step, clock in arrays["trace_chunk_ends"]]
        trace.hessian_errors = [(int(step), float(clock), errors) for step, clock, errors in
                                zip(arrays["trace_hessian_steps"], arrays["trace_hessian_times"],
                                    arrays["trace_hessian_errors"])]
        if "trace_params" in arrays and len(arrays["trace_params"]):
            trace.params = [arrays["trace_params"]]
        return trace


class Engine:
    """Runs one optimizer on one small task for a group of seeds."""

    def __init__(self, task: SmallTask, optimizer: EngineOptimizer, seeds, chunk_size: int = 1000,
                 record_params: bool = False):
        self.task, self.optimizer, self.seeds = task, optimizer, tuple(int(s) for s in seeds)
        self.chunk_size = int(chunk_size)
        self.record_params = bool(record_params)
        self.problem = task.setup(self.seeds)
        self.params = tf.Variable(self.problem.initial_params, trainable=False, name="params")
        self.batch_state = tf.Variable(self.problem.initial_batch_state, trainable=False, name="batch")
        self.step_count = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        optimizer.build(self.params, self.seeds)
        chunk = self._train_chunk_recording if self.record_params else self._train_chunk
        self._chunk = tf.function(chunk, jit_compile=True)
        self._hessian_error = tf.function(self._compute_hessian_error, jit_compile=True)

    def state(self) -> dict:
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

    @property
    def has_preconditioner(self) -> bool:
        return self.optimizer.preconditioner_times(tf.zeros([len(self.seeds), self.task.num_params, 1], self.task.dtype)) is not None

    def compile(self, trace: Trace) -> None:
        start = time.perf_counter()
        [t.numpy() for t in tf.nest.flatten(self._chunk(tf.constant(0)))]
        if self.has_preconditioner:
            self._hessian_error().numpy()
        trace.compile_time_s += time.perf_counter() - start

    def run(self, steps: int, time_budget_s: float | None = None, hessian_every: int = 0, progress=None,
            trace: Trace | None = None, after_chunk=None) -> Trace:
        """Train until ``steps`` steps are done and, if given, ``time_budget_s`` seconds of training.

        ``trace``: the trace of a run restored to its last chunk (``state()`` already
        loaded); training and its clock continue from there. ``after_chunk(trace)`` is
        called after every chunk; returning True stops the run there (e.g. to checkpoint
        and exit on preemption).
        """
        trace = Trace(self.seeds) if trace is None else trace
        self.compile(trace)
        track_hessian = hessian_every > 0 and self.has_preconditioner
        if track_hessian and not trace.chunk_ends and not trace.hessian_errors:
            trace.hessian_errors.append((0, 0.0, self._hessian_error().numpy()))
        done, clock = trace.steps_done, trace.train_time_s
        while (done < steps or (time_budget_s is not None and clock < time_budget_s)) and not trace.all_diverged:
            k = self.chunk_size
            if done < steps:
                k = min(k, steps - done)  # a chunk ends exactly at the step budget
            if track_hessian:
                k = min(k, hessian_every - done % hessian_every)
            start = time.perf_counter()
            result = [t.numpy()[:k] for t in tf.nest.flatten(self._chunk(tf.constant(k)))]
            clock += time.perf_counter() - start
            losses = result[0]
            if self.record_params:
                trace.params.append(result[1])
            done += k
            trace.losses.append(losses)
            trace.chunk_ends.append((done, clock))
            if track_hessian and done % hessian_every == 0:
                trace.hessian_errors.append((done, clock, self._hessian_error().numpy()))
            if progress is not None:
                progress(done, clock, losses)
            if after_chunk is not None and after_chunk(trace):
                break
        if self.record_params:
            trace.final_params = self.params.numpy()
        return trace

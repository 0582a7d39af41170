"""The one timed training loop: compiled chunks of steps, and what was measured, on the host.

Both kinds of run go through ``train``: the multi-seed engine (small tasks, every
seed in one XLA program) and the Keras trainer (image tasks, one model per seed)
are *chunk runners*, objects that train a given number of steps in one compiled
call and return the loss of every step and seed. Everything else about timing
is written down here, once:

- the clock covers only the compiled training chunks, read after their losses
  are on the host; never compilation (``runner.compile()``, a zero-step call),
  never the runner's evaluations, never checkpointing;
- seeds that train together are each charged the chunk's wall-clock time;
- a run trains until it has done ``steps`` steps *and* (if set) ``time_budget_s``
  seconds of training, or until every seed has diverged (a non-finite loss);
- a chunk ends exactly at ``steps`` and at every multiple of ``runner.eval_every``,
  where the runner's evaluation (the Hessian approximation error, a validation
  loss) is recorded, so chunk boundaries depend only on the step count and a
  resumed run repeats an uninterrupted one bit for bit.

``Trace`` is everything a run measured. It round-trips through plain arrays for a
checkpoint (``to_arrays``/``from_arrays``). This module needs NumPy only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from lodo.experiment import provenance


class ChunkRunner(Protocol):
    """What ``train`` needs of a runner."""

    seeds: tuple  # the seeds trained together: a column of the losses each
    max_chunk: int  # steps per compiled call at most
    eval_every: int  # evaluate every this many steps (0: never)

    def compile(self) -> None:
        """Trace and compile the training chunk (and the evaluation) without training a step."""

    def train(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Train ``count`` steps: the ``[count, S]`` losses, and the ``[count, S, n]`` parameters before each
        step where the runner records them (else None)."""

    def evaluate(self) -> dict[str, np.ndarray]:
        """Diagnostics at the current step, ``name -> [S]`` values (may be empty)."""

    def finish(self, trace: "Trace") -> None:
        """Complete the trace when training stops (e.g. the final parameters of a recorded trajectory)."""


@dataclass
class Trace:
    """Everything a run measured, on the host."""

    seeds: tuple
    losses: list = field(default_factory=list)  # per chunk: [k, S] training loss at each step
    chunk_ends: list = field(default_factory=list)  # (steps_done, train_time_s) after each chunk
    evaluations: list = field(default_factory=list)  # (step, train_time_s, {name: [S]})
    compile_time_s: float = 0.0
    others_cpu: list = field(default_factory=list)  # per chunk: [wall s, CPU s used by other processes]
    params: list = field(default_factory=list)  # where recorded, per chunk: [k, S, n] params before each step
    final_params: np.ndarray | None = None  # where recorded: [S, n] after the last step
    milestones: dict = field(default_factory=dict)  # "steps"/"time" -> {step, train_time_s, name: [S]}
    _scanned: tuple | None = field(default=None, repr=False, compare=False)  # diverged_at's progress

    # -- reading -------------------------------------------------------------------------------
    @property
    def steps_done(self) -> int:
        return int(self.chunk_ends[-1][0]) if self.chunk_ends else 0

    @property
    def train_time_s(self) -> float:
        return float(self.chunk_ends[-1][1]) if self.chunk_ends else 0.0

    def _ends(self) -> np.ndarray:
        """``[chunks + 1, 2]``: (steps done, training time) at the start and after every chunk."""
        return np.array([(0, 0.0)] + [tuple(e) for e in self.chunk_ends], dtype=np.float64)

    def time_at_step(self, steps):
        """Training time after ``steps`` steps, linear within a chunk (its steps cost the same)."""
        ends = self._ends()
        return np.interp(steps, ends[:, 0], ends[:, 1])

    def steps_within(self, seconds: float) -> int:
        """How many steps were done within ``seconds`` of training time."""
        ends = self._ends()
        return int(math.floor(np.interp(seconds, ends[:, 1], ends[:, 0])))

    def loss_matrix(self) -> np.ndarray:
        return np.concatenate(self.losses) if self.losses else np.zeros((0, len(self.seeds)))

    def diverged_at(self, steps: int | None = None) -> list:
        """Per seed, the first step (below ``steps``) whose loss is NaN or inf; None where there is none."""
        # Scanned incrementally: the loop asks after every chunk, and a long run has thousands of chunks.
        if self._scanned is None or self._scanned[0] > len(self.losses):
            self._scanned = (0, 0, [None] * len(self.seeds))
        chunks_seen, steps_seen, first = self._scanned
        for chunk in self.losses[chunks_seen:]:
            bad = ~np.isfinite(np.asarray(chunk))
            for j in np.flatnonzero(bad.any(axis=0)):
                if first[j] is None:
                    first[j] = steps_seen + int(np.argmax(bad[:, j]))
            steps_seen += len(chunk)
        self._scanned = (len(self.losses), steps_seen, first)
        return [None if d is None or (steps is not None and d >= steps) else d for d in first]

    @property
    def all_diverged(self) -> bool:
        """Every seed has had a NaN or inf loss: nothing left to learn."""
        return bool(self.losses) and all(step is not None for step in self.diverged_at())

    def evaluated(self, name: str) -> list:
        """``(step, train_time_s, [S])`` of every evaluation that measured ``name``."""
        return [(step, clock, np.asarray(values[name])) for step, clock, values in self.evaluations if name in values]

    @property
    def hessian_errors(self) -> list:
        return self.evaluated("hessian_error")

    def trajectory(self) -> np.ndarray:
        """``[steps_done + 1, S, n]``: row t holds θ_t, the point where step t's loss was measured."""
        if self.final_params is None:
            raise ValueError("the run did not record its parameters (Engine(record_params=True))")
        return np.concatenate(self.params + [self.final_params[None]])

    # -- checkpointing -------------------------------------------------------------------------
    def to_arrays(self) -> dict:
        """The trace as arrays and JSON values (a checkpoint's metadata); ``from_arrays`` inverts it exactly."""
        num_seeds = len(self.seeds)
        names = sorted({name for _, _, values in self.evaluations for name in values})
        arrays = {
            "trace_losses": self.loss_matrix(),
            "trace_chunk_ends": np.array(self.chunk_ends, dtype=np.float64).reshape(-1, 2),
            "trace_compile_time_s": np.array(self.compile_time_s),
            "trace_others_cpu": np.array([[w, np.nan if o is None else o] for w, o in self.others_cpu],
                                         dtype=np.float64).reshape(-1, 2),
            "trace_milestones": {kind: {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in m.items()}
                                 for kind, m in self.milestones.items()},
        }
        for name in names:
            found = self.evaluated(name)
            arrays[f"trace_eval_{name}_steps"] = np.array([f[0] for f in found], dtype=np.int64)
            arrays[f"trace_eval_{name}_times"] = np.array([f[1] for f in found], dtype=np.float64)
            arrays[f"trace_eval_{name}_values"] = np.array([f[2] for f in found], dtype=np.float64).reshape(-1, num_seeds)
        if self.params:
            arrays["trace_params"] = np.concatenate(self.params)
        return arrays

    @classmethod
    def from_arrays(cls, seeds, arrays: dict) -> "Trace":
        losses = np.asarray(arrays["trace_losses"])
        trace = cls(tuple(seeds), compile_time_s=float(arrays["trace_compile_time_s"]))
        trace.losses = [losses] if len(losses) else []
        trace.chunk_ends = [(int(step), float(clock)) for step, clock in arrays["trace_chunk_ends"]]
        trace.others_cpu = [[float(w), None if np.isnan(o) else float(o)]
                            for w, o in arrays.get("trace_others_cpu", np.zeros((0, 2)))]
        trace.milestones = dict(arrays.get("trace_milestones") or {})
        evaluations: dict[tuple, dict] = {}
        if "trace_hessian_steps" in arrays:  # a checkpoint written before evaluations had names
            arrays = {**arrays, "trace_eval_hessian_error_steps": arrays["trace_hessian_steps"],
                      "trace_eval_hessian_error_times": arrays["trace_hessian_times"],
                      "trace_eval_hessian_error_values": arrays["trace_hessian_errors"]}
        for key in list(arrays):
            if key.startswith("trace_eval_") and key.endswith("_steps"):
                name = key[len("trace_eval_"):-len("_steps")]
                for step, clock, values in zip(arrays[key], arrays[f"trace_eval_{name}_times"],
                                               arrays[f"trace_eval_{name}_values"]):
                    evaluations.setdefault((int(step), float(clock)), {})[name] = values
        trace.evaluations = [(step, clock, values) for (step, clock), values in sorted(evaluations.items())]
        if "trace_params" in arrays and len(arrays["trace_params"]):
            trace.params = [np.asarray(arrays["trace_params"])]
        return trace


def next_chunk(done: int, steps: int, max_chunk: int, eval_every: int) -> int:
    """Steps in the next chunk: at most ``max_chunk``, ending exactly at ``steps`` and at evaluation steps."""
    k = max_chunk
    if done < steps:
        k = min(k, steps - done)
    if eval_every:
        k = min(k, eval_every - done % eval_every)
    return k


def finished(trace: Trace, steps: int, time_budget_s: float | None) -> bool:
    """Every step and every second of the budget done, or every seed diverged."""
    return trace.all_diverged or (trace.steps_done >= steps
                                  and (time_budget_s is None or trace.train_time_s >= time_budget_s))


def train(runner: ChunkRunner, steps: int, time_budget_s: float | None = None, trace: Trace | None = None,
          after_chunk: Callable[[Trace], bool] | None = None) -> Trace:
    """Train until ``finished``; the trace, continued from ``trace`` (a restored run) if given.

    ``after_chunk(trace)`` runs after every chunk, outside the clock; returning True stops the run there
    (e.g. to checkpoint and exit on preemption).
    """
    trace = Trace(tuple(runner.seeds)) if trace is None else trace
    started = time.perf_counter()
    runner.compile()
    trace.compile_time_s += time.perf_counter() - started
    if runner.eval_every and not trace.chunk_ends and not trace.evaluations:
        values = runner.evaluate()
        if values:
            trace.evaluations.append((0, 0.0, values))
    while not finished(trace, steps, time_budget_s):
        done = trace.steps_done
        k = next_chunk(done, steps, runner.max_chunk, runner.eval_every)
        cpu_before, started = provenance.cpu_seconds(), time.perf_counter()
        losses, params = runner.train(k)
        elapsed = time.perf_counter() - started
        trace.others_cpu.append([elapsed, provenance.others_cpu(cpu_before, provenance.cpu_seconds())])
        trace.losses.append(losses)
        if params is not None:
            trace.params.append(params)
        trace.chunk_ends.append((done + k, trace.train_time_s + elapsed))
        if runner.eval_every and trace.steps_done % runner.eval_every == 0 and not trace.all_diverged:
            values = runner.evaluate()
            if values:
                trace.evaluations.append((trace.steps_done, trace.train_time_s, values))
        if after_chunk is not None and after_chunk(trace):
            break
    runner.finish(trace)
    return trace

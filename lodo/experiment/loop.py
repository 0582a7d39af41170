"""The training loop of a run, around the timed chunk loop (``lodo.experiment.chunks``).

One function, ``train``, for every task and optimizer. Given a chunk runner (the
multi-seed engine or one seed's Keras model), it owns what happens between chunks:

- resuming from the newest intact checkpoint, after checking that the checkpoint's
  "same settings" record (the resolved config, saved in every checkpoint) matches
  this run: a changed config is refused, never silently relabelled;
- the progress bar and TensorBoard (``train/loss``, and every evaluation the runner
  makes, e.g. ``lodo/hessian_error`` or ``validation/loss``);
- the milestones: after ``steps`` steps and after ``time_budget_s`` seconds of
  training (or when every seed has diverged), the runner's milestone metrics
  (e.g. the test set) are recorded and a checkpoint is written;
- checkpoint cadence (every ``checkpoint.every_s`` seconds) and preemption
  (SIGTERM, SIGINT, SIGHUP, submitit's signal): checkpoint, say so, then exit
  (``lodo.experiment.preemption``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from lodo.experiment import chunks, outputs
from lodo.experiment.checkpoints import CheckpointError, RunCheckpoint
from lodo.experiment.chunks import Trace
from lodo.experiment.config import FRESH_HINT, check_same_run
from lodo.experiment.preemption import Preemption

# TensorBoard tag of each evaluation a runner makes.
TB_TAGS = {"hessian_error": "lodo/hessian_error", "val_loss": "validation/loss"}


def loggable_mean(losses) -> float:
    """The mean of the finite-or-inf losses, as the float32 that TensorBoard stores.

    A runaway loss beyond float32's range becomes inf here; passed on as is, it made ``tf.summary.scalar`` raise,
    which crashed the job (in a GA generation, every individual sharing it).
    """
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every seed diverged: the mean of nothing is NaN
        return float(np.float32(np.nanmean(np.asarray(losses, dtype=np.float64))))


def restore(checkpoint: RunCheckpoint, seeds, config: dict, what_dir: Path, label: str) -> Trace | None:
    """The trace of the newest intact checkpoint, its state loaded into the runner; None if there is none.

    The same-settings check is made on the checkpoint that is restored (a damaged newer one is skipped).
    """
    def check(path: Path, stored: dict) -> None:
        if "trace_losses" not in stored.get("_arrays", []):
            raise CheckpointError(f"checkpoint {path} was written by an older version of this runner and cannot "
                                  f"be resumed; {FRESH_HINT.format(dir=what_dir)}")
        check_same_run(stored.get("config", {}), config, what_dir, "a checkpoint")

    trace = checkpoint.restore(check=check, convert=lambda restored: Trace.from_arrays(seeds, restored))
    if trace is None:
        return None
    note = ""
    if checkpoint.skipped:
        skipped = "; ".join(f"{name} {why}, kept as {kept}" if kept else f"{name} {why}"
                            for name, why, kept in checkpoint.skipped)
        note = f" (checkpoint {checkpoint.restored_from.name}, the newest intact one; skipped {skipped})"
    print(f"{label}resumed from step {trace.steps_done}{note}", flush=True)
    return trace


def train(runner, *, steps: int, time_budget_s: float | None, config: dict, checkpoint_dir: Path,
          checkpointing: dict, tb_dir: Path, desc: str, progress: bool = True, log_every: int = 1,
          run_dir: Path | None = None, label: str = "", on_start=None) -> Trace:
    """Train ``runner`` to its milestones, resuming from ``checkpoint_dir`` when it holds this run.

    ``config`` is the resolved config, stored in every checkpoint and compared on resume;
    ``checkpointing`` holds ``every_s``, ``keep`` and ``resume``; ``label`` prefixes console lines
    (e.g. ``"seed 3: "`` when seeds train one after another); ``on_start()`` runs once the folder is known
    to hold this run (e.g. to write config.yaml), before training.
    """
    run_dir = run_dir or checkpoint_dir.parent
    checkpoint = RunCheckpoint(checkpoint_dir, keep=checkpointing["keep"], every_s=checkpointing["every_s"],
                               **runner.trackables())
    # Signals only set a flag from here on (the command line's block, or one of our own): a checkpoint, a
    # table or an events file is never left half-written by one.
    with Preemption() as preemption:
        try:
            return _train(runner, checkpoint, preemption, steps=steps, time_budget_s=time_budget_s, config=config,
                          checkpointing=checkpointing, tb_dir=tb_dir, desc=desc, progress=progress,
                          log_every=log_every, run_dir=run_dir, label=label, on_start=on_start)
        except tf.errors.OpError as err:  # the TensorBoard writer's: its own files are the only ones it writes
            if outputs.disk_full(err):
                raise outputs.disk_full_error(err, tb_dir) from None
            raise


def _train(runner, checkpoint: RunCheckpoint, preemption: Preemption, *, steps, time_budget_s, config, checkpointing,
           tb_dir, desc, progress, log_every, run_dir, label, on_start) -> Trace:
    trace = restore(checkpoint, runner.seeds, config, run_dir, label) if checkpointing["resume"] else None
    saved_step = trace.steps_done if trace is not None else None

    def stop(current: Trace | None, before_training: bool = False) -> None:
        """Say why the run stops and where its work is, then exit with the status said."""
        if current is None:
            where = "before its first step: nothing to save"
        elif before_training:
            where = f"at step {current.steps_done}, before training on: its checkpoint is in {checkpoint.directory}"
        else:
            where = f"at step {current.steps_done}: checkpoint saved in {checkpoint.directory}"
        rerun = "" if preemption.hands_over else "; rerun the same command to resume"
        print(f"{label}stopped by {preemption.signal_name} {where}; {preemption.how_it_exits()}{rerun}", flush=True)
        preemption.exit_for_requeue()

    if preemption.requested:  # a signal while the process started (TensorFlow, the task's data, the checkpoint)
        stop(trace, before_training=True)
    if on_start is not None:
        on_start()

    def save(current: Trace) -> None:
        nonlocal saved_step
        if current.steps_done == saved_step:
            return  # this state is already the newest checkpoint
        checkpoint.save(current.steps_done, {"config": config, **current.to_arrays()})
        saved_step = current.steps_done

    writer = tf.summary.create_file_writer(str(tb_dir))
    logged = {name: len(trace.evaluated(name)) for name in TB_TAGS} if trace else dict.fromkeys(TB_TAGS, 0)
    bar = tqdm(total=steps, initial=min(steps, trace.steps_done) if trace else 0, desc=desc, unit="step",
               disable=not progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)

    def log(current: Trace) -> None:
        losses = current.losses[-1]
        recent = loggable_mean(losses[-min(len(losses), log_every):])
        bar.update(min(steps, current.steps_done) - bar.n)
        # Not the reported figure (the summary's window mean): the mean of the latest log_every steps.
        last = min(len(losses), log_every)
        bar.set_postfix_str(f"mean loss of the last {last:,} step{'s' if last != 1 else ''} {recent:.4g}, "
                            f"{current.train_time_s:.1f} s training", refresh=False)
        with writer.as_default(step=current.steps_done):
            tf.summary.scalar("train/loss", recent)
        for name, tag in TB_TAGS.items():
            found = current.evaluated(name)
            for step, _, values in found[logged[name]:]:
                with writer.as_default(step=step):
                    tf.summary.scalar(tag, loggable_mean(values))
            logged[name] = len(found)

    def milestones(current: Trace) -> bool:
        """Record the milestones this chunk reached; whether it reached one."""
        reached = []
        if "steps" not in current.milestones and (current.steps_done >= steps or current.all_diverged):
            reached.append("steps")
        if time_budget_s is not None and "time" not in current.milestones and (
                current.train_time_s >= time_budget_s or current.all_diverged):
            reached.append("time")
        for kind in reached:
            metrics = {}
            if hasattr(runner, "milestone") and not current.all_diverged:
                # Evaluation takes a while on the image tasks (the whole test set): say so, then how long it took.
                what = "the step budget" if kind == "steps" else f"the time budget ({time_budget_s:g} s)"
                tqdm.write(f"{label}{what} reached at step {current.steps_done:,}: evaluating "
                           f"{getattr(runner, 'milestone_what', 'the test metrics')}…", file=sys.stdout)
                metrics = runner.milestone()
                tqdm.write(f"{label}evaluated in {metrics.get('eval_time_s', 0.0):.1f} s", file=sys.stdout)
            current.milestones[kind] = {"step": current.steps_done, "train_time_s": current.train_time_s, **metrics}
            with writer.as_default(step=current.steps_done):
                for key, value in metrics.items():
                    if key.startswith("test_") and isinstance(value, float):
                        tf.summary.scalar(f"test/{key[5:]}", value)
        return bool(reached)

    def after_chunk(current: Trace) -> bool:
        log(current)
        if milestones(current) or checkpoint.due() or preemption.requested:
            save(current)
        return preemption.requested

    trace = chunks.train(runner, steps, time_budget_s, trace=trace, after_chunk=after_chunk)
    save(trace)
    bar.close()
    writer.flush()
    if preemption.requested and not chunks.finished(trace, steps, time_budget_s):
        stop(trace)
    # A finished run keeps only its final checkpoint (the trained state), or none (checkpoint.keep_final=false).
    checkpoint.prune(1 if checkpointing.get("keep_final", True) else 0)
    return trace

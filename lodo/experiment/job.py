"""One job: every seed of one configuration, trained by the one loop, and its run folder written.

Small tasks train all seeds at once in the multi-seed engine; image tasks train
one Keras model per seed, one seed after another (a finished seed leaves
``seed_<s>.json``, so a rerun skips it). Both go through ``lodo.experiment.loop``
and end in one summary schema (``lodo.experiment.summary``).

The run folder receives ``config.yaml``, ``curve.csv`` (learning curve),
``summary.json``, ``checkpoints/`` and TensorBoard events under ``tb/``; tiny
tasks also ``trajectory.csv`` (the parameters at every step), image tasks
``validation.csv`` and the task's pictures, and the frozen-preconditioner test
(``frozen.steps=N``) ``frozen_curve.csv``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from omegaconf import OmegaConf

from lodo.experiment import chunks, distribute, keras_trainer, loop, metrics, outputs, registry, run_folder
from lodo.experiment.chunks import Trace
from lodo.experiment.config import ConfigError, check_same_run
from lodo.experiment.engine import Engine
from lodo.experiment.frozen import frozen_test
from lodo.experiment.summary import format_summary, summarize
from lodo.functional import EngineOptimizer

TRAJECTORY_MAX_PARAMS = 10  # record_trajectory=null saves trajectory.csv up to this many parameters


def _seeds(cfg) -> list[int]:
    return list(range(cfg.seed, cfg.seed + cfg.num_seeds))


def _log_every(cfg) -> int:
    return cfg.log_every or max(1, cfg.steps // 1000)


def _checkpointing(cfg) -> dict:
    return dict(cfg.get("checkpoint") or {"every_s": 600, "keep": 2, "resume": True})


def set_determinism(cfg) -> None:
    """``deterministic=true``: op determinism and the global seeds, before any TF work of the run."""
    if cfg.get("deterministic"):
        keras.utils.set_random_seed(int(cfg.seed))  # Python, NumPy and TF global seeds
        tf.config.experimental.enable_op_determinism()


def run(cfg, out_dir: Path) -> dict:
    """Train and write the run folder; the summary (also printed)."""
    summary = (run_image_task if registry.is_image_task(cfg.task.name) else run_small_task)(cfg, out_dir)
    summary = outputs.jsonable(summary)  # what summary.json holds: a diverged figure is None, not NaN
    outputs.write_json(out_dir / "summary.json", summary)
    print(format_summary(summary), flush=True)
    return summary


# -- small tasks: the multi-seed engine ------------------------------------------------------------

def run_small_task(cfg, out_dir: Path) -> dict:
    try:
        task = registry.build_task(cfg.task.name, **registry.task_options(cfg.task))
        optimizer = registry.build_engine_optimizer(cfg.optimizer.name, **registry.optimizer_options(cfg.optimizer))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    seeds, steps = _seeds(cfg), cfg.steps
    record = cfg.get("record_trajectory")
    record = task.num_params <= TRAJECTORY_MAX_PARAMS if record is None else bool(record)
    frozen = cfg.get("frozen") or {}
    frozen_task = None
    if frozen.get("steps"):
        if type(optimizer).preconditioner_times is EngineOptimizer.preconditioner_times:
            raise ConfigError(f"the frozen test needs an optimizer with a learned preconditioner (e.g. lodo), "
                              f"not {cfg.optimizer.name!r}")
        try:
            frozen_task = registry.build_task(cfg.task.name, **{**registry.task_options(cfg.task),
                                                                 "problem_offset": frozen.problem_offset})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"frozen test: {err}") from None
    try:
        engine = Engine(task, optimizer, seeds, chunk_size=min(cfg.chunk_size, steps), record_params=record)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    hessian_every = max(cfg.chunk_size, steps // 20) if cfg.hessian_every is None else cfg.hessian_every
    engine.track_hessian(hessian_every)

    config = OmegaConf.to_container(cfg, resolve=True)
    checkpointing = _checkpointing(cfg)
    trace = loop.train(engine, steps=steps, time_budget_s=cfg.time_budget_s, config=config,
                       checkpoint_dir=out_dir / "checkpoints", checkpointing=checkpointing, tb_dir=out_dir / "tb",
                       desc=f"{cfg.optimizer.name} on {cfg.task.name}", progress=cfg.progress,
                       log_every=_log_every(cfg), run_dir=out_dir,
                       on_start=lambda: run_folder.write_config(out_dir, cfg))
    outputs.write_csv(out_dir / "curve.csv", metrics.learning_curve(trace, _log_every(cfg)))
    if record:
        outputs.write_csv(out_dir / "trajectory.csv", metrics.trajectory(trace))
    extra = {}
    if frozen_task is not None:
        extra["frozen"] = {"after_steps": trace.steps_done,
                           **frozen_test(frozen, frozen_task, task, optimizer, seeds, cfg.chunk_size, out_dir)}
    return summarize(cfg, task, [trace], num_params=task.num_params,
                     completed=chunks.finished(trace, steps, cfg.time_budget_s), extra=extra)


# -- image tasks: one Keras model per seed ----------------------------------------------------------

def run_image_task(cfg, out_dir: Path) -> dict:
    try:
        strategy = distribute.make_strategy(cfg.distribute)  # first TensorFlow call: devices are set up here
    except distribute.DistributeError as err:
        raise ConfigError(str(err)) from None
    task = keras_trainer.build_task(cfg)
    keras_trainer.build_optimizer(cfg, cfg.seed)  # a bad hyperparameter fails now, not after loading a model
    config = OmegaConf.to_container(cfg, resolve=True)
    eval_every = cfg.get("eval_every") or max(1, cfg.steps // 20)
    written = False

    def write_config_once():
        nonlocal written
        if not written:
            run_folder.write_config(out_dir, cfg)
            written = True

    traces, extra = [], {}
    for seed in _seeds(cfg):
        done_file = out_dir / f"seed_{seed}.json"
        stored = _finished_seed(done_file, cfg, out_dir) if _checkpointing(cfg)["resume"] else None
        if stored is not None:
            traces.append(stored[0])
            extra = stored[1]
            print(f"seed {seed}: already finished, read from {done_file}", flush=True)
            continue
        runner = keras_trainer.KerasSeedRunner(cfg, task, strategy, seed, eval_every=eval_every)
        trace = loop.train(runner, steps=cfg.steps, time_budget_s=cfg.time_budget_s, config=config,
                           checkpoint_dir=out_dir / "checkpoints" / f"seed_{seed}", checkpointing=_checkpointing(cfg),
                           tb_dir=out_dir / "tb" / f"seed_{seed}", desc=f"{cfg.optimizer.name} on {cfg.task.name} "
                           f"seed {seed}", progress=cfg.progress, log_every=_log_every(cfg), run_dir=out_dir,
                           label=f"seed {seed}: ", on_start=write_config_once)
        state = runner.state_bytes()
        extra = {**extra, "optimizer_state_bytes": state, "optimizer_state_bytes_per_param": state / runner.num_params,
                 "batch_size": task.batch_size, "distribute": distribute.describe(strategy),
                 "num_params": runner.num_params}
        if seed == cfg.seed and cfg.get("artifacts", True):
            print(f"seed {seed}: drawing the task's pictures (artifacts=false skips them)…", flush=True)
            started = time.perf_counter()
            extra["artifacts"] = [str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p)
                                  for p in task.artifacts(runner.model, out_dir, seed)]
            print(f"seed {seed}: wrote {', '.join(extra['artifacts']) or 'no pictures'} in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        outputs.write_json(done_file, {"config": config, "trace": _jsonable_trace(trace), "extra": extra})
        traces.append(trace)
    write_config_once()
    outputs.write_csv(out_dir / "curve.csv", pd.concat([metrics.learning_curve(t, _log_every(cfg)) for t in traces],
                                                       ignore_index=True))
    outputs.write_csv(out_dir / "validation.csv", pd.DataFrame(
        [{"seed": t.seeds[0], "step": step, "train_time_s": clock, "val_loss": float(values[0])}
         for t in traces for step, clock, values in t.evaluated("val_loss")],
        columns=["seed", "step", "train_time_s", "val_loss"]))
    num_params = extra.pop("num_params")
    return summarize(cfg, task, traces, num_params=num_params, completed=True, extra=extra)


def _jsonable_trace(trace: Trace) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in trace.to_arrays().items()}


def _finished_seed(done_file: Path, cfg, out_dir: Path):
    """(trace, extra) of a seed this run already finished; None if it has not (or its record is unreadable)."""
    try:
        stored = json.loads(done_file.read_text())
        arrays = {k: v if k == "trace_milestones" else np.asarray(v, dtype=np.float64)
                  for k, v in stored["trace"].items()}
        seed = int(done_file.stem.split("_")[1])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    check_same_run(stored.get("config", {}), cfg, out_dir, f"a finished seed ({done_file.name})")
    return Trace.from_arrays([seed], arrays), stored.get("extra", {})

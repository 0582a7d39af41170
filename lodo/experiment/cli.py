"""The runner: ``python -m lodo.run task=… optimizer=… steps=… seed=… num_seeds=…``.

Each run folder receives ``config.yaml`` (resolved), ``provenance.json``
(code, packages, hardware), ``curve.csv`` (learning curve), ``summary.json``,
``checkpoints/`` and TensorBoard events under ``tb/``; tiny tasks also get
``trajectory.csv`` (the parameters at every step), and the
frozen-preconditioner test (``frozen.steps=N``) ``frozen_curve.csv``.

Never lose work: a run started again in the same folder resumes from its
newest checkpoint (``checkpoint.resume=false`` starts afresh), a finished one
is skipped (``already finished: <dir>``), and SIGTERM or submitit's SIGUSR2
make the run checkpoint and exit for requeueing (``lodo.experiment.preemption``).
Bad input stops the run with one line, ``error: …``, and exit status 2.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lodo.experiment.registry import CONFIG_DIR  # noqa: E402
CHECKED_GROUPS = ("task", "optimizer", "experiment", "distribute", "scale")
TRAJECTORY_MAX_PARAMS = 10  # record_trajectory=null saves trajectory.csv up to this many parameters


class ConfigError(ValueError):
    """A bad setting, reported as one line naming the problem and the fix."""


FRESH_HINT = "delete {dir} or rerun with checkpoint.resume=false to start fresh"
# Files the runner writes into a run folder (what checkpoint.resume=false clears).
RUN_FILES = ("config.yaml", "provenance.json", "curve.csv", "trajectory.csv", "frozen_curve.csv", "summary.json")
RUN_FOLDERS = ("checkpoints", "tb")
# Settings that may differ between a run and its resumption: they change how a run is watched
# or where it runs, never its numbers.
NOT_COMPARED = ("progress", "checkpoint", "gpu_per_job")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """Reject unknown task/optimizer/experiment names before Hydra composes anything.

    Hydra's own message for a missing option spans several lines; this one
    names the bad value and lists the valid ones on one line.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return  # a bad flag: Hydra's own usage message says which
    overrides = []
    for text in args.overrides:
        try:
            overrides.extend(OverridesParser.create().parse_overrides([text]))
        except OverrideParseException as err:
            detail = str(err).strip().splitlines()[0]
            raise ConfigError(f"malformed override {text!r} ({detail}); write key=value, +key=value to add a key, "
                              f"~key to remove one (quote values with spaces or brackets)") from None
    for override in overrides:
        group = override.key_or_group.lstrip("+~")
        if group not in CHECKED_GROUPS or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        valid = group_options(group)
        for value in values:
            if value is not None and str(value) != "null" and str(value) not in valid:
                raise ConfigError(f"unknown {group} {value!r}; valid {group} names: {', '.join(valid)}")


EXAMPLES = {"steps": 1000, "num_seeds": 8, "chunk_size": 1000}


def _positive_int(cfg, key):
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r} (e.g. {key}={EXAMPLES[key]})")
    return value


def validate(cfg: DictConfig) -> None:
    _positive_int(cfg, "steps")
    _positive_int(cfg, "num_seeds")
    _positive_int(cfg, "chunk_size")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    budget = cfg.time_budget_s
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise ConfigError(f"time_budget_s must be a positive number of seconds or null, got {budget!r}")
    for key in ("log_every", "hessian_every"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{key} must be a non-negative integer or null, got {value!r}")
    if cfg.get("record_trajectory") not in (None, True, False):
        raise ConfigError(f"record_trajectory must be true, false or null, got {cfg.record_trajectory!r}")
    for key in ("deterministic", "gpu_per_job", "progress"):
        if cfg.get(key, False) not in (True, False):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    checkpoint = cfg.get("checkpoint")
    if checkpoint is not None:
        every = checkpoint.get("every_s")
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
            raise ConfigError(f"checkpoint.every_s must be a non-negative number of seconds (0: after every chunk), "
                              f"got {every!r}")
        keep = checkpoint.get("keep")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"checkpoint.keep must be a positive integer, got {keep!r} (e.g. checkpoint.keep=2)")
        if checkpoint.get("resume") not in (True, False):
            raise ConfigError(f"checkpoint.resume must be true or false, got {checkpoint.get('resume')!r}")
    frozen = cfg.get("frozen")
    if frozen is not None:
        steps = frozen.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"frozen.steps must be a non-negative integer (0: no frozen test), got {steps!r}")
        factor = frozen.get("divergence_factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ConfigError(f"frozen.divergence_factor must be a number above 1, got {factor!r}")


NOT_OPTIONS = ("name", "tune")  # a group's label, and the tuner's search space (configs/optimizer/*.yaml)


def options(node: DictConfig) -> dict:
    """A config group's settings as keyword arguments (without its ``name`` and ``tune``)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in NOT_OPTIONS}


def comparable(config) -> dict:
    """A resolved config as a plain dict, without the settings a resumed run may change."""
    plain = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    return {k: v for k, v in plain.items() if k not in NOT_COMPARED}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested dicts."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            found.extend(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def check_same_run(stored: dict, cfg: DictConfig, out_dir: Path, what: str) -> None:
    changed = differences(comparable(stored), comparable(cfg))
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(f"{out_dir} holds {what} with other settings ({shown}); rerun with the same settings "
                          f"to resume, or {FRESH_HINT.format(dir=out_dir)}")


def loggable_mean(losses) -> float:
    """The mean of the finite-or-inf losses, as the float32 that TensorBoard stores.

    A runaway loss beyond float32's range becomes inf here; passed on as is, it made ``tf.summary.scalar`` raise,
    which crashed the job (in a GA generation, every individual sharing it).
    """
    import numpy as np

    with np.errstate(all="ignore"):
        return float(np.float32(np.nanmean(np.asarray(losses, dtype=np.float64))))


def finished_summary(cfg: DictConfig, out_dir: Path) -> dict | None:
    """The stored summary if this folder holds this very run, finished; None if there is nothing to skip.

    A finished run with other settings is an error: its folder is not this run's to overwrite.
    """
    import yaml

    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        stored = yaml.safe_load((out_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None  # nothing finished here (or a file a kill left unreadable): run it
    if not isinstance(summary, dict) or summary.get("completed") is not True or not isinstance(stored, dict):
        return None
    check_same_run(stored, cfg, out_dir, "a finished run")
    return summary


def start_fresh(out_dir: Path) -> None:
    """checkpoint.resume=false: remove what an earlier run left in the folder."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out_dir / name, ignore_errors=True)


def _written_by_this_attempt(path: Path) -> bool:
    """A provenance.json this process wrote into a folder that held no earlier attempt."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("pid") == os.getpid() and "previous_attempts" not in record


def discard_empty_run_folder(out_dir: Path) -> None:
    """After bad input, remove the folder Hydra made for this run if it holds nothing but Hydra's own
    files (and this attempt's provenance.json): a rejected run leaves no run folder behind."""
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return
    for e in entries:
        disposable = (e.name == ".hydra" or (e.is_file() and e.suffix == ".log")
                      or (e.name == "provenance.json" and _written_by_this_attempt(e)))
        if not disposable:
            return
    if out_dir.resolve() == Path.cwd().resolve():
        return
    shutil.rmtree(out_dir / ".hydra", ignore_errors=True)
    for e in entries:
        if e.is_file():
            e.unlink(missing_ok=True)
    try:
        out_dir.rmdir()
    except OSError:
        pass


def run_small_task(cfg: DictConfig, out_dir: Path) -> dict:
    """Train every seed of one configuration together and write the run folder.

    Resumes from ``out_dir/checkpoints`` when it holds a checkpoint of this run
    (unless ``checkpoint.resume=false``), checkpoints every ``checkpoint.every_s``
    seconds and at the end, and on SIGTERM/SIGUSR2 checkpoints and exits for requeueing.
    """
    import numpy as np
    import tensorflow as tf
    from tqdm import tqdm

    from lodo.experiment import metrics, outputs, registry
    from lodo.experiment.checkpoints import RunCheckpoint
    from lodo.experiment.engine import Engine, Trace
    from lodo.experiment.preemption import Preemption
    from lodo.functional import EngineOptimizer

    try:
        task = registry.build_task(cfg.task.name, **registry.task_options(cfg.task))
        optimizer = registry.build_engine_optimizer(cfg.optimizer.name, **registry.optimizer_options(cfg.optimizer))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_seeds))
    steps = cfg.steps
    log_every = cfg.log_every or max(1, steps // 1000)
    hessian_every = max(cfg.chunk_size, steps // 20) if cfg.hessian_every is None else cfg.hessian_every
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

    checkpointing = cfg.get("checkpoint") or {"every_s": 600, "keep": 2, "resume": True}
    try:
        engine = Engine(task, optimizer, seeds, chunk_size=min(cfg.chunk_size, steps), record_params=record)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    checkpoint = RunCheckpoint(out_dir / "checkpoints", keep=checkpointing["keep"], every_s=checkpointing["every_s"],
                               **engine.state())
    trace = None
    if checkpointing["resume"]:
        stored = checkpoint.peek()
        if stored is not None:
            check_same_run(stored.get("config", {}), cfg, out_dir, "a checkpoint")
            restored = checkpoint.restore()
            trace = Trace.from_arrays(seeds, restored)
            print(f"resumed from step {restored['step']}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    saved_step = trace.steps_done if trace is not None else None

    def save(current) -> None:
        nonlocal saved_step
        if current.steps_done == saved_step:
            return  # this state is already the newest checkpoint
        checkpoint.save(current.steps_done, {"config": resolved, **current.to_arrays()})
        saved_step = current.steps_done

    writer = tf.summary.create_file_writer(str(out_dir / "tb"))
    bar = tqdm(total=steps, initial=min(steps, trace.steps_done) if trace else 0,
               desc=f"{cfg.optimizer.name} on {cfg.task.name}", unit="step",
               disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)

    def progress(done, clock, losses):
        current = loggable_mean(losses[-min(len(losses), log_every):])
        bar.update(min(done, steps) - bar.n)
        bar.set_postfix(loss=f"{current:.4g}", train_s=f"{clock:.1f}")
        with writer.as_default(step=done):
            tf.summary.scalar("train/loss", current)

    with Preemption() as preemption:
        def after_chunk(current) -> bool:
            if preemption.requested:
                return True
            if checkpoint.due():
                save(current)
            return False

        trace = engine.run(steps, time_budget_s=cfg.time_budget_s, hessian_every=hessian_every, progress=progress,
                           trace=trace, after_chunk=after_chunk)
        save(trace)
        budget = cfg.time_budget_s
        completed = trace.all_diverged or (trace.steps_done >= steps
                                           and (budget is None or trace.train_time_s >= budget))
        if preemption.requested and not completed:  # (a signal after the last step: just write the results)
            bar.close()
            writer.flush()
            print(f"stopped by {preemption.signal_name} at step {trace.steps_done}: checkpoint saved in "
                  f"{checkpoint.directory}; exiting with status {Preemption.EXIT_CODE} for requeueing", flush=True)
            preemption.exit_for_requeue()
    bar.close()
    with writer.as_default():
        for step, _, errors in trace.hessian_errors:
            tf.summary.scalar("lodo/hessian_error", float(np.mean(errors)), step=step)
    writer.flush()

    final = metrics.loss_at(trace, task, min(steps, trace.steps_done))
    train_time = final["train_time_s"]
    summary = {
        "task": cfg.task.name,
        "optimizer": cfg.optimizer.name,
        "hyperparameters": registry.optimizer_options(cfg.optimizer),
        "task_options": registry.task_options(cfg.task),
        "steps": final["steps"],
        "steps_done": trace.steps_done,
        "seeds": seeds,
        "loss_final_mean": final["loss_mean"],
        "loss_final_std": final["loss_std"],
        "loss_final_per_seed": final["loss_per_seed"],
        "report_window": final["window"],
        "diverged": final["diverged"],
        "num_params": task.num_params,
        "train_time_s": train_time,
        "seed_steps_per_s": len(seeds) * final["steps"] / train_time if train_time > 0 else None,
        "compile_time_s": trace.compile_time_s,
        "optimum_loss": task.optimum_loss(),
        # The run ended on its own: every step (and second) done, or stopped early because every seed diverged.
        "completed": completed,
    }
    if cfg.time_budget_s is not None:
        budget_steps = trace.steps_within(cfg.time_budget_s)
        summary["time_budget"] = {"seconds": cfg.time_budget_s, **metrics.loss_at(trace, task, budget_steps)}
    if trace.hessian_errors:
        step, _, errors = trace.hessian_errors[-1]
        summary["hessian_error_final"] = {"step": step, "mean": float(np.mean(errors)), "per_seed": errors.tolist()}
    outputs.write_csv(out_dir / "curve.csv", metrics.learning_curve(trace, log_every))
    if record:
        outputs.write_csv(out_dir / "trajectory.csv", metrics.trajectory(trace))
    if frozen_task is not None:
        summary["frozen"] = {"after_steps": trace.steps_done,
                             **frozen_test(frozen, frozen_task, task, optimizer, seeds, cfg.chunk_size, out_dir)}
    outputs.write_json(out_dir / "summary.json", summary)
    checkpoint.prune(1)  # a finished run keeps only its final checkpoint
    print(format_summary(summary))
    return summary


def frozen_test(frozen, new_task, task, optimizer, seeds, chunk_size, out_dir: Path) -> dict:
    """SPEC §1.4: the trained G(φ), frozen, on a new problem and (as a control) on the one it learned.

    Both start afresh (θ0, batch state and momentum reset); the trained
    optimizer's state is only read. Writes ``frozen_curve.csv``.
    """
    import numpy as np
    import pandas as pd

    from lodo.experiment import outputs
    from lodo.experiment.frozen import frozen_summary

    result = {"steps": frozen.steps, "problem_offset": frozen.problem_offset,
              "divergence_factor": float(frozen.divergence_factor)}
    frames = []
    runs = [("new", new_task)] + ([("same", task)] if frozen.get("control", True) else [])
    for label, problem in runs:
        summary, losses = frozen_summary(problem, optimizer, seeds, frozen.steps, frozen.divergence_factor, chunk_size)
        if label == "new":
            result.update(summary)
        else:
            result["control"] = summary
        steps, num_seeds = losses.shape
        frames.append(pd.DataFrame({"problem": label, "seed": np.repeat(seeds, steps),
                                    "step": np.tile(np.arange(steps), num_seeds), "loss": losses.T.reshape(-1)}))
    outputs.write_csv(out_dir / "frozen_curve.csv", pd.concat(frames, ignore_index=True))
    return result


def format_frozen(f: dict) -> list[str]:
    def steps(values):
        return ", ".join("–" if v is None else str(v) for v in values)

    lines = [f"  frozen G on a new problem ({f['steps']} steps): {f['diverged_seeds']}/"
             f"{len(f['divergence_step_per_seed'])} seeds diverged (loss > {f['divergence_factor']:.0e} x initial) "
             f"at steps [{steps(f['divergence_step_per_seed'])}]"]
    if "control" in f:
        c = f["control"]
        lines.append(f"  frozen G on its own problem (control): {c['diverged_seeds']}/"
                     f"{len(c['divergence_step_per_seed'])} seeds diverged")
    return lines


def format_summary(s: dict) -> str:
    lines = [
        f"{s['optimizer']} on {s['task']}: {len(s['seeds'])} seeds x {s['steps']} steps, "
        f"{s['train_time_s']:.1f} s training ({s['seed_steps_per_s']:.0f} seed-steps/s)",
        f"  loss over steps {s['report_window'][0]}-{s['report_window'][1]}: "
        f"{s['loss_final_mean']:.6g} ± {s['loss_final_std']:.3g}"
        + (f"   ({s['diverged']} seed(s) diverged)" if s["diverged"] else ""),
    ]
    if "time_budget" in s:
        b = s["time_budget"]
        lines.append(f"  loss at {b['seconds']} s training ({b['steps']} steps): {b['loss_mean']:.6g} ± {b['loss_std']:.3g}"
                     + (f"   ({b['diverged']} diverged)" if b["diverged"] else ""))
    if s.get("optimum_loss") is not None and s["task"] == "noisy_quadratic_bowl":
        lines.append(f"  analytic optimum ½·tr(H)·σ² (Newton): {s['optimum_loss']:.4g}")
    if "hessian_error_final" in s:
        lines.append(f"  Hessian approximation error ‖I − GH‖_F/√n: {s['hessian_error_final']['mean']:.4g}")
    if "frozen" in s:
        lines.extend(format_frozen(s["frozen"]))
    return "\n".join(lines)


def claim_gpu() -> str:
    """``gpu_per_job=true``: pin this process to one GPU no other job process holds.

    Joblib reuses its worker processes and a process cannot change GPUs once
    TensorFlow has touched one, so the claim belongs to the process, not the
    job: the first job in a worker takes the first free GPU (an exclusive
    ``flock`` on a per-GPU lock file, released when the process exits) and
    keeps it. The GPUs are those in ``CUDA_VISIBLE_DEVICES`` of the launching
    shell, else those ``nvidia-smi`` lists. Jobs of different sweeps on one
    machine share the locks (``$LODO_GPU_LOCK_DIR``, default a folder in /tmp).
    """
    import fcntl
    import subprocess
    import tempfile

    global _CLAIMED_GPU
    if _CLAIMED_GPU is not None:
        return _CLAIMED_GPU[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        try:
            listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30)
            gpus = listed.stdout.split() if listed.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            gpus = []
    if not gpus:
        raise ConfigError("gpu_per_job=true found no GPU (CUDA_VISIBLE_DEVICES is empty and nvidia-smi lists none); "
                          "drop gpu_per_job or run on a GPU node")
    default_locks = Path(tempfile.gettempdir()) / f"lodo-gpu-locks-{os.getuid()}"
    lock_dir = Path(os.environ.get("LODO_GPU_LOCK_DIR") or default_locks)
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        handle = open(lock_dir / f"gpu-{gpu}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMED_GPU = (gpu, handle)  # the open handle holds the lock until the process exits
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        return gpu
    raise ConfigError(f"gpu_per_job=true: all {len(gpus)} GPUs ({', '.join(gpus)}) are held by other jobs; "
                      f"run at most {len(gpus)} jobs at once (hydra.launcher.n_jobs={len(gpus)})")


_CLAIMED_GPU = None


def set_determinism(cfg: DictConfig) -> None:
    """``deterministic=true``: op determinism and the global seeds, before any TF work of the run."""
    if not cfg.get("deterministic"):
        return
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(cfg.seed))  # Python, NumPy and TF global seeds
    tf.config.experimental.enable_op_determinism()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from lodo.experiment.checkpoints import CheckpointError
    from tasks.image_base import DataError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        if cfg.get("gpu_per_job"):
            claim_gpu()
        from lodo.experiment import provenance, registry

        if not (cfg.get("checkpoint") or {}).get("resume", True):
            start_fresh(out_dir)
        else:
            finished = finished_summary(cfg, out_dir)
            if finished is not None:
                print(f"already finished: {out_dir}", flush=True)
                return finished
        if registry.is_image_task(cfg.task.name):
            from lodo.experiment import distribute

            try:  # logical devices must exist before anything (provenance, determinism) starts TensorFlow
                distribute.configure_devices(cfg.distribute)
            except distribute.DistributeError as err:
                raise ConfigError(str(err)) from None
        set_determinism(cfg)
        provenance.write(out_dir, cfg)
        if registry.is_image_task(cfg.task.name):
            from lodo.experiment.trainer import run_image_task

            result = run_image_task(cfg, out_dir)
        else:
            result = run_small_task(cfg, out_dir)
        provenance.write(out_dir, cfg, end_time=provenance.utc_now())
        return result
    except (ConfigError, CheckpointError, DataError) as err:
        discard_empty_run_folder(out_dir)
        fail(str(err))
    except OSError as err:
        if err.filename is None:
            raise
        inside = Path(str(err.filename)).resolve().is_relative_to(out_dir.resolve())
        fail(f"cannot access {err.filename}: {err.strerror}"
             + ("; choose a writable folder with hydra.run.dir=… (hydra.sweep.dir=… with -m)" if inside else ""))


def fail(message: str):
    """One line on stderr and exit status 2."""
    sys.stdout.flush()
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def hydra_error(err: BaseException) -> str | None:
    """One line for an error Hydra raises before the run starts (None: not one of those)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, OSError) and err.filename is not None:
        return (f"cannot create the run folder {err.filename}: {err.strerror}; choose a writable folder with "
                f"hydra.run.dir=… (hydra.sweep.dir=… with -m)")
    if isinstance(err, ValueError) and not isinstance(err, ConfigError):
        frames = traceback.extract_tb(err.__traceback__)
        if frames and f"{os.sep}hydra{os.sep}" in frames[-1].filename:  # e.g. -m together with --cfg
            return " ".join(str(err).split())
        return None
    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    parts = []
    texts = [str(err)] + ([str(err.__cause__)] if isinstance(err.__cause__, OmegaConfBaseException) else [])
    for text in texts:
        lines = iter(text.splitlines())
        for line in lines:
            line = line.strip().rstrip(".")
            if line.startswith("Available options in"):  # then one option per line, then the search path
                group = line.split("'")[1] if "'" in line else "the group"
                options = []
                for option in lines:
                    if not option.startswith("\t"):
                        break
                    options.append(option.strip())
                parts.append(f"valid {group} options: {', '.join(options)}")
                break
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "See https://",
                                             "Set the environment variable")) or line in parts:
                continue
            parts.append(line)
    return "; ".join(parts)


def cli() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as err:
        fail(str(err))
    # Hydra prints its own errors over several lines unless HYDRA_FULL_ERROR is set, in which case it
    # raises them: catch them here and say each in one line (a user who set it gets Hydra's tracebacks).
    user_wants_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        message = None if user_wants_tracebacks else hydra_error(err)
        if message is None:
            raise
        fail(message)

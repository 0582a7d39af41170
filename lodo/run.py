"""The runner: ``python -m lodo.run task=… optimizer=… steps=… seed=… num_seeds=…``.

Each run folder receives ``config.yaml`` (resolved), ``curve.csv`` (learning
curve), ``summary.json`` and TensorBoard events under ``tb/``; tiny tasks also
get ``trajectory.csv`` (the parameters at every step), and the
frozen-preconditioner test (``frozen.steps=N``) ``frozen_curve.csv``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CHECKED_GROUPS = ("task", "optimizer", "experiment", "distribute", "scale")
TRAJECTORY_MAX_PARAMS = 10  # record_trajectory=null saves trajectory.csv up to this many parameters


class ConfigError(ValueError):
    """A bad setting, reported as one line naming the problem and the fix."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """Reject unknown task/optimizer/experiment names before Hydra composes anything.

    Hydra's own message for a missing option spans several lines; this one
    names the bad value and lists the valid ones on one line.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:
        return  # a malformed override: Hydra reports it with its own message
    for override in overrides:
        group = override.key_or_group.lstrip("+~")
        if group not in CHECKED_GROUPS or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        valid = group_options(group)
        for value in values:
            if value is not None and str(value) != "null" and str(value) not in valid:
                raise ConfigError(f"unknown {group} {value!r}; valid {group} names: {', '.join(valid)}")


def _positive_int(cfg, key):
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r} (e.g. {key}=1000)")
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


def run_small_task(cfg: DictConfig, out_dir: Path) -> dict:
    """Train every seed of one configuration together and write the run folder."""
    import numpy as np
    import tensorflow as tf
    from tqdm import tqdm

    import optimizers
    import tasks
    from lodo import metrics, outputs
    from lodo.engine import Engine

    try:
        task = tasks.build(cfg.task.name, **{k: v for k, v in options(cfg.task).items() if k != "steps"})
        optimizer = optimizers.build(cfg.optimizer.name, **options(cfg.optimizer))
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
        if type(optimizer).preconditioner_times is optimizers.EngineOptimizer.preconditioner_times:
            raise ConfigError(f"the frozen test needs an optimizer with a learned preconditioner (e.g. lodo), "
                              f"not {cfg.optimizer.name!r}")
        try:
            task_options = {k: v for k, v in options(cfg.task).items() if k != "steps"}
            frozen_task = tasks.build(cfg.task.name, **{**task_options, "problem_offset": frozen.problem_offset})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"frozen test: {err}") from None

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    engine = Engine(task, optimizer, seeds, chunk_size=min(cfg.chunk_size, steps), record_params=record)
    writer = tf.summary.create_file_writer(str(out_dir / "tb"))
    bar = tqdm(total=steps, desc=f"{cfg.optimizer.name} on {cfg.task.name}", unit="step",
               disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)

    def progress(done, clock, losses):
        with np.errstate(all="ignore"):
            current = float(np.nanmean(losses[-min(len(losses), log_every):]))
        bar.update(min(done, steps) - bar.n)
        bar.set_postfix(loss=f"{current:.4g}", train_s=f"{clock:.1f}")
        with writer.as_default(step=done):
            tf.summary.scalar("train/loss", current)

    trace = engine.run(steps, time_budget_s=cfg.time_budget_s, hessian_every=hessian_every, progress=progress)
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
        "hyperparameters": options(cfg.optimizer),
        "task_options": options(cfg.task),
        "steps": final["steps"],
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
        "completed": trace.steps_done >= steps,
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
    print(format_summary(summary))
    return summary


def frozen_test(frozen, new_task, task, optimizer, seeds, chunk_size, out_dir: Path) -> dict:
    """SPEC §1.4: the trained G(φ), frozen, on a new problem and (as a control) on the one it learned.

    Both start afresh (θ0, batch state and momentum reset); the trained
    optimizer's state is only read. Writes ``frozen_curve.csv``.
    """
    import numpy as np
    import pandas as pd

    from lodo import outputs
    from lodo.frozen import frozen_summary

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


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    import tasks

    try:
        validate(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        if tasks.is_image_task(cfg.task.name):
            from lodo.trainer import run_image_task

            return run_image_task(cfg, out_dir)
        return run_small_task(cfg, out_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()

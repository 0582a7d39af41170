"""The runner: ``python -m lodo.run task=… optimizer=… steps=… seed=… num_seeds=…``.

Each run folder receives ``config.yaml`` (resolved), ``curve.csv`` (learning
curve), ``summary.json`` and TensorBoard events under ``tb/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CHECKED_GROUPS = ("task", "optimizer", "experiment")


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


def options(node: DictConfig) -> dict:
    """A config group's settings as keyword arguments (without its ``name``)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}


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

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    engine = Engine(task, optimizer, seeds, chunk_size=min(cfg.chunk_size, steps))
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
    outputs.write_json(out_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary


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
    return "\n".join(lines)


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    try:
        validate(cfg)
        return run_small_task(cfg, Path(HydraConfig.get().runtime.output_dir))
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

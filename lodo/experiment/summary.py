"""summary.json: one schema for every run, and the one console summary.

The reported figures follow ``lodo.experiment.metrics`` (SPEC §5): the mean
training loss over the task's report window, diverged seeds counted and left out.

Keys (every run):
  task, optimizer, hyperparameters, task_options, steps (the budget), steps_done, seeds,
  loss_final_mean, loss_final_std (both over the seeds that did not diverge), loss_final_per_seed
  (null: non-finite), report_window, diverged (seeds, by ``metrics``' rule), diverged_per_seed (null,
  "non-finite" or "worse than never moving"), diverged_loss_mean (the finite diverged seeds' mean),
  never_moving_loss (per seed, the rule's bar), diverged_at_per_seed (the first non-finite step), num_params, train_time_s (training time of the first
  ``steps`` steps, per seed), seed_steps_per_s (seeds x steps per second of training),
  compile_time_s, completed, cpu_sharing (if measured);
  time_budget (with ``time_budget_s``): seconds, steps, train_time_s, window, loss_mean,
  loss_std, loss_per_seed, diverged, diverged_per_seed, diverged_loss_mean, never_moving_loss, and the
  milestone metrics below;
where the task measures them at its milestones (image tasks): test_loss_mean, test_loss_std,
  test_loss_per_seed, the same for test_accuracy, and test_images;
where known: optimum_loss and optimum_label (the bowl's analytic optimum), hessian_error_final
  (a learned preconditioner), frozen (the frozen-preconditioner test), and what the runner
  adds (image tasks: optimizer_state_bytes, batch_size, distribute, artifacts).
"""

from __future__ import annotations

import math

import numpy as np

from lodo.experiment import metrics, provenance, registry
from lodo.experiment.chunks import Trace

MILESTONE_METRICS = ("test_loss", "test_accuracy")


def _mean_std(values) -> tuple:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return float(np.mean(finite)), float(np.std(finite))


def _milestone_metrics(traces: list[Trace], kind: str) -> dict:
    """The runner's milestone metrics (e.g. the test loss) per seed; diverged seeds are None."""
    out = {}
    for key in MILESTONE_METRICS:
        values = []
        for trace in traces:
            found = trace.milestones.get(kind, {}).get(key)
            diverged = trace.diverged_at(trace.milestones.get(kind, {}).get("step"))
            found = found if isinstance(found, list) else [found] * len(trace.seeds)
            values.extend(None if d is not None else v for v, d in zip(found, diverged))
        if any(v is not None for v in values):
            out[f"{key}_mean"], out[f"{key}_std"] = _mean_std(values)
            out[f"{key}_per_seed"] = values
    images = [t.milestones.get(kind, {}).get("test_images") for t in traces]
    if any(images):
        out["test_images"] = max(i for i in images if i)
    return out


def summarize(cfg, task, traces: list[Trace], *, num_params: int, completed: bool, extra: dict | None = None) -> dict:
    """summary.json of a run whose seeds trained in ``traces`` (one trace, or one per seed)."""
    steps = int(cfg.steps)
    stops = [min(steps, t.steps_done) for t in traces]
    final = metrics.pooled([metrics.loss_at(t, task, stop) for t, stop in zip(traces, stops)])
    times = [float(t.time_at_step(stop)) for t, stop in zip(traces, stops)]
    seed_steps = sum(len(t.seeds) * stop for t, stop in zip(traces, stops))
    summary = {
        "task": cfg.task.name,
        "optimizer": cfg.optimizer.name,
        "hyperparameters": registry.optimizer_options(cfg.optimizer),
        "task_options": registry.task_options(cfg.task),
        "steps": steps,
        "steps_done": max(t.steps_done for t in traces),
        "seeds": [s for t in traces for s in t.seeds],
        "loss_final_mean": final["loss_mean"],
        "loss_final_std": final["loss_std"],
        "loss_final_per_seed": final["loss_per_seed"],
        "report_window": final["window"],
        "diverged": final["diverged"],
        "diverged_per_seed": final["diverged_per_seed"],
        "diverged_loss_mean": final["diverged_loss_mean"],
        "never_moving_loss": final["never_moving_loss"],
        "diverged_at_per_seed": [d for t in traces for d in t.diverged_at()],
        "num_params": int(num_params),
        "train_time_s": float(np.mean(times)),
        "seed_steps_per_s": seed_steps / sum(times) if sum(times) > 0 else None,
        "compile_time_s": float(np.mean([t.compile_time_s for t in traces])),
        # The run ended on its own: every step (and second) done, or stopped early because every seed diverged.
        "completed": bool(completed),
        **_milestone_metrics(traces, "steps"),
    }
    optimum = getattr(task, "optimum_loss", lambda: None)()
    if optimum is not None:
        summary["optimum_loss"] = optimum
        summary["optimum_label"] = getattr(task, "optimum_label", None)
    budget = cfg.get("time_budget_s")
    if budget is not None:
        within = metrics.pooled([metrics.loss_at(t, task, t.steps_within(budget)) for t in traces])
        summary["time_budget"] = {"seconds": budget, **within, **_milestone_metrics(traces, "time")}
    hessian = [t.hessian_errors[-1] for t in traces if t.hessian_errors]
    if hessian:
        step, _, errors = hessian[-1]
        summary["hessian_error_final"] = {"step": step, "mean": float(np.mean(errors)), "per_seed": errors.tolist()}
    sharing = provenance.cpu_sharing([c for t in traces for c in t.others_cpu])
    if sharing is not None:
        summary["cpu_sharing"] = sharing  # were the timings measured with the cores to the run itself?
    summary.update(extra or {})
    return summary


def upgrade(summary: dict) -> dict:
    """A summary.json written before the schema was one, in today's keys (image runs had their own)."""
    s = dict(summary)
    if "seed_steps_per_s" not in s and "steps_per_s" in s:
        s["seed_steps_per_s"] = s.pop("steps_per_s")
    at_steps = s.pop("at_steps", None)  # image runs: every metric at the step budget
    if isinstance(at_steps, dict):
        for key, value in at_steps.items():
            if key.startswith("test_"):
                s.setdefault(key, value)
    for key in MILESTONE_METRICS:  # image runs also had the bare mean, e.g. test_loss
        if key in s:
            value = s.pop(key)
            s.setdefault(f"{key}_mean", value)
    if isinstance(s.get("time_budget"), dict):
        b = dict(s["time_budget"])
        for old, new in (("train_loss_mean", "loss_mean"), ("train_loss_std", "loss_std"),
                         ("train_loss_per_seed", "loss_per_seed")):
            if old in b and new not in b:
                b[new] = b.pop(old)
        s["time_budget"] = b
    return s


def healthy_losses(summary: dict) -> list:
    """Each seed's final loss, None where it diverged (by ``metrics``' rule where the summary records the
    verdicts; an older summary's nulls are its non-finite seeds)."""
    seeds = summary.get("seeds") if isinstance(summary.get("seeds"), list) else []
    values = summary.get("loss_final_per_seed")
    if not isinstance(values, list) or len(values) != len(seeds):
        mean = summary.get("loss_final_mean")
        return [mean if _is_number(mean) and math.isfinite(mean) else None] * len(seeds)
    verdicts = summary.get("diverged_per_seed")
    verdicts = verdicts if isinstance(verdicts, list) and len(verdicts) == len(values) else [None] * len(values)
    return [v if _is_number(v) and math.isfinite(v) and verdict is None else None
            for v, verdict in zip(values, verdicts)]


# -- what a table row needs ------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


KINDS = {  # name -> (test, what the message says is expected)
    "name": (lambda v: isinstance(v, str) and bool(v.strip()), "a name"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    "count": (lambda v: _is_integer(v) and v >= 1, "a positive integer"),
    "natural": (lambda v: _is_integer(v) and v >= 0, "a non-negative integer"),
    "seeds": (lambda v: isinstance(v, list) and bool(v) and all(_is_integer(x) for x in v),
              "a non-empty list of seeds"),
    "number": (_is_number, "a number"),
    "number?": (lambda v: v is None or _is_number(v), "a number or null"),
    "numbers?": (lambda v: isinstance(v, list) and all(x is None or _is_number(x) for x in v),
                 "a list of numbers or nulls"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "window": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_integer(x) for x in v), "[start, stop]"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}
# Every table reads these; ``summarize`` always writes them.
ROW_FIELDS = {"task": "name", "optimizer": "name", "steps": "count", "seeds": "seeds", "diverged": "natural",
              "loss_final_mean": "number?"}
# Optional (older summaries lack some), but where present the tables read them as this kind; dotted keys are
# nested (checked when their parents are objects).
TYPED_FIELDS = {"loss_final_std": "number?", "loss_final_per_seed": "numbers?", "diverged_loss_mean": "number?",
                "never_moving_loss": "numbers?", "hyperparameters": "dict",
                "task_options": "dict", "task_options.data": "dict", "train_time_s": "number?",
                "seed_steps_per_s": "number?", "report_window": "window", "frozen": "dict", "cpu_sharing": "dict",
                "test_images": "natural", "completed": "bool", "distribute": "dict", "distribute.devices": "names",
                "time_budget": "dict",
                "time_budget.seconds": "number", "time_budget.steps": "natural", "time_budget.diverged": "natural",
                **{f"{block}{m}_{stat}": "number?" for block in ("", "time_budget.")
                   for m in ("loss", "loss_final", *MILESTONE_METRICS) for stat in ("mean", "std")}}


def _lookup(summary: dict, key: str) -> tuple[bool, object]:
    """(present, value) of a dotted key."""
    value = summary
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def problems(summary: dict, needs: dict | None = None) -> list[str]:
    """Why ``summary`` (upgraded) cannot be a table row: missing or mistyped fields; empty if it can.

    ``needs``: more fields a particular table reads, dotted for nested ones (``hyperparameters.beta``),
    each with its kind (a key of ``KINDS``).
    """
    found = []
    for key, kind in {**ROW_FIELDS, **(needs or {})}.items():
        present, value = _lookup(summary, key)
        test, expected = KINDS[kind]
        if not present:
            found.append(f"no {key}")
        elif not test(value):
            found.append(f"{key} is {_short(value)}, expected {expected}")
    for key, kind in TYPED_FIELDS.items():
        present, value = _lookup(summary, key)
        test, expected = KINDS[kind]
        if present and not test(value):
            found.append(f"{key} is {_short(value)}, expected {expected}")
    if not found and summary["diverged"] > len(summary["seeds"]):
        found.append(f"diverged is {summary['diverged']}, more than its {len(summary['seeds'])} seeds")
    return found


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- the console ------------------------------------------------------------------------------------

def _number(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def _pm(mean, std, digits: str = ".6g") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "diverged"
    return f"{_number(mean, digits)} ± {_number(std, '.3g')}"


def _frozen_lines(f: dict) -> list[str]:
    steps = ", ".join("–" if v is None else str(v) for v in f.get("divergence_step_per_seed", []))
    lines = [f"  frozen G on a new problem ({f.get('steps')} steps): {f.get('diverged_seeds')}/"
             f"{len(f.get('divergence_step_per_seed', []))} seeds diverged "
             f"(loss > {_number(f.get('divergence_factor'), '.0e')} x initial) at steps [{steps}]"]
    if "control" in f:
        c = f["control"]
        lines.append(f"  frozen G on its own problem (control): {c.get('diverged_seeds')}/"
                     f"{len(c.get('divergence_step_per_seed', []))} seeds diverged")
    return lines


def _diverged_note(block: dict) -> str:
    """"(2 seed(s) diverged: 1 non-finite, 1 worse than never moving, mean 1.4e+05)" or nothing."""
    count = block.get("diverged")
    if not count:
        return ""
    verdicts = [v for v in block.get("diverged_per_seed") or [] if v]
    kinds = ", ".join(f"{verdicts.count(k)} {k}" for k in dict.fromkeys(verdicts))
    beside = block.get("diverged_loss_mean")
    beside = f", mean {beside:.3g}" if _is_number(beside) and math.isfinite(beside) else ""
    return f"   ({count} seed(s) diverged{': ' + kinds if kinds else ''}{beside})"


def format_summary(summary: dict) -> str:
    """The console summary of a run; any key may be missing or null (an old or a diverged run)."""
    s = upgrade(summary)
    seeds = s.get("seeds") or []
    window = s.get("report_window") or ["?", "?"]
    lines = [f"{s.get('optimizer')} on {s.get('task')}: {len(seeds)} seed{'s' if len(seeds) != 1 else ''} x "
             f"{s.get('steps')} steps, {_number(s.get('train_time_s'), '.1f')} s training "
             f"({_number(s.get('seed_steps_per_s'), ',.1f')} seed-steps/s), "
             f"{_number(s.get('num_params'), ',')} parameters",
             f"  loss over steps {window[0]}-{window[1]}: {_pm(s.get('loss_final_mean'), s.get('loss_final_std'))}"
             + _diverged_note(s)]
    for key, name in (("test_loss", "test loss"), ("test_accuracy", "test accuracy")):
        if f"{key}_mean" in s:
            lines.append(f"  {name}: {_pm(s[f'{key}_mean'], s.get(f'{key}_std'), '.4g')}")
    if isinstance(s.get("time_budget"), dict):
        b = s["time_budget"]
        line = (f"  at {b.get('seconds')} s of training ({b.get('steps', '?')} steps): "
                f"loss {_pm(b.get('loss_mean'), b.get('loss_std'))}")
        if "test_loss_mean" in b:
            line += f", test loss {_pm(b['test_loss_mean'], b.get('test_loss_std'), '.4g')}"
        lines.append(line + _diverged_note(b))
    if s.get("optimum_loss") is not None and s.get("optimum_label"):
        lines.append(f"  {s['optimum_label']}: {_number(s['optimum_loss'], '.4g')}")
    if isinstance(s.get("hessian_error_final"), dict):
        lines.append(f"  Hessian approximation error ‖I − GH‖_F/√n: {_number(s['hessian_error_final'].get('mean'), '.4g')}")
    if isinstance(s.get("frozen"), dict):
        lines.extend(_frozen_lines(s["frozen"]))
    return "\n".join(lines)

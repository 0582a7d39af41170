"""The genetic tuner's results beside the paper's tuned values, from finished sweep folders; never trains.

    python scripts/tuning_summary.py RUNS_DIR OUT_DIR        # results/tuning/summary.{md,csv}
    python scripts/tuning_summary.py --overrides TUNED_YAML  # print a tuned.yaml as command-line overrides

RUNS_DIR holds ``<task>/<optimizer>/`` sweep folders (``hydra.sweep.dir`` of
``python -m lodo.run -m hydra/sweeper=ga``, as ``make tune-small`` leaves
them): ``ga_state.json`` and ``tuned.yaml`` from the sweep (the final
selection round's best candidate, or the final mean for a sweep without that
round), and two
evaluation runs on the seeds the tuner never used (``seed=0 num_seeds=8``;
tuning draws seeds from 1000 up): ``eval_ours/`` with our tuned values and
``eval_paper/`` with the paper's (``configs/tuned/<task>/<optimizer>.yaml``).
The loss is each run's reported figure: the mean over the last 1% of 100k
steps on the bowl, over steps 180–200 on Rosenbrock.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from lodo.experiment import report
from lodo.experiment.outputs import atomic_write_text, write_csv

TASKS = {"noisy_quadratic_bowl": "Bowl", "rosenbrock": "Rosenbrock"}
# The optimizers with the paper's values (Table 6, configs/tuned/…): a sweep of any other optimizer (the newer
# ones) has nothing to be compared with, so it is left out, as the image-task sweeps are.
PAPER = {"noisy_quadratic_bowl": {"adam", "momentum", "momentum_ema", "rmsprop", "yogi", "lbfgs", "olbfgs", "lodo"},
         "rosenbrock": {"adam", "momentum", "momentum_ema", "rmsprop", "yogi", "lodo"}}
TOLERANCE = 0.03  # "within 3% of the paper's loss, or below"


def overrides(tuned_yaml: Path) -> str:
    """``optimizer.key=value`` for every value of a tuned YAML (our tuned.yaml or configs/tuned/…)."""
    values = yaml.safe_load(Path(tuned_yaml).read_text()) or {}
    return " ".join(f"optimizer.{k}={v!r}" for k, v in values.items())


def number(value) -> str:
    """Four significant digits; a value just below 1 (a decay) keeps four of 1 − x (0.9999723, not 1)."""
    if isinstance(value, float) and 0.99 < value < 1:
        digits = 4 - int(math.floor(math.log10(1 - value))) - 1
        return f"{value:.{digits}f}".rstrip("0")
    if isinstance(value, float) and value >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def hyperparameters(values: dict) -> str:
    return ", ".join(f"{k} {number(v)}" for k, v in values.items())


def summary(folder: Path):
    """The run's summary, None if there is none or it cannot be read (the row then says so)."""
    try:
        found = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("loss_final_mean"), (int, float)) else None


def origin(state: dict) -> str:
    """Which point the sweep's result is: the final mean, or generation g's individual i (the final round's pick)."""
    final = state.get("final")
    if not final:
        return "final mean"
    chosen = final["origins"][final["choice"]]
    return "final mean" if chosen is None else f"gen {chosen[0]}, individual {chosen[1]}"


def collect(runs_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    rows, problems = [], []
    for state_path in sorted(runs_dir.glob("*/*/ga_state.json")):
        sweep = state_path.parent
        task, optimizer = sweep.parent.name, sweep.name
        if task not in TASKS or optimizer not in PAPER[task]:
            continue  # the image-task sweeps tune lost values, the newer optimizers have none in the paper
        try:  # a damaged state is one problem line, never a traceback (the sweeper itself refuses to resume it)
            state = json.loads(state_path.read_text())
            plan, generations, final = state["setup"]["plan"], state["generations"], state.get("final") or {}
            walls = [float(g["wall_s"]) for g in generations] + [float(final.get("wall_s", 0.0))]
            seeds = [s for g in generations for s in g["seeds"]] + list(final.get("seeds", []))
            ks = state["setup"].get("seeds_per_individual") or [1] * len(plan)
            result = origin(state)
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"{task}/{optimizer}: {state_path} cannot be read ({type(err).__name__}: {err})")
            continue
        if len(generations) < len(plan) or not (sweep / "tuned.yaml").is_file():
            problems.append(f"{task}/{optimizer}: sweep unfinished ({len(state['generations'])}/{len(plan)} "
                            f"generations)")
            continue
        ours = yaml.safe_load((sweep / "tuned.yaml").read_text())
        eval_ours, eval_paper = summary(sweep / "eval_ours"), summary(sweep / "eval_paper")
        if eval_ours is None or eval_paper is None:
            problems.append(f"{task}/{optimizer}: evaluation run missing")
        paper = {k: v for k, v in (eval_paper or {}).get("hyperparameters", {}).items() if k in ours}
        loss_ours = eval_ours["loss_final_mean"] if eval_ours else math.nan
        loss_paper = eval_paper["loss_final_mean"] if eval_paper else math.nan
        rows.append({
            "task": task, "optimizer": optimizer,
            "ours": json.dumps(ours), "paper": json.dumps(paper),
            "loss_ours": loss_ours, "loss_ours_std": eval_ours["loss_final_std"] if eval_ours else math.nan,
            "diverged_ours": eval_ours["diverged"] if eval_ours else 0,
            "loss_paper": loss_paper, "loss_paper_std": eval_paper["loss_final_std"] if eval_paper else math.nan,
            "diverged_paper": eval_paper["diverged"] if eval_paper else 0,
            "seeds": len(eval_ours["seeds"]) if eval_ours else 0,
            "eval_steps": eval_ours["steps"] if eval_ours else 0,
            "window": "-".join(str(w) for w in eval_ours["report_window"]) if eval_ours else "",
            "ratio": loss_ours / loss_paper if loss_paper and not math.isnan(loss_paper) else math.nan,
            "result": result,
            "tuning_s": sum(walls), "final_s": float(final.get("wall_s", 0.0)),
            "retry_s": sum(g.get("retry_wall_s", 0.0) for g in [*generations, final]),
            "generations": len(plan), "population": state["setup"]["population"],
            "seeds_per_individual": "/".join(str(k) for k in ks) if len(set(ks)) > 1 else str(ks[0]),
            "final_candidates": state["setup"].get("final_candidates", 0),
            "final_seeds": state["setup"].get("final_seeds", 0),
            "final_steps": int(final.get("steps", 0)),
            "center": json.dumps(dict(zip(state["setup"]["search_space"], state["setup"]["center"]))),
            "tuning_seeds": f"{min(seeds)}-{max(seeds)}", "first_tuning_seed": min(seeds),
        })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(["task", "optimizer"], key=lambda c: c.map(
            lambda v: list(TASKS).index(v) if v in TASKS else report.order_key(v)[0])).reset_index(drop=True)
    return frame, problems


def markdown(frame: pd.DataFrame) -> str:
    header = ["Task", "Optimizer", "Our tuned values", "Picked", "Paper's values (Table 6)", "Loss, ours",
              "Loss, paper's", "Ours / paper", "Tuning time"]
    rows = []
    for r in frame.to_dict("records"):
        ratio = "–" if math.isnan(r["ratio"]) else f"{r['ratio']:.3f}" + (" ✓" if r["ratio"] <= 1 + TOLERANCE else "")
        rows.append([TASKS.get(r["task"], r["task"]), report.label(r["optimizer"]),
                     hyperparameters(json.loads(r["ours"])), r["result"], hyperparameters(json.loads(r["paper"])),
                     report.cell(r["loss_ours"], r["loss_ours_std"], r["diverged_ours"], r["seeds"], fmt="{:.4g}"),
                     report.cell(r["loss_paper"], r["loss_paper_std"], r["diverged_paper"], r["seeds"], fmt="{:.4g}"),
                     ratio, f"{r['tuning_s'] / 60:.1f} min"
                     + (f" ({r['retry_s'] / 60:.1f} re-running crashed jobs)" if r["retry_s"] >= 1 else "")])
    schemes = []
    for task in dict.fromkeys(frame["task"]) if not frame.empty else []:
        r = frame[frame["task"] == task].iloc[0]
        final = (f", then a final round: the final mean and the best {r['final_candidates']} individuals of the "
                 f"generations at the last one's steps re-scored on {r['final_seeds']} fresh seeds each over "
                 f"{r['final_steps']} steps, the best of "
                 f"them the result" if r["final_candidates"] else ", the result the final mean")
        ks = r["seeds_per_individual"]
        seeds = (f"{ks} seeds (per generation)" if "/" in ks else f"{ks} seed" + ("s" if ks != "1" else ""))
        schemes.append(f"{TASKS.get(task, task)}: {r['generations']} generations x {r['population']} individuals x "
                       f"{seeds} each{final}")
    text = report.markdown_table(header, rows)
    if not frame.empty:
        first = frame.iloc[0]
        centres = "; ".join(f"{report.label(r['optimizer'])} ({TASKS.get(r['task'], r['task'])}): "
                            + hyperparameters(json.loads(r["center"])) for r in frame.to_dict("records"))
        text += (
            f"\nOur values: SPEC §4.1's genetic algorithm (`make tune-small`) with the paper's schedules "
            f"(configs/hydra/sweeper/ga.yaml; {'; '.join(schemes)}; tuning seeds from "
            f"{frame['first_tuning_seed'].min()} up). "
            f"Picked: the point tuned.yaml holds (the final round's winner: the final mean, or generation g's "
            f"individual i). Both columns are then evaluated on the same {first['seeds']} fresh "
            f"seeds (0–{first['seeds'] - 1}, never used in tuning): mean ± std of the loss over steps "
            f"{', '.join(sorted(set(frame['window'])))} of {', '.join(str(s) for s in sorted(set(frame['eval_steps'])))}"
            f" steps (the bowl: its last 1%; Rosenbrock: 180–200). ✓: ours within {TOLERANCE:.0%} of the paper's "
            f"loss or below. Tuning time: wall clock of the generations' and the final round's jobs (compilation "
            f"included) on a shared 2-core CPU"
            + ("; in parentheses, the part spent re-running, in halves, jobs that crashed"
               if (frame["retry_s"] >= 1).any() else "") + f". Generation 0 was centred on: {centres}.\n")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", nargs="?", type=Path)
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("--overrides", type=Path, metavar="TUNED_YAML",
                        help="print the values of a tuned YAML as optimizer.key=value overrides and exit")
    args = parser.parse_args(argv)
    if args.overrides:
        if not args.overrides.is_file():
            print(f"error: {args.overrides} does not exist (run the GA sweep first)", file=sys.stderr)
            return 2
        print(overrides(args.overrides))
        return 0
    if args.runs_dir is None or args.out_dir is None:
        parser.error("give RUNS_DIR and OUT_DIR, or --overrides TUNED_YAML")
    if not args.runs_dir.is_dir():
        print(f"error: {args.runs_dir} is not a folder of GA sweeps (make tune-small writes runs/tuning)",
              file=sys.stderr)
        return 2
    frame, problems = collect(args.runs_dir)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if frame.empty:
        print(f"error: no finished GA sweep under {args.runs_dir}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "summary.csv", frame)
    text = markdown(frame)
    atomic_write_text(args.out_dir / "summary.md", "# Genetic-algorithm tuning of the small tasks\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m lodo.aggregate DIR [--out OUT]``: one table and one figure from any set of run folders.

Gathers every run folder under DIR, however deep (a run folder is one with
``config.yaml``: a single run, a multirun's jobs, copies from a cluster),
and writes ``aggregate.csv``, ``aggregate.md`` and ``aggregate_curves.{png,pdf}``
to OUT (default: DIR). A run that is unfinished, crashed or damaged (no
``summary.json``, ``completed`` false, unreadable JSON, a summary without
the fields a row needs) is skipped with one line saying why. An OUT that
cannot be written is refused before any work, and the outputs appear only
once all of them are complete. Reads files only: nothing is trained.

Columns: task, optimizer, the hyperparameters that differ between the runs
of one optimizer (and the task options that differ between runs of one
task), steps, seeds, the final loss (mean ± std over seeds that did not
diverge), the diverged count, test loss / test accuracy where the task
reports them, and throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pandas as pd

from lodo.experiment.report import (CSV_COLUMNS, ReportError, cell, label, markdown_table, order_key, output_problem,
                                    pyplot, read_csv, read_summary, save_figure, staged, write_error, write_table)
from lodo.experiment.summary import healthy_losses

NOT_RUN_FOLDERS = {"checkpoints", "tb"}  # inside a run folder; hidden folders (.hydra, .submitit) are skipped too


def run_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that holds a ``config.yaml``."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in NOT_RUN_FOLDERS)
        if "config.yaml" in files:
            found.append(Path(folder))
    return sorted(found)


def number(summary: dict, key: str):
    """``summary[key]`` if it is a finite number, else None (missing, null for a diverged run, or damaged)."""
    value = summary.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def varying(dicts: list[dict]) -> set[str]:
    """Keys whose values differ between the given dicts."""
    keys = set().union(*dicts) if dicts else set()
    return {k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1}


def describe(values: dict, keys) -> str:
    return ", ".join(f"{k}={values.get(k)}" for k in sorted(keys)) or "–"


def _pooled(values: list) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None]
    if not finite:
        return None, None
    mean = sum(finite) / len(finite)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))


def _mean(values: list):
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def rows(root: Path, runs: list[tuple[Path, dict]]) -> pd.DataFrame:
    """One row per group of runs that differ only by their seeds (a sweep over seed=… pools into one row)."""
    groups: dict[tuple, list[tuple[Path, dict]]] = {}
    for folder, s in runs:
        key = (s["task"], s["optimizer"], json.dumps(s.get("hyperparameters") or {}, sort_keys=True),
               json.dumps(s.get("task_options") or {}, sort_keys=True), number(s, "steps"), number(s, "batch_size"))
        groups.setdefault(key, []).append((folder, s))
    records = []
    for (task, optimizer, hyperparameters, task_options, steps, batch_size), members in groups.items():
        per_seed = [v for _, s in members for v in healthy_losses(s)]
        mean, std = _pooled(per_seed)
        times = [number(s, "train_time_s") for _, s in members]
        records.append({
            "folder": ", ".join(str(f.relative_to(root)) if f != root else "." for f, _ in members),
            "task": task, "optimizer": optimizer,
            "hyperparameters": json.loads(hyperparameters), "task_options": json.loads(task_options),
            "steps": steps, "batch_size": batch_size, "runs": len(members), "seeds": len(per_seed),
            "loss_mean": mean, "loss_std": std, "diverged": sum(v is None for v in per_seed),
            "test_loss": _mean([number(s, "test_loss_mean") for _, s in members]),
            "test_accuracy": _mean([number(s, "test_accuracy_mean") for _, s in members]),
            # one model's (one seed's) steps per second, and all seeds' together
            "steps_per_s": _mean([steps / t if steps and t else None for t in times]),
            "seed_steps_per_s": _mean([number(s, "seed_steps_per_s") for _, s in members]),
            "train_time_s": _mean(times),
        })
    frame = pd.DataFrame(records)
    keys = []
    for _, row in frame.iterrows():
        same_opt = frame[(frame.task == row.task) & (frame.optimizer == row.optimizer)]
        same_task = frame[frame.task == row.task]
        shown = {f"{k}": row.hyperparameters.get(k) for k in varying(list(same_opt.hyperparameters))}
        shown.update({f"task.{k}": row.task_options.get(k) for k in varying(list(same_task.task_options))})
        for column in ("steps", "batch_size"):
            if same_task[column].nunique(dropna=True) > 1:
                shown[column] = None if pd.isna(row[column]) else int(row[column])
        keys.append(describe(shown, shown))
    frame.insert(3, "key_hyperparameters", keys)
    frame["hyperparameters"] = [json.dumps(h, sort_keys=True) for h in frame.hyperparameters]
    frame["task_options"] = [json.dumps(t, sort_keys=True) for t in frame.task_options]
    frame["_order"] = [order_key(o) for o in frame.optimizer]
    frame = frame.sort_values(["task", "_order", "key_hyperparameters", "folder"]).drop(columns="_order")
    return frame.reset_index(drop=True)


def fmt(value, spec: str = "{:.4g}") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def markdown(frame: pd.DataFrame) -> str:
    tests = [c for c in ("test_loss", "test_accuracy") if frame[c].notna().any()]
    batch = frame.batch_size.notna().any()
    header = ["Task", "Optimizer", "Hyperparameters", "Steps", *(["Batch"] if batch else []), "Seeds", "Loss",
              "Diverged", *[{"test_loss": "Test loss", "test_accuracy": "Test accuracy"}[c] for c in tests],
              "Steps/s", "Runs"]
    body = []
    for _, r in frame.iterrows():
        seeds = int(r.seeds)
        loss = cell(r.loss_mean, r.loss_std if r.loss_std is not None else float("nan"), int(r.diverged), seeds,
                    fmt="{:.4g}")
        body.append([r.task, label(r.optimizer), r.key_hyperparameters, fmt(r.steps, "{:,.0f}"),
                     *([fmt(r.batch_size, "{:,.0f}")] if batch else []), seeds or "–", loss, int(r.diverged),
                     *[fmt(r[c]) for c in tests], fmt(r.steps_per_s, "{:,.0f}"),
                     r.folder if r.runs == 1 else f"{r.runs} runs (aggregate.csv lists them)"])
    note = ("\nLoss: the final training loss (the task's report window), mean ± std over the seeds that did not "
            "diverge, pooled over the runs of a row (runs that differ only by their seeds).\n")
    return markdown_table(header, body) + note


SMOOTHING = 0.02  # the curves' rolling mean spans this fraction of each curve's points (at least 1)
CLIP = 10.0  # a panel's axis stops at this many times the highest loss of a run with no diverged seed


def curves_figure(root: Path, frame: pd.DataFrame, out_dir: Path) -> list[str]:
    """Each row's learning curve (mean over its seeds and runs, smoothed), one panel per task, on a log axis
    where the losses allow; a curve that leaves the axis (diverged) ends in a marker. Returns the runs
    without a readable curve."""
    plt = pyplot()
    tasks = list(dict.fromkeys(frame.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    unreadable = []
    for ax, task in zip(axes[0], tasks):
        curves = []
        for _, r in frame[frame.task == task].iterrows():
            parts = []
            for folder in r.folder.split(", "):
                try:
                    parts.append(read_csv(root / folder / "curve.csv", CSV_COLUMNS["curve.csv"], ""))
                except ReportError:
                    unreadable.append(folder)
            if not parts:
                continue
            curve = pd.concat(parts)
            mean = curve.dropna(subset=["loss"]).groupby("step").loss.mean()  # rows without a loss: diagnostics
            window = max(1, round(SMOOTHING * len(mean)))
            smooth = mean.rolling(window, min_periods=1).mean()
            name = label(r.optimizer) + ("" if r.key_hyperparameters == "–" else f" ({r.key_hyperparameters})")
            curves.append((name, smooth, int(r.diverged), int(r.seeds)))
        def highest(c):
            finite = c[c.map(math.isfinite)]
            return float(finite.max()) if len(finite) else None

        healthy = [h for _, c, diverged, _ in curves if not diverged for h in [highest(c)] if h is not None]
        top = CLIP * max(healthy) if healthy else None
        positive = all(((c > 0) | ~pd.Series(c).map(math.isfinite)).all() for _, c, _, _ in curves)
        clipped = False
        for name, smooth, diverged, seeds in curves:
            values = smooth.to_numpy(dtype=float)
            left = ~pd.Series(values).map(math.isfinite).to_numpy() | ((values > top) if top else False)
            shown = values.copy()
            if left.any():
                shown[int(left.argmax()):] = float("nan")
                clipped = True
            suffix = f", {diverged} of {seeds} seeds diverged" if diverged else ""
            (line,) = ax.plot(smooth.index, shown, label=name + suffix, linewidth=1.3)
            if left.any() and top is not None:
                x = smooth.index[max(0, int(left.argmax()) - 1)]
                ax.plot([x], [top], marker="x", markersize=9, color=line.get_color(), clip_on=False)
        ax.set_title(task)
        ax.set_xlabel(f"step  (curves: rolling mean over {SMOOTHING:.0%} of their points"
                      + ("; ×: where a run left the axis, diverging)" if clipped else ")"), fontsize=8)
        ax.set_ylabel("training loss (mean over seeds)")
        if curves and positive:
            ax.set_yscale("log")
        if clipped and top is not None:
            ax.set_ylim(top=top)
        if curves:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, "aggregate_curves")
    return sorted(set(unreadable))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Gather finished run folders into one table and figure "
                                                 "(never trains).")
    parser.add_argument("dir", type=Path, help="folder searched recursively for run folders (with config.yaml)")
    parser.add_argument("--out", type=Path, help="where aggregate.{csv,md} and aggregate_curves.{png,pdf} go "
                                                 "(default: DIR)")
    args = parser.parse_args(argv)
    root = args.dir
    if not root.is_dir():
        return fail(f"{root} is not a folder; pass the folder that holds the runs (e.g. multirun/ or runs/table1)")
    out_dir = args.out or root
    what = "--out" if args.out else "DIR (the default --out)"
    problem = output_problem(out_dir, what)
    if problem:
        return fail(problem)
    runs = []
    for folder in run_folders(root):
        summary, reason = read_summary(folder)
        if summary is None:
            print(f"skipped {folder}: {reason}", file=sys.stderr)
        else:
            runs.append((folder, summary))
    if not runs:
        return fail(f"no finished run folder (config.yaml and a completed summary.json) under {root}")
    frame = rows(root, runs)
    table = markdown(frame)
    stage = None
    try:
        with staged(out_dir) as stage:
            write_table(stage, "aggregate", frame, table)
            unreadable = curves_figure(root, frame, stage)
    except OSError as err:
        return fail(write_error(err, stage, out_dir, "--out"))
    for folder in unreadable:
        print(f"no learning curve for {root / folder}: curve.csv is missing or unreadable", file=sys.stderr)
    print(table, end="")
    print(f"wrote {out_dir / 'aggregate.csv'}, {out_dir / 'aggregate.md'}, {out_dir / 'aggregate_curves.png'}",
          file=sys.stderr)
    return 0


def fail(message: str) -> int:
    """One ``error:`` line on stderr; the exit status 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

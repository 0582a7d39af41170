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


def rows(root: Path, runs: list[tuple[Path, dict]]) -> pd.DataFrame:
    records = []
    for folder, s in runs:
        seeds = s.get("seeds")
        num_seeds = len(seeds) if isinstance(seeds, list) else s.get("num_seeds")
        steps = number(s, "steps")
        train_time = number(s, "train_time_s")
        steps_per_s = steps / train_time if steps and train_time else None  # one model's (one seed's) steps/s
        records.append({
            "folder": str(folder.relative_to(root)) if folder != root else ".",
            "task": s["task"], "optimizer": s["optimizer"],  # read_summary made sure of both
            "hyperparameters": s.get("hyperparameters") or {}, "task_options": s.get("task_options") or {},
            "steps": steps, "seeds": num_seeds,
            "loss_mean": number(s, "loss_final_mean"),
            "loss_std": number(s, "loss_final_std"),
            "diverged": s.get("diverged", 0) if isinstance(s.get("diverged"), int) else 0,
            "test_loss": number(s, "test_loss_mean"),
            "test_accuracy": number(s, "test_accuracy_mean"),
            "steps_per_s": steps_per_s, "seed_steps_per_s": number(s, "seed_steps_per_s"),
            "train_time_s": train_time,
        })
    frame = pd.DataFrame(records)
    keys = []
    for _, row in frame.iterrows():
        same_opt = frame[(frame.task == row.task) & (frame.optimizer == row.optimizer)]
        same_task = frame[frame.task == row.task]
        shown = {f"{k}": row.hyperparameters.get(k) for k in varying(list(same_opt.hyperparameters))}
        shown.update({f"task.{k}": row.task_options.get(k) for k in varying(list(same_task.task_options))})
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
    header = ["Task", "Optimizer", "Hyperparameters", "Steps", "Seeds", "Loss", "Diverged",
              *[{"test_loss": "Test loss", "test_accuracy": "Test accuracy"}[c] for c in tests], "Steps/s", "Run"]
    body = []
    for _, r in frame.iterrows():
        seeds = int(r.seeds) if r.seeds is not None and not pd.isna(r.seeds) else 0
        loss = cell(r.loss_mean, r.loss_std if r.loss_std is not None else float("nan"), int(r.diverged), seeds,
                    fmt="{:.4g}")
        body.append([r.task, label(r.optimizer), r.key_hyperparameters, fmt(r.steps, "{:,.0f}"), seeds or "–", loss,
                     int(r.diverged), *[fmt(r[c]) for c in tests], fmt(r.steps_per_s, "{:,.0f}"), r.folder])
    return markdown_table(header, body)


def curves_figure(root: Path, frame: pd.DataFrame, out_dir: Path) -> list[str]:
    """Mean learning curve over seeds of every run, one panel per task; the runs without a readable curve."""
    plt = pyplot()
    tasks = list(dict.fromkeys(frame.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    unreadable = []
    for ax, task in zip(axes[0], tasks):
        for _, r in frame[frame.task == task].iterrows():
            try:
                curve = read_csv(root / r.folder / "curve.csv", CSV_COLUMNS["curve.csv"], "")
            except ReportError:
                unreadable.append(r.folder)
                continue
            mean = curve.dropna(subset=["loss"]).groupby("step").loss.mean()
            name = label(r.optimizer) + ("" if r.key_hyperparameters == "–" else f" ({r.key_hyperparameters})")
            ax.plot(mean.index, mean.values, label=name, linewidth=1.2)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        if ax.lines and all((line.get_ydata() > 0).all() for line in ax.lines):
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, "aggregate_curves")
    return unreadable


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

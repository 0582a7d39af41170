"""The throughput bar chart of the extended tables: seed-steps per second of every optimizer's runs; never trains.

    python scripts/report_throughput.py RUNS_DIR OUT_DIR [--optimizers a,b]

RUNS_DIR holds one folder per optimizer with ``summary.json`` (Table 1's runs on the bowl, 8 seeds in one
compiled program, as ``make reproduce-extended`` leaves them in runs/table1). Writes
``throughput.{md,csv,pdf,png}`` into OUT_DIR: each run's seed-steps/s over its training time (compilation
excluded), the paper's optimizers and the newer ones told apart, and the 2,000 seed-steps/s line that every
newer optimizer must clear.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from lodo.experiment import registry, report

TARGET = registry.NEWER_THROUGHPUT_TARGET
NEEDS = {"seed_steps_per_s": "number?"}
newer = registry.beyond_the_paper


def task_label(name: str) -> str:
    try:
        return registry.task(name).label.lower()
    except registry.RegistryError:
        return name


def build(runs, paper, out_dir: Path) -> str:
    runs = report.by_optimizer(runs)
    frame = pd.DataFrame([{"optimizer": name, "label": report.label(name), "seeds": run.num_seeds,
                           "steps": run.summary["steps"], "seed_steps_per_s": run.summary.get("seed_steps_per_s"),
                           "cpu_shared": bool((run.summary.get("cpu_sharing") or {}).get("shared")),
                           "newer": newer(name)} for name, run in runs.items()])
    task = next(iter(runs.values())).summary["task"]
    rows = [[r.label, "newer" if r.newer else "paper's", f"{r.seeds}",
             "–" if report.missing(r.seed_steps_per_s) else f"{r.seed_steps_per_s:,.0f}",
             "" if report.missing(r.seed_steps_per_s) or not r.newer else
             ("yes" if r.seed_steps_per_s >= TARGET else "no")] for r in frame.itertuples()]
    md = report.markdown_table(["Optimizer", "Compared by", "Seeds", "Seed-steps/s", f"≥ {TARGET:,.0f}"], rows) + (
        f"\nTraining throughput on the {task_label(task)}: seeds × steps per second of training "
        f"time (compilation excluded), all seeds of a run in one compiled program, from each run's summary.json."
        + (" Runs marked as sharing the CPU with other processes: "
           + ", ".join(frame.label[frame.cpu_shared]) + "." if frame.cpu_shared.any() else "") + "\n")
    report.write_table(out_dir, "throughput", frame, md)

    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(frame) + 1.2))
    shown = frame.dropna(subset=["seed_steps_per_s"]).iloc[::-1]
    colors = ["C1" if n else "C0" for n in shown.newer]
    # Bars on a log axis need a common base: the decade below the slowest run (and the target).
    base = 10.0 ** math.floor(math.log10(min(shown.seed_steps_per_s.min(), TARGET) / 2))
    ax.barh(shown.label, shown.seed_steps_per_s - base, left=base, color=colors)
    ax.set_xlim(left=base)
    ax.axvline(TARGET, color="k", ls=":", lw=1)
    ax.text(TARGET, len(shown) - 0.4, f" {TARGET:,.0f}", fontsize=8, va="bottom")
    ax.set(xscale="log", xlabel="seed-steps per second of training (log scale)", title=f"Throughput on the {task_label(task)}")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="C0"), plt.Rectangle((0, 0), 1, 1, color="C1")],
              labels=["the paper's optimizers", "newer optimizers"], fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x", which="both")
    fig.tight_layout()
    report.save_figure(fig, out_dir, "throughput")
    return md


def main(argv=None) -> int:
    return report.main(argv, doc=__doc__, stem="throughput", make_target="reproduce-extended", build=build,
                       needs=NEEDS)


if __name__ == "__main__":
    sys.exit(main())

"""Table 8 and Figures 3 and 11 (Rosenbrock) from finished run folders; never trains.

    python scripts/report_table8.py RUNS_DIR OUT_DIR [--tuned-here results/tuning]

RUNS_DIR holds one folder per optimizer with ``summary.json``, ``curve.csv``
and ``trajectory.csv`` (as ``make reproduce-table8`` leaves them). Writes
``table8.{md,csv,tex}`` (mean loss over steps 180–200 beside the paper's
``results/paper/table8.csv``, and ours/paper), ``figure3.{pdf,png}`` (seed 0's
trajectory of each optimizer on a log-scaled heatmap of f) and
``figure11.{pdf,png}`` (learning curves, mean over seeds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lodo.experiment import report

X_RANGE, Y_RANGE = (-1.2, 1.5), (-1.0, 2.5)  # Figure 3's window (SPEC §3.2)
NEEDS = {"loss_final_std": "number?", "report_window": "window"}  # read beyond every row's fields


def build_table(runs: dict, paper, tuned_here=None) -> pd.DataFrame:
    rows = []
    for name, run in runs.items():
        s = run.summary
        ours, theirs = s["loss_final_mean"], report.as_float(report.paper_value(paper, name, "loss"))
        rows.append({**report.tuned_here_columns(tuned_here, run),
            "optimizer": name,
            "loss_mean": ours,
            "loss_std": s["loss_final_std"],
            "paper_loss": report.paper_value(paper, name, "loss"),
            "paper_loss_std": report.paper_value(paper, name, "loss_std"),
            "ratio_to_paper": ours / theirs if theirs and not report.missing(ours) else np.nan,
            "window": f"{s['report_window'][0]}-{s['report_window'][1]}",
            "diverged": s["diverged"],
            "diverged_loss_mean": s.get("diverged_loss_mean"),
            "seeds": run.num_seeds,
            "steps": s["steps"],
        })
    return pd.DataFrame(rows)


def entries(table: pd.DataFrame) -> list[list[str]]:
    rows = []
    for r in table.to_dict("records"):
        paper = report.paper_cell(r["paper_loss"])
        if not report.missing(r["paper_loss_std"]) and r["paper_loss_std"] != report.NOT_IN_PAPER:
            paper += f" ± {r['paper_loss_std']}"
        ratio = "–" if report.missing(r["ratio_to_paper"]) else f"{r['ratio_to_paper']:.2f}"
        rows.append([report.label(r["optimizer"]),
                     report.cell(r["loss_mean"], r["loss_std"], r["diverged"], r["seeds"], fmt="{:.4g}",
                                 diverged_mean=r["diverged_loss_mean"]),
                     paper, ratio] + ([report.tuned_here_cell(r, fmt="{:.4g}")] if "tuned_here_mean" in r else []))
    return rows


def header(table: pd.DataFrame) -> list[str]:
    return ["Optimizer", "Loss (steps 180–200)", "Paper", "Ours / paper"] + (
        ["Tuned here (GA)"] if "tuned_here_mean" in table else [])


def markdown(table: pd.DataFrame) -> str:
    windows = ", ".join(sorted(set(table.window)))
    note = (f"\nMean ± std over {int(table.seeds.max())} seeds of the loss averaged over steps {windows} "
            f"({int(table.steps.max())} steps from (−0.5, 2); f = 0.01(1 − x)² + (y − x²)², minimum 0 at (1, 1)). "
            "Rosenbrock has no noise, so the seeds differ only in an optimizer's own random draws (LODO's "
            "permutations and initial blocks, PSGD-Kron's probes): the other optimizers' 8 seeds are identical runs. Paper: Table 8 of the paper ('–': an optimizer the paper did not run). "
            + report.DIVERGENCE_NOTE + report.tuned_here_note(table, "loss_mean"))
    return report.markdown_table(header(table), entries(table)) + note + "\n"


def latex(table: pd.DataFrame) -> str:
    return report.latex_table(header(table), entries(table), align="lllr" + "l" * (len(header(table)) - 4))


def rosenbrock(x, y, scale=0.01):
    return scale * (1 - x) ** 2 + (y - x**2) ** 2


def figure3(runs: dict, out_dir: Path) -> None:
    plt = report.pyplot()
    from matplotlib.colors import LogNorm

    xs, ys = np.linspace(*X_RANGE, 400), np.linspace(*Y_RANGE, 400)
    gx, gy = np.meshgrid(xs, ys)
    scale = next((r.task_option("scale") for r in runs.values() if r.task_option("scale") is not None), 0.01)
    f = rosenbrock(gx, gy, scale)
    fig, ax = plt.subplots(figsize=(7, 6.4))
    mesh = ax.imshow(f, origin="lower", extent=(*X_RANGE, *Y_RANGE), aspect="auto", cmap="Greys_r",
                     norm=LogNorm(vmin=max(f.min(), 1e-5), vmax=f.max()), interpolation="bilinear")
    fig.colorbar(mesh, ax=ax, label="f(x, y)  (log scale)")
    styles = report.line_styles(runs)
    for name, run in runs.items():
        if not (run.folder / "trajectory.csv").exists():
            continue
        points = run.read_csv("trajectory.csv")
        seed0 = points[points.seed == points.seed.min()].sort_values("step")
        ax.plot(seed0.theta_0, seed0.theta_1, lw=1.3, label=report.label(name), **styles[name])
        ax.plot(seed0.theta_0.iloc[-1], seed0.theta_1.iloc[-1], "o", color=styles[name]["color"], ms=5)
    start = next(iter(runs.values())).task_option("start", [-0.5, 2.0])
    ax.plot(*start, "s", color="white", mec="k", ms=8, label="start (−0.5, 2)")
    ax.plot(1, 1, "*", color="gold", mec="k", ms=16, label="minimum (1, 1)")
    ax.set(xlim=X_RANGE, ylim=Y_RANGE, xlabel="x", ylabel="y",
           title=f"Rosenbrock: trajectories of seed 0 ({int(max(r.summary['steps'] for r in runs.values()))} steps)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    report.save_figure(fig, out_dir, "figure3")


def figure11(runs: dict, out_dir: Path) -> None:
    plt = report.pyplot()
    crowded = len(runs) > report.CROWDED_LINES  # the extended table: the legend goes beside the axes, off the curves
    fig, ax = plt.subplots(figsize=(8.6 if crowded else 6.4, 4.4))
    styles = report.line_styles(runs)
    for name, run in runs.items():
        curve = run.curve.dropna(subset=["loss"]).groupby("step").loss.mean()
        ax.plot(curve.index, curve.values, lw=1.3, label=report.label(name), **styles[name])
    window = next(iter(runs.values())).summary["report_window"]
    ax.axvspan(*window, color="k", alpha=0.08, label=f"report window {window[0]}–{window[1]}")
    ax.set(yscale="log", xlabel="step", ylabel="loss (mean of seeds)", title="Rosenbrock: learning curves")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, **({"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if crowded else {}))
    fig.tight_layout()
    report.save_figure(fig, out_dir, "figure11")


def build(runs, paper, out_dir: Path, tuned_here=None) -> str:
    runs = report.by_optimizer(runs)
    table = build_table(runs, paper, tuned_here)
    table_md = markdown(table)
    report.write_table(out_dir, "table8", table, table_md, latex(table))
    figure3(runs, out_dir)
    figure11(runs, out_dir)
    return table_md


def main(argv=None) -> int:
    return report.main(argv, doc=__doc__, stem="table8", make_target="reproduce-table8", build=build, needs=NEEDS,
                       tuned_here=True)


if __name__ == "__main__":
    sys.exit(main())

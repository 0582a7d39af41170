"""Table 1 and Figure 2 from finished run folders; reads results, never trains.

    python scripts/report_table1.py RUNS_DIR OUT_DIR [--readme README.md] [--tuned-here results/tuning]

RUNS_DIR holds one folder per optimizer with ``summary.json`` and
``curve.csv`` (as ``make reproduce-table1`` leaves them). Writes
``table1.{md,csv,tex}`` and ``figure2.{pdf,png}`` into OUT_DIR, our numbers
beside the paper's (``results/paper/table1.csv``). Folders without a
``summary.json`` (unfinished or crashed runs) are skipped and named.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from matplotlib.ticker import EngFormatter

from lodo.experiment import report

NEEDS = {"loss_final_std": "number?"}  # the summary fields read beyond every row's (report.main skips runs without)


def build_table(runs: dict, paper, tuned_here=None) -> pd.DataFrame:
    rows = []
    for name, run in runs.items():
        s = run.summary
        budget = s.get("time_budget", {})
        seeds = run.num_seeds
        rows.append({**report.tuned_here_columns(tuned_here, run),
            "optimizer": name,
            "loss_100k_mean": s["loss_final_mean"],
            "loss_100k_std": s["loss_final_std"],
            "loss_100k": report.cell(s["loss_final_mean"], s["loss_final_std"], s["diverged"], seeds,
                                     diverged_mean=s.get("diverged_loss_mean")),
            "paper_loss_100k": report.paper_value(paper, name, "loss_100k_steps"),
            "loss_300s_mean": budget.get("loss_mean"),
            "loss_300s_std": budget.get("loss_std"),
            "loss_300s": report.cell(budget.get("loss_mean"), budget.get("loss_std"), budget.get("diverged", 0), seeds,
                                     diverged_mean=budget.get("diverged_loss_mean")) if budget else "–",
            "paper_loss_300s": report.paper_value(paper, name, "loss_300_s"),
            "steps_in_300s": budget.get("steps"),
            "seed_steps_per_s": s["seed_steps_per_s"],
            "diverged": s["diverged"],
            "seeds": seeds,
            "steps": s["steps"],
        })
    return pd.DataFrame(rows)


def steps_text(value, sep=",") -> str:
    return "–" if report.missing(value) or pd.isna(value) else f"{int(value):,}".replace(",", sep)


def markdown(table: pd.DataFrame, optimum: float | None, seconds) -> str:
    steps = int(table.steps.max())
    alike = "tuned_here_mean" in table
    header = ["Optimizer", f"Loss at {steps:,} steps", "Paper (100k)", f"Loss at {seconds} s", "Paper (300 s)",
              f"Steps in {seconds} s", "Seed-steps/s"] + ([f"Tuned here (GA), {steps:,} steps"] if alike else [])
    rows = [[report.label(r["optimizer"]), r["loss_100k"], report.paper_cell(r["paper_loss_100k"]), r["loss_300s"],
             report.paper_cell(r["paper_loss_300s"]), steps_text(r["steps_in_300s"]),
             "–" if report.missing(r["seed_steps_per_s"]) else f"{r['seed_steps_per_s']:,.0f}"]
            + ([report.tuned_here_cell(r)] if alike else []) for r in table.to_dict("records")]
    note = (f"\nMean ± std over {int(table.seeds.max())} seeds of the training loss averaged over the last 1% of "
            "steps. \"?\": the paper's value is lost in our copy (SPEC §5); \"–\": an optimizer the paper did not run. ")
    if optimum is not None:
        note += f"Analytic optimum ½·tr(H)·σ² = {optimum:.3f}. "
    note += ("All seeds of an optimizer run together in one compiled program, so each seed is charged the group's "
             "wall-clock training time. " + report.DIVERGENCE_NOTE + report.tuned_here_note(table, "loss_100k_mean"))
    return report.markdown_table(header, rows) + note + "\n"


def latex(table: pd.DataFrame) -> str:
    header = ["Optimizer", "Loss @ 100k steps", "Paper", "Loss @ 300 s", "Paper", "Steps in 300 s"]
    rows = [[report.label(r.optimizer), r.loss_100k, report.paper_cell(r.paper_loss_100k), r.loss_300s,
             report.paper_cell(r.paper_loss_300s), steps_text(r.steps_in_300s, sep="")] for r in table.itertuples()]
    return report.latex_table(header, rows, align="lllllr")


def figure(runs: dict, out_dir: Path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = report.line_styles(runs)
    for name, run in runs.items():
        curve = run.curve.dropna(subset=["loss"])
        by_step = curve.groupby("step").agg(loss=("loss", "mean"), t=("train_time_s", "first")).reset_index()
        in_steps = by_step[by_step.step <= run.summary["steps"]]
        axes[0].plot(in_steps.step, in_steps.loss, label=report.label(name), lw=1, **styles[name])
        axes[1].plot(by_step.t, by_step.loss, label=report.label(name), lw=1, **styles[name])
    optimum = next((r.summary.get("optimum_loss") for r in runs.values() if r.summary.get("optimum_loss")), None)
    for ax, xlabel in zip(axes[:2], ["step", "training time (s)"]):
        if optimum:
            ax.axhline(optimum, color="k", ls=":", lw=1, label=f"optimum {optimum:.2f}")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="training loss (mean of seeds)")
        if optimum:  # a runaway loss (BFGS) would squash every other curve into one line
            ax.set_ylim(0.8 * optimum, 50 * optimum)
        ax.grid(alpha=0.3, which="both")
    legend_space = report.place_legend(fig, axes[0])
    axes[0].set_title("Learning curves")
    axes[1].set_title("Learning curves by training time")
    if "lodo" in runs and "hessian_error" in runs["lodo"].curve:
        errors = runs["lodo"].curve.dropna(subset=["hessian_error"])
        per_step = errors.groupby("step").hessian_error.agg(["mean", "min", "max"]).reset_index()
        axes[2].plot(per_step.step, per_step["mean"], color="C3", label="LODO (mean of seeds)")
        axes[2].fill_between(per_step.step, per_step["min"], per_step["max"], color="C3", alpha=0.2)
        axes[2].set(xlabel="step", ylabel=r"$\|I - GH\|_F / \sqrt{n}$", title="LODO's Hessian approximation error")
        axes[2].xaxis.set_major_formatter(EngFormatter())  # 740k steps at 300 s: plain integers overlap
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.suptitle("Noisy quadratic bowl (n = 100, σ² = 1)")
    fig.tight_layout(rect=(0, legend_space, 1, 1))
    report.save_figure(fig, out_dir, "figure2")


def build(runs, paper, out_dir: Path, tuned_here=None) -> str:
    runs = report.by_optimizer(runs)
    table = build_table(runs, paper, tuned_here)
    optimum = next((r.summary.get("optimum_loss") for r in runs.values() if r.summary.get("optimum_loss")), None)
    seconds = next((r.summary["time_budget"]["seconds"] for r in runs.values() if "time_budget" in r.summary), "–")
    table_md = markdown(table, optimum, seconds)
    report.write_table(out_dir, "table1", table, table_md, latex(table))
    figure(runs, out_dir)
    return table_md


def main(argv=None) -> int:
    return report.main(argv, doc=__doc__, stem="table1", make_target="reproduce-table1", build=build, needs=NEEDS,
                       tuned_here=True)


if __name__ == "__main__":
    sys.exit(main())

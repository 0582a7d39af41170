"""The frozen-preconditioner result (SPEC §1.4) from finished run folders; never trains.

    python scripts/report_frozen.py RUNS_DIR OUT_DIR

RUNS_DIR holds one folder per optimizer whose ``summary.json`` has a
``frozen`` entry and whose ``frozen_curve.csv`` holds the losses (as
``make reproduce-frozen`` leaves them). Writes ``frozen.{md,csv}`` (per
optimizer: how many seeds diverged on the new bowl, at which steps, beside
the paper's "within 10 steps", and the same for the control, the bowl the
preconditioner was trained on) and ``frozen.{pdf,png}``: loss / initial loss
on both bowls over the first 20 steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lodo.experiment import report
from lodo.experiment.summary import problems

# The frozen-preconditioner result's fields this report reads (a run whose result lacks them is left out).
FROZEN_NEEDS = {"frozen.after_steps": "natural", "frozen.steps": "count", "frozen.diverged_seeds": "natural",
                "frozen.divergence_step_per_seed": "numbers?", "frozen.nonfinite_step_per_seed": "numbers?",
                "frozen.divergence_factor": "number"}


def steps_text(steps: list) -> str:
    return ", ".join("–" if s is None else str(s) for s in steps)


def build_table(runs: dict, paper) -> pd.DataFrame:
    rows = []
    for name, run in runs.items():
        f = run.summary["frozen"]
        steps = [s for s in f["divergence_step_per_seed"] if s is not None]
        control = f.get("control", {})
        rows.append({
            "optimizer": name,
            "trained_steps": f["after_steps"],
            "frozen_steps": f["steps"],
            "seeds": run.num_seeds,
            "frozen_diverged_seeds": f["diverged_seeds"],
            "divergence_step_min": min(steps) if steps else np.nan,
            "divergence_step_median": float(np.median(steps)) if steps else np.nan,
            "divergence_step_max": max(steps) if steps else np.nan,
            "divergence_steps": steps_text(f["divergence_step_per_seed"]),
            "nonfinite_steps": steps_text(f["nonfinite_step_per_seed"]),
            "divergence_factor": f["divergence_factor"],
            "growth_rate_mean": float(np.mean(f["growth_rate_per_seed"])) if f.get("growth_rate_per_seed") else np.nan,
            "hessian_error_new_mean": float(np.mean(f["hessian_error_per_seed"])) if f.get("hessian_error_per_seed")
            else np.nan,
            "control_diverged_seeds": control.get("diverged_seeds"),
            "control_growth_rate_mean": float(np.mean(control["growth_rate_per_seed"]))
            if control.get("growth_rate_per_seed") else np.nan,
            "control_hessian_error_mean": float(np.mean(control["hessian_error_per_seed"]))
            if control.get("hessian_error_per_seed") else np.nan,
            "paper_divergence_within_steps": report.paper_value(paper, name, "divergence_within_steps"),
            "diverged": run.summary["diverged"],  # seeds that diverged while training, before freezing
        })
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    header = ["Optimizer", "Trained steps", "Diverged on the new bowl", "Divergence step per seed", "Paper",
              "Growth rate ρ (new)", "Control: diverged on its own bowl", "Growth rate ρ (own)"]
    rows = []
    for r in table.to_dict("records"):
        paper = r["paper_divergence_within_steps"]
        rows.append([report.label(r["optimizer"]), f"{r['trained_steps']:,}",
                     f"{r['frozen_diverged_seeds']}/{r['seeds']}", r["divergence_steps"],
                     "?" if report.missing(paper) else f"within {paper} steps",
                     "–" if report.missing(r["growth_rate_mean"]) else f"{r['growth_rate_mean']:.3g}",
                     "–" if report.missing(r["control_diverged_seeds"]) else f"{int(r['control_diverged_seeds'])}/{r['seeds']}",
                     "–" if report.missing(r["control_growth_rate_mean"]) else f"{r['control_growth_rate_mean']:.4g}"])
    factor = table.divergence_factor.iloc[0]
    note = (f"\nAfter training, φ is frozen (no more meta-updates) and G(φ) drives momentum from a fresh start "
            f"(θ0 = 0, center 0, m = 0) on a new bowl with new random eigenvectors and, as a control, on the bowl it "
            f"was trained on, for {int(table.frozen_steps.max())} steps each. Step t is the loss at θ_t; a seed "
            f"diverged at the first step whose loss is non-finite or above {factor:.0e} × its loss at step 0 "
            f"(\"–\": never). ρ: spectral radius of the frozen iteration (momentum + G) on that bowl's Hessian, mean "
            f"over seeds; ρ > 1 makes the loss grow like ρ^(2t).")
    return report.markdown_table(header, rows) + note + "\n"


def figure(runs: dict, out_dir: Path, first: int = 20) -> None:
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    factor = None
    for i, (name, run) in enumerate(runs.items()):
        curve = run.read_csv("frozen_curve.csv")
        factor = run.summary["frozen"]["divergence_factor"]
        for problem, style, text in (("new", "-", "new bowl"), ("same", "--", "its own bowl (control)")):
            part = curve[(curve.problem == problem) & (curve.step < first)]
            for j, (seed, seed_curve) in enumerate(part.groupby("seed")):
                seed_curve = seed_curve.sort_values("step")
                relative = seed_curve.loss.to_numpy() / seed_curve.loss.iloc[0]
                ax.plot(seed_curve.step, relative, style, color=f"C{2 * i + (problem == 'same')}", lw=0.9, alpha=0.8,
                        label=f"{report.label(name)}, frozen, {text}" if j == 0 else None)
    if factor:
        ax.axhline(factor, color="k", ls=":", lw=1, label=f"divergence threshold ({factor:.0e} × initial)")
    ax.axvline(10, color="grey", ls="-.", lw=0.8, label="paper: diverges within 10 steps")
    ax.set(yscale="log", xlabel="step on the new problem", ylabel="loss / loss at step 0",
           title="Frozen preconditioner on a new bowl (one line per seed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    report.save_figure(fig, out_dir, "frozen")


def build(runs, paper, out_dir: Path) -> str:
    frozen = []
    for run in runs:
        damage = problems(run.summary, FROZEN_NEEDS)
        if "frozen" not in run.summary:
            print(f"note: {run.name} has no frozen-preconditioner result (frozen.steps=0); left out", file=sys.stderr)
        elif damage:
            print(f"note: {run.name}'s summary.json has a damaged frozen result ({'; '.join(damage)}); left out",
                  file=sys.stderr)
        else:
            frozen.append(run)
    if not frozen:
        raise report.ReportError("no run with a frozen-preconditioner result: run `make reproduce-frozen` first")
    runs = report.by_optimizer(frozen)
    table = build_table(runs, paper)
    table_md = markdown(table)
    report.write_table(out_dir, "frozen", table, table_md)
    figure(runs, out_dir)
    return table_md


def main(argv=None) -> int:
    return report.main(argv, doc=__doc__, stem="frozen", make_target="reproduce-frozen", build=build)


if __name__ == "__main__":
    sys.exit(main())

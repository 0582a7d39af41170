"""Table 1 and Figure 2 from finished run folders; reads results, never trains.

    python scripts/report_table1.py RUNS_DIR OUT_DIR

RUNS_DIR holds one folder per optimizer with ``summary.json`` and
``curve.csv`` (as ``make reproduce-table1`` leaves them). Writes
``table1.{md,csv,tex}`` and ``figure2.{pdf,png}`` into OUT_DIR, our numbers
beside the paper's (``results/paper/table1.csv``). Folders without a
``summary.json`` (unfinished or crashed runs) are skipped and named.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lodo.outputs import atomic_write_text, write_csv  # noqa: E402

ORDER = ["adam", "momentum", "rmsprop", "yogi", "lbfgs", "olbfgs", "l2lbgdbgd", "lodo", "bfgs",
         "levenberg_marquardt", "newton"]
LABELS = {"adam": "Adam", "momentum": "Momentum", "rmsprop": "RMSprop", "yogi": "Yogi", "lbfgs": "L-BFGS",
          "olbfgs": "O-LBFGS", "l2lbgdbgd": "L2LBGDBGD", "lodo": "LODO", "bfgs": "BFGS",
          "levenberg_marquardt": "Levenberg–Marquardt", "newton": "Newton (optimal)"}


def load_runs(runs_dir: Path):
    summaries, curves, skipped = {}, {}, []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        path = folder / "summary.json"
        if not path.exists():
            skipped.append(folder.name)
            continue
        summary = json.loads(path.read_text())
        summaries[summary["optimizer"]] = summary
        curves[summary["optimizer"]] = pd.read_csv(folder / "curve.csv")
    return summaries, curves, skipped


def cell(mean, std, diverged, seeds) -> str:
    if diverged and diverged == seeds:
        return f"diverged ({diverged}/{seeds})"
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.3f} ± {std:.3f}"
    return text + (f" ({diverged}/{seeds} diverged)" if diverged else "")


def build_table(summaries: dict, paper: pd.DataFrame) -> pd.DataFrame:
    paper = paper.set_index("optimizer")
    rows = []
    for name in sorted(summaries, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        s = summaries[name]
        budget = s.get("time_budget", {})
        seeds = len(s["seeds"])
        rows.append({
            "optimizer": name,
            "loss_100k_mean": s["loss_final_mean"],
            "loss_100k_std": s["loss_final_std"],
            "loss_100k": cell(s["loss_final_mean"], s["loss_final_std"], s["diverged"], seeds),
            "paper_loss_100k": paper.loc[name, "loss_100k_steps"] if name in paper.index else None,
            "loss_300s_mean": budget.get("loss_mean"),
            "loss_300s_std": budget.get("loss_std"),
            "loss_300s": cell(budget.get("loss_mean"), budget.get("loss_std"), budget.get("diverged", 0), seeds)
            if budget else "–",
            "paper_loss_300s": paper.loc[name, "loss_300_s"] if name in paper.index else None,
            "steps_in_300s": budget.get("steps"),
            "seed_steps_per_s": s["seed_steps_per_s"],
            "diverged": s["diverged"],
            "seeds": seeds,
            "steps": s["steps"],
        })
    return pd.DataFrame(rows)


def paper_cell(value) -> str:
    return "?" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def markdown(table: pd.DataFrame, optimum: float | None, seconds) -> str:
    steps = int(table.steps.max())
    lines = [
        f"| Optimizer | Loss at {steps:,} steps | Paper (100k) | Loss at {seconds} s | Paper (300 s) "
        f"| Steps in {seconds} s | Seed-steps/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        steps = "–" if r.steps_in_300s is None or pd.isna(r.steps_in_300s) else f"{int(r.steps_in_300s):,}"
        lines.append(f"| {LABELS.get(r.optimizer, r.optimizer)} | {r.loss_100k} | {paper_cell(r.paper_loss_100k)} "
                     f"| {r.loss_300s} | {paper_cell(r.paper_loss_300s)} | {steps} | {r.seed_steps_per_s:,.0f} |")
    note = (f"\nMean ± std over {int(table.seeds.max())} seeds of the training loss averaged over the last 1% of "
            "steps. \"?\": the paper's value is lost in our copy (SPEC §5). ")
    if optimum is not None:
        note += f"Analytic optimum ½·tr(H)·σ² = {optimum:.3f}. "
    note += ("All seeds of an optimizer run together in one compiled program, so each seed is charged the group's "
             "wall-clock training time.")
    return "\n".join(lines) + "\n" + note + "\n"


def latex(table: pd.DataFrame) -> str:
    lines = [r"\begin{tabular}{lllllr}", r"\toprule",
             r"Optimizer & Loss @ 100k steps & Paper & Loss @ 300 s & Paper & Steps in 300 s \\", r"\midrule"]
    for r in table.itertuples():
        steps = "--" if r.steps_in_300s is None or pd.isna(r.steps_in_300s) else f"{int(r.steps_in_300s)}"
        row = [LABELS.get(r.optimizer, r.optimizer), r.loss_100k, paper_cell(r.paper_loss_100k), r.loss_300s,
               paper_cell(r.paper_loss_300s), steps]
        lines.append(" & ".join(str(c).replace("±", r"$\pm$").replace("–", "--") for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def figure(curves: dict, summaries: dict, out_dir: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = sorted(curves, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    for name in names:
        curve = curves[name].dropna(subset=["loss"])
        steps_limit = summaries[name]["steps"]
        by_step = curve.groupby("step").agg(loss=("loss", "mean"), t=("train_time_s", "first")).reset_index()
        in_steps = by_step[by_step.step <= steps_limit]
        axes[0].plot(in_steps.step, in_steps.loss, label=LABELS.get(name, name), lw=1)
        axes[1].plot(by_step.t, by_step.loss, label=LABELS.get(name, name), lw=1)
    optimum = next((s.get("optimum_loss") for s in summaries.values() if s.get("optimum_loss")), None)
    for ax, xlabel in zip(axes[:2], ["step", "training time (s)"]):
        if optimum:
            ax.axhline(optimum, color="k", ls=":", lw=1, label=f"optimum {optimum:.2f}")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="training loss (mean of seeds)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Learning curves")
    axes[1].set_title("Learning curves by training time")
    if "lodo" in curves:
        errors = curves["lodo"].dropna(subset=["hessian_error"])
        per_step = errors.groupby("step").hessian_error.agg(["mean", "min", "max"]).reset_index()
        axes[2].plot(per_step.step, per_step["mean"], color="C3", label="LODO (mean of seeds)")
        axes[2].fill_between(per_step.step, per_step["min"], per_step["max"], color="C3", alpha=0.2)
        axes[2].set(xlabel="step", ylabel=r"$\|I - GH\|_F / \sqrt{n}$", title="LODO's Hessian approximation error")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.suptitle("Noisy quadratic bowl (n = 100, σ² = 1)")
    fig.tight_layout()
    for ext in ("pdf", "png"):
        tmp = out_dir / f".figure2.tmp.{ext}"
        fig.savefig(tmp, dpi=130)
        tmp.replace(out_dir / f"figure2.{ext}")
    plt.close(fig)


def paste_into_readme(readme: Path, table_md: str) -> None:
    text = readme.read_text()
    start, end = "<!-- table1 -->", "<!-- /table1 -->"
    if start not in text or end not in text:
        print(f"note: {readme} has no {start} … {end} markers; not updated", file=sys.stderr)
        return
    head, rest = text.split(start, 1)
    atomic_write_text(readme, head + start + "\n" + table_md + rest[rest.index(end):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--paper", type=Path, default=ROOT / "results" / "paper" / "table1.csv")
    parser.add_argument("--readme", type=Path, help="also paste the table between <!-- table1 --> markers here")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"error: no run folder {args.runs_dir}; run `make reproduce-table1` first", file=sys.stderr)
        return 2
    summaries, curves, skipped = load_runs(args.runs_dir)
    if skipped:
        print(f"skipped unfinished or crashed runs: {', '.join(skipped)}", file=sys.stderr)
    if not summaries:
        print(f"error: no finished run (summary.json) under {args.runs_dir}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = build_table(summaries, pd.read_csv(args.paper, dtype=str, keep_default_na=False).replace("", None))
    optimum = next((s.get("optimum_loss") for s in summaries.values() if s.get("optimum_loss")), None)
    seconds = next((s["time_budget"]["seconds"] for s in summaries.values() if "time_budget" in s), "–")
    write_csv(args.out_dir / "table1.csv", table)
    atomic_write_text(args.out_dir / "table1.md", markdown(table, optimum, seconds))
    atomic_write_text(args.out_dir / "table1.tex", latex(table))
    figure(curves, summaries, args.out_dir)
    if args.readme:
        paste_into_readme(args.readme, markdown(table, optimum, seconds))
    print((args.out_dir / "table1.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tables 2, 3, 4 and Figures 4, 5, 6 (the image tasks) from finished run folders; never trains.

    python scripts/report_images.py table2  RUNS_DIR OUT_DIR [--readme README.md]   # + figure4
    python scripts/report_images.py table3  RUNS_DIR OUT_DIR                        # + table3_curves
    python scripts/report_images.py table4  RUNS_DIR OUT_DIR                        # + figure6
    python scripts/report_images.py figure5 RUNS_DIR OUT_DIR                        # momentum sweep

RUNS_DIR holds one folder per optimizer (per β for figure5) as
``make reproduce-table2`` etc. leave them. Every caption states the dataset,
steps, seeds, batch and test images the numbers come from, because the
same scripts report the paper-scale runs and the reduced CPU runs.
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.ticker import FuncFormatter

from lodo.experiment import report
from lodo.experiment.outputs import atomic_copy
from lodo.experiment.provenance import SHARED_CPU_FRACTION

DATASET_LABELS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def scale_note(runs: list[report.Run]) -> str:
    """What the numbers were measured on: dataset and source, steps, seeds, batch, test images, time budget."""
    s = runs[0].summary
    options = s.get("task_options", {})
    if s["task"] == "pixelcnn_mnist":
        dataset = DATASET_LABELS.get(options.get("dataset", "mnist"), options.get("dataset"))
    else:
        dataset = "CIFAR-10"
    source = options.get("data", {}).get("source", "tfds")
    tests = [r.summary["test_images"] for r in runs if r.summary.get("test_images")]
    seeds = max(r.num_seeds for r in runs)
    parts = [f"{dataset} ({source} source)", f"{s['steps']:,} steps", f"{seeds} seed{'s' if seeds > 1 else ''}",
             f"batch {s.get('batch_size', options.get('batch_size'))}"]
    if tests:
        parts.append(f"test metrics on {tests[0]:,} test images")
    if "time_budget" in s:
        parts.append(f"time budget {s['time_budget']['seconds']:,} s")
    device = s.get("distribute", {}).get("devices", ["?"])
    parts.append(f"device {device[0].split('device:')[-1] if device else '?'}")
    return ", ".join(parts)


def _milestone_value(summary: dict, kind: str, key: str):
    """(mean, std) of ``train_loss``, ``test_loss`` or ``test_accuracy`` at the step budget or the time budget."""
    if kind == "steps":
        prefix, block = ("loss_final" if key == "train_loss" else key), summary
    else:
        prefix, block = ("loss" if key == "train_loss" else key), summary.get("time_budget", {})
    return block.get(f"{prefix}_mean"), block.get(f"{prefix}_std")


def build_loss_table(runs: dict, paper) -> pd.DataFrame:
    rows = []
    for name, run in runs.items():
        s = run.summary
        row = {"optimizer": name, "seeds": run.num_seeds, "diverged": s["diverged"], "steps": s["steps"],
               "steps_per_s": s.get("seed_steps_per_s"),  # the seeds train one after another: one model's steps/s
               "shared_machine": bool(s.get("cpu_sharing", {}).get("shared", False))}
        for kind in ("steps", "time"):
            for key in ("train_loss", "test_loss", "test_accuracy"):
                row[f"{key}_{kind}_mean"], row[f"{key}_{kind}_std"] = _milestone_value(s, kind, key)
        row["train_loss_last_10pct"] = None if s["diverged"] else late_training_loss(run)
        row["paper_test_loss_steps"] = report.paper_value(paper, name, "test_loss_steps")
        row["paper_test_loss_time"] = report.paper_value(paper, name, "test_loss_time")
        rows.append(row)
    return pd.DataFrame(rows)


def loss_entries(table: pd.DataFrame, with_time: bool) -> tuple[list[str], list[list[str]]]:
    header = ["Optimizer", "Training loss", "Test loss", "Paper test loss (300k steps)"]
    if with_time:
        header += ["Training loss (time budget)", "Test loss (time budget)", "Paper test loss (50k s)"]
    header.append("Steps/s")
    rows = []
    for r in table.to_dict("records"):
        row = [report.label(r["optimizer"]),
               report.cell(r["train_loss_steps_mean"], r["train_loss_steps_std"], r["diverged"], r["seeds"]),
               report.cell(r["test_loss_steps_mean"], r["test_loss_steps_std"], r["diverged"], r["seeds"]),
               report.paper_cell(r["paper_test_loss_steps"])]
        if with_time:
            row += [report.cell(r["train_loss_time_mean"], r["train_loss_time_std"], r["diverged"], r["seeds"]),
                    report.cell(r["test_loss_time_mean"], r["test_loss_time_std"], r["diverged"], r["seeds"]),
                    report.paper_cell(r["paper_test_loss_time"])]
        row.append("–" if report.missing(r["steps_per_s"]) else
                   f"{r['steps_per_s']:.2f}" + ("*" if r["shared_machine"] else ""))
        rows.append(row)
    return header, rows


def _title(fig, text: str) -> None:
    """A two-panel figure's title, wrapped: the scale note makes it wider than the figure."""
    fig.suptitle(textwrap.fill(text, 150), fontsize=9)


def curves(runs: dict, out_dir: Path, stem: str, title: str, smooth: int = 25) -> None:
    """Training loss by step and by training time, mean over seeds, smoothed over ``smooth`` curve points."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = report.line_styles(runs)
    late_losses = []
    for name, run in runs.items():
        curve = run.curve
        if curve.empty:
            continue
        mean = curve.groupby("step", as_index=False).agg(loss=("loss", "mean"), train_time_s=("train_time_s", "mean"))
        loss = mean["loss"].rolling(smooth, min_periods=1).mean()
        axes[0].plot(mean["step"], loss, label=report.label(name), **styles[name])
        axes[1].plot(mean["train_time_s"], loss, label=report.label(name), **styles[name])
        if not run.summary.get("diverged"):
            late_losses.append(loss[mean["step"] > 0.1 * mean["step"].max()])
    late = pd.concat(late_losses) if late_losses else pd.Series(dtype=float)
    late = late[late.map(math.isfinite) & (late > 0)]
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, xlabel in zip(axes, ("step", "training time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (smoothed)")
        ax.set_yscale("log")
        if not late.empty:  # the first tenth's descent would squash the late differences between optimizers
            ax.set_ylim(0.98 * late.min(), 1.05 * late.max())
            if late.max() < 10 * late.min():  # within a decade, "3.2" reads better than "3.2 x 10^0"
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
        ax.grid(alpha=0.3, which="both")
    legend_space = report.place_legend(fig, axes[0], columns=8)
    _title(fig, title)
    fig.tight_layout(rect=(0, legend_space, 1, 1))
    report.save_figure(fig, out_dir, stem)


def loss_table_report(runs_list, paper, out_dir: Path, stem: str, figure: str, what: str,
                      compare_lodo: bool = False) -> str:
    runs = report.by_optimizer(runs_list)
    note = scale_note(list(runs.values()))
    table = build_loss_table(runs, paper)
    with_time = "time_budget" in next(iter(runs.values())).summary
    header, rows = loss_entries(table, with_time)
    caption = (f"\n{what}. Mean ± std over seeds (one seed: its value); training loss = mean over the last 1% of steps; test loss = mean "
               f"cross-entropy over all 784 query positions of each test image. Measured on: {note}. The paper's "
               f"numbers are MNIST at 300k steps / 50k s on its hardware (one randomly chosen run).")
    if table["shared_machine"].any():
        caption += (" *: other processes used more than "
                    f"{SHARED_CPU_FRACTION:.0%} of the machine's CPUs while this run trained, so its steps/s and "
                    f"time axis understate the optimizer's speed.")
    if compare_lodo:
        caption += competitiveness(table) + lodo_rank(table)
    md = report.markdown_table(header, rows) + caption + "\n"
    report.write_table(out_dir, stem, table, md, report.latex_table(header, rows))
    curves(runs, out_dir, figure, f"{what} — {note}")
    return md


def copy_pictures(runs: dict, out_dir: Path) -> None:
    """Figures 9 and 10 from the LODO run (else the first run): its input channels and its samples.

    Every other optimizer's samples come along as ``figure10_<optimizer>.png``,
    because at a reduced scale how far the samples got differs by optimizer.
    """
    run = runs.get("lodo") or next(iter(runs.values()))
    copies = [(run.folder / f"{source}.{ext}", f"{figure}.{ext}")
              for source, figure in (("input_channels", "figure9"), ("samples", "figure10")) for ext in ("png", "pdf")]
    copies += [(other.folder / "samples.png", f"figure10_{name}.png") for name, other in runs.items() if other is not run]
    for source, name in copies:
        if source.is_file():
            atomic_copy(source, out_dir / name)


# The paper's claim for the image task: LODO is competitive with these (SPEC §1.3).
STANDARD_OPTIMIZERS = ("adam", "momentum", "yogi")


def late_training_loss(run: report.Run, fraction: float = 0.1) -> float:
    """Training loss averaged over the last ``fraction`` of steps, then over seeds.

    One step's loss is one random query pixel per image, so the last 1% of a
    short run is too noisy to rank optimizers by; a tenth of the run is not.
    """
    curve = run.curve
    late = curve[curve.step > curve.step.max() * (1 - fraction)]
    return float(late.groupby("seed")["loss"].mean().mean())


def competitiveness(table: pd.DataFrame) -> str:
    """One sentence: LODO's late training loss against the best of Adam, Momentum and Yogi ('' if absent).

    Reads ``build_loss_table``'s train_loss_last_10pct column (empty for a diverged run).
    """
    late = table.set_index("optimizer")["train_loss_last_10pct"].dropna()
    rivals = {name: late[name] for name in STANDARD_OPTIMIZERS if name in late}
    if "lodo" not in late or not rivals:
        return ""
    best = min(rivals, key=rivals.get)
    lodo = late["lodo"]
    among = f"best of {', '.join(report.label(n) for n in rivals)}: " if len(rivals) > 1 else ""
    return (f" Smoothed training loss (mean over the last 10% of steps and over seeds): LODO {lodo:.3f}; "
            f"{among}{report.label(best)} {rivals[best]:.3f}; "
            f"LODO is {100 * (lodo / rivals[best] - 1):+.1f}% from it.")


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def lodo_rank(table: pd.DataFrame) -> str:
    """One sentence: LODO's place among the runs that did not diverge, by smoothed training loss and by test loss.

    A tie shares the better place; '' when LODO is absent, diverged, or alone.
    """
    ok = table[table.diverged == 0].set_index("optimizer")
    if "lodo" not in ok.index or len(ok) < 2:
        return ""
    parts = []
    for column, what in (("train_loss_last_10pct", "smoothed training loss"), ("test_loss_steps_mean", "test loss")):
        values = ok[column].dropna()
        if "lodo" not in values:
            continue
        best = values.idxmin()
        place = 1 + int((values < values["lodo"]).sum())
        parts.append(f"by {what} {ordinal(place)} of {len(values)} (best: {report.label(best)} {values[best]:.3f})")
    return f" LODO ranks {'; '.join(parts)}." if parts else ""


def build_table2(runs_list, paper, out_dir: Path) -> str:
    runs = report.by_optimizer(runs_list)
    copy_pictures(runs, out_dir)
    papers = report.experiment_optimizers("table2") or []
    what = ("Table 2, extended: autoregressive image generation, the paper's optimizers, LODO and newer ones"
            if any(name not in papers for name in runs) else
            "Table 2: autoregressive image generation, standard optimizers and LODO")
    return loss_table_report(runs_list, paper, out_dir, "table2", "figure4", what, compare_lodo=True)


def build_table3(runs_list, paper, out_dir: Path) -> str:
    return loss_table_report(runs_list, paper, out_dir, "table3", "table3_curves",
                             "Table 3: LODO's ablations on autoregressive image generation")


def build_table4(runs_list, paper, out_dir: Path) -> str:
    runs = report.by_optimizer(runs_list)
    note = scale_note(list(runs.values()))
    table = build_loss_table(runs, paper)
    header = ["Optimizer", "Training loss", "Test accuracy", "Steps/s"]
    rows = [[report.label(r["optimizer"]),
             report.cell(r["train_loss_steps_mean"], r["train_loss_steps_std"], r["diverged"], r["seeds"]),
             report.cell(r["test_accuracy_steps_mean"], r["test_accuracy_steps_std"], r["diverged"], r["seeds"]),
             "–" if report.missing(r["steps_per_s"]) else f"{r['steps_per_s']:.3f}"] for r in table.to_dict("records")]
    caption = (f"\nTable 4: ResNet-18 on CIFAR-10. Mean ± std over seeds. Measured on: {note}. The paper's values "
               f"are lost in our copy.")
    md = report.markdown_table(header, rows) + caption + "\n"
    report.write_table(out_dir, "table4", table, md, report.latex_table(header, rows))
    curves(runs, out_dir, "figure6", f"Figure 6: ResNet-18 on CIFAR-10 — {note}", smooth=5)
    return md


def build_figure5(runs_list, paper, out_dir: Path) -> str:
    """LODO's final training (and test) loss against β, and each β's learning curve.

    Beside the paper's last-1% training loss it gives the mean over the last 10% of steps:
    in a short run the last 1% and the one end-of-run test loss move by more than β does.
    """
    runs = sorted(runs_list, key=lambda r: r.summary["hyperparameters"]["beta"])
    note = scale_note(runs)
    rows, frame = [], []
    for run in runs:
        s = run.summary
        beta = s["hyperparameters"]["beta"]
        train, test = s.get("loss_final_mean"), s.get("test_loss_mean")
        late = None if s["diverged"] else late_training_loss(run)
        frame.append({"beta": beta, "one_minus_beta": 1 - beta, "train_loss": train, "train_loss_last_10pct": late,
                      "test_loss": test, "diverged": s["diverged"], "seeds": run.num_seeds})
        rows.append([f"{beta:.4f}", report.cell(train, s.get("loss_final_std") or 0.0, s["diverged"], run.num_seeds),
                     "—" if late is None else f"{late:.3f}",
                     report.cell(test, s.get("test_loss_std") or 0.0, s["diverged"], run.num_seeds)])
    frame = pd.DataFrame(frame)
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ok = frame[frame.diverged == 0]
    axes[0].plot(ok.one_minus_beta, ok.train_loss, "o-", label="training loss (last 1%)")
    axes[0].plot(ok.one_minus_beta, ok.train_loss_last_10pct, "^-", label="training loss (last 10%)")
    if ok.test_loss.notna().any():
        axes[0].plot(ok.one_minus_beta, ok.test_loss, "s--", label="test loss")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("1 − β")
    axes[0].set_ylabel("loss at the end of training")
    axes[0].legend()
    cmap = plt.get_cmap("viridis")
    for i, run in enumerate(runs):
        curve = run.curve.groupby("step", as_index=False)["loss"].mean()
        axes[1].plot(curve.step, curve.loss.rolling(25, min_periods=1).mean(), color=cmap(i / max(1, len(runs) - 1)),
                     label=f"β = {run.summary['hyperparameters']['beta']:.3f}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (smoothed)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    _title(fig, f"Figure 5: LODO's momentum sweep — {note}")
    fig.tight_layout()
    report.save_figure(fig, out_dir, "figure5")
    header = ["β", "Training loss", "Training loss, last 10%", "Test loss"]
    md = report.markdown_table(header, rows) + (
        f"\nFigure 5's data: LODO with {len(runs)} momenta β. Training loss = mean over the last 1% of steps "
        f"(the paper's measure) and over the last 10%; test loss = mean cross-entropy over all 784 query positions "
        f"of each test image, at the end of training. Measured on: {note}.\n")
    report.write_table(out_dir, "figure5", frame, md)
    return md


BUILDERS = {  # kind -> (build, make target, the summary fields read beyond every row's)
    "table2": (build_table2, "reproduce-table2", {}),
    "table3": (build_table3, "reproduce-table3", {}),
    "table4": (build_table4, "reproduce-table4", {}),
    "figure5": (build_figure5, "reproduce-figure5", {"hyperparameters.beta": "number"}),
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BUILDERS:
        print(f"usage: report_images.py {{{','.join(BUILDERS)}}} RUNS_DIR OUT_DIR [--readme README.md]", file=sys.stderr)
        sys.exit(2)
    kind = sys.argv[1]
    build, target, needs = BUILDERS[kind]
    sys.exit(report.main(sys.argv[2:], doc=__doc__, stem=kind, make_target=target, build=build, needs=needs))

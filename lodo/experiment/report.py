"""What every table and figure script shares (SPEC §5); reports read run folders and never train.

- ``load_runs``: the finished run folders (with ``summary.json``) under a
  directory; unfinished, crashed or damaged ones are skipped and named, never fatal.
- ``cell``: "mean ± std", "diverged (k/8)" when every seed diverged (": 6.49e+11" after it when
  they stayed finite but ended worse than never moving: ``metrics``' rule), and
  "(k/8 diverged)" after the mean of the others otherwise.
- ``markdown_table``/``latex_table``, ``write_table`` (CSV + Markdown +
  LaTeX) and ``save_figure`` (PNG + PDF), all written atomically so a report
  killed midway leaves the previous complete files.
- ``main``: the command line every ``scripts/report_*.py`` has
  (``RUNS_DIR OUT_DIR [--paper CSV] [--readme README.md]``).
- ``output_problem`` and ``staged``: an output folder is checked before any
  work, and the outputs are built in a hidden folder inside it and moved in
  only once all of them are complete, so a report that fails writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from lodo.experiment import registry
from lodo.experiment.outputs import atomic_write_text, write_csv
from lodo.experiment.summary import problems as summary_problems
from lodo.experiment.summary import upgrade as upgrade_summary  # old image summaries in today's keys
from lodo.experiment.tuned_here import TunedHere, TunedHereError

ROOT = Path(__file__).resolve().parents[2]
PAPER_DIR = ROOT / "results" / "paper"

# Row order and labels are declared by each optimizer's YAML (``lodo.experiment.registry``).
label = registry.label
order_key = registry.order_key


class ReportError(ValueError):
    """A damaged file that a report reads, or an output it cannot write: one line naming it and the fix."""


# Columns a report reads from a run's CSV files, and whether they must be numbers.
CSV_COLUMNS = {"curve.csv": {"seed": True, "step": True, "train_time_s": True, "loss": True},
               "frozen_curve.csv": {"problem": False, "seed": True, "step": True, "loss": True},
               "trajectory.csv": {"seed": True, "step": True, "theta_0": True, "theta_1": True}}


@dataclass
class Run:
    """One finished run folder."""

    folder: Path
    summary: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def optimizer(self) -> str:
        return self.summary["optimizer"]

    @property
    def num_seeds(self) -> int:
        return len(self.summary["seeds"])

    def task_option(self, key: str, default=None):
        return self.summary.get("task_options", {}).get(key, default)

    @cached_property
    def curve(self) -> pd.DataFrame:
        return self.read_csv("curve.csv")

    def read_csv(self, filename: str) -> pd.DataFrame:
        """The run's CSV file with the columns the reports read (``CSV_COLUMNS``), else a ``ReportError``."""
        return read_csv(self.folder / filename, CSV_COLUMNS.get(filename, {}),
                        f"move {self.folder} out of the runs folder, or run it again")


def read_csv(path: Path, columns: dict, fix: str) -> pd.DataFrame:
    """``path`` parsed, with ``columns`` (name -> must be numeric) present, else a one-line ``ReportError``."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise ReportError(f"{path} is missing: {fix}") from None
    except (OSError, ValueError) as err:  # a folder, no permission, empty, not CSV, not UTF-8
        reason = _reason(err)
        raise ReportError(f"{path} is unreadable ({reason}): {fix}") from None
    lacking = [c for c in columns if c not in frame.columns]
    if lacking:
        raise ReportError(f"{path} has no {', '.join(lacking)} column{'s' if len(lacking) > 1 else ''}: {fix}")
    garbled = [c for c, numeric in columns.items() if numeric and not pd.api.types.is_numeric_dtype(frame[c])]
    if garbled:
        raise ReportError(f"{path} has values that are not numbers in {', '.join(garbled)}: {fix}")
    return frame


def _reason(err: Exception) -> str:
    """An error's cause in a few words, on one line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return " ".join(str(err).split())[:120] or type(err).__name__


def read_summary(folder: Path, needs: dict | None = None) -> tuple[dict | None, str | None]:
    """The run's summary (in today's keys), or None and why the run is skipped.

    ``needs``: fields the calling table reads beyond every row's (``lodo.experiment.summary.problems``).
    """
    path = folder / "summary.json"
    if not os.path.lexists(path):
        return None, "no summary.json (unfinished or crashed)"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # a folder, no permission, not UTF-8, not JSON
        reason = _reason(err)
        return None, f"unreadable summary.json ({reason})"
    if not isinstance(summary, dict):
        return None, "unreadable summary.json (not a JSON object)"
    if summary.get("completed") is False:
        return None, "not completed (summary.json says completed: false)"
    summary = upgrade_summary(summary)
    found = summary_problems(summary, needs)
    if found:
        return None, f"summary.json lacks what a table row needs ({'; '.join(found)})"
    return summary, None


def load_runs(runs_dir: Path, needs: dict | None = None) -> tuple[list[Run], list[str]]:
    """Finished runs under ``runs_dir`` (one folder each) and, for each folder skipped, ``name (why)``."""
    runs, skipped = [], []
    try:
        folders = sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise ReportError(f"cannot read the runs folder {runs_dir}: {err.strerror}") from None
    for folder in folders:
        summary, reason = read_summary(folder, needs)
        if summary is None:
            skipped.append(f"{folder.name} ({reason.removesuffix(' (unfinished or crashed)')})")
        else:
            runs.append(Run(folder, summary))
    return runs, skipped


def by_optimizer(runs: list[Run]) -> dict[str, Run]:
    """One run per optimizer, in table order."""
    table = {}
    for run in runs:
        table[run.optimizer] = run
    return {name: table[name] for name in sorted(table, key=order_key)}


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


DIVERGENCE_NOTE = ("A seed has diverged when its loss became non-finite or its reported loss is worse than never "
                   "moving from θ0 (on the bowl ½·tr(H)·σ²·(t + 1) at step t, in expectation; elsewhere the loss at θ0); "
                   "\"diverged (k/n): x\" gives the mean x of such seeds where they stayed finite.")


def cell(mean, std, diverged: int, seeds: int, fmt: str = "{:.3f}", diverged_mean=None) -> str:
    """A table entry: mean ± std of the seeds that did not diverge, with the divergence count.

    ``diverged_mean``: the mean of the diverged seeds that stayed finite (worse than never moving),
    printed beside "diverged" when every seed diverged.
    """
    if diverged and diverged == seeds:
        beside = "" if missing(diverged_mean) else f": {diverged_mean:.3g}"
        return f"diverged ({diverged}/{seeds}){beside}"
    if missing(mean):
        return "–"
    if abs(mean) >= 1e5:  # a loss that ran away: fixed-point digits would only be noise
        fmt = "{:.3g}"
    # one surviving seed has no spread to show: "± 0.000" would claim a precision it does not have
    text = fmt.format(mean) if seeds - diverged == 1 else f"{fmt.format(mean)} ± {fmt.format(std)}"
    return text + (f" ({diverged}/{seeds} diverged)" if diverged else "")


def tuned_here_columns(tuned_here: TunedHere | None, run: Run) -> dict:
    """The "tuned here" columns of a table row (none without ``--tuned-here``): the loss at the GA's values."""
    if tuned_here is None:
        return {}
    found = tuned_here.loss(run) or {}
    return {"tuned_here_mean": found.get("mean"), "tuned_here_std": found.get("std"),
            "tuned_here_diverged": found.get("diverged", 0), "tuned_here_seeds": found.get("seeds", run.num_seeds),
            "tuned_here_source": found.get("source")}


def tuned_here_cell(row: dict, fmt: str = "{:.3f}") -> str:
    return cell(row["tuned_here_mean"], row["tuned_here_std"], row["tuned_here_diverged"], row["tuned_here_seeds"],
                fmt=fmt)


def _lodo_rank(table: pd.DataFrame, mean: str, diverged: str, seeds: str) -> str | None:
    losses = {r["optimizer"]: (None if missing(r[mean]) or r[diverged] == r[seeds] else float(r[mean]))
              for r in table.to_dict("records")}
    place = TunedHere.rank(losses, "lodo")
    return None if place is None else f"{place[0]} of {place[1]}"


def tuned_here_note(table: pd.DataFrame, mean: str, diverged: str = "diverged", seeds: str = "seeds") -> str:
    """The sentence under a table with a "tuned here" column: what it holds, and where LODO ranks in each."""
    if "tuned_here_mean" not in table:
        return ""
    note = (" Tuned here (GA): each optimizer's loss at the values this project's genetic tuner found, on the same "
            "seeds, steps and window (the newer optimizers' runs above; the paper's optimizers' evaluation in "
            "results/tuning/summary.md); '–': not tuned here.")
    as_run = _lodo_rank(table, mean, diverged, seeds)
    alike = _lodo_rank(table, "tuned_here_mean", "tuned_here_diverged", "tuned_here_seeds")
    if as_run:
        note += f" LODO ranks {as_run} as run"
        note += f" and {alike} tuned here." if alike else "."
    return note


def read_paper(path: Path) -> pd.DataFrame:
    """The paper's numbers, indexed by optimizer; empty entries (lost in our copy) are None."""
    fix = "restore it (git checkout results/paper) or pass another with --paper"
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False).replace("", None)
    except (OSError, ValueError) as err:
        reason = _reason(err)
        raise ReportError(f"{path} is unreadable ({reason}): {fix}") from None
    if "optimizer" not in frame.columns:
        raise ReportError(f"{path} has no optimizer column: {fix}")
    return frame.set_index("optimizer")


NOT_IN_PAPER = "–"  # an optimizer the paper did not run (the extended tables' newer ones)


def paper_value(paper: pd.DataFrame, name: str, column: str):
    """The paper's entry; None where it is lost from our copy, ``NOT_IN_PAPER`` for an optimizer it did not run."""
    if paper is None:
        return None
    return paper.loc[name, column] if name in paper.index else NOT_IN_PAPER


def paper_cell(value) -> str:
    """'?' where the paper's value is lost, '–' where the paper did not run it, the value as printed otherwise."""
    return "?" if missing(value) else str(value)


def as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


LATEX_REPLACEMENTS = [("±", r"$\pm$"), ("–", "--"), ("σ²", r"$\sigma^2$"), ("%", r"\%"), ("_", r"\_"),
                      ("≤", r"$\le$"), ("×", r"$\times$")]


def latex_escape(text) -> str:
    text = str(text)
    for old, new in LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def latex_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" * len(header)
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\",
             r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, stem: str, frame: pd.DataFrame, md: str, tex: str | None = None) -> None:
    """``stem.csv`` (one row per optimizer, numbers), ``stem.md`` and, if given, ``stem.tex``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"{stem}.csv", frame)
    atomic_write_text(out_dir / f"{stem}.md", md)
    if tex is not None:
        atomic_write_text(out_dir / f"{stem}.tex", tex)


CROWDED_LINES = 8  # more curves than this and an in-axes legend hides them


def place_legend(fig, ax, columns: int = 7) -> float:
    """Legend for ``ax``'s lines: inside it, or under the panels when crowded (the extended tables).

    Returns the bottom fraction of the figure to leave for it in ``fig.tight_layout(rect=...)``.
    """
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) <= CROWDED_LINES:
        ax.legend(fontsize=8)
        return 0.0
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    rows = -(-len(handles) // columns)
    return 0.035 * (rows + 1)


def save_figure(fig, out_dir: Path, stem: str, dpi: int = 130) -> None:
    """``stem.pdf`` and ``stem.png``, each written to a temporary name first."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        for ext in ("pdf", "png"):
            tmp = out_dir / f".{stem}.tmp.{ext}"
            try:
                fig.savefig(tmp, dpi=dpi)
                tmp.replace(out_dir / f"{stem}.{ext}")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    finally:
        plt.close(fig)


def output_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be (made and) written as an output folder, in one line; None if it can.

    ``what`` names the setting in the message (``--out``, ``OUT_DIR``). Checked before any work:
    a file in the way, a read-only filesystem, no permission.
    """
    path = Path(path)
    fix = "pass another folder (a missing one is made)"
    try:
        if os.path.lexists(path) and not path.is_dir():
            return f"{what} {path} is a file, not a folder: {fix}"
        existing = path
        while not os.path.lexists(existing):
            existing = existing.parent
        if not existing.is_dir():
            return f"{what} {path} cannot be made: {existing} is a file, not a folder: {fix}"
    except OSError as err:
        return f"{what} {path} cannot be reached ({err.strerror}): {fix}"
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only filesystem" if _read_only(existing) else "no write permission"
        return f"{what} {path} cannot be written ({existing}: {why}): {fix}"
    return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def staged(out_dir: Path):
    """A hidden folder inside ``out_dir`` to build the outputs in; they move into ``out_dir`` (each by an
    atomic rename) only when the block succeeds, so a failure midway writes nothing, not even ``out_dir``."""
    out_dir = Path(out_dir)
    made = []
    for folder in [out_dir, *out_dir.parents]:
        if os.path.lexists(folder):
            break
        made.append(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".staging."))
    done = False
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, out_dir / item.name)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the staging folder is this function's own
        if not done:
            for folder in made:  # deepest first; only folders this call made, and only if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def write_error(err: OSError, stage: Path | None, out_dir: Path, what: str) -> str:
    """One line for a failed write, naming the output path (not the staging folder) and the setting ``what``."""
    name = str(err.filename or out_dir)
    if stage is not None:
        name = name.replace(str(stage), str(out_dir))
    return (f"cannot write {what} {out_dir} ({name}: {err.strerror or err}): make room or permission there, or "
            f"pass another folder")


def line_styles(names) -> dict:
    """One look per optimizer in a figure: up to 20 distinct colours, the paper's optimizers solid and the
    newer ones (ordered after the paper's) dashed, so an extended figure's twenty lines stay apart."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    colors = colors[::2] + colors[1::2]
    return {name: {"color": colors[i % len(colors)], "ls": "--" if registry.beyond_the_paper(name) else "-"}
            for i, name in enumerate(names)}


def pyplot():
    """matplotlib.pyplot on the non-interactive backend (reports run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def paste_into_readme(readme: Path, marker: str, table_md: str) -> None:
    """Replace what lies between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``readme``."""
    text = readme.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        print(f"note: {readme} has no {start} … {end} markers; not updated", file=sys.stderr)
        return
    head, rest = text.split(start, 1)
    atomic_write_text(readme, head + start + "\n" + table_md + rest[rest.index(end):])


def experiment_scale(stem: str) -> tuple[int | None, int | None]:
    """The steps and seeds of the runs a table is made of: ``configs/experiment/<stem>.yaml``'s."""
    try:
        data = yaml.safe_load((registry.CONFIG_DIR / "experiment" / f"{stem}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None, None
    steps, seeds = data.get("steps"), data.get("num_seeds")
    return (steps if isinstance(steps, int) else None), (seeds if isinstance(seeds, int) else None)


def experiment_optimizers(stem: str) -> list[str] | None:
    """The optimizers that ``configs/experiment/<stem>.yaml`` sweeps (None: it names none)."""
    try:
        data = yaml.safe_load((registry.CONFIG_DIR / "experiment" / f"{stem}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    names = ((data.get("hydra") or {}).get("sweeper") or {}).get("params", {}).get("optimizer")
    return [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else None


def check_scale(runs: list[Run], stem: str, steps: int | None, seeds: int | None, other_steps: dict) -> None:
    """Refuse runs made at another scale than the table's: a smoke run must never become the paper's table."""
    wrong = []
    for run in runs:
        want = other_steps.get(run.optimizer, steps)
        if (want is not None and run.summary.get("steps") != want) or (seeds is not None and run.num_seeds != seeds):
            wrong.append(f"{run.folder} ran {run.summary.get('steps')} steps x {run.num_seeds} seed(s)")
    if wrong:
        shown = "; ".join(wrong[:2]) + (f" and {len(wrong) - 2} more" if len(wrong) > 2 else "")
        raise ReportError(f"{shown}, but {stem} is made of runs of {steps} steps x {seeds} seeds; report runs of "
                          f"another scale with --steps N --seeds M into an OUT_DIR of their own, or rerun them at "
                          f"this scale")


def main(argv, *, doc: str, stem: str, make_target: str,
         build: Callable[[list[Run], pd.DataFrame | None, Path], str], needs: dict | None = None,
         other_steps: dict | None = None, tuned_here: bool = False) -> int:
    """The shared command line: load the runs, call ``build(runs, paper, out_dir)``, print its Markdown.

    ``build`` writes the outputs and returns the Markdown table, which
    ``--readme`` also pastes between ``<!-- stem -->`` markers (``--marker`` names others).
    ``tuned_here``: ``build`` also takes ``tuned_here=`` (a ``TunedHere`` or None), and ``--tuned-here DIR`` sets it.
    ``needs``: the summary fields ``build`` reads beyond every row's (``lodo.experiment.summary.problems``);
    a run without them is skipped. Every bad input is one ``error:`` line and exit status 2, with nothing written.
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--paper", type=Path, help=f"the paper's numbers (default: {PAPER_DIR / (stem + '.csv')})")
    parser.add_argument("--readme", type=Path, help=f"also paste the table between <!-- {stem} --> markers here")
    parser.add_argument("--marker", default=stem,
                        help="the README markers' name, when one README shows the same table at two scales")
    default_steps, default_seeds = experiment_scale(stem)
    parser.add_argument("--steps", type=int, default=default_steps,
                        help=f"the steps every run must have made (default: experiment={stem}'s, {default_steps})")
    parser.add_argument("--seeds", type=int, default=default_seeds,
                        help=f"the seeds every run must have trained (default: experiment={stem}'s, {default_seeds})")
    parser.add_argument("--optimizers", help=f"comma-separated optimizers to report, or 'all' (default: those that "
                                             f"experiment={stem} sweeps; the extended tables pass all)")
    parser.add_argument("--note", help="a sentence to add under the table, for what the run folders cannot say "
                                       "(e.g. that some runs shared the machine)")
    if tuned_here:
        parser.add_argument("--tuned-here", type=Path, metavar="DIR",
                            help="the tuning results (results/tuning): add each optimizer's loss at this "
                                 "project's GA values, so that all are compared tuned alike")
    args = parser.parse_args(argv)
    try:
        return _main(args, stem, make_target, build, needs, other_steps or {})
    except ReportError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _main(args, stem: str, make_target: str, build, needs, other_steps: dict) -> int:
    if not args.runs_dir.is_dir():
        raise ReportError(f"no run folder {args.runs_dir}; run `make {make_target}` first")
    problem = output_problem(args.out_dir, "OUT_DIR")
    if problem:
        raise ReportError(problem)
    if args.readme is not None:
        if not args.readme.is_file():
            raise ReportError(f"--readme {args.readme} is not a file: pass the README to paste the table into")
        problem = output_problem(args.readme.resolve().parent, "the folder of --readme")
        if problem:
            raise ReportError(problem)
        try:
            args.readme.read_text()
        except (OSError, ValueError) as err:  # no permission, not UTF-8
            raise ReportError(f"--readme {args.readme} is unreadable ({_reason(err)}): pass a readable "
                              f"README") from None
    if args.paper is not None and not args.paper.is_file():
        raise ReportError(f"--paper {args.paper} is not a file: pass the CSV of the paper's numbers, or leave "
                          f"--paper out")
    paper_path = args.paper or PAPER_DIR / f"{stem}.csv"
    paper = read_paper(paper_path) if paper_path.exists() else None
    compare_tuned = getattr(args, "tuned_here", None) is not None  # only tables that take it have the flag
    try:
        tuned = TunedHere(args.tuned_here) if compare_tuned else None
    except TunedHereError as err:
        raise ReportError(str(err)) from None
    runs, skipped = load_runs(args.runs_dir, needs)
    wanted = (experiment_optimizers(stem) if args.optimizers is None else None if args.optimizers.strip() == "all"
              else [n.strip() for n in args.optimizers.split(",") if n.strip()])
    if wanted is not None:
        wanted = [*wanted, *other_steps]  # a declared exception (Table 7's Newton) is the table's, too
        left_out = sorted({run.optimizer for run in runs} - set(wanted))
        runs = [run for run in runs if run.optimizer in wanted]
        if left_out:
            print(f"left out (not among {stem}'s optimizers; --optimizers all reports them): {', '.join(left_out)}",
                  file=sys.stderr)
    if skipped:
        print(f"skipped unfinished or crashed runs: {'; '.join(skipped)}", file=sys.stderr)
    if not runs:
        raise ReportError(f"no finished run (summary.json) under {args.runs_dir}")
    check_scale(runs, stem, args.steps, args.seeds, other_steps)
    stage = None
    try:
        with staged(args.out_dir) as stage:
            table_md = build(runs, paper, stage, tuned_here=tuned) if compare_tuned else build(runs, paper, stage)
            if args.note:
                table_md = table_md.rstrip("\n") + f"\n\nNote: {args.note.strip()}\n"
                atomic_write_text(stage / f"{stem}.md", table_md)
        if args.readme:
            paste_into_readme(args.readme, args.marker, table_md)
    except OSError as err:
        raise ReportError(write_error(err, stage, args.out_dir, "OUT_DIR")) from None
    print(table_md)
    return 0

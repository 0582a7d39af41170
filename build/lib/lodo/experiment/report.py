"""What every table and figure script shares (SPEC §5); reports read run folders and never train.

- ``load_runs``: the finished run folders (with ``summary.json``) under a
  directory; unfinished or crashed ones are skipped and named, never fatal.
- ``cell``: "mean ± std", "diverged (k/8)" when every seed diverged, and
  "(k/8 diverged)" after the mean of the others otherwise.
- ``markdown_table``/``latex_table``, ``write_table`` (CSV + Markdown +
  LaTeX) and ``save_figure`` (PNG + PDF), all written atomically so a report
  killed midway leaves the previous complete files.
- ``main``: the command line every ``scripts/report_*.py`` has
  (``RUNS_DIR OUT_DIR [--paper CSV] [--readme README.md]``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import pandas as pd

from lodo.experiment import registry
from lodo.experiment.outputs import atomic_write_text, write_csv
from lodo.experiment.summary import upgrade as upgrade_summary  # old image summaries in today's keys

ROOT = Path(__file__).resolve().parents[2]
PAPER_DIR = ROOT / "results" / "paper"

# Row order and labels are declared by each optimizer's YAML (``lodo.experiment.registry``).
label = registry.label
order_key = registry.order_key


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
        return pd.read_csv(self.folder / filename)


def load_runs(runs_dir: Path) -> tuple[list[Run], list[str]]:
    """Finished runs under ``runs_dir`` (one folder each) and the names of the folders skipped."""
    runs, skipped = [], []
    for folder in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = folder / "summary.json"
        if not path.exists():
            skipped.append(folder.name)
            continue
        runs.append(Run(folder, upgrade_summary(json.loads(path.read_text()))))
    return runs, skipped


def by_optimizer(runs: list[Run]) -> dict[str, Run]:
    """One run per optimizer, in table order."""
    table = {}
    for run in runs:
        table[run.optimizer] = run
    return {name: table[name] for name in sorted(table, key=order_key)}


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell(mean, std, diverged: int, seeds: int, fmt: str = "{:.3f}") -> str:
    """A table entry: mean ± std of the seeds that did not diverge, with the divergence count."""
    if diverged and diverged == seeds:
        return f"diverged ({diverged}/{seeds})"
    if missing(mean):
        return "–"
    if abs(mean) >= 1e5:  # a loss that ran away: fixed-point digits would only be noise
        fmt = "{:.3g}"
    text = f"{fmt.format(mean)} ± {fmt.format(std)}"
    return text + (f" ({diverged}/{seeds} diverged)" if diverged else "")


def read_paper(path: Path) -> pd.DataFrame:
    """The paper's numbers, indexed by optimizer; empty entries (lost in our copy) are None."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False).replace("", None)
    return frame.set_index("optimizer")


def paper_value(paper: pd.DataFrame, name: str, column: str):
    return paper.loc[name, column] if paper is not None and name in paper.index else None


def paper_cell(value) -> str:
    """'?' where the paper's value is lost, the value as the paper printed it otherwise."""
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


def save_figure(fig, out_dir: Path, stem: str, dpi: int = 130) -> None:
    """``stem.pdf`` and ``stem.png``, each written to a temporary name first."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("pdf", "png"):
        tmp = out_dir / f".{stem}.tmp.{ext}"
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(out_dir / f"{stem}.{ext}")
    plt.close(fig)


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


def main(argv, *, doc: str, stem: str, make_target: str,
         build: Callable[[list[Run], pd.DataFrame | None, Path], str]) -> int:
    """The shared command line: load the runs, call ``build(runs, paper, out_dir)``, print its Markdown.

    ``build`` writes the outputs and returns the Markdown table, which
    ``--readme`` also pastes between ``<!-- stem -->`` markers (``--marker`` names others).
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--paper", type=Path, default=PAPER_DIR / f"{stem}.csv",
                        help="the paper's numbers (default: %(default)s)")
    parser.add_argument("--readme", type=Path, help=f"also paste the table between <!-- {stem} --> markers here")
    parser.add_argument("--marker", default=stem,
                        help="the README markers' name, when one README shows the same table at two scales")
    parser.add_argument("--note", help="a sentence to add under the table, for what the run folders cannot say "
                                       "(e.g. that some runs shared the machine)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"error: no run folder {args.runs_dir}; run `make {make_target}` first", file=sys.stderr)
        return 2
    runs, skipped = load_runs(args.runs_dir)
    if skipped:
        print(f"skipped unfinished or crashed runs: {', '.join(skipped)}", file=sys.stderr)
    if not runs:
        print(f"error: no finished run (summary.json) under {args.runs_dir}", file=sys.stderr)
        return 2
    paper = read_paper(args.paper) if args.paper and args.paper.exists() else None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table_md = build(runs, paper, args.out_dir)
    if args.note:
        table_md = table_md.rstrip("\n") + f"\n\nNote: {args.note.strip()}\n"
        atomic_write_text(args.out_dir / f"{stem}.md", table_md)
    if args.readme:
        paste_into_readme(args.readme, args.marker, table_md)
    print(table_md)
    return 0

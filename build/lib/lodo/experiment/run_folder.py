"""A run folder's life: skip it when finished, clear it on request, remove it when a run was refused.

A run folder holds ``config.yaml`` (resolved), ``provenance.json``,
``summary.json`` (written last: its ``completed`` flag marks a finished run),
``curve.csv`` and the other tables, ``checkpoints/`` and ``tb/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from lodo.experiment import outputs
from lodo.experiment.config import check_same_run

# Files and folders the runner writes into a run folder (what checkpoint.resume=false clears).
RUN_FILES = ("config.yaml", "provenance.json", "curve.csv", "trajectory.csv", "frozen_curve.csv", "summary.json",
             "validation.csv")
RUN_FOLDERS = ("checkpoints", "tb")


def finished_summary(cfg, out_dir: Path) -> dict | None:
    """The stored summary if this folder holds this very run, finished; None if there is nothing to skip.

    A finished run with other settings is an error: its folder is not this run's to overwrite.
    """
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        stored = yaml.safe_load((out_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None  # nothing finished here (or a file a kill left unreadable): run it
    if not isinstance(summary, dict) or summary.get("completed") is not True or not isinstance(stored, dict):
        return None
    check_same_run(stored, cfg, out_dir, "a finished run")
    return summary


def start_fresh(out_dir: Path) -> None:
    """checkpoint.resume=false: remove what an earlier run left in the folder."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob("seed_*.json"):
        path.unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out_dir / name, ignore_errors=True)


def write_config(out_dir: Path, cfg) -> None:
    """config.yaml: the resolved settings, written once the run is known to be this folder's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _written_by_this_attempt(path: Path) -> bool:
    """A provenance.json this process wrote into a folder that held no earlier attempt."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("pid") == os.getpid() and "previous_attempts" not in record


def discard_if_empty(out_dir: Path) -> None:
    """After bad input, remove the folder Hydra made for this run if it holds nothing but Hydra's own
    files (and this attempt's provenance.json): a rejected run leaves no run folder behind."""
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return
    for e in entries:
        disposable = (e.name == ".hydra" or (e.is_file() and e.suffix == ".log")
                      or (e.name == "provenance.json" and _written_by_this_attempt(e)))
        if not disposable:
            return
    if out_dir.resolve() == Path.cwd().resolve():
        return
    shutil.rmtree(out_dir / ".hydra", ignore_errors=True)
    for e in entries:
        if e.is_file():
            e.unlink(missing_ok=True)
    try:
        out_dir.rmdir()
    except OSError:
        pass

"""A run folder's life: claim it (only if it is the runner's own), lock it, skip it when finished, clear it
on request, remove it when a run was refused.

A run folder holds ``config.yaml`` (resolved), ``provenance.json``,
``summary.json`` (written last: its ``completed`` flag marks a finished run),
``curve.csv`` and the other tables, ``checkpoints/`` and ``tb/``, and two
hidden files: ``.lodo_run`` (the marker, written when the runner first
claims the folder) and ``.lodo_run.lock`` (``flock``-ed for the whole run).

A folder is the runner's own when it holds the marker, or, for folders made
before the marker existed, a ``provenance.json`` the runner wrote or a
``checkpoints/ckpt-<N>`` folder. Any other folder that holds anything but
what Hydra writes before the run starts (``.hydra/``, the job's ``.log``) is
refused untouched: the runner writes files of common names (``config.yaml``,
``curve.csv``, ``tb/``) and would overwrite a user's, and
``checkpoint.resume=false`` would delete them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from lodo.experiment import outputs
from lodo.experiment.config import ConfigError, check_same_run

MARKER = ".lodo_run"
LOCK = ".lodo_run.lock"
# Files and folders the runner writes into a run folder (what checkpoint.resume=false clears).
RUN_FILES = ("config.yaml", "provenance.json", "curve.csv", "trajectory.csv", "frozen_curve.csv", "summary.json",
             "validation.csv")
RUN_FOLDERS = ("checkpoints", "tb")
# What is in a folder before the runner's code runs: Hydra's job config and log, a launcher's own files.
STARTUP_NAMES = (".hydra", "multirun.yaml", ".submitit", MARKER, LOCK)
WHERE_ELSE = "choose another folder with hydra.run.dir=… (hydra.sweep.dir=… with -m)"
_CHECKPOINT = re.compile(r"^ckpt-\d{8}$")

_CLAIMED_HERE: set[str] = set()  # folders this process made the runner's (their marker is this attempt's)


class FolderError(ConfigError):
    """A folder the runner may not use (not its own, or in use): one line; nothing in it was touched."""


# -- whose folder? ---------------------------------------------------------------------------------

def _runner_provenance(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("config"), dict) and {
        "start_time", "packages", "command_line"} <= set(record)


def _has_checkpoints(folder: Path) -> bool:
    for parent in [folder, *folder.glob("seed_*")]:
        if parent.is_dir() and any(_CHECKPOINT.match(p.name) and p.is_dir() for p in parent.iterdir()):
            return True
    return False


def is_runners(out_dir: Path) -> bool:
    """Whether the folder can be proved a run folder of this runner (the marker, or an older run's files)."""
    return ((out_dir / MARKER).is_file() or _runner_provenance(out_dir / "provenance.json")
            or _has_checkpoints(out_dir / "checkpoints"))


def _foreign(out_dir: Path) -> list[str]:
    """What the folder holds besides what Hydra and the launchers put there before a run."""
    try:
        entries = sorted(out_dir.iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        return []
    return [e.name + ("/" if e.is_dir() else "") for e in entries
            if e.name not in STARTUP_NAMES and not (e.suffix == ".log" and e.is_file())]


def refuse_foreign(out_dir: Path) -> None:
    """``FolderError`` if the folder holds files and cannot be proved the runner's own (see the module)."""
    if is_runners(out_dir):
        return
    foreign = _foreign(out_dir)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise FolderError(f"{out_dir} is not a run folder of this runner (it holds {shown}); nothing in "
                          f"it was changed: {WHERE_ELSE}, or an empty or new one")


class Claim:
    """The run folder, proved the runner's and locked, for a ``with`` block (see ``claim``)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self._fd: int | None = None

    def __enter__(self) -> "Claim":
        out_dir = self.out_dir
        refuse_foreign(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        if not (out_dir / MARKER).is_file():
            outputs.write_json(out_dir / MARKER, {"runner": "lodo.run", "created": _now(), "pid": os.getpid(),
                                                  "hostname": socket.gethostname()})
            _CLAIMED_HERE.add(str(out_dir.resolve()))
        return self

    def _lock(self) -> None:
        path = self.out_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                print(f"warning: {path} cannot be locked on this file system ({err.strerror}): nothing stops a "
                      f"second run in this folder", file=sys.stderr, flush=True)
                return
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = (f"PID {holder[0]} (on {holder[1]}, since {holder[2]})" if len(holder) >= 3
                   else "another process (it is starting)")
            raise FolderError(f"folder {self.out_dir} in use by {who}: another run is training in it; wait for it "
                              f"to end, or {WHERE_ELSE}") from None
        # The holder, for the message above: written only while holding the lock, cleared on release.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {_now()}\n".encode(), 0)
        self._fd = fd

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Unlock (also when the process dies: the kernel releases a ``flock``)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def claim(out_dir: Path) -> Claim:
    """``with claim(out_dir):`` the run folder, refused (``FolderError``) if it is not the runner's own or
    another run holds it; the marker is written on first use. Held for the whole run, released between the
    jobs of a sweep."""
    return Claim(out_dir)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- what it holds ---------------------------------------------------------------------------------

def finished_summary(cfg, out_dir: Path) -> dict | None:
    """The stored summary if this folder holds this very run, finished; None if there is nothing to skip.

    A folder whose ``config.yaml`` holds other settings is an error, finished or not: the steps trained
    there (a finished seed, a checkpoint, a finished run) are not this run's to continue or relabel.
    """
    try:
        stored = yaml.safe_load((out_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        stored = None  # nothing here yet (or a file a kill left unreadable): the checkpoints decide
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    finished = isinstance(summary, dict) and summary.get("completed") is True
    if isinstance(stored, dict):
        check_same_run(stored, cfg, out_dir, "a finished run" if finished else "a run")
    return summary if finished and isinstance(stored, dict) else None


def start_fresh(out_dir: Path) -> None:
    """checkpoint.resume=false (in a folder proved the runner's): remove what earlier runs of the runner left,
    and nothing else (a file of another name, under tb/ or checkpoints/ too, stays)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob("seed_*.json"):
        path.unlink(missing_ok=True)
    for events in (out_dir / "tb").rglob("events.out.tfevents.*"):
        events.unlink(missing_ok=True)
    checkpoints = out_dir / "checkpoints"
    for parent in [checkpoints, *checkpoints.glob("seed_*")]:
        if parent.is_dir():
            for item in parent.iterdir():
                if _CHECKPOINT.match(item.name.split(".")[0]) or item.name.startswith(".tmp-"):
                    shutil.rmtree(item, ignore_errors=True)
    for name in RUN_FOLDERS:
        _remove_empty_folders(out_dir / name)


def _remove_empty_folders(folder: Path) -> None:
    if not folder.is_dir():
        return
    for sub in folder.iterdir():
        if sub.is_dir() and not sub.is_symlink():
            _remove_empty_folders(sub)
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: it holds something the runner did not write


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
    files (and this attempt's provenance.json and marker): a rejected run leaves no run folder behind."""
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return
    claimed_here = str(out_dir.resolve()) in _CLAIMED_HERE
    for e in entries:
        disposable = (e.name == ".hydra" or (e.is_file() and e.suffix == ".log")
                      or (e.name == "provenance.json" and _written_by_this_attempt(e))
                      or (e.name in (MARKER, LOCK) and claimed_here))
        if not disposable:
            return
    if out_dir.resolve() == Path.cwd().resolve():
        return
    lock = Claim(out_dir)
    if claimed_here:
        try:
            lock._lock()  # a run that started here meanwhile keeps its folder
        except (FolderError, OSError):
            return
    try:
        shutil.rmtree(out_dir / ".hydra", ignore_errors=True)
        for e in entries:
            if e.is_file():
                e.unlink(missing_ok=True)
    finally:
        lock.release()
    _CLAIMED_HERE.discard(str(out_dir.resolve()))
    try:
        out_dir.rmdir()
    except OSError:
        pass

"""Checkpoints that survive a kill at any moment.

A checkpoint is a folder ``<directory>/ckpt-<NNNNNNNN>/`` holding the
TensorFlow state (``state.index``, ``state.data-*``), the host-side arrays
(``arrays.npz``) and ``metadata.json``, written last. Everything is first
written into a hidden temporary folder that is renamed into place in one
step, so a checkpoint either exists complete (with its metadata) or not at
all; a kill mid-save leaves the previous checkpoint usable, and the temporary
folder is swept away by the next save. Old checkpoints are removed the same
way (renamed aside first, then deleted), keeping the newest ``keep``.

A checkpoint damaged after it was written (a truncated or garbled file) is
skipped on restore in favour of the newest intact one, and kept aside as
``ckpt-<N>.damaged``; a full disk during a save leaves the previous
checkpoints as they were and is raised as an ``OSError`` naming the checkpoint.

Usage (a training loop)::

    ckpt = RunCheckpoint(run_dir / "checkpoints", keep=2, every_s=600, model=model, optimizer=opt)
    meta = ckpt.restore()            # None: nothing to resume
    step = meta["step"] if meta else 0
    ...
    if ckpt.due():
        ckpt.save(step, {"losses": np.asarray(losses), "clock": clock})
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lodo.experiment.outputs import disk_full, disk_full_error

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8})$")
_FRESH_HINT = "delete {dir} or rerun with checkpoint.resume=false to start fresh"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, in one line, with how to start fresh."""


class _Damaged(Exception):
    """One checkpoint cannot be read (the reason, in words that follow its path)."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (a rename is only durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint metadata: {type(value).__name__} is not JSON-serializable")


class RunCheckpoint:
    """The newest ``keep`` checkpoints of one run: TF trackables plus host metadata.

    ``trackables`` are ``tf.train.Checkpoint`` keyword arguments (variables,
    lists of variables, Keras models and optimizers). ``metadata`` values that
    are NumPy arrays go to ``arrays.npz``; the rest must be JSON-serializable.
    """

    def __init__(self, directory: Path, keep: int = 2, every_s: float = 600, **trackables):
        import tensorflow as tf

        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"checkpoint.keep must be a positive integer, got {keep!r}")
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not every_s >= 0:
            raise ValueError(f"checkpoint.every_s must be a non-negative number of seconds, got {every_s!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.every_s = float(every_s)
        self._checkpoint = tf.train.Checkpoint(**trackables)
        self._last_save = time.monotonic()
        self.restored_from: Path | None = None  # the checkpoint the last restore() loaded
        self.skipped: list[tuple[str, str, str]] = []  # what it skipped: (name, why, renamed to)

    # -- reading -------------------------------------------------------------------------------

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{what}; {_FRESH_HINT.format(dir=self.directory)}")

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name) and (p / "metadata.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def peek(self) -> dict | None:
        """The newest checkpoint's JSON metadata without touching the trackables (None: no checkpoint)."""
        path = self.latest()
        if path is None:
            return None
        try:
            return self._read_metadata(path)
        except _Damaged as err:
            raise self._error(f"checkpoint {path} {err}") from None

    def _read_metadata(self, path: Path) -> dict:
        try:
            metadata = json.loads((path / "metadata.json").read_text())
        except (OSError, ValueError) as err:
            raise _Damaged(f"has unreadable metadata ({_one_line(err)})") from None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("step"), int):
            raise _Damaged("has malformed metadata (no integer 'step')")
        return metadata

    def restore(self, check=None, convert=None):
        """Load the newest intact checkpoint into the trackables; its metadata (with ``step``), or None if there
        is none.

        Checkpoints are tried newest first: one whose metadata, arrays or TensorFlow state cannot be read (or
        do not fit the trackables) is skipped, so the older checkpoint that ``keep`` holds is not lost to a
        damaged newest one. Once one restores, the skipped ones are renamed ``ckpt-N.damaged`` (kept, for a
        look) and listed in ``skipped``. Only when every checkpoint is damaged is it an error.

        ``check(path, metadata)`` sees each candidate's JSON metadata first and may refuse it by raising
        (e.g. a checkpoint of other settings): that error is not damage and propagates. ``convert(metadata)``
        turns the metadata with its arrays into what the caller needs (returned instead of the metadata); an
        error there is damage too.
        """
        self.skipped = []
        self.restored_from = None
        candidates = self.complete()
        if not candidates:
            return None
        damaged = []
        for path in reversed(candidates):
            try:
                result = self._restore_one(path, check, convert)
            except _Damaged as err:
                damaged.append((path, str(err)))
                continue
            self.skipped = [(path.name, reason, self._set_aside(path)) for path, reason in damaged]
            self.restored_from = path
            self._last_save = time.monotonic()
            return result
        if len(damaged) == 1:
            path, reason = damaged[0]
            raise self._error(f"checkpoint {path} {reason}")
        raise self._error(f"every checkpoint in {self.directory} is damaged ("
                          + "; ".join(f"{path.name} {reason}" for path, reason in damaged) + ")")

    def _restore_one(self, path: Path, check, convert):
        import tensorflow as tf

        metadata = self._read_metadata(path)
        if check is not None:
            check(path, metadata)
        names = metadata.pop("_arrays", [])
        if names:
            try:
                with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
                    metadata.update({name: arrays[name] for name in names})
            except Exception as err:  # a truncated or garbled file fails in zipfile, numpy or the key lookup
                raise _Damaged(f"has unreadable arrays ({type(err).__name__}: {_one_line(err)})") from None
        result = metadata
        if convert is not None:
            try:
                result = convert(metadata)
            except Exception as err:
                raise _Damaged(f"has arrays that do not form a run ({type(err).__name__}: {_one_line(err)})") from None

        # A failed restore leaves TF's "unrestored values" warnings for when the half-read state is
        # garbage-collected; collect it now, with TF's logger quiet, so the error stays one line.
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel(logging.ERROR)
        problem = None
        status = None
        try:
            status = self._checkpoint.read(str(path / "state"))
            status.assert_consumed()
        except Exception as err:  # OpError for damaged files; AssertionError, ValueError, … for other contents
            kind = "is corrupt" if isinstance(err, tf.errors.OpError) else "does not match this run"
            problem = f"{kind} ({_one_line(err)})"
            if status is not None:
                status.expect_partial()
        finally:
            status = None
            if problem is not None:
                gc.collect()
            logger.setLevel(level)
        if problem is not None:
            raise _Damaged(problem)
        return result

    def _set_aside(self, path: Path) -> str:
        """Rename a damaged checkpoint out of the way (never delete it); its new name ("" if it cannot move)."""
        for i in range(1, 100):
            target = path.with_name(path.name + (".damaged" if i == 1 else f".damaged-{i}"))
            if target.exists():
                continue
            try:
                os.rename(path, target)
            except OSError:
                return ""
            return target.name
        return ""

    # -- writing -------------------------------------------------------------------------------

    def due(self) -> bool:
        """Whether ``every_s`` wall-clock seconds have passed since the last save (or the start)."""
        return time.monotonic() - self._last_save >= self.every_s

    def save(self, step: int, metadata: dict) -> Path:
        """Write a complete checkpoint for ``step`` and prune the old ones; returns its folder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sweep()
        existing = self.complete()
        number = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 1
        final = self.directory / f"ckpt-{number:08d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        reserved = {"step", "_arrays", "saved_at", "format"} & set(metadata)
        if reserved:
            raise ValueError(f"checkpoint metadata may not use the reserved keys {sorted(reserved)}")
        try:
            tmp.mkdir()
            self._write(tmp, step, metadata)
            os.rename(tmp, final)  # the moment the checkpoint exists, complete
            _fsync(self.directory)
        except BaseException as err:
            # Whatever stopped the save (a full disk, the third Ctrl-C) leaves the previous checkpoints as they
            # were, and frees the space the partial one took.
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and disk_full(err):
                raise disk_full_error(err, final) from None
            raise
        self._last_save = time.monotonic()
        self.prune(self.keep)
        return final

    def _write(self, tmp: Path, step: int, metadata: dict) -> None:
        arrays = {k: v for k, v in metadata.items() if isinstance(v, np.ndarray)}
        host = {k: v for k, v in metadata.items() if not isinstance(v, np.ndarray)}
        self._checkpoint.write(str(tmp / "state"))
        if arrays:
            with open(tmp / "arrays.npz", "wb") as f:
                np.savez(f, **arrays)
        record = {"step": int(step), "format": FORMAT, "saved_at": datetime.now(timezone.utc).isoformat(),
                  "_arrays": sorted(arrays), **host}
        text = json.dumps(record, indent=1, default=_json_default, allow_nan=True)
        (tmp / "metadata.json").write_text(text + "\n")
        for item in tmp.iterdir():
            _fsync(item)
        _fsync(tmp)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints (0: all of them)."""
        found = self.complete()
        for old in found[:-keep] if keep > 0 else found:
            doomed = self.directory / f".tmp-delete-{old.name}-{os.getpid()}"
            os.rename(old, doomed)  # never a half-deleted folder that still looks complete
            shutil.rmtree(doomed, ignore_errors=True)

    def _sweep(self) -> None:
        """Remove what interrupted saves and prunes left behind."""
        for item in self.directory.iterdir():
            if item.name.startswith(".tmp-"):
                shutil.rmtree(item, ignore_errors=True)
            elif _NAME.match(item.name) and not (item / "metadata.json").is_file():
                shutil.rmtree(item, ignore_errors=True)

"""Run-folder files, always written atomically (temporary file, then rename).

A run killed mid-write leaves the previous complete file or none, never a
truncated one that would break aggregation. A full disk (or quota) is reported
as an ``OSError`` that names the file being written (``disk_full``), so the
command line can say it in one line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd


_UMASK = os.umask(0)
os.umask(_UMASK)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = tuple(os.strerror(e) for e in DISK_FULL)  # how TensorFlow's errors say it


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk or the quota is full (an ``OSError``, or TensorFlow's error text)."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL
    return type(err).__module__.startswith("tensorflow") and any(t in str(err) for t in _DISK_FULL_TEXT)


def disk_full_error(err: BaseException, path) -> OSError:
    """``err`` (see ``disk_full``) as an ``OSError`` naming ``path``, the file or folder being written."""
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        code = err.errno
    else:
        code = next((e for e, text in zip(DISK_FULL, _DISK_FULL_TEXT) if text in str(err)), errno.ENOSPC)
    return OSError(code, os.strerror(code), str(path))


def _replace_from_temporary(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        write(fd, tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(err):
            raise disk_full_error(err, path) from None
        raise


def atomic_write_text(path, text: str) -> None:
    def write(fd, tmp):
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _replace_from_temporary(Path(path), write)


def atomic_copy(source, path) -> None:
    """Copy the file ``source`` to ``path`` through a temporary file, as ``atomic_write_text`` writes."""
    def write(fd, tmp):
        os.close(fd)
        shutil.copyfile(source, tmp)

    _replace_from_temporary(Path(path), write)


def jsonable(value):
    """``value`` as JSON holds it: NumPy scalars as Python numbers, NaN and inf as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf: a diverged value is null
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # NumPy scalars
        return jsonable(value.item())
    return value


def write_json(path, data: dict) -> None:
    atomic_write_text(path, json.dumps(jsonable(data), indent=2) + "\n")


def write_csv(path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.8g"))

"""Run-folder files, always written atomically (temporary file, then rename).

A run killed mid-write leaves the previous complete file or none, never a
truncated one that would break aggregation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(source, path) -> None:
    """Copy the file ``source`` to ``path`` through a temporary file, as ``atomic_write_text`` writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

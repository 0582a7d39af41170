"""What a run shows on the console, and keeps in its run.log.

TensorFlow's C++ libraries print several lines while they load and find devices
(oneDNN, CUDA drivers, ``failed call to cuInit`` on a machine without a GPU),
before any Python logging setting can reach them: they write to the process's
stderr directly. Unless ``verbose=true``, that stretch runs with stderr pointed
at /dev/null (a Python exception raised in it is reported after stderr is back),
and ``TF_CPP_MIN_LOG_LEVEL=3`` silences the C++ log lines that come later.
A user's own ``TF_CPP_MIN_LOG_LEVEL`` is left as it is.

``logged_to`` copies everything the run prints on stdout (its summary, resume
and checkpoint lines) into the run folder's run.log, where Hydra's own logging
already writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

QUIET_LEVEL = "3"  # TensorFlow's C++ logging: FATAL only
_USER_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")


def set_verbosity(verbose: bool) -> None:
    """Before TensorFlow is imported: how much of its C++ and absl logging reaches the console."""
    if _USER_LEVEL is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else QUIET_LEVEL
    # absl's Python logger: TensorFlow's checkpoint writer logs a line per save at INFO.
    logging.getLogger("absl").setLevel(logging.INFO if verbose else logging.WARNING)


@contextlib.contextmanager
def native_stderr_silenced(verbose: bool):
    """Inside the block, what C++ code writes to stderr is dropped (unless ``verbose``)."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def start_tensorflow(verbose: bool):
    """Import TensorFlow and let it find its devices, quietly; the module."""
    set_verbosity(verbose)
    with native_stderr_silenced(verbose):
        import tensorflow as tf

        tf.config.list_physical_devices()  # where CUDA is probed (cuInit), before any logical device is made
    return tf


class _Tee:
    """A text stream that also writes to a log file."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def logged_to(log_file: Path):
    """Inside the block, stdout is also appended to ``log_file`` (only if it exists: Hydra made it for this job)."""
    if not log_file.is_file():
        yield
        return
    with open(log_file, "a", encoding="utf-8") as log:
        original = sys.stdout
        sys.stdout = _Tee(original, log)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stdout = original

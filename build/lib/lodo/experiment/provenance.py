"""Where a run's numbers came from: ``provenance.json`` in every run folder.

The resolved config, the code (git commit and whether the tree had
uncommitted changes), the package versions, the machine (CPU, GPUs, logical
devices), the host, the command line and the start time. A run resumed in
the same folder keeps the records of its earlier attempts under
``previous_attempts`` (a preempted job may continue on other hardware).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILENAME = "provenance.json"
PACKAGES = ("tensorflow", "keras", "numpy", "hydra-core", "omegaconf", "tensorflow-datasets", "pandas", "scipy",
            "matplotlib", "hydra-joblib-launcher", "hydra-submitit-launcher", "submitit", "joblib")
# Environment variables that say where and how a job ran (never anything secret).
ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
               "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR", "XLA_FLAGS", "TF_XLA_FLAGS",
               "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")

_ATTEMPTS: dict[str, str] = {}  # run folder -> this process's start time there (one attempt per process)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code() -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The vector extensions XLA's CPU compiler may use: two machines that differ in them can round differently.
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd",
                     "sve")


def cpu_vector_extensions() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in VECTOR_EXTENSIONS if f in flags]
    except OSError:
        pass
    return []


def available_cpus() -> int | None:
    """The CPUs this process may run on (its affinity), which a container or a batch job can restrict."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def hardware() -> dict:
    """CPU and accelerators. Never initializes TensorFlow's devices: a run may still split them
    (``distribute.num_cpu_devices``), so the logical devices are counted only once they exist."""
    info = {"cpu_model": cpu_model(), "cpu_vector_extensions": cpu_vector_extensions(), "cpu_count": os.cpu_count(),
            "cpus_available": available_cpus(),
            "gpus": [], "gpu_count": 0, "logical_device_count": None, "logical_devices": None}
    if "tensorflow" not in sys.modules:
        return info
    import tensorflow as tf
    from tensorflow.python.eager import context

    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except (RuntimeError, ValueError):
            names.append(gpu.name)
    info.update(gpus=names, gpu_count=len(gpus))
    if context.context()._initialized:
        logical = tf.config.list_logical_devices()
        info.update(logical_device_count=len(logical), logical_devices=[d.name for d in logical])
    return info


# A run's step times only mean something if it had the machine's cores to itself. The load average cannot tell:
# one TensorFlow run alone keeps more threads runnable than there are cores. What can: the CPU time the whole
# machine spent busy (/proc/stat) minus this process's own, per second of training. A run is marked shared when
# other processes used more than this fraction of the CPUs while it trained.
SHARED_CPU_FRACTION = 0.2


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process), or None without /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / ticks, own.user + own.system


def others_cpu(before, after) -> float | None:
    """CPU seconds that other processes used between two ``cpu_seconds()`` samples."""
    if before is None or after is None:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1]))


def cpu_sharing(chunks) -> dict | None:
    """From ``[wall seconds, others' CPU seconds]`` per training chunk: the cores others used on average, and
    whether that made the run's timings unrepresentative (``shared``)."""
    chunks = [c for c in chunks if c and c[1] is not None]
    wall = sum(c[0] for c in chunks)
    if wall <= 0:
        return None
    cpus = available_cpus() or os.cpu_count() or 1
    others = sum(c[1] for c in chunks) / wall
    return {"others_cores_mean": round(others, 3), "cpus": cpus, "shared": others > SHARED_CPU_FRACTION * cpus}


def op_determinism() -> bool | None:
    """Whether TensorFlow's op determinism is on (None: TensorFlow not loaded)."""
    if "tensorflow" not in sys.modules:
        return None
    from tensorflow.python.framework import config

    return bool(config.is_op_determinism_enabled())


def record(cfg) -> dict:
    from omegaconf import OmegaConf

    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "op_determinism": op_determinism(),
        **code(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions(),
        "hardware": hardware(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": utc_now(),
        "command_line": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
    }


def write(out_dir, cfg, **extra) -> dict:
    """Write ``provenance.json`` atomically; called again by the same process it updates its own
    record (e.g. with ``end_time``), while earlier attempts in the folder move to ``previous_attempts``."""
    from lodo.experiment import outputs

    path = Path(out_dir) / FILENAME
    key = str(path.resolve())
    data = {**record(cfg), **extra}
    previous = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None  # unreadable: nothing worth keeping
        if isinstance(old, dict):
            previous = old.pop("previous_attempts", [])
            if old.get("start_time") != _ATTEMPTS.get(key) or old.get("pid") != os.getpid():
                previous.append(old)
    data["start_time"] = _ATTEMPTS.setdefault(key, data["start_time"])
    if previous:
        data["previous_attempts"] = previous
    outputs.write_json(path, data)
    return data

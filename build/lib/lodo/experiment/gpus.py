"""``gpu_per_job=true``: one GPU per job process when a sweep's jobs share a machine."""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
from pathlib import Path

from lodo.experiment.config import ConfigError

_CLAIMED_GPU = None  # (gpu, the open lock file that holds it)


def claim_gpu() -> str:
    """``gpu_per_job=true``: pin this process to one GPU no other job process holds.

    Joblib reuses its worker processes and a process cannot change GPUs once
    TensorFlow has touched one, so the claim belongs to the process, not the
    job: the first job in a worker takes the first free GPU (an exclusive
    ``flock`` on a per-GPU lock file, released when the process exits) and
    keeps it. The GPUs are those in ``CUDA_VISIBLE_DEVICES`` of the launching
    shell, else those ``nvidia-smi`` lists. Jobs of different sweeps on one
    machine share the locks (``$LODO_GPU_LOCK_DIR``, default a folder in /tmp).
    """
    global _CLAIMED_GPU
    if _CLAIMED_GPU is not None:
        return _CLAIMED_GPU[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        try:
            listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30)
            gpus = listed.stdout.split() if listed.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            gpus = []
    if not gpus:
        raise ConfigError("gpu_per_job=true found no GPU (CUDA_VISIBLE_DEVICES is empty and nvidia-smi lists none); "
                          "drop gpu_per_job or run on a GPU node")
    default_locks = Path(tempfile.gettempdir()) / f"lodo-gpu-locks-{os.getuid()}"
    lock_dir = Path(os.environ.get("LODO_GPU_LOCK_DIR") or default_locks)
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        handle = open(lock_dir / f"gpu-{gpu}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _CLAIMED_GPU = (gpu, handle)  # the open handle holds the lock until the process exits
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        return gpu
    raise ConfigError(f"gpu_per_job=true: all {len(gpus)} GPUs ({', '.join(gpus)}) are held by other jobs; "
                      f"run at most {len(gpus)} jobs at once (hydra.launcher.n_jobs={len(gpus)})")

"""A tiny image run killed with SIGKILL after a checkpoint resumes to the bitwise-identical result.

Through the real command line: PixelCNN on synthetic data, batch 8, a 2-layer
LODO (compiles quickly), a checkpoint after every 4-step chunk, and the validation
loss only at the start and the end (each evaluation of the PixelCNN costs seconds).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]  # subprocesses: each imports TensorFlow and compiles

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
ARGS = ["task=pixelcnn_mnist", "task.data.source=synthetic", "task.batch_size=8", "optimizer=lodo",
        "optimizer.num_layers=2", "num_seeds=1", "seed=5", "steps=12", "chunk_size=4", "eval_every=12", "test_size=1",
        "artifacts=false", "checkpoint.every_s=0", "progress=false"]


def start(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lodo.run", *ARGS, f"hydra.run.dir={folder}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_then_rerun_gives_the_uninterrupted_result(tmp_path):
    whole = start(tmp_path / "whole")  # the reference trains meanwhile
    killed = start(tmp_path / "killed")
    checkpoints = tmp_path / "killed" / "checkpoints" / "seed_5"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(checkpoints.glob("ckpt-*"))) < 2 and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it could be killed"

    resumed = start(tmp_path / "killed")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    reference, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, reference[-3000:]
    assert "resumed from step" in out

    first, second = (json.loads((tmp_path / run / "seed_5.json").read_text())["trace"]["trace_losses"]
                     for run in ("whole", "killed"))
    assert len(second) == 12
    assert second == first  # bitwise: the same batches, the same state
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert a["test_loss_per_seed"] == b["test_loss_per_seed"]

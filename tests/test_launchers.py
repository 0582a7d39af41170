"""Scale-out: joblib runs in parallel (one GPU per job), the SLURM launcher configs, a submitit requeue.

No cluster here: the SLURM configs are composed and turned into the sbatch
script that submitit would submit, by the launcher plugin's own code. The
requeue test uses submitit's local executor, which handles SIGUSR2 and
restarts a job exactly as on SLURM, minus ``scontrol``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lodo.experiment.registry import CONFIG_DIR

pytestmark = pytest.mark.slow  # subprocesses: each imports TensorFlow and compiles

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "lodo.run", *args], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def sbatch_script(launcher_name, tmp_path, monkeypatch, *overrides) -> tuple[str, object]:
    """The sbatch file the SLURM launcher would submit for one job, and its executor."""
    import submitit

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher_name}", f"hydra.sweep.dir={tmp_path}",
                                           "hydra.job.name=run", *overrides], return_hydra_config=True)
    captured = {}

    def map_array(executor, fn, *iterables):
        captured["executor"] = executor
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 2))  # "srun is installed"
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["seed=0"]], initial_job_idx=0)
    executor = captured["executor"]._executor
    return executor._make_submission_file_text("python -u -m submitit.core._submit JOB", "uid"), executor


def test_slurm_one_gpu_per_job_config(tmp_path, monkeypatch):
    monkeypatch.setenv("LODO_SLURM_PARTITION", "gpu")
    monkeypatch.delenv("LODO_SLURM_ACCOUNT", raising=False)
    script, executor = sbatch_script("slurm_gpu", tmp_path, monkeypatch)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "#SBATCH --time=720",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB"):
        assert line in script.splitlines(), line
    assert "--account" not in script and "--exclusive" not in script
    assert executor.max_num_timeout == 20  # requeued after hitting the time limit


def test_slurm_whole_node_config(tmp_path, monkeypatch):
    monkeypatch.delenv("LODO_SLURM_PARTITION", raising=False)
    script, _ = sbatch_script("slurm_node", tmp_path, monkeypatch, "distribute=mirrored",
                              "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=big")
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive",
                 "#SBATCH --partition=big", "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "#SBATCH --time=1440"):
        assert line in script.splitlines(), line
    assert "--mem=" not in script


def test_launcher_configs_print_with_cfg_hydra():
    result = cli("hydra/launcher=slurm_node", "--cfg", "hydra", "-p", "hydra.launcher")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SlurmLauncher" in result.stdout and "exclusive: true" in result.stdout


@pytest.mark.long
def test_joblib_runs_jobs_in_parallel_each_pinned_to_its_own_gpu(tmp_path):
    """Two jobs, two workers, a node with "GPUs" 3 and 5 (CPU TensorFlow ignores them: only the pinning is tested)."""
    sweep = tmp_path / "sweep"
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "3,5", "LODO_GPU_LOCK_DIR": str(tmp_path / "locks")}
    result = cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "gpu_per_job=true", "optimizer=adam",
                 "seed=0,1", "num_seeds=1", "task.dim=6", "steps=50", "chunk_size=25", "progress=false",
                 f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=seed_${seed}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((sweep / f"seed_{s}" / "provenance.json").read_text()) for s in (0, 1)]
    assert all(json.loads((sweep / f"seed_{s}" / "summary.json").read_text())["completed"] for s in (0, 1))
    assert records[0]["pid"] != records[1]["pid"] != os.getpid()
    assert sorted(r["environment"]["CUDA_VISIBLE_DEVICES"] for r in records) == ["3", "5"]
    start, end = ([datetime.fromisoformat(r[k]) for r in records] for k in ("start_time", "end_time"))
    assert max(start) <= min(end), "the two jobs did not overlap in time"


def test_gpu_per_job_without_a_free_gpu_is_an_error(tmp_path):
    import fcntl

    locks = tmp_path / "locks"
    locks.mkdir()
    with open(locks / "gpu-7.lock", "w") as held:  # another job holds the only GPU
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli("gpu_per_job=true", "steps=5", f"hydra.run.dir={tmp_path / 'run'}",
                     env={**ENV, "CUDA_VISIBLE_DEVICES": "7", "LODO_GPU_LOCK_DIR": str(locks)})
    assert result.returncode == 2
    assert "error: gpu_per_job=true: all 1 GPUs (7) are held by other jobs" in result.stderr


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.long
def test_submitit_requeues_on_sigusr2_and_the_job_resumes(tmp_path):
    """SIGUSR2 (what submitit asks SLURM to send before the time limit) reaches the running job: it
    checkpoints, submitit requeues it, and the restarted job resumes from the checkpoint and finishes."""
    sweep = tmp_path / "sweep"
    process = subprocess.Popen(
        [sys.executable, "-m", "lodo.run", "-m", "hydra/launcher=submitit_local", "steps=1200", "num_seeds=2",
         "task.dim=12", "optimizer.num_layers=4", "chunk_size=20", "hessian_every=200", "checkpoint.every_s=0",
         "progress=false", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = sweep / "job"
    deadline = time.monotonic() + 900
    first = None
    while time.monotonic() < deadline and process.poll() is None:
        provenance = read_json(run_dir / "provenance.json")
        checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*/metadata.json"))
        if provenance and checkpoints and (read_json(checkpoints[-1]) or {}).get("step", 0) >= 100:
            first = provenance["pid"]
            os.kill(first, signal.SIGUSR2)
            break
        time.sleep(0.01)
    assert first is not None, "the job never reached step 100"
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, (out[-2000:], err[-2000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["steps_done"] == 1200
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert [a["pid"] for a in provenance["previous_attempts"]] == [first] and provenance["pid"] != first
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "stopped by SIGUSR2 at step" in logs and "Requeued job" in logs and "resumed from step" in logs

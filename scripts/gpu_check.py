"""On a machine with an NVIDIA GPU: the image-task optimizers, LODO's step time and memory, one GPU per job.

    python scripts/gpu_check.py [--out results/gpu_check.md] [--time-limit 540]

Everything trains through the framework's own runner (``python -m lodo.run``), one fresh process per run,
on synthetic data of the tasks' shapes (``task.data.source=synthetic``: a GPU node may have no datasets
and no internet). In this order:

1. step time: LODO and Adam on ResNet-18 at batch 2048 and on the PixelCNN at batch 256, each run alone on
   the GPU, by the runner's own clock (its per-chunk training times in ``seed_0.json``); the first chunk
   (``--warmup`` steps: cuDNN autotuning, first allocations) is left out;
2. a 2-job joblib sweep with ``gpu_per_job=true``: each job pinned to one GPU and seeing exactly one;
3. every registry optimizer with a ``keras:`` entry on every image task for ``--steps`` steps at
   ``scale=smoke``, ``--jobs`` runs at a time (LODO's and Adam's pairs are the step-time runs of 1).

Every runner process is started through ``runpy`` exactly as ``-m`` starts it, so that as it exits it can
read its allocator's peak (``tf.config.experimental.get_memory_info``): each process is fresh, so the peak
is that run's own and needs no ``reset_memory_stats``. A wall-clock guard (``--time-limit``) stops whatever
still runs and writes what it has; the report is written atomically (a temporary file, then a rename).
Without a GPU it says so in one line, exits 0 and writes nothing. Exit status 1: a check failed or the guard
cut it; 2: a bad setting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file (python scripts/gpu_check.py) from any folder
    sys.path.insert(0, str(ROOT))

from lodo.experiment import memory, provenance, registry  # noqa: E402
from lodo.experiment.outputs import atomic_write_text  # noqa: E402

RUNNER = "lodo.run"  # the module each run is started as (python -m lodo.run)
IMAGE_TASKS = ("pixelcnn_mnist", "resnet18_cifar10")
TIMING = "resnet18_cifar10:2048,pixelcnn_mnist:256"
TIMED = ("adam", "lodo")  # the ratio is LODO's step time over Adam's
PAPER_RATIO = {"resnet18_cifar10": 1.3}  # the paper: LODO takes at most 1.3x Adam's step time on ResNet-18
GIB = 2**30
STATUSES = ("pass", "fail", "stopped", "not run")

# ``python -m RUNNER args`` as runpy runs it, then the allocator's peak as the process exits (SystemExit included:
# the runner exits through sys.exit). In a finally rather than atexit, so that it runs before TensorFlow's own
# exit handlers.
BOOTSTRAP = r"""
import json, runpy, sys
module, peak_file, device = sys.argv[1:4]
def record_peak():
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    try:
        from tensorflow.python.eager import context
        if not context.context()._initialized:
            return  # stopped before TensorFlow made a device: nothing was allocated, and asking would allocate
    except Exception:
        pass
    try:
        info = {k: int(v) for k, v in tf.config.experimental.get_memory_info(device).items()}
    except Exception as err:
        info = {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
    with open(peak_file, "w") as f:
        json.dump(info, f)
sys.argv = [module] + sys.argv[4:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    record_peak()
"""


def say(text: str) -> None:
    print(f"gpu-check: {text}", flush=True)


# --- settings -------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.md", help="the Markdown report")
    parser.add_argument("--time-limit", type=float, default=540.0, help="wall-clock guard in seconds (all checks)")
    parser.add_argument("--optimizers", default=None, help="comma-separated (default: every one with a keras: entry)")
    parser.add_argument("--tasks", default=",".join(IMAGE_TASKS), help="comma-separated image tasks")
    parser.add_argument("--steps", type=int, default=3, help="steps of each optimizer run")
    parser.add_argument("--batch", type=int, default=8, help="batch of each optimizer run (max_batch_size)")
    parser.add_argument("--timing", default=TIMING, help="TASK:BATCH,... of the LODO and Adam step-time runs "
                        "(none: no step-time runs)")
    parser.add_argument("--warmup", type=int, default=3, help="steps of the untimed first chunk of a step-time run")
    parser.add_argument("--timed-steps", type=int, default=10, help="steps timed after the warm-up")
    parser.add_argument("--jobs", type=int, default=6, help="optimizer runs at a time (they share the GPU)")
    parser.add_argument("--memory-budget-gb", type=float, default=40.0,
                        help="optimizer state of the runs at a time at most (GB, from the YAML footprints)")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--device", default="/GPU:0", help="where the runs train: /GPU:k, or /CPU:0 (tests)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the run folders here (default: removed)")
    args = parser.parse_args(argv)
    check_settings(args)
    return args


def _names(text: str, setting: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise ValueError(f"{setting} must be a comma-separated list of names, got {text!r}")
    return names


def image_optimizers() -> list[str]:
    """The registry's optimizers that train a model (a ``keras:`` entry), read now: new ones join by YAML."""
    return sorted((n for n in registry.names("optimizer") if registry.optimizer(n).runs_on_models),
                  key=registry.order_key)


def _is_image_task(name: str) -> bool:
    if name in IMAGE_TASKS:
        return True
    from lodo.experiment import console

    console.set_verbosity(False)
    with console.native_stderr_silenced(False):  # asking imports the task's module, TensorFlow with it
        return registry.is_image_task(name)


def _image_task(name: str, setting: str) -> str:
    known = registry.names("task")
    if name not in known or not _is_image_task(name):
        images = [n for n in known if _is_image_task(n)]
        raise ValueError(f"{setting} must name image tasks ({', '.join(images)}), got {name!r}")
    return name


def check_settings(args: argparse.Namespace) -> None:
    """Each setting in range, names known (one-line ValueError naming the setting), before any work."""
    valid = image_optimizers()
    args.optimizers = _names(args.optimizers, "--optimizers") if args.optimizers else valid
    for name in args.optimizers:
        if name not in valid:
            raise ValueError(f"--optimizers must name optimizers with a keras: entry ({', '.join(valid)}), "
                             f"got {name!r}")
    args.tasks = [_image_task(n, "--tasks") for n in _names(args.tasks, "--tasks")]
    timing = []
    for item in [] if args.timing.strip() == "none" else _names(args.timing, "--timing"):
        task, _, batch = item.partition(":")
        if not batch.strip().isdigit() or int(batch) < 1:
            raise ValueError(f"--timing must be TASK:BATCH pairs with a batch >= 1 (or none), got {item!r}")
        timing.append((_image_task(task.strip(), "--timing"), int(batch)))
    args.timing = timing
    for setting, value, low, high in (("--steps", args.steps, 1, 10_000), ("--batch", args.batch, 1, 1_000_000),
                                      ("--warmup", args.warmup, 1, 100),  # one chunk: image chunks hold <= 100
                                      ("--timed-steps", args.timed_steps, 1, 100_000), ("--jobs", args.jobs, 1, 64)):
        if not low <= value <= high:
            raise ValueError(f"{setting} must be an integer in [{low}, {high}], got {value}")
    for setting, value in (("--time-limit", args.time_limit), ("--memory-budget-gb", args.memory_budget_gb),
                           ("--run-timeout", args.run_timeout)):
        if not value > 0:
            raise ValueError(f"{setting} must be a positive number, got {value}")
    match = re.fullmatch(r"/?(?:device:)?(GPU|CPU):(\d+)", args.device.strip(), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--device must be /GPU:k or /CPU:0, got {args.device!r}")
    args.device_kind, args.device_index = match.group(1).upper(), int(match.group(2))
    if args.runs_dir is not None and args.runs_dir.exists() and any(args.runs_dir.iterdir()):
        raise ValueError(f"--runs-dir must be a new or empty folder (a finished run there would be skipped), "
                         f"got {args.runs_dir}")


# --- the machine --------------------------------------------------------------------------------------------

def find_gpus() -> list[dict]:
    """The GPUs TensorFlow sees (``name``, ``device_name``, ``compute_capability``), quietly; makes no device."""
    from lodo.experiment import console

    tf = console.start_tensorflow(False)
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except (RuntimeError, ValueError):
            details = {}
        capability = details.get("compute_capability")
        found.append({"name": gpu.name, "device_name": details.get("device_name", gpu.name),
                      "compute_capability": ".".join(map(str, capability)) if capability else None})
    return found


def nvidia_smi() -> list[str]:
    """``name, memory, driver`` per GPU from nvidia-smi, or nothing where it is missing."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def visible_gpu_ids(count: int) -> list[str]:
    """The GPU ids a child pins with CUDA_VISIBLE_DEVICES: the launching shell's list, else 0 … count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(count)]


# --- runs -------------------------------------------------------------------------------------------------

@dataclass
class Run:
    kind: str  # "timing", "optimizer" or "joblib"
    task: str
    optimizer: str
    argv: list
    env: dict
    folder: Path  # hydra.run.dir (a sweep's hydra.sweep.dir)
    log: Path
    peak_file: Path | None = None
    batch: int | None = None
    warmup: int = 0  # a step-time run: the steps of its untimed first chunk
    weight: float = 0.0  # bytes of optimizer state (the YAML footprints): how many may share the GPU
    order: float = 0.0  # larger first: the longest runs start early
    status: str = "not run"  # pass, fail, stopped (by the guard), not run
    error: str = ""
    wall_s: float | None = None
    compile_s: float | None = None
    loss: float | None = None
    diverged: int = 0  # seeds the runner counted as diverged
    peak_bytes: int | None = None
    peak_error: str = ""
    ms_per_step: float | None = None
    jobs: list = field(default_factory=list)  # joblib: what each job saw
    workers: int = 0
    _process: subprocess.Popen | None = field(default=None, repr=False)
    _started: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "timing":
            return f"step time, {self.optimizer} on {self.task} at batch {self.batch:,}"
        if self.kind == "joblib":
            return f"joblib sweep, gpu_per_job=true, 2 jobs on {self.workers} worker{'s' if self.workers > 1 else ''}"
        return f"{self.optimizer} on {self.task}"


def footprint_bytes(task: str, optimizer: str, steps: int) -> dict[str, float]:
    """What the run holds by the YAML footprints (lodo.experiment.memory); zeros if a footprint cannot be read."""
    t, o = registry.task(task), registry.optimizer(optimizer)
    try:
        return memory.estimate(task_footprint=t.footprint, optimizer_footprint=o.footprint, task_options=t.defaults,
                               hyperparameters=o.defaults, num_seeds=1, steps=steps, record_trajectory=False)
    except (memory.FootprintError, TypeError, ValueError):
        return {}


def runner_argv(module: str, peak_file: Path, device: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-c", BOOTSTRAP, module, str(peak_file), device, *overrides]


def plan(args, gpus: list[dict], runs_dir: Path) -> tuple[list[Run], list[Run]]:
    """The step-time runs (one at a time, alone), then the joblib sweep and the optimizer runs (shared)."""
    base = dict(os.environ)
    pinned = dict(base)
    if args.device_kind == "CPU":
        pinned["CUDA_VISIBLE_DEVICES"] = "-1"
        child_device = "CPU:0"
    else:
        ids = visible_gpu_ids(len(gpus))
        if args.device_index >= len(ids):
            raise ValueError(f"--device must be one of /GPU:0 … /GPU:{len(ids) - 1} on this machine, "
                             f"got {args.device!r}")
        pinned["CUDA_VISIBLE_DEVICES"] = ids[args.device_index]
        child_device = "GPU:0"
    shared = {**pinned, "TF_FORCE_GPU_ALLOW_GROWTH": base.get("TF_FORCE_GPU_ALLOW_GROWTH", "true")}
    (runs_dir / "logs").mkdir(parents=True, exist_ok=True)
    (runs_dir / "peaks").mkdir(parents=True, exist_ok=True)

    def run(kind, task, optimizer, overrides, env, **extra) -> Run:
        key = f"{kind}_{task}_{optimizer}" + (f"_{extra['batch']}" if extra.get("batch") else "")
        folder, peak = runs_dir / key, runs_dir / "peaks" / f"{key}.json"
        argv = runner_argv(RUNNER, peak, child_device, [f"task={task}", f"optimizer={optimizer}",
                                                        "task.data.source=synthetic", "artifacts=false",
                                                        "progress=false", *overrides, f"hydra.run.dir={folder}"])
        return Run(kind, task, optimizer, argv, env, folder, runs_dir / "logs" / f"{key}.log", peak, **extra)

    steps = args.warmup + args.timed_steps
    timing = [run("timing", task, optimizer, [f"task.batch_size={batch}", "num_seeds=1", f"steps={steps}",
                                              f"chunk_size={args.warmup}", f"eval_every={steps}", "test_size=2",
                                              "hessian_every=0", "checkpoint.keep_final=false"], pinned, batch=batch,
                  warmup=args.warmup)
              for task, batch in args.timing for optimizer in TIMED]
    timed = {(r.task, r.optimizer) for r in timing}
    shared_runs = []
    workers = min(2, len(gpus))  # as many joblib workers as GPUs, two at most: a sweep of 2 jobs
    sweep = runs_dir / "joblib"
    # The launching shell's GPUs (unset: gpus.py asks nvidia-smi, as on a node), and locks of its own, so that
    # no stale claim interferes.
    joblib_env = {k: v for k, v in shared.items() if k != "CUDA_VISIBLE_DEVICES"}
    joblib_env["LODO_GPU_LOCK_DIR"] = str(runs_dir / "gpu_locks")
    if "CUDA_VISIBLE_DEVICES" in base:
        joblib_env["CUDA_VISIBLE_DEVICES"] = base["CUDA_VISIBLE_DEVICES"]
    joblib_task = args.tasks[0]
    shared_runs.append(Run("joblib", joblib_task, "adam", [
        sys.executable, "-m", RUNNER, "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}",
        "gpu_per_job=true", f"task={joblib_task}", "optimizer=adam", "seed=0,1", "scale=smoke", "steps=2",
        "task.data.source=synthetic", "artifacts=false", "progress=false", f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=seed_${seed}"], joblib_env, sweep, runs_dir / "logs" / "joblib.log",
        workers=workers, order=float("inf")))
    for task in args.tasks:
        for optimizer in args.optimizers:
            if (task, optimizer) in timed:
                continue  # its step-time run (a larger batch) already trains it through the runner
            held = footprint_bytes(task, optimizer, args.steps)
            shared_runs.append(run("optimizer", task, optimizer, ["scale=smoke", f"steps={args.steps}",
                                                                  f"max_batch_size={args.batch}"], shared,
                                   weight=held.get("optimizer state", 0.0), order=sum(held.values())))
    shared_runs.sort(key=lambda r: -r.order)  # stable: the registry's order among equals
    return timing, shared_runs


def start(run: Run) -> None:
    run._started = time.monotonic()
    with open(run.log, "w") as log:
        run._process = subprocess.Popen(run.argv, cwd=ROOT, env=run.env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)


def stop(run: Run) -> None:
    """Kill the run's process group (a joblib sweep's workers too) and reap it."""
    try:
        os.killpg(run._process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    run._process.wait()


def run_all(runs: list[Run], *, jobs: int, budget_bytes: float, timeout: float, deadline: float, done) -> None:
    """Run ``runs``, ``jobs`` at a time and their optimizer state within ``budget_bytes`` (a run alone always
    starts); one that outlives ``timeout`` or the guard's ``deadline`` is killed. ``done(run)`` after each."""
    pending, running = list(runs), []
    try:
        while pending or running:
            now = time.monotonic()
            for run in list(running):
                code = run._process.poll()
                if code is None and now < min(run._started + timeout, deadline):
                    continue
                running.remove(run)
                run.wall_s = now - run._started
                if code is None:
                    stop(run)
                    if now >= deadline:
                        run.status, run.error = "stopped", f"stopped by the time guard ({run.wall_s:.0f} s in)"
                    else:
                        run.error = f"timed out after {timeout:g} s"
                finish(run, code)
                done(run)
            if now >= deadline:
                for run in pending:
                    run.error = "not started: the time guard"
                return
            while pending and len(running) < jobs:
                load = sum(r.weight for r in running)
                pick = next((r for r in pending if not running or load + r.weight <= budget_bytes), None)
                if pick is None:
                    break
                pending.remove(pick)
                start(pick)
                running.append(pick)
            time.sleep(0.1)
    finally:
        for run in running:  # an exception (Ctrl-C) leaves no process behind
            if run._process.poll() is None:
                stop(run)


# --- what a run left -----------------------------------------------------------------------------------------

def error_line(log: Path, code: int | None) -> str:
    """The line that says why a run failed: the runner's ``error:`` line, an out-of-memory line, the last
    exception, else the last line."""
    try:
        lines = [" ".join(line.split()) for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    picks = ([line for line in lines if line.startswith("error:")]
             or [line for line in lines if "OOM when allocating" in line or "out of memory" in line.lower()]
             or [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)])
    line = (picks or lines or [""])[-1]
    status = f"exit status {code}" if code is not None and code >= 0 else \
        f"killed by {signal.Signals(-code).name}" if code is not None else "no exit status"
    return f"{line[:300]} ({status})" if line else status


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finish(run: Run, code: int | None) -> None:
    """Pass or fail, and what the run measured, from its folder (a run the guard stopped stays stopped)."""
    if run.peak_file is not None:
        peak = read_json(run.peak_file) or {}
        run.peak_bytes = peak.get("peak")
        run.peak_error = peak.get("error", "")
    if run.status == "stopped":
        return
    if run.kind == "joblib":
        finish_joblib(run, code)
        return
    summary = read_json(run.folder / "summary.json") or {}
    if code == 0 and summary.get("completed"):
        run.status = "pass"
        run.loss, run.compile_s = summary.get("loss_final_mean"), summary.get("compile_time_s")
        run.diverged = int(summary.get("diverged") or 0)
    else:
        run.status = "fail"
        run.error = run.error or error_line(run.log, code)
    if run.kind == "timing" and run.status == "pass":
        trace = (read_json(run.folder / "seed_0.json") or {}).get("trace", {})
        ends = [(int(s), float(t)) for s, t in trace.get("trace_chunk_ends", [])]
        warm = [t for s, t in ends if s == run.warmup]
        if ends and warm and ends[-1][0] > run.warmup:
            run.ms_per_step = 1000 * (ends[-1][1] - warm[0]) / (ends[-1][0] - run.warmup)
        else:
            run.status, run.error = "fail", f"no chunk times after the warm-up in {run.folder / 'seed_0.json'}"


def finish_joblib(run: Run, code: int | None) -> None:
    """Each job: its pin (CUDA_VISIBLE_DEVICES in its provenance), the GPUs TensorFlow saw, where it trained."""
    problems = []
    for name in ("seed_0", "seed_1"):
        record = read_json(run.folder / name / "provenance.json") or {}
        summary = read_json(run.folder / name / "summary.json") or {}
        pin = (record.get("environment") or {}).get("CUDA_VISIBLE_DEVICES")
        seen = (record.get("hardware") or {}).get("gpu_count")
        devices = (summary.get("distribute") or {}).get("devices") or []
        job = {"job": name, "pid": record.get("pid"), "pin": pin, "gpus_seen": seen, "devices": devices,
               "completed": bool(summary.get("completed"))}
        run.jobs.append(job)
        if not job["completed"]:
            problems.append(f"{name} did not finish")
        if not pin or "," in pin or pin == "-1":
            problems.append(f"{name} is pinned to {pin!r}, not to one GPU")
        if seen != 1:
            problems.append(f"{name} sees {seen} GPUs in TensorFlow, not 1")
    pins = [j["pin"] for j in run.jobs]
    if run.workers > 1 and len(set(pins)) != len(pins):
        problems.append(f"the {run.workers} workers' jobs share a GPU ({', '.join(map(str, pins))})")
    if code == 0 and not problems:
        run.status = "pass"
    else:
        run.status = "fail"
        run.error = run.error or ("; ".join(problems) if code == 0 else error_line(run.log, code))


def progress(run: Run) -> None:
    took = f"{run.wall_s:.0f} s" if run.wall_s is not None else "not run"
    if run.status != "pass":
        say(f"{run.label}: {'FAIL' if run.status == 'fail' else run.status} ({took}): {run.error}")
    elif run.kind == "timing":
        say(f"{run.label}: {run.ms_per_step:.1f} ms/step, peak {gib(run.peak_bytes)} ({took})")
    elif run.kind == "joblib":
        say(f"{run.label}: pass, pinned to GPU {', '.join(sorted({str(j['pin']) for j in run.jobs}))} ({took})")
    else:
        say(f"{run.label}: pass ({took})")


# --- the report --------------------------------------------------------------------------------------------

def gib(value) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value / GIB:.2f} GiB" if value >= GIB / 10 else f"{value / 2**20:.1f} MiB"


def cell(text) -> str:
    return str(text).replace("|", "\\|") if text not in (None, "") else "–"


def number(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def report(args, gpus, timing: list[Run], shared: list[Run], elapsed: float) -> str:
    versions = provenance.versions()
    code = provenance.code()
    gpu = gpus[args.device_index] if args.device_kind == "GPU" and args.device_index < len(gpus) else None
    device = (f"{gpu['device_name']} (compute capability {gpu['compute_capability'] or '?'}), {args.device}"
              if gpu else f"{args.device} (not a GPU: a test of this script)")
    smi = nvidia_smi()
    lines = ["# GPU check", "",
             f"Generated by `scripts/gpu_check.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in "
             f"{elapsed:.0f} s (time guard {args.time_limit:g} s).", "",
             f"- Device: {device}; TensorFlow sees {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}: "
             + ", ".join(f"{g['name']} {g['device_name']}" for g in gpus),
             f"- nvidia-smi: {'; '.join(smi) if smi else 'not available'}",
             f"- TensorFlow {versions.get('tensorflow')}, Keras {versions.get('keras')}, Python "
             f"{sys.version.split()[0]}; commit {code['git_commit'] or '?'}"
             + (" (with uncommitted changes)" if code["git_dirty"] else ""),
             f"- CPU: {provenance.cpu_model()}, {provenance.available_cpus()} cores available", ""]
    lines += timing_section(args, timing) + joblib_section(args, gpus, shared) + matrix_section(args, timing, shared)
    everything = timing + shared
    left = [r for r in everything if r.status in ("stopped", "not run")]
    lines += ["## Time guard", ""]
    lines.append(f"The guard ({args.time_limit:g} s) stopped {len(left)} of {len(everything)} runs: "
                 + ", ".join(r.label for r in left) + "." if left else
                 f"Every run finished within the guard ({elapsed:.0f} s of {args.time_limit:g} s).")
    return "\n".join(lines) + "\n"


def timing_section(args, timing: list[Run]) -> list[str]:
    lines = ["## Step time: LODO against Adam", "",
             "| Task | Batch | Adam ms/step | LODO ms/step | LODO / Adam | Paper |", "|---|---|---|---|---|---|"]
    for task, batch in args.timing:
        got = {r.optimizer: r for r in timing if r.task == task and r.batch == batch}
        adam, lodo = (got[o].ms_per_step if o in got else None for o in ("adam", "lodo"))
        ratio = lodo / adam if adam and lodo else None
        paper = f"≤ {PAPER_RATIO[task]}" if task in PAPER_RATIO else "–"
        if ratio is not None and task in PAPER_RATIO:
            paper += " (met)" if ratio <= PAPER_RATIO[task] else " (not met)"
        lines.append(f"| {task} | {batch:,} | {number(adam, '.1f')} | {number(lodo, '.1f')} | "
                     f"{number(ratio, '.2f')} | {paper} |")
    lines += ["", f"The runner's own clock: the training time of its compiled chunks (`trace_chunk_ends` in each "
              f"run's `seed_0.json`, read after the losses reach the host; never compilation, evaluation or "
              f"checkpoints) over steps {args.warmup + 1}–{args.warmup + args.timed_steps}; the first chunk "
              f"({args.warmup} step{'s' if args.warmup > 1 else ''}: cuDNN autotuning, first allocations) is left "
              f"out. One seed, synthetic data, the task's tuned hyperparameters; each run alone on the device. "
              f"The paper's bound is for ResNet-18.",
              "", "## Peak GPU memory", "",
              "| Run | Task | Batch | Peak allocated | Result |", "|---|---|---|---|---|"]
    for r in timing:
        lines.append(f"| {r.optimizer} | {r.task} | {r.batch:,} | {gib(r.peak_bytes)} | "
                     f"{cell(r.status if r.status == 'pass' else r.status + ': ' + r.error)} |")
    errors = sorted({r.peak_error for r in timing if r.peak_error})
    lines += ["", f"`tf.config.experimental.get_memory_info('{'CPU' if args.device_kind == 'CPU' else 'GPU'}:0')"
              f"['peak']` read as each run's process exits: the most TensorFlow's allocator held at once over the "
              f"whole run (model, optimizer state, activations, evaluation), not what the process reserved. "
              f"The optimizer runs' peaks are in their table below." + (f" Not read: {'; '.join(errors)}."
                                                                          if errors else ""), ""]
    return lines


def joblib_section(args, gpus, shared: list[Run]) -> list[str]:
    run = next((r for r in shared if r.kind == "joblib"), None)
    if run is None:
        return []
    ids = visible_gpu_ids(len(gpus))
    if run.workers <= 1:
        meaning = (f"This machine has one GPU ({', '.join(ids)}), so one GPU per job means one worker "
                   f"(`hydra.launcher.n_jobs=1`: as many workers as GPUs, as the README says): the two jobs run one "
                   f"after the other, each pinned to that GPU and seeing exactly one GPU. A second worker would "
                   f"find the GPU held and stop with `error: gpu_per_job=true: all 1 GPUs (…) are held by other "
                   f"jobs` (tests/test_launchers.py checks that refusal).")
    else:
        meaning = (f"This machine has {len(gpus)} GPUs ({', '.join(ids)}): two workers "
                   f"(`hydra.launcher.n_jobs=2`), so each job must be pinned to a GPU of its own and see only it.")
    lines = ["## joblib: one GPU per job", "",
             f"`python -m lodo.run -m hydra/launcher=joblib hydra.launcher.n_jobs={run.workers} gpu_per_job=true "
             f"task={run.task} optimizer=adam seed=0,1 scale=smoke steps=2 task.data.source=synthetic` "
             f"(its own GPU lock folder). {meaning}", "",
             f"Result: **{run.status}**" + (f": {cell(run.error)}" if run.error else "") + "", "",
             "| Job | Process | CUDA_VISIBLE_DEVICES | GPUs TensorFlow sees | Trained on | Finished |",
             "|---|---|---|---|---|---|"]
    for job in run.jobs:
        lines.append(f"| {job['job']} | {cell(job['pid'])} | {cell(job['pin'])} | {cell(job['gpus_seen'])} | "
                     f"{cell(', '.join(job['devices']))} | {'yes' if job['completed'] else 'no'} |")
    return lines + [""]


def matrix_section(args, timing: list[Run], shared: list[Run]) -> list[str]:
    found = {(r.task, r.optimizer): r for r in shared if r.kind == "optimizer"}
    for r in timing:  # LODO's and Adam's pairs: the step-time run (the first batch listed) stands for them
        found.setdefault((r.task, r.optimizer), r)
    which = ("Every optimizer with a `keras:` entry" if set(args.optimizers) == set(image_optimizers())
             else "The optimizers asked for") + f" ({len(args.optimizers)}, read from the registry at run time)"
    lines = ["## Optimizers × tasks", "",
             f"{which}, {args.steps} steps at `scale=smoke` (batch {args.batch}, 1 seed, 2 test images) through "
             f"`python -m lodo.run` on synthetic data, up to {args.jobs} run{'s' if args.jobs > 1 else ''} at once "
             f"(`TF_FORCE_GPU_ALLOW_GROWTH=true`). A pair with a step-time run (LODO's, Adam's) is that run. "
             f"Wall: the whole process (start, build, compile, steps, evaluation, checkpoint). Loss: the runner's "
             f"final-window mean; \"diverged\" is the runner's rule (non-finite, or worse than never moving), "
             f"which a few steps of noise can trip: the check is that the optimizer trains, not how well.", "",
             "| Optimizer | Task | Result | Wall s | Compile s | Loss | Peak allocated | Error |",
             "|---|---|---|---|---|---|---|---|"]
    counts = dict.fromkeys(STATUSES, 0)
    for optimizer in args.optimizers:
        for task in args.tasks:
            r = found.get((task, optimizer))
            if r is None:
                continue
            counts[r.status] += 1
            result = r.status + (f" (batch {r.batch:,})" if r.kind == "timing" else "")
            lines.append(f"| {optimizer} | {task} | {result} | {number(r.wall_s, '.0f')} | "
                         f"{number(r.compile_s, '.1f')} | {'diverged' if r.diverged else number(r.loss, '.4g')} | "
                         f"{gib(r.peak_bytes)} | "
                         f"{cell(r.error)} |")
    lines += ["", ", ".join(f"{counts[s]} {s}" for s in STATUSES) + ".", ""]
    return lines


# --- main ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    gpus = find_gpus()
    if not gpus:
        listed = nvidia_smi()
        hint = f" although nvidia-smi lists {len(listed)} (a CPU-only TensorFlow, or CUDA libraries missing)" \
            if listed else ""
        say(f"no GPU found (TensorFlow sees none{hint}); nothing to check")
        return 0
    deadline = started + args.time_limit - 2.0  # the report's own few seconds
    keep = args.runs_dir is not None
    runs_dir = args.runs_dir.resolve() if keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        timing, shared = plan(args, gpus, runs_dir)
        name = gpus[min(args.device_index, len(gpus) - 1)]["device_name"]
        say(f"{name} (TensorFlow sees {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}): {len(timing)} step-time "
            f"runs, a joblib sweep, {len(shared) - 1} optimizer runs; guard {args.time_limit:g} s")

        def done(run: Run) -> None:
            progress(run)
            if not keep:
                shutil.rmtree(run.folder, ignore_errors=True)  # LODO's checkpoint of ResNet-18 is ~20 GB

        run_all(timing, jobs=1, budget_bytes=float("inf"), timeout=args.run_timeout, deadline=deadline, done=done)
        run_all(shared, jobs=args.jobs, budget_bytes=args.memory_budget_gb * 1e9, timeout=args.run_timeout,
                deadline=deadline, done=done)
        text = report(args, gpus, timing, shared, time.monotonic() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    finally:
        if not keep:
            shutil.rmtree(runs_dir, ignore_errors=True)
    everything = timing + shared
    say(f"wrote {args.out} (" + ", ".join(f"{sum(r.status == s for r in everything)} {s}" for s in STATUSES) + ")")
    return 0 if all(r.status == "pass" for r in everything) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

"""scripts/gpu_check.py without a GPU: the no-GPU line, and the GPU path with the GPU discovery mocked.

The mocked path runs the script's own process handling (start, poll, kill, the guard) against a stand-in
for ``python -m lodo.run`` that answers in milliseconds: it records each command line and writes what the
runner writes (summary.json, seed_0.json's chunk times, a joblib sweep's provenance), with step times
chosen here, so the ratio and the report are checked against numbers known in advance. One test marked
slow and long runs the real runner on CPU.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.long  # the script's runs are subprocesses; make test-long (CI runs it)

from lodo.experiment import registry

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
spec.loader.exec_module(gpu_check)

FAKE_GPUS = [{"name": f"/physical_device:GPU:{i}", "device_name": "Fake GPU", "compute_capability": "9.0"}
             for i in range(2)]
PER_STEP_S = {"adam": 0.100, "lodo": 0.125}  # the stand-in's step times: LODO/Adam = 1.25
WARMUP_CHUNK_S = 5.0  # its first chunk, far slower than the rest: a ratio that included it would be off
PEAK_BYTES = {"adam": 1 * 2**30, "lodo": 3 * 2**30}

FAKE_RUNNER = r'''
"""Stands in for python -m lodo.run: writes what the runner writes, with known step times."""
import json, os, sys, time, types
from pathlib import Path

argv = sys.argv[1:]
args = dict(a.split("=", 1) for a in argv if "=" in a)
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                          "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH")}) + "\n")
optimizer = args.get("optimizer")
if optimizer in os.environ.get("FAKE_FAIL", "").split(","):
    print("Traceback (most recent call last):\n  File x\nValueError: not the one", file=sys.stderr)
    print(f"error: {optimizer} cannot train here", file=sys.stderr)
    sys.exit(2)
if optimizer in os.environ.get("FAKE_SLOW", "").split(","):
    time.sleep(120)
if "-m" in argv:  # the joblib sweep: job i in worker i % n_jobs, pinned to the i-th listed GPU of its worker
    sweep, workers = Path(args["hydra.sweep.dir"]), int(args["hydra.launcher.n_jobs"])
    ids = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    for i, seed in enumerate(args["seed"].split(",")):
        job = sweep / f"seed_{seed}"
        job.mkdir(parents=True)
        (job / "provenance.json").write_text(json.dumps({"pid": 1000 + i % workers, "hardware": {"gpu_count": 1},
                                                         "environment": {"CUDA_VISIBLE_DEVICES": ids[i % workers]}}))
        (job / "summary.json").write_text(json.dumps({"completed": True,
                                                      "distribute": {"devices": ["/device:GPU:0"]}}))
    sys.exit(0)
folder = Path(args["hydra.run.dir"])
folder.mkdir(parents=True)
steps, chunk = int(args["steps"]), int(args.get("chunk_size", args["steps"]))
per_step = json.loads(os.environ["FAKE_PER_STEP"]).get(optimizer, 0.05)
ends, done, clock = [], 0, 0.0
while done < steps:
    k = min(chunk, steps - done)
    clock += float(os.environ["FAKE_WARMUP_S"]) if done == 0 else k * per_step
    done += k
    ends.append([done, clock])
(folder / "seed_0.json").write_text(json.dumps({"trace": {"trace_chunk_ends": ends}}))
(folder / "summary.json").write_text(json.dumps({"completed": True, "loss_final_mean": 2.5, "diverged": 0,
                                                 "compile_time_s": 0.5}))
peaks = json.loads(os.environ["FAKE_PEAKS"])


def get_memory_info(device):
    if device != os.environ.get("FAKE_DEVICE", "CPU:0"):
        raise ValueError(f"asked for {device}")
    return {"current": 1, "peak": peaks.get(optimizer, 2**20)}


sys.modules["tensorflow"] = types.SimpleNamespace(  # what the bootstrap reads as the process exits
    config=types.SimpleNamespace(experimental=types.SimpleNamespace(get_memory_info=get_memory_info)))
print(f"{optimizer} on {args['task']}: done")
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The stand-in runner, a machine with two (fake) GPUs, and a temp folder that must end up empty."""
    (tmp_path / "fake_lodo_run.py").write_text(FAKE_RUNNER)
    monkeypatch.setattr(gpu_check, "RUNNER", "fake_lodo_run")
    monkeypatch.setattr(gpu_check, "find_gpus", lambda: FAKE_GPUS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_PER_STEP", json.dumps(PER_STEP_S))
    monkeypatch.setenv("FAKE_WARMUP_S", str(WARMUP_CHUNK_S))
    monkeypatch.setenv("FAKE_PEAKS", json.dumps(PEAK_BYTES))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_SLOW", raising=False)
    monkeypatch.delenv("FAKE_DEVICE", raising=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def calls():
        return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]

    return {"out": tmp_path / "report" / "gpu_check.md", "calls": calls, "scratch": scratch}


def overrides(call) -> dict:
    return dict(a.split("=", 1) for a in call["argv"] if "=" in a)


def test_no_gpu_prints_one_line_exits_0_and_writes_nothing(tmp_path):
    out, scratch = tmp_path / "gpu_check.md", tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "TMPDIR": str(scratch)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["gpu-check: no GPU found (TensorFlow sees none); nothing to check"]
    assert done.stderr == ""
    assert not out.exists() and list(scratch.iterdir()) == [] and list(tmp_path.iterdir()) == [scratch]


def test_mocked_gpu_runs_every_optimizer_through_the_runner_and_writes_every_section(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAIL", "yogi")
    tasks = ["pixelcnn_mnist", "resnet18_cifar10"]
    code = gpu_check.main(["--out", str(fake["out"]), "--device", "/CPU:0", "--optimizers", "adam,lodo,momentum,yogi",
                           "--timing", "resnet18_cifar10:16,pixelcnn_mnist:8", "--warmup", "2", "--timed-steps", "4",
                           "--steps", "2", "--batch", "2", "--jobs", "3", "--time-limit", "120"])
    assert code == 1  # yogi failed; everything else passed
    calls = fake["calls"]()
    runs = [c for c in calls if "-m" not in c["argv"]]
    # the step-time runs: LODO and Adam at each batch, one chunk of --warmup steps first, on the pinned device
    timing = sorted((overrides(c)["task"], overrides(c)["optimizer"], overrides(c)["task.batch_size"])
                    for c in runs if "task.batch_size" in overrides(c))
    assert timing == sorted((t, o, b) for t, b in (("resnet18_cifar10", "16"), ("pixelcnn_mnist", "8"))
                            for o in ("adam", "lodo"))
    assert all(overrides(c)["chunk_size"] == "2" and overrides(c)["steps"] == "6" and c["growth"] is None
               for c in runs if "task.batch_size" in overrides(c))
    # every other (optimizer, task) pair once, at scale=smoke; the pairs with a step-time run not again
    matrix = sorted((overrides(c)["optimizer"], overrides(c)["task"]) for c in runs if "scale" in overrides(c))
    assert matrix == sorted((o, t) for o in ("momentum", "yogi") for t in tasks)
    assert all(overrides(c)["steps"] == "2" and overrides(c)["max_batch_size"] == "2" and c["growth"] == "true"
               for c in runs if "scale" in overrides(c))
    assert all(overrides(c)["task.data.source"] == "synthetic" and c["cuda"] == "-1" for c in runs)
    sweep = [c for c in calls if "-m" in c["argv"]]
    assert len(sweep) == 1 and overrides(sweep[0])["gpu_per_job"] == "true" and sweep[0]["cuda"] == "3,5"
    assert overrides(sweep[0])["hydra.launcher.n_jobs"] == "2"  # two GPUs: two workers

    text = fake["out"].read_text()
    for section in ("# GPU check", "## Step time: LODO against Adam", "## Peak GPU memory",
                    "## joblib: one GPU per job", "## Optimizers × tasks", "## Time guard"):
        assert section in text.splitlines(), section
    assert "- Device: /CPU:0" in text and f"TensorFlow {gpu_check.provenance.versions()['tensorflow']}" in text
    adam_ms, lodo_ms = 1000 * PER_STEP_S["adam"], 1000 * PER_STEP_S["lodo"]
    ratio = lodo_ms / adam_ms
    assert f"| resnet18_cifar10 | 16 | {adam_ms:.1f} | {lodo_ms:.1f} | {ratio:.2f} | ≤ 1.3 (met) |" in text
    assert f"| pixelcnn_mnist | 8 | {adam_ms:.1f} | {lodo_ms:.1f} | {ratio:.2f} | – |" in text
    assert "| lodo | resnet18_cifar10 | 16 | 3.00 GiB | pass |" in text  # its allocator peak, read at exit
    for task in tasks:
        assert f"| yogi | {task} | fail |" in text and f"| momentum | {task} | pass |" in text
    assert text.count("error: yogi cannot train here (exit status 2)") == 2
    assert "Result: **pass**" in text and "| seed_0 | 1000 | 3 | 1 |" in text and "| seed_1 | 1001 | 5 | 1 |" in text
    assert "6 pass, 2 fail, 0 stopped, 0 not run." in text and "Every run finished within the guard" in text
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + 4 + 1 + 4 + 1  # the plan, one per check, where it wrote
    assert printed[-1].startswith(f"gpu-check: wrote {fake['out']} (7 pass, 2 fail")
    assert list(fake["scratch"].iterdir()) == []  # the run folders are gone
    assert not any(p.name.startswith(".") for p in fake["out"].parent.iterdir())  # no temporary file left


def test_the_time_guard_kills_a_slow_run_and_still_writes_the_report(fake, monkeypatch):
    monkeypatch.setenv("FAKE_SLOW", "momentum")
    started = time.monotonic()
    code = gpu_check.main(["--out", str(fake["out"]), "--device", "/CPU:0", "--optimizers", "momentum,rmsprop",
                           "--timing", "none", "--jobs", "1", "--time-limit", "6"])
    took = time.monotonic() - started
    assert code == 1 and took < 20
    text = fake["out"].read_text()
    # one at a time, the largest first: the sweep, then ResNet-18's runs, rmsprop's (2n of state) before momentum's
    assert "| momentum | resnet18_cifar10 | stopped |" in text and "stopped by the time guard" in text
    assert "| rmsprop | resnet18_cifar10 | pass |" in text
    for optimizer in ("momentum", "rmsprop"):
        assert f"| {optimizer} | pixelcnn_mnist | not run |" in text
    assert "The guard (6 s) stopped 3 of 5 runs" in text
    slow = [c["pid"] for c in fake["calls"]() if overrides(c).get("optimizer") == "momentum"]
    assert len(slow) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(slow[0], 0)  # killed, not left behind


def test_on_one_gpu_both_jobs_run_in_one_worker_on_that_gpu(fake, monkeypatch):
    monkeypatch.setattr(gpu_check, "find_gpus", lambda: FAKE_GPUS[:1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("FAKE_DEVICE", "GPU:0")  # the child's only GPU, whatever its id outside
    code = gpu_check.main(["--out", str(fake["out"]), "--device", "/GPU:0", "--optimizers", "adam",
                           "--tasks", "pixelcnn_mnist", "--timing", "none"])
    assert code == 0
    sweep = next(c for c in fake["calls"]() if "-m" in c["argv"])
    assert overrides(sweep)["hydra.launcher.n_jobs"] == "1"
    adam = next(c for c in fake["calls"]() if "-m" not in c["argv"])
    assert adam["cuda"] == "0"
    text = fake["out"].read_text()
    assert re.search(r"\| adam \| pixelcnn_mnist \| pass \| \d+ \| 0.5 \| 2.5 \| 1.00 GiB \| – \|", text), text
    assert "This machine has one GPU (0), so one GPU per job means one worker" in text
    assert "| seed_0 | 1000 | 0 | 1 |" in text and "| seed_1 | 1000 | 0 | 1 |" in text and "Result: **pass**" in text


def test_the_report_replaces_the_old_one_whole_or_not_at_all(fake, monkeypatch):
    fake["out"].parent.mkdir()
    fake["out"].write_text("the previous report\n")

    def no_rename(source, target):
        raise PermissionError(f"cannot rename {source}")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(PermissionError):
        gpu_check.main(["--out", str(fake["out"]), "--device", "/CPU:0", "--optimizers", "adam",
                        "--tasks", "pixelcnn_mnist", "--timing", "none"])
    assert fake["out"].read_text() == "the previous report\n"
    assert [p.name for p in fake["out"].parent.iterdir()] == [fake["out"].name]  # no temporary file left
    assert list(fake["scratch"].iterdir()) == []


def test_the_scheduler_keeps_the_optimizer_state_of_parallel_runs_within_the_budget(tmp_path):
    def sleeper(name, weight):
        return gpu_check.Run("optimizer", "t", name, [sys.executable, "-c", "import time; time.sleep(0.6)"],
                             dict(os.environ), tmp_path / name, tmp_path / f"{name}.log", weight=weight)

    runs = [sleeper("big1", 30e9), sleeper("big2", 30e9), sleeper("small", 1e6)]
    finished = []
    gpu_check.run_all(runs, jobs=3, budget_bytes=40e9, timeout=60, deadline=time.monotonic() + 60,
                      done=finished.append)
    assert len(finished) == 3
    span = {r.optimizer: (r._started, r._started + r.wall_s) for r in runs}
    assert span["big2"][0] >= span["big1"][1] - 0.05  # 60 GB together: never at once
    assert span["small"][0] < span["big1"][1]  # the small one fits beside a big one


def test_the_joblib_verdict(tmp_path):
    def sweep(name, jobs, workers, code=0):
        folder = tmp_path / name
        for job, (pin, seen) in zip(("seed_0", "seed_1"), jobs):
            (folder / job).mkdir(parents=True)
            (folder / job / "provenance.json").write_text(json.dumps(
                {"pid": 7, "environment": {"CUDA_VISIBLE_DEVICES": pin}, "hardware": {"gpu_count": seen}}))
            (folder / job / "summary.json").write_text(json.dumps({"completed": True,
                                                                   "distribute": {"devices": ["/device:GPU:0"]}}))
        run = gpu_check.Run("joblib", "t", "adam", [], {}, folder, tmp_path / "none.log", workers=workers)
        gpu_check.finish(run, code)
        return run

    assert sweep("one_gpu", [("0", 1), ("0", 1)], workers=1).status == "pass"  # one worker: both on the one GPU
    assert sweep("two_gpus", [("0", 1), ("1", 1)], workers=2).status == "pass"
    shared = sweep("shared", [("0", 1), ("0", 1)], workers=2)
    assert shared.status == "fail" and "share a GPU (0, 0)" in shared.error
    unpinned = sweep("unpinned", [("0,1", 2), ("1", 1)], workers=2)
    assert unpinned.status == "fail" and "pinned to '0,1'" in unpinned.error and "sees 2 GPUs" in unpinned.error


def test_the_error_line_of_a_failed_run(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("seed 0: start\nTraceback (most recent call last):\n  File \"x\", line 1\n"
                   "tensorflow.python.framework.errors_impl.ResourceExhaustedError: Graph execution error:\n"
                   "OOM when allocating tensor with shape[2048,64,32,32] and type float\n  [[{{node conv}}]]\n")
    assert gpu_check.error_line(log, 1) == ("OOM when allocating tensor with shape[2048,64,32,32] and type float "
                                            "(exit status 1)")
    log.write_text("error: optimizer.beta must be in [0, 1), got 2\n")
    assert gpu_check.error_line(log, 2) == "error: optimizer.beta must be in [0, 1), got 2 (exit status 2)"
    log.write_text("Traceback\nKeyError: 'x'\nwhile exiting\n")
    assert gpu_check.error_line(log, 1) == "KeyError: 'x' (exit status 1)"
    log.write_text("")
    assert gpu_check.error_line(log, -9) == "killed by SIGKILL"


def test_the_optimizers_are_read_from_the_registry_at_run_time():
    registry.add_optimizer("toy_keras_sgd", keras="keras.optimizers.SGD", engine=None, learning_rate=0.1)
    registry.add_optimizer("toy_small_only", keras=None, engine="keras")
    try:
        names = gpu_check.parse_args([]).optimizers
    finally:
        registry.remove("optimizer", "toy_keras_sgd")
        registry.remove("optimizer", "toy_small_only")
    assert "toy_keras_sgd" in names and "toy_small_only" not in names
    assert set(names) - {"toy_keras_sgd"} == {n for n in registry.names("optimizer")
                                             if registry.optimizer(n).runs_on_models}


@pytest.mark.parametrize("argv, says", [
    (["--optimizers", "lbfgs"], "--optimizers must name optimizers with a keras: entry"),
    (["--tasks", "rosenbrock"], "--tasks must name image tasks"),
    (["--timing", "resnet18_cifar10"], "--timing must be TASK:BATCH pairs"),
    (["--timing", "resnet18_cifar10:0"], "--timing must be TASK:BATCH pairs with a batch >= 1"),
    (["--warmup", "0"], r"--warmup must be an integer in \[1, 100\], got 0"),
    (["--jobs", "0"], r"--jobs must be an integer in \[1, 64\]"),
    (["--time-limit", "0"], "--time-limit must be a positive number"),
    (["--device", "/TPU:0"], "--device must be /GPU:k or /CPU:0"),
])
def test_bad_settings_are_one_line_value_errors(argv, says):
    with pytest.raises(ValueError, match=says) as caught:
        gpu_check.parse_args(argv)
    assert "\n" not in str(caught.value)


def test_a_gpu_the_machine_lacks_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = gpu_check.parse_args(["--device", "/GPU:2"])
    with pytest.raises(ValueError, match=r"--device must be one of /GPU:0 … /GPU:1 on this machine, got '/GPU:2'"):
        gpu_check.plan(args, FAKE_GPUS, tmp_path)


@pytest.mark.slow
@pytest.mark.long
def test_the_real_runner_on_cpu(tmp_path, monkeypatch):
    """The runner itself: its summary, its chunk times, the allocator's peak, a real joblib sweep (fake GPU ids)."""
    monkeypatch.setattr(gpu_check, "find_gpus", lambda: FAKE_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    out = tmp_path / "gpu_check.md"
    code = gpu_check.main(["--out", str(out), "--device", "/CPU:0", "--tasks", "pixelcnn_mnist",
                           "--optimizers", "adam,lodo,yogi", "--timing", "pixelcnn_mnist:2", "--warmup", "1",
                           "--timed-steps", "2", "--steps", "2", "--batch", "2", "--jobs", "2", "--time-limit", "900",
                           "--runs-dir", str(tmp_path / "runs")])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| pixelcnn_mnist | 2 |"))
    adam_ms, lodo_ms, ratio = (float(v) for v in row.split(" | ")[2:5])
    assert adam_ms > 0 and lodo_ms > 0 and ratio == pytest.approx(lodo_ms / adam_ms, abs=0.01), text
    assert "| yogi | pixelcnn_mnist | pass |" in text
    for optimizer in ("adam", "lodo"):  # the allocator's peak, read as the runner's process exited
        assert re.search(rf"\| {optimizer} \| pixelcnn_mnist \| 2 \| \d+\.\d\d GiB \| pass \|", text), text
    # CPU TensorFlow sees no GPU in the jobs: each is pinned to one id, and the check says it saw 0
    assert "| seed_0 |" in text and "sees 0 GPUs in TensorFlow, not 1" in text
    assert sorted(line.split(" | ")[2] for line in text.splitlines() if line.startswith("| seed_")) == ["3", "5"]
    assert code == 1

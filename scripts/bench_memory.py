"""Memory of LODO against Adam: optimizer state per parameter, peak RSS, step time -> results/bench_memory.md.

    python scripts/bench_memory.py                       # ResNet-18 at batch 32 (LODO needs ~22 GB)
    python scripts/bench_memory.py --n 1000000 2000000   # synthetic linear models of about n parameters
    python scripts/bench_memory.py --n 1000000 2000000 --resnet   # both

Every (model, optimizer) pair runs in a fresh Python process, so that its peak
resident set size (``ru_maxrss``) is its own. A run builds the model, then the
optimizer, then takes ``--steps`` full training steps (forward, backward,
optimizer; the first one compiles) on a fixed synthetic batch. Reported per run:
the optimizer's state counted from its variables, the XLA scratch memory of
LODO's compiled programs (from their buffer assignment), the peak RSS and the
peak RSS minus the RSS before the optimizer was built (what the optimizer and
its step added), per trained parameter, and the median step time after the
first. With several ``--n`` the per-parameter cost is fitted linearly and
extrapolated to ResNet-18.

A run that would not fit in the memory available now (or in ``--max-gb``) is
skipped (it says so, with the estimate, on stderr and in the table) instead of
pushing a shared machine into swap or the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESNET18_PARAMS = 11_173_962  # the trainable parameters of the CIFAR ResNet-18 (tasks.resnet18_cifar10)
# Per-parameter bytes of a lean LODO step (state 1,668 B + scratch), for the refusal check only.
LODO_BYTES_PER_PARAM = 1_900
BASE_BYTES = 1.5e9  # TensorFlow, Keras and the model's activations, roughly


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- one run, in a child process ----------------------------------------------------------------------

def linear_model(n: int):
    """A dense layer to 10 classes with about ``n`` parameters (10·d weights + 10 biases)."""
    import keras

    inputs = max(1, (n - 10) // 10)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(10)])
    return model, inputs


def run_child(spec: dict) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    from lodo import LODO

    batch = spec["batch"]
    if spec["model"] == "resnet18":
        from lodo.experiment import registry

        task = registry.build_task("resnet18_cifar10", data={"source": "synthetic"}, batch_size=batch)
        model = task.build_model(0)
        x, y = task.train_batch(0, tf.constant(0, tf.int64))
        loss_fn = lambda logits: tf.reduce_mean(task.per_example_loss(y, logits)) + task.regularization(model)
    else:
        model, inputs = linear_model(spec["n"])
        x = tf.random.stateless_normal([batch, inputs], [0, 1])
        y = tf.random.stateless_uniform([batch], [0, 2], 0, 10, tf.int64)
        loss_fn = lambda logits: tf.reduce_mean(
            tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    variables = model.trainable_variables
    num_params = int(sum(np.prod(v.shape) for v in variables))
    before = rss_bytes()

    if spec["optimizer"] == "lodo":
        optimizer = LODO(initial_lr=0.1725, meta_lr=0.0001134, beta=0.9490, seed=0, plan=spec["plan"])
    else:
        optimizer = keras.optimizers.Adam(1e-3)
    started = time.perf_counter()
    optimizer.build(variables)
    build_s = time.perf_counter() - started
    after_build = rss_bytes()

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    times = []
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        loss = float(train_step())
        times.append(time.perf_counter() - started)
    result = {
        **spec,
        "num_params": num_params,
        "state_bytes": int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in optimizer.variables)),
        "rss_before_optimizer": before,
        "rss_after_build": after_build,
        "peak_rss": peak_rss_bytes(),
        "build_s": build_s,
        "first_step_s": times[0],
        "step_s": float(np.median(times[1:])) if len(times) > 1 else times[0],
        "loss": loss,
    }
    if spec["optimizer"] == "lodo":
        plan = optimizer.plan
        result["plan_used"] = (f"{plan.segment} layer(s) per segment, "
                               f"{'p and p⁻¹ kept' if plan.inverse else 'p⁻¹ kept, p rebuilt in each step'}")
        result["scratch"] = optimizer._core.compiled_memory(optimizer._layer_state, variables)
    return result


# --- the parent: runs, table, extrapolation -------------------------------------------------------------

def estimate(spec: dict) -> float:
    n = RESNET18_PARAMS if spec["model"] == "resnet18" else spec["n"]
    per_param = LODO_BYTES_PER_PARAM if spec["optimizer"] == "lodo" else 16
    return BASE_BYTES + n * per_param


def launch(spec: dict) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"run {spec} failed (exit {out.returncode}): " + " | ".join(tail))
    return json.loads(out.stdout.strip().splitlines()[-1])


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def report(results: list[dict], args) -> str:
    from lodo.experiment.provenance import cpu_model

    rows = []
    for r in results:
        if r.get("skipped"):
            rows.append(f"| {r['model']} | {r['optimizer']} | {r['num_params']:,} | skipped: needs about "
                        f"{gb(r['need'])} GB, {gb(r['free'])} GB were available | | | | | | |")
            continue
        n = r["num_params"]
        added = r["peak_rss"] - r["rss_before_optimizer"]
        scratch = max(r["scratch"].values()) / n if r.get("scratch") else 0.0
        rows.append(f"| {r['model']} | {r['optimizer']} | {n:,} | {r['state_bytes'] / n:,.0f} | {scratch:,.0f} | "
                    f"{gb(r['rss_after_build'])} | {gb(r['peak_rss'])} | {added / n:,.0f} | {r['step_s']:.2f} | "
                    f"{r['first_step_s']:.1f} |")
    lines = [
        "# Memory: LODO against Adam",
        "",
        "Generated by `scripts/bench_memory.py`. Each row is a fresh process: build the model, then the "
        f"optimizer, then {args.steps} full training steps (forward, backward, optimizer) at batch {args.batch} "
        "on a fixed synthetic batch.",
        "",
        "- *state*: the optimizer's variables (for LODO: blocks φ, the meta-Adam moments of φ, permutations, "
        "momentum; Keras's iteration count and learning rate), bytes per trained parameter.",
        "- *scratch*: the largest XLA scratch allocation of LODO's compiled programs (one segment's "
        "recomputed inputs, the cotangent, scatter buffers), from the programs' buffer assignment; the "
        "updated variables are aliased in place and add nothing.",
        "- *peak RSS*: `ru_maxrss` of the process; *added*: peak RSS minus the RSS before the optimizer "
        "was built, per parameter (state, scratch, the step's gradients and TensorFlow's own buffers).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, "
        f"{gb(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} GB RAM, shared with other jobs "
        "(step times are slower than on an idle machine).",
        "",
        "| model | optimizer | parameters | state B/param | scratch B/param | RSS after build GB | peak RSS GB "
        "| added B/param | step s | first step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    plans = {r["plan_used"] for r in results if r.get("plan_used")}
    if plans:
        lines += [f"LODO's memory plan (`--plan {args.plan}`): {'; '.join(sorted(plans))}.", ""]
    lodo = sorted((r for r in results if r["optimizer"] == "lodo" and r["model"] == "linear"
                   and not r.get("skipped")),
                  key=lambda r: r["num_params"])
    if len(lodo) >= 2:
        a, b = lodo[0], lodo[-1]
        slope = (b["peak_rss"] - a["peak_rss"]) / (b["num_params"] - a["num_params"])
        base = a["peak_rss"] - slope * a["num_params"]
        state = b["state_bytes"] / b["num_params"]
        lines += [
            "## Extrapolation to ResNet-18",
            "",
            f"A line through the LODO runs' peak RSS: {base / 1e9:.2f} GB + {slope:,.0f} B per parameter "
            f"(state {state:,.0f} B of it). For ResNet-18's {RESNET18_PARAMS:,} parameters that predicts "
            f"**{gb(base + slope * RESNET18_PARAMS)} GB** peak RSS for the LODO step, before the CNN's own "
            "activations at batch 32 (a few hundred MB) and the difference between the models' TensorFlow "
            "overheads.",
            "",
        ]
        measured = [r for r in results if r["model"] == "resnet18" and r["optimizer"] == "lodo"
                    and not r.get("skipped")]
        if measured:
            lines += [f"Measured above on ResNet-18: {gb(measured[0]['peak_rss'])} GB.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", help="synthetic linear models of about these sizes "
                        "instead of ResNet-18")
    parser.add_argument("--resnet", action="store_true", help="with --n, also run ResNet-18")
    parser.add_argument("--max-gb", type=float, help="skip runs estimated to need more than this many GB "
                        "(on a shared machine; by default only the memory available now limits them)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (the first compiles)")
    parser.add_argument("--optimizers", default="lodo,adam")
    parser.add_argument("--plan", default="auto", help="LODO's memory plan: auto, fast or lean")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_memory.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be positive integers")
    if args.n and min(args.n) < 11:
        parser.error(f"--n must be at least 11 (a dense layer to 10 classes), got {min(args.n)}")
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - {"lodo", "adam"})
    if unknown:
        parser.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from lodo, adam")

    base = dict(batch=args.batch, steps=args.steps, plan=args.plan)
    specs = [dict(base, model="linear", n=n, optimizer=o) for n in args.n or [] for o in names]
    if not args.n or args.resnet:
        specs += [dict(base, model="resnet18", n=None, optimizer=o) for o in names]
    results = []
    for spec in specs:
        need, free = estimate(spec), available_bytes()
        if args.max_gb is not None:
            free = min(free, args.max_gb * 1e9) if free else args.max_gb * 1e9
        if free and need > free:
            print(f"skipped {spec['model']} {spec['optimizer']}: needs about {gb(need)} GB, {gb(free)} GB "
                  "available now; run it on a machine with more free memory", file=sys.stderr)
            results.append(dict(spec, skipped=True, need=need, free=free,
                                num_params=RESNET18_PARAMS if spec["model"] == "resnet18" else spec["n"]))
            continue
        result = launch(spec)
        results.append(result)
        print(f"{result['model']} {result['optimizer']} n={result['num_params']:,}: peak RSS "
              f"{gb(result['peak_rss'])} GB, state {result['state_bytes'] / result['num_params']:,.0f} B/param, "
              f"step {result['step_s']:.2f} s", file=sys.stderr)
    if all(r.get("skipped") for r in results):
        print("nothing ran", file=sys.stderr)
        return 1
    from lodo.experiment.outputs import atomic_write_text

    text = report(results, args)
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

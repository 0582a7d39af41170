"""LODO's training-step time against Adam's on an image model -> results/bench_step.md.

    python scripts/bench_step.py [--task pixelcnn_mnist] [--batch 256] [--steps 5] [--rounds 6] [--plan auto]

A step is what a run pays per batch: forward, backward and the optimizer, in one
``tf.function`` (no XLA around the model: on CPU it slows the convolutions down;
LODO compiles its own core). The batch is fixed (synthetic data of the task's
shapes), so input loading is not timed. Adam and LODO each get their own copy of
the model and take turns, ``--steps`` steps at a time for ``--rounds`` rounds, so
that a machine shared with other jobs slows both alike; the table gives the median
and the fastest round of each, and the ratio of the medians. The optimizer alone
(``apply_gradients`` on a fixed gradient) is timed the same way. With
``--reference``, LODO through ``lodo.algorithm.update`` itself (the functional
reference, not compiled: the Keras path of the ablations) is timed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent

import keras
import numpy as np
import tensorflow as tf

from lodo import LODO
from lodo.experiment import provenance
from lodo.experiment.outputs import atomic_write_text
from lodo.experiment import registry

# The image-generation values of the paper's Table 6 (SPEC §4.2); they do not change the timing.
LODO_HP = dict(initial_lr=0.08459 / 2, meta_lr=7.946e-6, beta=0.9343)


class ReferenceLODO(LODO):
    """LODO on the functional reference path (``lodo.algorithm.update`` per step) instead of the layerwise core."""

    layerwise = property(lambda self: False)


def make_optimizer(name: str, plan: str):
    if name == "adam":
        return keras.optimizers.Adam(1e-3)
    cls = ReferenceLODO if name == "lodo_reference" else LODO
    return cls(**LODO_HP, seed=0, plan=plan)


class Contestant:
    """One optimizer with its own model, compiled training step and optimizer-only step."""

    def __init__(self, name: str, task, batch, plan: str):
        self.name = name
        self.model = task.build_model(0)
        self.optimizer = make_optimizer(name, plan)
        self.optimizer.build(self.model.trainable_variables)
        x, y = batch
        variables = self.model.trainable_variables

        @tf.function
        def train_step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(task.per_example_loss(y, self.model(x, training=True)))
            self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        grads = [tf.random.stateless_normal(v.shape, [1, i], dtype=v.dtype) * 1e-4 for i, v in enumerate(variables)]

        @tf.function
        def optimizer_step():
            self.optimizer.apply_gradients(zip(grads, variables))
            return variables[0][(0,) * len(variables[0].shape)]

        self.steps = {"train": train_step, "optimizer": optimizer_step}
        self.times = {"train": [], "optimizer": []}

    def run(self, kind: str, count: int) -> None:
        start = time.perf_counter()
        for _ in range(count):
            out = self.steps[kind]()
        out.numpy()  # waits for the last step
        self.times[kind].append((time.perf_counter() - start) / count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pixelcnn_mnist")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="steps per optimizer per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--plan", default="auto", help="LODO's memory plan: auto, fast or lean")
    parser.add_argument("--reference", action="store_true",
                        help="also time LODO on the functional reference path (lodo.algorithm.update)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_step.md")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")

    task = registry.build_task(args.task, data={"source": "synthetic"}, batch_size=args.batch)
    batch = task.train_batch(0, tf.constant(0, tf.int64))
    load_before = os.getloadavg()
    names = ["adam", "lodo"] + (["lodo_reference"] if args.reference else [])
    contestants = [Contestant(name, task, batch, args.plan) for name in names]
    for c in contestants:  # compile, and one step each to settle allocations
        c.run("train", 2)
        c.run("optimizer", 2)
        c.times = {"train": [], "optimizer": []}
    for _ in range(args.rounds):
        for kind in ("train", "optimizer"):
            for c in contestants:
                c.run(kind, args.steps)
    load_after = os.getloadavg()

    adam, lodo = contestants[:2]
    num_params = int(sum(np.prod(v.shape) for v in adam.model.trainable_variables))
    med = {(c.name, k): statistics.median(c.times[k]) * 1e3 for c in contestants for k in c.times}
    best = {(c.name, k): min(c.times[k]) * 1e3 for c in contestants for k in c.times}
    ratio = med[("lodo", "train")] / med[("adam", "train")]
    overhead = med[("lodo", "optimizer")] - med[("adam", "optimizer")]
    plan = lodo.optimizer.plan
    rows = [
        f"| {kind} | {med[('adam', kind)]:.1f} ({best[('adam', kind)]:.1f}) | "
        f"{med[('lodo', kind)]:.1f} ({best[('lodo', kind)]:.1f}) | "
        f"{med[('lodo', kind)] / med[('adam', kind)]:.2f} |"
        + (f" {med[('lodo_reference', kind)]:.1f} ({best[('lodo_reference', kind)]:.1f}) |" if args.reference else "")
        for kind in ("train", "optimizer")
    ]
    busy = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    text = "\n".join([
        "# LODO step time against Adam",
        "",
        "Generated by `scripts/bench_step.py`. Milliseconds per step: median over "
        f"{args.rounds} rounds of {args.steps} steps (fastest round in brackets); the two optimizers "
        "take turns on their own copies of the model, on one fixed synthetic batch.",
        "",
        f"Task `{args.task}`, {num_params:,} parameters, batch {args.batch}. LODO: N = {lodo.optimizer.num_layers}, "
        f"k = {lodo.optimizer.block_size}, memory plan: {plan.segment} layer(s) per compiled program, "
        f"{'p and p⁻¹ kept' if plan.inverse else 'p⁻¹ kept, p rebuilt in each step'}.",
        "",
        f"Machine: {provenance.cpu_model()}, {os.cpu_count()} logical CPUs; TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}. Load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after"
        + (": above the CPU count, so other jobs shared the machine and every number is slower than on an idle one."
           if busy else "."),
        "",
        "| step | Adam ms | LODO ms | LODO / Adam |" + (" LODO via `algorithm.update` ms |" if args.reference else ""),
        "|---|---|---|---|" + ("---|" if args.reference else ""),
        *rows,
        "",
        f"Full training step, LODO / Adam: **{ratio:.2f}x**. LODO's optimizer costs {overhead:.1f} ms per step "
        "more than Adam's.",
        "",
    ])
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step time of every image-task optimizer, and the cost of a checkpoint -> results/bench_images.md.

    python scripts/bench_images.py [--task pixelcnn_mnist] [--batch 256] [--steps 30] [--optimizers adam,lodo]

Synthetic data of the task's shapes (``task.data.source=synthetic``): the
step time of a model does not depend on pixel values. Every optimizer is timed
in the same process, in turn, through the trainer's own compiled chunk (so
what is measured is what a run pays), after one warm-up chunk that compiles.
The checkpoint row times ``RunCheckpoint.save`` of the LODO run's full state
and expresses it as a fraction of the default checkpoint interval.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from lodo.experiment import provenance

TABLE2 = ["adam", "momentum", "rmsprop", "yogi", "lars", "lodo", "lodo_diagonal", "lodo_global", "lodo_residuals",
          "lodo_no_momentum", "lodo_sgd"]
TABLE4 = ["adam", "momentum", "rmsprop", "yogi", "lars", "lodo"]


def compose(task: str, optimizer: str, batch: int):
    from hydra import compose as hydra_compose, initialize_config_dir

    from lodo.experiment.registry import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[f"task={task}", f"optimizer={optimizer}", "task.data.source=synthetic",
                                                  f"task.batch_size={batch}", "num_seeds=1", "steps=1000"])


def time_optimizer(task_name: str, optimizer: str, batch: int, steps: int, repeats: int) -> dict:
    import tensorflow as tf

    from lodo.experiment.keras_trainer import KerasSeedRunner, build_task

    cfg = compose(task_name, optimizer, batch)
    task = build_task(cfg)
    trainer = KerasSeedRunner(cfg, task, tf.distribute.get_strategy(), seed=0)
    trainer.compile()
    trainer.train(2)  # the first steps (allocations, input pipeline warm-up) are not timed
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer.train(steps)
        times.append((time.perf_counter() - started) / steps)
    per_step = float(np.median(times))
    return {"optimizer": optimizer, "ms_per_step": 1000 * per_step, "steps_per_s": 1 / per_step,
            "state_bytes_per_param": trainer.state_bytes() / trainer.num_params, "num_params": trainer.num_params,
            "trainer": trainer, "cfg": cfg}


def checkpoint_cost(result: dict) -> dict:
    from lodo.experiment.checkpoints import RunCheckpoint

    trainer, cfg = result["trainer"], result["cfg"]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = RunCheckpoint(Path(folder), keep=cfg.checkpoint.keep, every_s=cfg.checkpoint.every_s,
                                   **trainer.trackables())
        record = {"trace_losses": np.zeros((300_000, 1))}  # a long run's losses, as the training loop saves them
        durations = []
        for i in range(3):
            started = time.perf_counter()
            checkpoint.save(i, record)
            durations.append(time.perf_counter() - started)
    save_s = float(np.median(durations))
    return {"save_s": save_s, "every_s": float(cfg.checkpoint.every_s),
            "overhead": save_s / float(cfg.checkpoint.every_s)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--task", default="pixelcnn_mnist", choices=["pixelcnn_mnist", "resnet18_cifar10"])
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (pixelcnn), 32 (resnet18)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimizers", default=None, help="comma-separated (default: the task's table)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file (default: results/bench_<task>.md)")
    args = parser.parse_args(argv)
    resnet = args.task == "resnet18_cifar10"
    batch = args.batch or (32 if resnet else 256)
    steps = args.steps or (3 if resnet else 20)
    names = args.optimizers.split(",") if args.optimizers else (TABLE4 if resnet else TABLE2)
    rows, checkpoint = [], None
    for name in names:
        result = time_optimizer(args.task, name, batch, steps, args.repeats)
        print(f"{name}: {result['ms_per_step']:.1f} ms/step", flush=True)
        if name == "lodo":
            checkpoint = checkpoint_cost(result)
        rows.append({k: v for k, v in result.items() if k not in ("trainer", "cfg")})
    adam = next((r["ms_per_step"] for r in rows if r["optimizer"] == "adam"), None)
    lines = [f"# Image-task step time: {args.task}, batch {batch}, CPU\n",
             f"{provenance.cpu_model()}, {len(os.sched_getaffinity(0))} cores; "
             f"median of {args.repeats} chunks of {steps} steps after a compiling warm-up; synthetic data of the "
             f"task's shapes; {rows[0]['num_params']:,} trainable parameters.\n",
             "| optimizer | ms/step | steps/s | × Adam | optimizer state bytes/param |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ms_per_step'] / adam:.2f}" if adam else "–"
        lines.append(f"| {r['optimizer']} | {r['ms_per_step']:.1f} | {r['steps_per_s']:.2f} | {ratio} | "
                     f"{r['state_bytes_per_param']:.0f} |")
    if checkpoint:
        lines.append(f"\nCheckpoint of the LODO run (model, optimizer state, a 300k-step host record): "
                     f"{checkpoint['save_s']:.2f} s per save; at the default interval of {checkpoint['every_s']:.0f} s "
                     f"that is {100 * checkpoint['overhead']:.2f}% of training time.")
    text = "\n".join(lines) + "\n"
    out = args.out or Path("results") / f"bench_{args.task}.md"
    from lodo.experiment.outputs import atomic_write_text

    atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

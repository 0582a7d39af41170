"""The image-task trainer: one Keras model per seed, any Keras optimizer, any ``tf.distribute`` strategy.

Timing rules live here, once (as in ``lodo.experiment.engine`` for the small tasks): the
clock runs only while compiled training steps run (read after their losses
are on the host), never during compilation, validation, test evaluation or
checkpointing. A run trains until it has done ``steps`` steps *and* (if set)
``time_budget_s`` seconds of training; both are milestones, where the test
metrics are evaluated and a checkpoint is written.

Training batches are a pure function of (seed, step) (``ImageTask.train_batch``),
so a run resumed from a checkpoint at step N continues exactly as an
uninterrupted one. Under a strategy with R replicas every input pipeline
builds the global batch and hands replica r its r-th slice, so the
distributed run sees the same examples as a single device.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lodo.experiment.engine import ChunkClock
from lodo.experiment import registry
from lodo.experiment.cli import ConfigError

FIRST_CHUNK = 2  # the first call compiles; keep it short so compilation is not mistaken for training time
MAX_CHUNK = 100  # steps per compiled call at most: bounds the time-milestone and SIGTERM latency


@dataclass
class SeedRecord(ChunkClock):
    """Everything measured for one seed, on the host; also the checkpoint's metadata."""

    seed: int
    losses: list = field(default_factory=list)  # training loss at every step
    chunk_ends: list = field(default_factory=list)  # [steps_done, train_time_s] after each chunk
    validation: list = field(default_factory=list)  # [step, train_time_s, val_loss]
    milestones: dict = field(default_factory=dict)  # "steps" / "time" -> metrics
    diverged_at: int | None = None
    compile_time_s: float = 0.0
    others_cpu: list = field(default_factory=list)  # [wall s, CPU s of other processes] of each training chunk

    def window_loss(self, steps: int) -> tuple[float, list]:
        """Mean training loss over the last 1% of ``steps`` steps (SPEC §5) and that window."""
        start = steps - max(1, steps // 100)
        values = np.asarray(self.losses[start:steps], dtype=np.float64)
        return (float(values.mean()) if len(values) else math.nan), [start, steps]

    def to_json(self) -> dict:
        return {"seed": self.seed, "losses": [float(v) for v in self.losses], "chunk_ends": self.chunk_ends,
                "validation": self.validation, "milestones": self.milestones, "diverged_at": self.diverged_at,
                "compile_time_s": self.compile_time_s, "others_cpu": self.others_cpu}

    @classmethod
    def from_json(cls, data: dict) -> "SeedRecord":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})  # older records lack "others_cpu"


def _check_image_settings(cfg: DictConfig) -> None:
    for key in ("test_size", "max_batch_size", "eval_every"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key} must be a positive integer or null, got {value!r}")


def build_task(cfg: DictConfig):
    """The task of ``cfg`` with its data loaded, or a one-line ConfigError."""
    from tasks.image_base import DataError

    task_options = registry.task_options(cfg.task)
    if cfg.get("max_batch_size") and "batch_size" in task_options:
        task_options["batch_size"] = min(task_options["batch_size"], cfg.max_batch_size)
    try:
        task = registry.build_task(cfg.task.name, **task_options, test_size=cfg.get("test_size"))
        task.load()
    except DataError as err:
        raise ConfigError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"task {cfg.task.name}: {err}") from None
    return task


def build_optimizer(cfg: DictConfig, seed: int):
    try:
        return registry.build_keras_optimizer(cfg.optimizer.name, seed=seed, **registry.optimizer_options(cfg.optimizer))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


class SeedTrainer:
    """One seed's model, optimizer, input pipeline and compiled training chunk."""

    def __init__(self, cfg: DictConfig, task, strategy, seed: int):
        import tensorflow as tf

        self.cfg, self.task, self.strategy, self.seed = cfg, task, strategy, seed
        self.replicas = strategy.num_replicas_in_sync
        self.global_batch = task.batch_size
        if self.global_batch % self.replicas:
            raise ConfigError(f"task.batch_size={self.global_batch} is not divisible by the {self.replicas} "
                                f"replicas of distribute={cfg.distribute.name}; choose a multiple of {self.replicas}")
        with strategy.scope():
            self.model = task.build_model(seed)
            self.optimizer = build_optimizer(cfg, seed)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.num_params = int(sum(np.prod(v.shape) for v in self.model.trainable_variables))
        self._chunk = tf.function(self._train_chunk)
        self._validate = tf.function(lambda x, y: tf.reduce_sum(task.per_example_loss(y, self.model(x, training=False))))

    # -- input ------------------------------------------------------------------------------------
    def dataset(self, start: int):
        """Batches from step ``start`` on, already split among the replicas of this worker."""
        import tensorflow as tf

        task, seed, replicas = self.task, self.seed, self.replicas
        per_replica = self.global_batch // replicas

        def global_batch(step):
            return task.train_batch(seed, step)

        if self.replicas == 1 and not isinstance(self.strategy, (tf.distribute.MirroredStrategy,
                                                                tf.distribute.MultiWorkerMirroredStrategy)):
            ds = tf.data.Dataset.range(start, 2**62).map(global_batch, num_parallel_calls=tf.data.AUTOTUNE)
            return iter(ds.prefetch(tf.data.AUTOTUNE))

        def per_worker(context: tf.distribute.InputContext):
            local = replicas // context.num_input_pipelines
            first = context.input_pipeline_id * local

            def slices(step):
                x, y = global_batch(step)
                split = lambda t: tf.reshape(t, [replicas, per_replica, *t.shape[1:]])[first:first + local]
                return split(x), split(y)

            ds = tf.data.Dataset.range(start, 2**62).map(slices, num_parallel_calls=tf.data.AUTOTUNE)
            # Elements go to this worker's replicas in turn, so unbatching the slices in order hands
            # replica r its r-th slice of every step.
            return ds.unbatch().prefetch(tf.data.AUTOTUNE)

        return iter(self.strategy.distribute_datasets_from_function(per_worker))

    # -- training ---------------------------------------------------------------------------------
    def _replica_step(self, x, y):
        import tensorflow as tf

        model, task = self.model, self.task
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            data_loss = tf.nn.compute_average_loss(task.per_example_loss(y, logits),
                                                   global_batch_size=self.global_batch)
            loss = data_loss + tf.cast(task.regularization(model), data_loss.dtype) / self.replicas
        grads = tape.gradient(loss, model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def _train_chunk(self, iterator, count):
        import tensorflow as tf

        losses = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            x, y = next(iterator)
            per_replica = self.strategy.run(self._replica_step, args=(x, y))
            loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            losses = losses.write(i, tf.cast(loss, tf.float32))
        self.step.assign_add(tf.cast(count, tf.int64))
        return losses.stack()

    def train(self, iterator, count: int) -> np.ndarray:
        import tensorflow as tf

        return self._chunk(iterator, tf.constant(count, tf.int32)).numpy()

    def validation_loss(self) -> float | None:
        data = self.task.validation_data()
        if data is None:
            return None
        total, count = 0.0, 0
        for x, y in data:
            total += float(self._validate(x, y))
            count += int(y.shape[0])
        return total / count

    def state_bytes(self) -> int:
        return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in self.optimizer.variables))


def _milestone(trainer: SeedTrainer, record: SeedRecord, kind: str, writer) -> None:
    """Evaluate the test metrics at the current step and store them under ``kind``."""
    import tensorflow as tf

    steps = record.steps_done
    loss, window = record.window_loss(steps)
    metrics = {"step": steps, "train_time_s": record.train_time_s, "train_loss": loss, "window": window}
    if record.diverged_at is None:
        started = time.perf_counter()
        metrics.update(trainer.task.evaluate(trainer.model))
        metrics["eval_time_s"] = time.perf_counter() - started
        with writer.as_default(step=steps):
            for key, value in metrics.items():
                if key.startswith("test_") and isinstance(value, float):
                    tf.summary.scalar(f"test/{key[5:]}", value)
    record.milestones[kind] = metrics


def train_seed(cfg: DictConfig, task, strategy, seed: int, out_dir: Path) -> tuple[SeedRecord, SeedTrainer]:
    """Train one seed to its milestones, resuming from its newest checkpoint if there is one."""
    import tensorflow as tf
    from tqdm import tqdm

    from lodo.experiment import preemption, provenance
    from lodo.experiment.checkpoints import RunCheckpoint

    steps, budget = cfg.steps, cfg.time_budget_s
    eval_every = cfg.get("eval_every") or max(1, steps // 20)
    trainer = SeedTrainer(cfg, task, strategy, seed)
    checkpoint = RunCheckpoint(out_dir / "checkpoints" / f"seed_{seed}", keep=cfg.checkpoint.keep,
                               every_s=cfg.checkpoint.every_s, model=trainer.model, optimizer=trainer.optimizer,
                               step=trainer.step)
    record = SeedRecord(seed)
    if cfg.checkpoint.resume:
        metadata = checkpoint.restore()
        if metadata is not None:
            record = SeedRecord.from_json({**metadata["record"], "losses": metadata["losses"].tolist()})
            print(f"seed {seed}: resumed from step {record.steps_done}", flush=True)
    writer = tf.summary.create_file_writer(str(out_dir / "tb" / f"seed_{seed}"))
    bar = tqdm(total=steps, initial=min(record.steps_done, steps), unit="step", dynamic_ncols=True,
               desc=f"{cfg.optimizer.name} on {cfg.task.name} seed {seed}", disable=not cfg.progress,
               mininterval=0.5 if sys.stderr.isatty() else 30)

    def save():
        # The per-step losses go to the checkpoint's .npz: as JSON a long run's list costs seconds per save.
        host = record.to_json()
        losses = np.asarray(host.pop("losses"), dtype=np.float32)
        checkpoint.save(record.steps_done, {"record": host, "losses": losses})

    def finished() -> bool:
        if record.diverged_at is not None:
            return True
        return record.steps_done >= steps and (budget is None or record.train_time_s >= budget)

    iterator = trainer.dataset(record.steps_done)
    with preemption.Preemption() as guard:
        while not finished():
            done = record.steps_done
            next_eval = (done // eval_every + 1) * eval_every
            limit = next_eval if done >= steps else min(next_eval, steps)
            count = max(1, min(limit - done, MAX_CHUNK, FIRST_CHUNK if not record.chunk_ends else MAX_CHUNK))
            cpu_before, started = provenance.cpu_seconds(), time.perf_counter()
            losses = trainer.train(iterator, count)
            elapsed = time.perf_counter() - started
            others = provenance.others_cpu(cpu_before, provenance.cpu_seconds())
            if not record.chunk_ends and record.compile_time_s == 0.0:
                record.compile_time_s = elapsed  # the first call traces and compiles: not training time
                elapsed = 0.0
            else:
                record.others_cpu.append([elapsed, others])
            record.losses.extend(float(v) for v in losses)
            record.chunk_ends.append([done + count, record.train_time_s + elapsed])
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                record.diverged_at = done + int(bad[0])
            bar.update(min(record.steps_done, steps) - bar.n)
            recent = np.asarray(record.losses[-max(1, min(len(record.losses), eval_every)):])
            bar.set_postfix(loss=f"{np.mean(recent):.4g}", train_s=f"{record.train_time_s:.0f}")
            with writer.as_default(step=record.steps_done):
                tf.summary.scalar("train/loss", float(np.mean(losses)))
            if record.steps_done % eval_every == 0 and record.diverged_at is None:
                val = trainer.validation_loss()
                if val is not None:
                    record.validation.append([record.steps_done, record.train_time_s, val])
                    with writer.as_default(step=record.steps_done):
                        tf.summary.scalar("validation/loss", val)
            milestone = False
            if "steps" not in record.milestones and (record.steps_done >= steps or record.diverged_at is not None):
                _milestone(trainer, record, "steps", writer)
                milestone = True
            if budget is not None and "time" not in record.milestones and (
                    record.train_time_s >= budget or record.diverged_at is not None):
                _milestone(trainer, record, "time", writer)
                milestone = True
            if milestone or checkpoint.due() or guard.requested:
                save()
            if guard.requested:
                bar.close()
                writer.flush()
                print(f"seed {seed}: stopped at step {record.steps_done} by a termination signal; "
                      f"checkpoint saved, rerun the same command to resume", flush=True)
                guard.exit_for_requeue()
    bar.close()
    writer.flush()
    return record, trainer


def learning_curve(records: list[SeedRecord], log_every: int):
    """Mean training loss over each ``log_every`` steps, per seed, with the training time at its end."""
    import pandas as pd

    rows = []
    for r in records:
        losses = np.asarray(r.losses, dtype=np.float64)
        for stop in range(log_every, len(losses) + 1, log_every):
            rows.append({"seed": r.seed, "step": stop, "train_time_s": float(r.time_at_step(stop)),
                         "loss": float(losses[stop - log_every:stop].mean())})
    return pd.DataFrame(rows, columns=["seed", "step", "train_time_s", "loss"])


def _mean_std(values):
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return None, None
    return float(np.mean(finite)), float(np.std(finite))


def summarize(cfg: DictConfig, task, records: list[SeedRecord], extra: dict) -> dict:
    """summary.json: the step milestone's numbers at the top level, the time milestone under ``time_budget``."""
    seeds = [r.seed for r in records]

    def milestone_summary(kind):
        found = [r.milestones.get(kind, {}) for r in records]
        out = {"steps_per_seed": [m.get("step") for m in found],
               "train_time_s_per_seed": [m.get("train_time_s") for m in found]}
        for key in ("train_loss", "test_loss", "test_accuracy"):
            values = [m.get(key) if r.diverged_at is None else None for m, r in zip(found, records)]
            if any(v is not None for v in values):
                out[f"{key}_mean"], out[f"{key}_std"] = _mean_std(values)
                out[f"{key}_per_seed"] = values
        return out

    at_steps = milestone_summary("steps")
    times = [r.train_time_s for r in records]
    steps_done = [r.steps_done for r in records]
    summary = {
        "task": cfg.task.name,
        "optimizer": cfg.optimizer.name,
        "hyperparameters": registry.optimizer_options(cfg.optimizer),
        "task_options": registry.task_options(cfg.task),
        "steps": cfg.steps,
        "seeds": seeds,
        "loss_final_mean": at_steps.get("train_loss_mean"),
        "loss_final_std": at_steps.get("train_loss_std"),
        "loss_final_per_seed": at_steps.get("train_loss_per_seed"),
        "diverged": sum(r.diverged_at is not None for r in records),
        "diverged_at_per_seed": [r.diverged_at for r in records],
        "num_params": extra["num_params"],
        "train_time_s": float(np.mean(times)),
        "steps_per_s": float(np.sum(steps_done) / np.sum(times)) if np.sum(times) > 0 else None,
        "compile_time_s": float(np.mean([r.compile_time_s for r in records])),
        "completed": True,
        "at_steps": at_steps,
        **extra,
    }
    from lodo.experiment import provenance

    sharing = provenance.cpu_sharing([c for r in records for c in r.others_cpu])
    if sharing is not None:
        summary["cpu_sharing"] = sharing  # were steps_per_s and the time axis measured with the cores to itself?
    for key in ("test_loss", "test_accuracy"):
        if f"{key}_mean" in at_steps:
            summary[key] = at_steps[f"{key}_mean"]
            summary[f"{key}_std"] = at_steps[f"{key}_std"]
            summary[f"{key}_per_seed"] = at_steps[f"{key}_per_seed"]
    images = [r.milestones.get("steps", {}).get("test_images") for r in records]
    if any(images):
        summary["test_images"] = max(i for i in images if i)
    if cfg.time_budget_s is not None:
        summary["time_budget"] = {"seconds": cfg.time_budget_s, **milestone_summary("time")}
    return summary


def format_summary(s: dict) -> str:
    def pm(mean, std, digits=4):
        return "diverged" if mean is None else f"{mean:.{digits}g} ± {std:.2g}"

    lines = [f"{s['optimizer']} on {s['task']}: {len(s['seeds'])} seed(s) x {s['steps']} steps, "
             f"{s['train_time_s']:.1f} s training per seed ({s['steps_per_s']:.2f} steps/s), "
             f"{s['num_params']:,} parameters",
             f"  training loss at {s['steps']} steps: {pm(s['loss_final_mean'], s['loss_final_std'])}"
             + (f"   ({s['diverged']} seed(s) diverged)" if s["diverged"] else "")]
    if "test_loss" in s:
        lines.append(f"  test loss: {pm(s['test_loss'], s['test_loss_std'])}")
    if "test_accuracy" in s:
        lines.append(f"  test accuracy: {pm(s['test_accuracy'], s['test_accuracy_std'])}")
    if "time_budget" in s:
        b = s["time_budget"]
        lines.append(f"  at {b['seconds']} s of training: training loss "
                     f"{pm(b.get('train_loss_mean'), b.get('train_loss_std'))}"
                     + (f", test loss {pm(b['test_loss_mean'], b['test_loss_std'])}" if "test_loss_mean" in b else ""))
    return "\n".join(lines)


def run_image_task(cfg: DictConfig, out_dir: Path) -> dict:
    """Train every seed of one configuration in turn and write the run folder.

    The folder gets ``config.yaml``, ``curve.csv`` (training loss per seed),
    ``validation.csv``, ``summary.json``, ``seed_<s>.json`` (a finished
    seed, so a rerun skips it), ``checkpoints/``, ``tb/`` and the task's
    pictures (from the first seed).
    """
    from lodo.experiment import distribute, outputs

    _check_image_settings(cfg)
    try:
        strategy = distribute.make_strategy(cfg.distribute)  # first TensorFlow call: devices are set up here
    except distribute.DistributeError as err:
        raise ConfigError(str(err)) from None
    task = build_task(cfg)
    build_optimizer(cfg, cfg.seed)  # a bad hyperparameter fails now, not after loading a model
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    seeds = list(range(cfg.seed, cfg.seed + cfg.num_seeds))
    log_every = cfg.log_every or max(1, cfg.steps // 1000)
    records, extra = [], {}
    for seed in seeds:
        done_file = out_dir / f"seed_{seed}.json"
        if done_file.is_file() and cfg.checkpoint.resume:
            stored = json.loads(done_file.read_text())
            records.append(SeedRecord.from_json(stored["record"]))
            extra = stored["extra"]
            print(f"seed {seed}: already finished, read from {done_file}", flush=True)
            continue
        record, trainer = train_seed(cfg, task, strategy, seed, out_dir)
        extra = {**extra, "num_params": trainer.num_params, "optimizer_state_bytes": trainer.state_bytes(),
                 "optimizer_state_bytes_per_param": trainer.state_bytes() / trainer.num_params,
                 "batch_size": task.batch_size, "distribute": distribute.describe(strategy)}
        if seed == seeds[0] and cfg.get("artifacts", True):
            extra["artifacts"] = [str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p)
                                  for p in task.artifacts(trainer.model, out_dir, seed)]
        outputs.write_json(done_file, {"record": record.to_json(), "extra": extra})
        records.append(record)
    import pandas as pd

    outputs.write_csv(out_dir / "curve.csv", learning_curve(records, log_every))
    outputs.write_csv(out_dir / "validation.csv", pd.DataFrame(
        [{"seed": r.seed, "step": s, "train_time_s": t, "val_loss": v} for r in records for s, t, v in r.validation],
        columns=["seed", "step", "train_time_s", "val_loss"]))
    summary = summarize(cfg, task, records, extra)
    outputs.write_json(out_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary

"""The Keras chunk runner for image tasks: one model per seed, any Keras optimizer, any ``tf.distribute`` strategy.

``KerasSeedRunner`` trains one seed's model a given number of steps per compiled
call (``lodo.experiment.chunks``); the timed loop, checkpoints and milestones
around it are the framework's one training loop (``lodo.experiment.loop``).

Training batches are a pure function of (seed, step) (``ImageTask.train_batch``),
so a run resumed from a checkpoint at step N continues exactly as an
uninterrupted one. Under a strategy with R replicas every input pipeline
builds the global batch and hands replica r its r-th slice, so the
distributed run sees the same examples as a single device.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from lodo.experiment import registry
from lodo.experiment.config import ConfigError
from tasks.image_base import DataError

MAX_CHUNK = 100  # steps per compiled call at most: bounds the time-milestone and SIGTERM latency


def build_task(cfg):
    """The image task of ``cfg`` with its data loaded, or a one-line ConfigError."""
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


def build_optimizer(cfg, seed: int):
    try:
        return registry.build_keras_optimizer(cfg.optimizer.name, seed=seed, **registry.optimizer_options(cfg.optimizer))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


class KerasSeedRunner:
    """One seed's model, optimizer, input pipeline and compiled training chunk: a chunk runner."""

    def __init__(self, cfg, task, strategy, seed: int, eval_every: int = 0):
        self.cfg, self.task, self.strategy, self.seed = cfg, task, strategy, seed
        self.max_chunk = min(MAX_CHUNK, int(cfg.get("chunk_size") or MAX_CHUNK))
        self.seeds = (seed,)
        self.eval_every = int(eval_every)
        self._iterator = None
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
        self._chunk = tf.function(self._train_chunk)
        self._validate = tf.function(lambda x, y: tf.reduce_sum(task.per_example_loss(y, self.model(x, training=False))))

    # -- input ------------------------------------------------------------------------------------
    def dataset(self, start: int):
        """Batches from step ``start`` on, already split among the replicas of this worker."""
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
        losses = tf.TensorArray(tf.float32, size=count, element_shape=[])
        for i in tf.range(count):
            x, y = next(iterator)
            per_replica = self.strategy.run(self._replica_step, args=(x, y))
            loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            losses = losses.write(i, tf.cast(loss, tf.float32))
        self.step.assign_add(tf.cast(count, tf.int64))
        return losses.stack()

    # -- the chunk-runner protocol (lodo.experiment.chunks) ------------------------------------------
    def trackables(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "step": self.step}

    def _batches(self):
        if self._iterator is None:  # from the step a restored checkpoint holds
            self._iterator = self.dataset(int(self.step.numpy()))
        return self._iterator

    def compile(self) -> None:
        self._chunk(self._batches(), tf.constant(0, tf.int32)).numpy()

    def train(self, count: int):
        losses = self._chunk(self._batches(), tf.constant(count, tf.int32)).numpy()
        return losses.astype(np.float64)[:, None], None

    def evaluate(self) -> dict:
        data = self.task.validation_data()
        if data is None:
            return {}
        total, count = 0.0, 0
        for x, y in data:
            total += float(self._validate(x, y))
            count += int(y.shape[0])
        return {"val_loss": np.array([total / count])}

    def finish(self, trace) -> None:
        pass

    @property
    def milestone_what(self) -> str:
        """What ``milestone`` evaluates, for the console."""
        size = getattr(self.task, "test_size", None)
        return f"the test set ({size:,} images)" if isinstance(size, int) else "the test set"

    def milestone(self) -> dict:
        """The task's test metrics at a milestone, and how long they took (never training time)."""
        started = time.perf_counter()
        metrics = dict(self.task.evaluate(self.model))
        metrics["eval_time_s"] = time.perf_counter() - started
        return metrics

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.model.trainable_variables))

    def state_bytes(self) -> int:
        return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in self.optimizer.variables))

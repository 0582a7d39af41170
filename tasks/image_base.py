"""What an image task offers the Keras chunk runner (``lodo.experiment.keras_trainer``).

An image task is a Keras model plus data, and knows nothing about
optimizers, flat parameter vectors, devices or checkpoints. Its training
batches are a pure function of (seed, step): a run resumed at step N reads
exactly the batches an uninterrupted run would have read, and every replica
of a distributed run agrees on the global batch.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from tasks.base import last_one_percent


class DataError(RuntimeError):
    """A dataset that cannot be read, reported as one line saying how to get it."""


class ImageTask:
    name: str = "image_task"
    steps: int = 1000  # the paper's step budget (the config's ``steps`` overrides it)

    batch_size: int

    def load(self) -> None:
        """Read the dataset into memory; raise ``DataError`` (one line) if it is missing."""
        raise NotImplementedError

    def build_model(self, seed: int) -> keras.Model:
        """A built model mapping a batch of inputs to logits, initialized from ``seed``."""
        raise NotImplementedError

    def train_batch(self, seed: int, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The global training batch ``(x, y)`` of ``step`` (a scalar int64 tensor): sampling,
        preprocessing and augmentation from stateless RNG keyed by (seed, step)."""
        raise NotImplementedError

    def per_example_loss(self, labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        """``[batch]`` losses; the trainer averages them over the global batch."""
        return tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    def regularization(self, model: keras.Model) -> tf.Tensor:
        """Added once to the mean loss (e.g. L2 weight decay); 0 by default."""
        return tf.constant(0.0)

    def report_window(self, steps_done: int) -> tuple[int, int]:
        """Steps [start, stop) whose mean training loss is the reported figure (last 1%)."""
        return last_one_percent(steps_done)

    def never_moving_loss(self, first_losses, start: int, stop: int):
        """What never leaving θ0 costs (the divergence bar): the first minibatch's loss, an unbiased draw of it."""
        return first_losses

    def validation_data(self) -> tf.data.Dataset | None:
        """Batches ``(x, y)`` of a fixed validation set, or None."""
        return None

    def evaluate(self, model: keras.Model) -> dict:
        """Test metrics at a milestone (e.g. ``test_loss``, ``test_accuracy``); never timed."""
        return {}

    def artifacts(self, model: keras.Model, out_dir: Path, seed: int) -> list[Path]:
        """Pictures written at the end of a run (samples, input channels); the files written."""
        return []

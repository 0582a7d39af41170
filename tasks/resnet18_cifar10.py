"""ResNet-18 on CIFAR-10 (SPEC §3.4).

The CIFAR variant of ResNet-18: a 3×3 stem convolution (no 7×7, no max-pool),
BasicBlocks [2, 2, 2, 2] with 64/128/256/512 channels, batch normalization,
global average pooling and a dense layer to 10 logits. Inputs are normalized per
channel with the training set's mean and standard deviation; training images are
augmented (pad 4, random 32×32 crop, random horizontal flip) per example from
stateless RNG keyed by (seed, step).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tasks.data import check_int, check_unknown, data_options, describe_source, layer_seed, load_images, step_keys
from tasks.image_base import DataError, ImageTask

SIZE = 32
PAD = 4
CLASSES = 10
WIDTHS = (64, 128, 256, 512)
BLOCKS = (2, 2, 2, 2)
TRAIN_STREAM = 0xC1FA  # the stateless stream of each step's sampling and augmentation
EPOCH_STREAM = 0xE90C  # the stateless stream of the epochs' permutations
SAMPLING = ("epochs", "uniform")
# PyTorch's batch-norm constants (momentum 0.1 there is 0.9 here), the usual ones for CIFAR ResNets.
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5


def build_resnet18(seed: int) -> keras.Model:
    """CIFAR ResNet-18 with He-normal convolutions, initialized from ``seed``.

    Convolutions have no bias (batch normalization follows each one); the shortcut of a
    block that changes width or resolution is a strided 1×1 convolution plus batch norm.
    Batch-norm moving statistics are non-trainable variables.
    """
    counter = iter(range(1_000))

    def conv(x, filters, kernel, stride, name):
        init = keras.initializers.HeNormal(seed=layer_seed(seed, next(counter)))
        return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                   kernel_initializer=init, name=name)(x)

    def bn(x, name):
        return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    h = keras.layers.ReLU(name="stem_relu")(bn(conv(inputs, WIDTHS[0], 3, 1, "stem_conv"), "stem_bn"))
    for stage, (width, blocks) in enumerate(zip(WIDTHS, BLOCKS)):
        for block in range(blocks):
            name = f"s{stage + 1}b{block + 1}"
            stride = 2 if stage > 0 and block == 0 else 1
            u = keras.layers.ReLU(name=f"{name}_relu1")(bn(conv(h, width, 3, stride, f"{name}_conv1"), f"{name}_bn1"))
            u = bn(conv(u, width, 3, 1, f"{name}_conv2"), f"{name}_bn2")
            if stride != 1 or h.shape[-1] != width:
                h = bn(conv(h, width, 1, stride, f"{name}_shortcut_conv"), f"{name}_shortcut_bn")
            h = keras.layers.ReLU(name=f"{name}_relu2")(keras.layers.Add(name=f"{name}_add")([h, u]))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    logits = keras.layers.Dense(CLASSES, name="logits",
                                kernel_initializer=keras.initializers.GlorotUniform(seed=layer_seed(seed, next(counter))))(h)
    return keras.Model(inputs, logits, name="resnet18")


def augment(images: tf.Tensor, top: tf.Tensor, left: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """Pad 4 with zeros, crop 32×32 at (``top``, ``left``) in 0..8, mirror where ``flip``; all per
    example (``[B]`` each), as two batched gathers."""
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    offsets = tf.range(SIZE, dtype=tf.int64)[None, :]
    rows = tf.cast(top, tf.int64)[:, None] + offsets
    cols = tf.cast(left, tf.int64)[:, None] + tf.where(flip[:, None], SIZE - 1 - offsets, offsets)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


class ResNet18CIFAR10(ImageTask):
    """SPEC §3.4.

    Options (the task YAML): ``data`` (the data source, see ``tasks.data``), ``batch_size``
    (2048), ``weight_decay`` (1e-4, the L2 coefficient), ``augment`` (true), ``sampling``
    (``epochs``: every epoch a fresh permutation of the training set; ``uniform``: with
    replacement), ``eval_batch_size`` (1000), ``test_size`` (test images evaluated; None: all).
    """

    name = "resnet18_cifar10"
    steps = 3000

    def __init__(self, data=None, batch_size=2048, weight_decay=1e-4, augment=True, sampling="epochs",
                 eval_batch_size=1000, test_size=None, **unknown):
        check_unknown(self.name, unknown, ResNet18CIFAR10.__init__)
        self.data = data_options(data)
        self.batch_size = check_int("task.batch_size", batch_size)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"task.weight_decay must be a non-negative number, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        if not isinstance(augment, bool):
            raise ValueError(f"task.augment must be true or false, got {augment!r}")
        self.augment = augment
        if sampling not in SAMPLING:
            raise ValueError(f"task.sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        self.sampling = sampling
        self.eval_batch_size = check_int("task.eval_batch_size", eval_batch_size)
        self.test_size = check_int("test_size", test_size, allow_none=True)
        self._arrays = None  # NumPy: train images, train labels, test images, test labels
        self._tensors = None
        self._eval_fn = (None, None)  # (model, tf.function)

    # --- data ---------------------------------------------------------------------------------
    def load(self) -> None:
        if self._arrays is not None:
            return
        train, train_labels = load_images("cifar10", "train", **self.data)
        test, test_labels = load_images("cifar10", "test", **self.data)
        if self.test_size is not None:
            test, test_labels = test[: self.test_size], test_labels[: self.test_size]
        # Per-channel statistics of the training set, in chunks (a float64 copy of CIFAR-10 is 1.2 GB).
        total, squares = np.zeros(3), np.zeros(3)
        for start in range(0, len(train), 5000):
            chunk = train[start:start + 5000].reshape(-1, 3).astype(np.float64) / 255.0
            total += chunk.sum(axis=0)
            squares += (chunk ** 2).sum(axis=0)
        count = train.shape[0] * train.shape[1] * train.shape[2]
        self.mean = (total / count).astype(np.float32)
        self.std = np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0)).astype(np.float32)
        if not (self.std > 1e-6).all():  # normalize() would divide by (almost) zero: every loss NaN or huge
            raise DataError(f"cifar10 train in {describe_source(self.data)} has a colour channel with no variation "
                            f"(std {', '.join(f'{v:.2g}' for v in self.std)} for red, green, blue): the images are not "
                            f"CIFAR-10's; replace them")
        self._arrays = (train, train_labels, test, test_labels)

    @property
    def num_train_images(self) -> int:
        self.load()
        return len(self._arrays[0])

    def normalize(self, images: tf.Tensor) -> tf.Tensor:
        """uint8 ``[B, 32, 32, 3]`` -> float32, zero mean and unit variance per channel."""
        self.load()
        return (tf.cast(images, tf.float32) / 255.0 - self.mean) / self.std

    def _train_tensors(self):
        self.load()
        if self._tensors is None:
            # Made eagerly on the host even when first asked for while tf.data traces train_batch,
            # so the graph captures the 150 MB of images instead of embedding them as a constant.
            with tf.init_scope(), tf.device("/CPU:0"):
                self._tensors = (tf.constant(self._arrays[0]), tf.constant(self._arrays[1]))
        return self._tensors

    def train_indices(self, key: tf.Tensor, step) -> tf.Tensor:
        """The step's training-image indices ``[batch]`` int64.

        ``epochs``: example i of the run (i = step·batch + j) is element i mod N of epoch
        i div N's permutation, so every image appears once per epoch; each epoch's permutation
        is drawn from its own stateless key. ``uniform``: independent uniform draws.
        """
        n, batch = self.num_train_images, self.batch_size
        if self.sampling == "uniform":
            return tf.random.stateless_uniform([batch], key, 0, n, tf.int64, alg="philox")
        example = tf.cast(step, tf.int64) * batch + tf.range(batch, dtype=tf.int64)
        epoch, position = example // n, example % n
        first = epoch[0]
        span = batch // n + 2  # the epochs one batch can touch
        perms = tf.stack([tf.argsort(tf.random.stateless_uniform(
            [n], tf.random.experimental.stateless_fold_in(key, first + e, alg="philox"), alg="philox"))
            for e in range(span)])
        return tf.cast(tf.gather_nd(perms, tf.stack([epoch - first, position], axis=1)), tf.int64)

    def train_plan(self, seed: int, step) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """The step's image indices, crop offsets (top, left in 0..8) and flips, ``[batch]`` each."""
        keys = step_keys(seed, TRAIN_STREAM, step, 4)
        # Epoch permutations are shared by the steps of an epoch: their key hangs off the seed alone.
        epoch_key = step_keys(seed, EPOCH_STREAM, 0, 1)[0]
        index = self.train_indices(epoch_key if self.sampling == "epochs" else keys[0], step)
        top = tf.random.stateless_uniform([self.batch_size], keys[1], 0, 2 * PAD + 1, tf.int64, alg="philox")
        left = tf.random.stateless_uniform([self.batch_size], keys[2], 0, 2 * PAD + 1, tf.int64, alg="philox")
        flip = tf.random.stateless_uniform([self.batch_size], keys[3], 0, 2, tf.int64, alg="philox") == 1
        return index, top, left, flip

    def train_batch(self, seed: int, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = self._train_tensors()
        index, top, left, flip = self.train_plan(seed, step)
        x = tf.gather(images, index)
        if self.augment:
            x = augment(x, top, left, flip)
        return self.normalize(x), tf.gather(labels, index)

    # --- model --------------------------------------------------------------------------------
    def build_model(self, seed: int) -> keras.Model:
        return build_resnet18(seed)

    def regularization(self, model: keras.Model) -> tf.Tensor:
        """``weight_decay`` × the sum of squares of every convolution and dense kernel; biases and
        batch-norm scales and offsets are not decayed."""
        kernels = [layer.kernel for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
        return self.weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(k, tf.float32))) for k in kernels])

    def evaluate(self, model: keras.Model) -> dict:
        """Mean cross-entropy and accuracy over ``test_size`` test images, batch-norm in inference mode."""
        self.load()
        _, _, images, labels = self._arrays
        if self._eval_fn[0] is not model:
            @tf.function
            def batch_metrics(x, y):
                logits = tf.cast(model(self.normalize(x), training=False), tf.float32)
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
                return ce, tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float32)

            self._eval_fn = (model, batch_metrics)
        fn, size = self._eval_fn[1], self.eval_batch_size
        loss_sum = correct = 0.0
        for start in range(0, len(images), size):
            n = min(size, len(images) - start)
            x = np.zeros((size, SIZE, SIZE, 3), np.uint8)  # padded: one shape, one trace
            y = np.zeros(size, np.int64)
            x[:n], y[:n] = images[start:start + n], labels[start:start + n]
            ce, hit = fn(tf.constant(x), tf.constant(y))
            loss_sum += float(np.sum(ce.numpy()[:n], dtype=np.float64))
            correct += float(np.sum(hit.numpy()[:n]))
        count = len(images)
        return {"test_loss": loss_sum / count if count else float("nan"),
                "test_accuracy": correct / count if count else float("nan"),
                "test_images": int(count)}

    def artifacts(self, model: keras.Model, out_dir: Path, seed: int) -> list[Path]:
        return []

"""Autoregressive image generation on MNIST (SPEC §3.3): predict one pixel from the pixels before it.

Each example is a training image and a query pixel (r, c). The pixels before the
query in raster order are visible; the network sees five channels (visible
brightness / 256, visibility ±1, "column ≤ c" ±1, row and column coordinates in
[−1, 1]) and predicts the query pixel's brightness as one of 256 classes.

The model is a 94,696-parameter CNN without normalization: a 1×1 stem, five
stages of four inverted-bottleneck residual blocks with arctan activations, each
stage followed by 2×2 average pooling (28 → 14 → 7 → 4 → 2 → 1), and a 1×1 head
to 256 logits.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tasks.data import check_int, check_unknown, data_options, describe_source, layer_seed, load_images, step_keys
from tasks.image_base import DataError, ImageTask

HEIGHT = WIDTH = 28
PIXELS = HEIGHT * WIDTH
LEVELS = 256  # brightness classes
CHANNELS = 20  # residual stream width
EXPAND = 40  # first 1×1 convolution of a block
DEPTH_MULTIPLIER = 3  # depthwise 3×3: 40 → 120 channels
STAGES, BLOCKS = 5, 4
VALIDATION_IMAGES = 64  # the last 64 training images
VALIDATION_QUERIES = 16  # query pixels per validation image
VALIDATION_SEED = 0xFA11D  # fixed: every run is validated on the same 1,024 examples
TRAIN_STREAM = 0x9C11  # the stateless stream of the training batches
SAMPLE_STREAM = 0x5A3B  # the stateless stream of the generated samples
DATASETS = ("mnist", "fashion_mnist")


def pixel_inputs(images: tf.Tensor, query: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The five input channels and the target for images ``[B, 28, 28]`` (integers 0..255) and
    raster query indices ``query`` ``[B]`` (r·28 + c): ``x`` float32 ``[B, 28, 28, 5]``, ``y`` int64 ``[B]``.

    Visible pixels are exactly those with a raster index below the query's (rows above r, and
    row r left of c), so one comparison builds the mask for the whole batch.
    """
    batch = tf.shape(images)[0]
    query = tf.cast(query, tf.int64)
    position = tf.reshape(tf.range(PIXELS, dtype=tf.int64), [1, HEIGHT, WIDTH])
    row, col = position // WIDTH, position % WIDTH
    visible = tf.cast(position < query[:, None, None], tf.float32)
    left = tf.cast(col <= (query % WIDTH)[:, None, None], tf.float32)
    full = [batch, HEIGHT, WIDTH]
    x = tf.stack([
        tf.cast(images, tf.float32) * visible / 256.0,
        2.0 * visible - 1.0,
        2.0 * left - 1.0,
        tf.broadcast_to(tf.cast(row, tf.float32) * (2.0 / (HEIGHT - 1)) - 1.0, full),
        tf.broadcast_to(tf.cast(col, tf.float32) * (2.0 / (WIDTH - 1)) - 1.0, full),
    ], axis=-1)
    y = tf.gather(tf.reshape(tf.cast(images, tf.int64), [batch, PIXELS]), query, batch_dims=1)
    return x, y


def _normal(seed: int, fan_in: int, *index: int):
    """N(0, 1/(fan_in + 1)): LeCun-normal with the bias counted as one more input."""
    return keras.initializers.RandomNormal(stddev=float(1.0 / np.sqrt(fan_in + 1)), seed=layer_seed(seed, *index))


def build_pixelcnn(seed: int, stem_kernel: int = 1) -> keras.Model:
    """The CNN of SPEC §3.3, initialized from ``seed`` (94,696 parameters with a 1×1 stem)."""
    layer = iter(range(1_000))

    def conv(filters, kernel, fan_in, name):
        i = next(layer)
        return keras.layers.Conv2D(filters, kernel, padding="same", name=name,
                                   kernel_initializer=_normal(seed, fan_in, i, 0),
                                   bias_initializer=_normal(seed, fan_in, i, 1))

    inputs = keras.Input((HEIGHT, WIDTH, 5), name="channels")
    h = conv(CHANNELS, stem_kernel, stem_kernel * stem_kernel * 5, "stem")(inputs)
    for stage in range(STAGES):
        for block in range(BLOCKS):
            name = f"s{stage + 1}b{block + 1}"
            u = conv(EXPAND, 1, CHANNELS, f"{name}_expand")(h)
            u = keras.layers.Activation(keras.ops.arctan, name=f"{name}_arctan1")(u)
            i = next(layer)
            u = keras.layers.DepthwiseConv2D(3, depth_multiplier=DEPTH_MULTIPLIER, padding="same",
                                             name=f"{name}_depthwise",
                                             depthwise_initializer=_normal(seed, 9, i, 0),
                                             bias_initializer=_normal(seed, 9, i, 1))(u)
            u = keras.layers.Activation(keras.ops.arctan, name=f"{name}_arctan2")(u)
            u = conv(CHANNELS, 1, EXPAND * DEPTH_MULTIPLIER, f"{name}_project")(u)
            h = keras.layers.Add(name=f"{name}_add")([h, u])
        h = keras.layers.AveragePooling2D(2, strides=2, padding="same", name=f"pool{stage + 1}")(h)
    logits = conv(LEVELS, 1, CHANNELS, "head")(h)
    logits = keras.layers.Reshape((LEVELS,), name="logits")(logits)
    return keras.Model(inputs, logits, name="pixelcnn")


class PixelCNNMNIST(ImageTask):
    """SPEC §3.3 on MNIST or Fashion-MNIST.

    Options (the task YAML): ``dataset`` (mnist | fashion_mnist), ``data`` (the data source,
    see ``tasks.data``), ``batch_size`` (256), ``stem_kernel`` (1; the paper's text says 3),
    ``eval_images_per_batch`` (test images whose 784 query positions go through the model
    together; null: 8 with a GPU, 1 without), ``test_size`` (test images evaluated; None: all).
    """

    name = "pixelcnn_mnist"
    steps = 300_000

    def __init__(self, dataset="mnist", data=None, batch_size=256, stem_kernel=1, eval_images_per_batch=None,
                 test_size=None, **unknown):
        check_unknown(self.name, unknown, PixelCNNMNIST.__init__)
        if dataset not in DATASETS:
            raise ValueError(f"task.dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
        self.dataset = dataset
        self.data = data_options(data)
        self.batch_size = check_int("task.batch_size", batch_size)
        self.stem_kernel = check_int("task.stem_kernel", stem_kernel)
        if self.stem_kernel % 2 == 0:
            raise ValueError(f"task.stem_kernel must be odd (SAME padding keeps 28x28), got {stem_kernel!r}")
        self.eval_images_per_batch = check_int("task.eval_images_per_batch", eval_images_per_batch, allow_none=True)
        self.test_size = check_int("test_size", test_size, allow_none=True)
        self._arrays = None  # NumPy: train (without validation), validation, test images [N, 28, 28]
        self._train_tensor = None
        self._validation = None  # (x, y) of the validation set, built once
        self._compiled = {}  # kind -> (model, tf.function)

    # --- data ---------------------------------------------------------------------------------
    def load(self) -> None:
        if self._arrays is not None:
            return
        train, _ = load_images(self.dataset, "train", **self.data)
        test, _ = load_images(self.dataset, "test", **self.data)
        if len(train) <= VALIDATION_IMAGES:
            raise DataError(f"{self.dataset} train in {describe_source(self.data)} has {len(train)} images; the task "
                            f"holds out the last {VALIDATION_IMAGES} for validation and needs more: point the task "
                            f"at the full dataset")
        test = test[: self.test_size] if self.test_size is not None else test
        self._arrays = (train[:-VALIDATION_IMAGES, ..., 0], train[-VALIDATION_IMAGES:, ..., 0], test[..., 0])

    @property
    def num_train_images(self) -> int:
        self.load()
        return len(self._arrays[0])

    def _train_images(self) -> tf.Tensor:
        self.load()
        if self._train_tensor is None:
            # init_scope: made eagerly even when first asked for while tf.data traces train_batch,
            # so the graph captures the tensor instead of embedding a 47 MB constant.
            with tf.init_scope(), tf.device("/CPU:0"):
                self._train_tensor = tf.constant(self._arrays[0])
        return self._train_tensor

    def train_queries(self, seed: int, step) -> tuple[tf.Tensor, tf.Tensor]:
        """The step's training-image indices and raster query indices, ``[batch]`` int64 each."""
        keys = step_keys(seed, TRAIN_STREAM, step, 2)
        index = tf.random.stateless_uniform([self.batch_size], keys[0], 0, self.num_train_images, tf.int64, alg="philox")
        query = tf.random.stateless_uniform([self.batch_size], keys[1], 0, PIXELS, tf.int64, alg="philox")
        return index, query

    def train_batch(self, seed: int, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        index, query = self.train_queries(seed, step)
        return pixel_inputs(tf.gather(self._train_images(), index), query)

    def validation_data(self) -> tf.data.Dataset:
        """The 64 held-out images at 16 query pixels each (1,024 examples), in batches of 256."""
        self.load()
        if self._validation is None:
            images = np.repeat(self._arrays[1], VALIDATION_QUERIES, axis=0)
            query = np.random.default_rng(VALIDATION_SEED).integers(0, PIXELS, len(images))
            with tf.init_scope():
                self._validation = pixel_inputs(tf.constant(images), tf.constant(query))
        return tf.data.Dataset.from_tensor_slices(self._validation).batch(256)

    # --- model --------------------------------------------------------------------------------
    def build_model(self, seed: int) -> keras.Model:
        return build_pixelcnn(seed, self.stem_kernel)

    def _compiled_fn(self, kind: str, model: keras.Model, make):
        """The compiled function ``kind`` for ``model``; one model at a time, so seeds trained one
        after another don't pile up models and graphs."""
        entry = self._compiled.get(kind)
        if entry is None or entry[0] is not model:
            entry = self._compiled[kind] = (model, make(model))
        return entry[1]

    # --- test loss over all 784 query positions ---------------------------------------------------
    def _images_per_batch(self) -> int:
        if self.eval_images_per_batch is not None:
            return self.eval_images_per_batch
        return 8 if tf.config.list_logical_devices("GPU") else 1

    @staticmethod
    def _make_image_losses(model):
        @tf.function
        def image_losses(images):
            """Summed cross-entropy over the 784 query positions of each image ``[k, 28, 28]`` -> ``[k]``."""
            k = tf.shape(images)[0]
            x, y = pixel_inputs(tf.repeat(images, PIXELS, axis=0), tf.tile(tf.range(PIXELS, dtype=tf.int64), [k]))
            logits = model(x, training=False)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.cast(logits, tf.float32))
            return tf.reduce_sum(tf.reshape(ce, [k, PIXELS]), axis=1)

        return image_losses

    def image_losses(self, model: keras.Model, images: np.ndarray) -> np.ndarray:
        """Mean cross-entropy over all 784 query positions of each image ``[N, 28, 28]`` -> ``[N]``."""
        fn = self._compiled_fn("losses", model, self._make_image_losses)
        k = self._images_per_batch()
        out = []
        for start in range(0, len(images), k):
            chunk = images[start:start + k]
            padded = np.zeros((k, HEIGHT, WIDTH), np.uint8)  # one shape: one trace
            padded[: len(chunk)] = chunk
            out.append(fn(tf.constant(padded)).numpy()[: len(chunk)])
        return np.concatenate(out).astype(np.float64) / PIXELS if out else np.zeros(0)

    def evaluate(self, model: keras.Model) -> dict:
        """``test_loss``: mean cross-entropy over ``test_size`` test images × all 784 query positions."""
        self.load()
        test = self._arrays[2]
        return {"test_loss": float(np.mean(self.image_losses(model, test))) if len(test) else float("nan"),
                "test_images": int(len(test))}

    # --- sampling (Figure 10) ---------------------------------------------------------------------
    @staticmethod
    def _make_sampler(model):
        @tf.function
        def sample(key, count):
            images = tf.zeros([count, PIXELS], tf.int64)
            for position in tf.range(PIXELS, dtype=tf.int64):
                x, _ = pixel_inputs(tf.reshape(images, [count, HEIGHT, WIDTH]), tf.fill([count], position))
                logits = tf.cast(model(x, training=False), tf.float32)
                step_key = tf.random.experimental.stateless_fold_in(key, position, alg="philox")
                value = tf.random.stateless_categorical(logits, 1, step_key)[:, 0]
                images += tf.one_hot(position, PIXELS, dtype=tf.int64)[None, :] * value[:, None]
            return tf.reshape(images, [count, HEIGHT, WIDTH])

        return sample

    def sample(self, model: keras.Model, seed: int, count: int = 16) -> np.ndarray:
        """``count`` images uint8 ``[count, 28, 28]``, each pixel drawn in raster order from the model."""
        fn = self._compiled_fn("sample", model, self._make_sampler)
        key = tf.constant([int(seed), SAMPLE_STREAM], tf.int64)
        return fn(key, tf.constant(count, tf.int32)).numpy().astype(np.uint8)

    # --- pictures ---------------------------------------------------------------------------------
    def artifacts(self, model: keras.Model, out_dir: Path, seed: int) -> list[Path]:
        """Figure 10 (``samples``: 16 generated images) and Figure 9 (``input_channels``: one
        training example's five channels), each as PNG and PDF."""
        from matplotlib.figure import Figure  # no pyplot: no interactive backend, no global state

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []

        samples = self.sample(model, seed, 16)
        fig = Figure(figsize=(5, 5.4))
        axes = fig.subplots(4, 4)
        for ax, image in zip(axes.flat, samples):
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
        trained_on = (f"synthetic data (random arrays shaped like {self.dataset})"
                      if self.data.get("source") == "synthetic" else self.dataset)
        fig.suptitle(f"{trained_on}: 16 samples drawn pixel by pixel (seed {seed})")
        written += _save(fig, out_dir / "samples")

        index, query = self.train_queries(seed, tf.constant(0, tf.int64))
        x, y = pixel_inputs(tf.gather(self._train_images(), index[:1]), query[:1])
        x, y, q = x.numpy()[0], int(y.numpy()[0]), int(query.numpy()[0])
        titles = ["1: image × visible / 256", "2: visible (±1)", "3: column ≤ c (±1)",
                  "4: row coordinate", "5: column coordinate"]
        fig = Figure(figsize=(15, 3.4))
        axes = fig.subplots(1, 5)
        for i, ax in enumerate(axes):
            shown = ax.imshow(x[..., i], cmap="gray" if i == 0 else "coolwarm", vmin=0 if i == 0 else -1,
                              vmax=1 if i else 255 / 256)
            ax.add_patch(_query_box(q))
            ax.set_title(titles[i], fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        fig.suptitle(f"Input channels of one training example: query pixel (row {q // WIDTH}, column {q % WIDTH}) "
                     f"in red, target brightness {y}")
        written += _save(fig, out_dir / "input_channels")
        return written


def _query_box(query: int):
    from matplotlib.patches import Rectangle

    return Rectangle((query % WIDTH - 0.5, query // WIDTH - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths

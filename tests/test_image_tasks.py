"""The image tasks (PixelCNN-style MNIST, ResNet-18 on CIFAR-10) against NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from omegaconf import OmegaConf

import tasks
from tasks import data
from tasks.pixelcnn_mnist import PixelCNNMNIST
from tasks.resnet18_cifar10 import ResNet18CIFAR10, augment
from lodo.experiment import registry

# One worker runs the whole file: its module fixture is computed once (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("image_tasks")

SYNTHETIC = {"source": "synthetic"}
CONFIGS = tasks.__file__.replace("tasks/__init__.py", "configs/task")


# --- independent NumPy references ------------------------------------------------------------------

def np_channels(image: np.ndarray, r, c) -> np.ndarray:
    """SPEC §3.3's five channels of one 28×28 image for query pixels (r, c) (scalars or ``[Q]``)."""
    r, c = np.asarray(r)[..., None, None], np.asarray(c)[..., None, None]
    i, j = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    visible = (i < r) | ((i == r) & (j < c))  # rows above, and the query row left of the query
    shape = np.broadcast_shapes(visible.shape, (j <= c).shape)
    return np.stack([np.where(visible, image / 256, 0), np.where(visible, 1.0, -1.0),
                     np.broadcast_to(np.where(j <= c, 1.0, -1.0), shape),
                     np.broadcast_to(-1 + 2 * i / 27, shape), np.broadcast_to(-1 + 2 * j / 27, shape)], axis=-1)


def np_pixelcnn(model, x: np.ndarray) -> np.ndarray:
    """The SPEC §3.3 network in float64 NumPy, reading the Keras model's weights by layer name."""
    w = {layer.name: [np.asarray(v, np.float64) for v in layer.weights] for layer in model.layers if layer.weights}

    def dense(h, name):
        kernel, bias = w[name]
        return h @ kernel[0, 0] + bias

    def depthwise(h, name):
        kernel, bias = w[name]  # [3, 3, channels, multiplier]; output channel = c * multiplier + m
        b, hh, ww, ch = h.shape
        padded = np.pad(h, [(0, 0), (1, 1), (1, 1), (0, 0)])
        out = sum(np.einsum("bhwc,cm->bhwcm", padded[:, i:i + hh, j:j + ww], kernel[i, j])
                  for i in range(3) for j in range(3))
        return out.reshape(b, hh, ww, -1) + bias

    def pool(h):  # 2×2, stride 2, SAME: the last window of an odd side holds one row/column
        n = h.shape[1]
        out = np.zeros((h.shape[0], (n + 1) // 2, (n + 1) // 2, h.shape[3]))
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                out[:, i, j] = h[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
        return out

    h = dense(x, "stem")
    for s in range(1, 6):
        for b in range(1, 5):
            u = np.arctan(dense(h, f"s{s}b{b}_expand"))
            u = np.arctan(depthwise(u, f"s{s}b{b}_depthwise"))
            h = h + dense(u, f"s{s}b{b}_project")
        h = pool(h)
    assert h.shape[1:3] == (1, 1)
    return dense(h, "head")[:, 0, 0]


def np_cross_entropy(logits, labels):
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(labels)), labels]


def tiny_pixel_model(seed=0):
    """A small stand-in for the 94,696-parameter CNN: evaluation and sampling accept any model."""
    inputs = keras.Input((28, 28, 5))
    h = keras.layers.Conv2D(3, 3, strides=4, activation="tanh")(inputs)
    logits = keras.layers.Dense(256, kernel_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=seed))(
        keras.layers.Flatten()(h))
    return keras.Model(inputs, logits)


class RunningSum(keras.Model):
    """Predicts (sum of the visible pixels + 1) mod 256 with certainty: sampling must feed back its draws."""

    def call(self, x, training=False):
        total = tf.round(tf.reduce_sum(x[..., 0], axis=[1, 2]) * 256.0)
        return 1e4 * tf.one_hot(tf.cast(total + 1.0, tf.int32) % 256, 256)


@pytest.fixture(scope="module")
def pixel_task():
    data.clear_cache()
    task = PixelCNNMNIST(data=SYNTHETIC, batch_size=16, test_size=3, eval_images_per_batch=2)
    task.load()
    return task


# --- PixelCNN ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixel_model(pixel_task):
    return pixel_task.build_model(seed=3)


def test_pixelcnn_parameters_and_initialization(pixel_model):
    model = pixel_model
    # stem 5·20+20 = 120; 20 blocks of (20·40+40) + (9·40·3+120) + (120·20+20) = 4,460; head 20·256+256 = 5,376
    assert model.count_params() == 120 + 20 * 4460 + 5376 == 94_696
    assert model.output_shape == (None, 256)
    project = model.get_layer("s3b2_project").kernel.numpy()  # 2,400 draws of N(0, 1/(120 + 1))
    assert abs(project.std() * np.sqrt(121) - 1) < 0.06 and abs(project.mean()) < 0.01
    depthwise = model.get_layer("s1b1_depthwise").bias.numpy()  # 120 draws of N(0, 1/(9 + 1))
    assert abs(depthwise.std() * np.sqrt(10) - 1) < 0.25
    wide = PixelCNNMNIST(data=SYNTHETIC, stem_kernel=3).build_model(seed=3)
    assert wide.count_params() == 94_696 + 8 * 5 * 20
    np.testing.assert_array_equal(wide.get_layer("head").bias.numpy(), model.get_layer("head").bias.numpy())
    other = PixelCNNMNIST(data=SYNTHETIC).build_model(seed=4)
    assert not np.allclose(other.get_layer("head").bias.numpy(), model.get_layer("head").bias.numpy())


def test_pixelcnn_forward_matches_numpy(pixel_task, pixel_model):
    x, _ = pixel_task.train_batch(0, tf.constant(0, tf.int64))
    x = x.numpy()[:2]
    np.testing.assert_allclose(pixel_model(x).numpy(), np_pixelcnn(pixel_model, x), rtol=1e-4, atol=1e-4)


def test_train_batch_channels_and_target_match_numpy(pixel_task):
    train = pixel_task._arrays[0]
    for step in (0, 7):
        index, query = (t.numpy() for t in pixel_task.train_queries(5, tf.constant(step, tf.int64)))
        x, y = (t.numpy() for t in pixel_task.train_batch(5, tf.constant(step, tf.int64)))
        assert x.shape == (16, 28, 28, 5) and x.dtype == np.float32 and y.dtype == np.int64
        for b in range(16):
            r, c = divmod(int(query[b]), 28)
            np.testing.assert_allclose(x[b], np_channels(train[index[b]], r, c), atol=1e-6)
            assert y[b] == train[index[b], r, c]


def test_train_batches_are_a_pure_function_of_seed_and_step(pixel_task):
    def batch(seed, step):
        return [t.numpy() for t in pixel_task.train_batch(seed, tf.constant(step, tf.int64))]

    first = batch(0, 4)
    for a, b in zip(first, batch(0, 4)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], batch(0, 5)[0]) and not np.array_equal(first[0], batch(1, 4)[0])
    pipeline = tf.data.Dataset.range(3, 6).map(lambda step: pixel_task.train_batch(0, step))
    for a, b in zip(first, next(iter(pipeline.skip(1)))):  # traced inside tf.data: the same batch
        np.testing.assert_array_equal(a, b.numpy())


def test_training_never_sees_the_validation_images(pixel_task):
    n = pixel_task.num_train_images
    assert n == 512 - 64
    task = PixelCNNMNIST(data=SYNTHETIC, batch_size=4096)
    index = np.concatenate([task.train_queries(seed, tf.constant(seed, tf.int64))[0].numpy() for seed in range(3)])
    assert index.min() == 0 and index.max() == n - 1  # the whole range, nothing above it
    np.testing.assert_array_equal(pixel_task._arrays[1][..., None], data.load_images("mnist", "train", "synthetic")[0][-64:])


def test_validation_set_is_the_held_out_images_at_16_fixed_queries(pixel_task):
    batches = list(pixel_task.validation_data())
    assert [len(b[0]) for b in batches] == [256] * 4
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    held_out = pixel_task._arrays[1]
    queries = (x[..., 1] > 0).sum(axis=(1, 2))  # the query's raster index = the number of visible pixels
    for e in range(0, 1024, 37):
        r, c = divmod(int(queries[e]), 28)
        np.testing.assert_allclose(x[e], np_channels(held_out[e // 16], r, c), atol=1e-6)
        assert y[e] == held_out[e // 16, r, c]
    again = np.concatenate([b[0].numpy() for b in pixel_task.validation_data()])
    np.testing.assert_array_equal(x, again)


def test_test_loss_averages_all_784_positions(pixel_task):
    model = tiny_pixel_model()
    result = pixel_task.evaluate(model)  # 3 images in batches of 2: the last batch is padded
    assert result["test_images"] == 3
    losses = []
    for image in pixel_task._arrays[2]:
        x = np_channels(image, *divmod(np.arange(784), 28)).astype(np.float32)
        losses.append(np_cross_entropy(model(x).numpy(), image.reshape(-1)))
    assert result["test_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    task = PixelCNNMNIST(data=SYNTHETIC, test_size=1000)  # more than the set holds: all of it
    task.load()
    assert len(task._arrays[2]) == 64


def test_samples_are_drawn_pixel_by_pixel(pixel_task):
    samples = pixel_task.sample(RunningSum(), seed=0, count=2)
    expected, total = np.zeros(784, np.int64), 0
    for q in range(784):
        expected[q] = (total + 1) % 256
        total += expected[q]
    assert samples.shape == (2, 28, 28) and samples.dtype == np.uint8
    np.testing.assert_array_equal(samples[0].reshape(-1), expected)
    model = tiny_pixel_model()
    drawn = pixel_task.sample(model, seed=1, count=3)
    np.testing.assert_array_equal(drawn, pixel_task.sample(model, seed=1, count=3))
    assert not np.array_equal(drawn, pixel_task.sample(model, seed=2, count=3))
    assert drawn.min() >= 0 and drawn.max() <= 255 and len(np.unique(drawn)) > 50


@pytest.mark.slow
def test_artifacts_are_written(pixel_task, tmp_path):
    paths = pixel_task.artifacts(tiny_pixel_model(), tmp_path / "figs", seed=0)
    assert sorted(p.name for p in paths) == ["input_channels.pdf", "input_channels.png", "samples.pdf", "samples.png"]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000


def test_tfds_source_under_mock_data(tmp_path):
    data.clear_cache()
    with tfds.testing.mock_data(num_examples=70, data_dir=str(tmp_path)):
        builder = tfds.builder("mnist", data_dir=str(tmp_path))
        (tmp_path / "mnist" / str(builder.version)).mkdir(parents=True)
        builder.info.write_to_directory(builder.data_dir)
        task = PixelCNNMNIST(data={"source": "tfds", "data_dir": str(tmp_path)}, batch_size=8)
        task.load()
    assert task.num_train_images == 70 - 64
    x, y = task.train_batch(0, tf.constant(0, tf.int64))
    assert x.shape == (8, 28, 28, 5)
    data.clear_cache()


# --- ResNet-18 --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    data.clear_cache()
    task = ResNet18CIFAR10(data=SYNTHETIC, batch_size=4, test_size=10, eval_batch_size=4)
    task.load()
    return task, task.build_model(seed=0)


def test_resnet18_parameter_counts(resnet):
    _, model = resnet
    convs = 3 * 3 * 3 * 64  # stem
    bn_channels = 64
    previous = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            convs += 9 * previous * width + 9 * width * width
            bn_channels += 2 * width
            if previous != width:  # the strided 1×1 shortcut and its batch norm
                convs += previous * width
                bn_channels += width
            previous = width
    dense = 512 * 10 + 10
    trainable = convs + 2 * bn_channels + dense  # batch norm: scale and offset
    assert (convs, bn_channels, trainable) == (11_159_232, 4_800, 11_173_962)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == trainable
    assert model.count_params() == trainable + 2 * bn_channels == 11_183_562  # + moving mean and variance
    assert not any("moving" in v.path for v in model.trainable_variables)
    assert len([v for v in model.non_trainable_variables if "moving" in v.path]) == 2 * 20


def test_augmentation_matches_numpy_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    top, left = rng.integers(0, 9, 6), rng.integers(0, 9, 6)
    flip = np.array([True, False, True, False, True, False])
    out = augment(tf.constant(images), tf.constant(top), tf.constant(left), tf.constant(flip)).numpy()
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
    for b in range(6):
        crop = padded[b, top[b]:top[b] + 32, left[b]:left[b] + 32]
        np.testing.assert_array_equal(out[b], crop[:, ::-1] if flip[b] else crop)


def test_resnet_train_batch_is_deterministic_and_normalized(resnet):
    task, _ = resnet
    train = data.load_images("cifar10", "train", "synthetic")[0]
    x0, y0 = (t.numpy() for t in task.train_batch(0, tf.constant(3, tf.int64)))
    x1, y1 = (t.numpy() for t in task.train_batch(0, tf.constant(3, tf.int64)))
    np.testing.assert_array_equal(x0, x1)
    assert x0.shape == (4, 32, 32, 3) and x0.dtype == np.float32
    assert not np.array_equal(x0, task.train_batch(0, tf.constant(4, tf.int64))[0].numpy())
    # NumPy: gather, zero-pad 4, crop, mirror, normalize with the training set's per-channel statistics.
    index, top, left, flip = (t.numpy() for t in task.train_plan(0, tf.constant(3, tf.int64)))
    assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
    pixels = train.reshape(-1, 3).astype(np.float64) / 255
    padded = np.pad(train[index], [(0, 0), (4, 4), (4, 4), (0, 0)]) / 255
    for b in range(4):
        crop = padded[b, top[b]:top[b] + 32, left[b]:left[b] + 32][:, ::-1 if flip[b] else 1]
        np.testing.assert_allclose(x0[b], (crop - pixels.mean(axis=0)) / pixels.std(axis=0), atol=1e-5)
    np.testing.assert_array_equal(y0, data.load_images("cifar10", "train", "synthetic")[1][index])
    plain = ResNet18CIFAR10(data=SYNTHETIC, augment=False)
    whole = plain.normalize(tf.constant(train)).numpy()
    np.testing.assert_allclose(whole.astype(np.float64).mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(whole.astype(np.float64).std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_resnet_epochs_visit_every_image_once():
    task = ResNet18CIFAR10(data=SYNTHETIC, batch_size=128, augment=False)
    epochs = [np.concatenate([task.train_plan(0, tf.constant(s, tf.int64))[0].numpy() for s in range(4 * e, 4 * e + 4)])
              for e in (0, 1)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(512))
    assert not np.array_equal(epochs[0], epochs[1])
    straddle = ResNet18CIFAR10(data=SYNTHETIC, batch_size=300, augment=False)  # step 1 spans epochs 0 and 1
    both = np.concatenate([straddle.train_plan(0, tf.constant(s, tf.int64))[0].numpy() for s in range(2)])
    np.testing.assert_array_equal(np.sort(both[:512]), np.arange(512))


def test_resnet_regularization_and_one_training_step(resnet):
    task, model = resnet
    kernels = [v.numpy() for v in model.trainable_variables if v.path.endswith("kernel")]
    assert len(kernels) == 21  # 17 convolutions + 3 shortcuts + the dense layer
    assert float(task.regularization(model)) == pytest.approx(1e-4 * sum(float((k.astype(np.float64) ** 2).sum())
                                                                          for k in kernels), rel=1e-5)
    x, y = task.train_batch(0, tf.constant(0, tf.int64))
    before = [v.numpy().copy() for v in model.weights]
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(task.per_example_loss(y, model(x, training=True))) + task.regularization(model)
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    assert np.isfinite(float(loss))
    changed = {v.path: not np.array_equal(b, v.numpy()) for v, b in zip(model.weights, before)}
    assert all(changed[v.path] for v in model.trainable_variables)
    assert changed["stem_bn/moving_mean"]  # updated by the forward pass, not by the optimizer


def test_resnet_evaluate_matches_numpy(resnet):
    task, model = resnet
    images, labels = (a[:10] for a in data.load_images("cifar10", "test", "synthetic"))
    logits = model(task.normalize(tf.constant(images)), training=False).numpy()
    result = task.evaluate(model)  # batches of 4: the last one padded
    assert result["test_images"] == 10
    assert result["test_loss"] == pytest.approx(np.mean(np_cross_entropy(logits, labels)), rel=1e-5)
    assert result["test_accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels))


# --- construction from the YAML -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pixelcnn_mnist", "resnet18_cifar10"])
def test_tasks_build_from_their_yaml(name):
    options = OmegaConf.to_container(OmegaConf.load(f"{CONFIGS}/{name}.yaml"))
    assert options["name"] == name and options["steps"] == registry.build_task(name, test_size=None).steps
    options = registry.task_options(options)
    task = registry.build_task(name, **options, test_size=None)
    assert task.name == name and task.batch_size == {"pixelcnn_mnist": 256, "resnet18_cifar10": 2048}[name]


@pytest.mark.parametrize("name, options, words", [
    ("pixelcnn_mnist", {"dataset": "kmnist"}, "task.dataset"),
    ("pixelcnn_mnist", {"batch_size": 0}, "task.batch_size"),
    ("pixelcnn_mnist", {"stem_kernel": 2}, "task.stem_kernel"),
    ("pixelcnn_mnist", {"test_size": -1}, "test_size"),
    ("pixelcnn_mnist", {"data": {"source": "s3"}}, "task.data.source"),
    ("resnet18_cifar10", {"weight_decay": -1}, "task.weight_decay"),
    ("resnet18_cifar10", {"sampling": "shuffle"}, "task.sampling"),
    ("resnet18_cifar10", {"augment": "yes"}, "task.augment"),
    ("resnet18_cifar10", {"colour": 1}, "colour"),
])
def test_bad_options_are_one_line_errors(name, options, words):
    with pytest.raises(ValueError, match=words) as err:
        registry.build_task(name, **options)
    assert "\n" not in str(err.value)

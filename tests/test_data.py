"""The image datasets' three sources (tasks.data): TFDS (mocked, offline), original files, synthetic."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tasks import data
from tasks.image_base import DataError


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text and text
    return text


# --- tfds -----------------------------------------------------------------------------------------

def prepare_mock(name: str, folder) -> None:
    """Write the metadata of a prepared TFDS dataset (dataset_info.json, features.json) into ``folder``;
    ``mock_data`` supplies the examples."""
    builder = tfds.builder(name, data_dir=str(folder))
    Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_reads_a_prepared_folder(tmp_path, name, shape):
    with tfds.testing.mock_data(num_examples=7, data_dir=str(tmp_path)):
        prepare_mock(name, tmp_path)
        images, labels = data.load_images(name, "train", "tfds", data_dir=tmp_path)
        again = data.load_images(name, "train", "tfds", data_dir=str(tmp_path))
    assert images.shape == (7, *shape) and images.dtype == np.uint8
    assert labels.shape == (7,) and labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < 10
    assert again[0] is images  # cached: read once per process
    assert not images.flags.writeable


def test_tfds_source_never_downloads_and_says_how_to_get_the_data(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(DataError) as err:
        data.load_images("fashion_mnist", "test", "tfds", data_dir=tmp_path / "empty")
    text = one_line(err)
    assert text.startswith(f"dataset fashion_mnist is not prepared in {tmp_path / 'empty'}")
    for fix in ("make data", "task.data.data_dir=", "task.data.source=files task.data.path="):
        assert fix in text


# --- files ----------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder, rng, compress=True, train=5, test=3):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", train), ("t10k", test)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        for kind, array in zip(("images-idx3", "labels-idx1"), arrays[prefix]):
            name = folder / f"{prefix}-{kind}-ubyte"
            if compress:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(idx_bytes(array))
            else:
                name.write_bytes(idx_bytes(array))
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_files_source_parses_idx_files(tmp_path, compress):
    arrays = write_idx_set(tmp_path / "mnist", np.random.default_rng(0), compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data.load_images("mnist", split, "files", path=tmp_path / "mnist")
        np.testing.assert_array_equal(images[..., 0], arrays[prefix][0])
        np.testing.assert_array_equal(labels, arrays[prefix][1])
        assert images.dtype == np.uint8 and labels.dtype == np.int64 and images.shape[1:] == (28, 28, 1)


def cifar_batch(rng, n):
    return {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": list(rng.integers(0, 10, n).tolist()), b"filenames": [b"f"] * n}


@pytest.mark.parametrize("subfolder", [True, False])
def test_files_source_reads_cifar_python_batches(tmp_path, subfolder):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py" if subfolder else tmp_path
    folder.mkdir(exist_ok=True)
    batches = {name: cifar_batch(rng, 2) for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch))
    images, labels = data.load_images("cifar10", "train", "files", path=tmp_path)
    assert images.shape == (10, 32, 32, 3) and labels.shape == (10,)
    rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    n, h, w, c = 7, 5, 30, 2  # row layout of a batch: 1024 red, 1024 green, 1024 blue values, each row-major
    assert images[n, h, w, c] == rows[n, c * 1024 + h * 32 + w]
    expected = np.stack([rows[:, c * 1024:(c + 1) * 1024].reshape(10, 32, 32) for c in range(3)], axis=-1)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), []))
    test_images, _ = data.load_images("cifar10", "test", "files", path=tmp_path)
    assert test_images.shape == (2, 32, 32, 3)


def test_files_source_reads_the_installed_fashion_mnist():
    folder = "/usr/share/datasets/fashion-mnist"
    if not (Path(folder) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    images, labels = data.load_images("fashion_mnist", "test", "files", path=folder)
    assert images.shape == (10_000, 28, 28, 1) and np.bincount(labels).tolist() == [1000] * 10


def test_files_source_errors_name_the_missing_or_bad_file(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_images("mnist", "train", "files", path=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in one_line(err) and "task.data.path" in one_line(err)

    write_idx_set(tmp_path / "m", np.random.default_rng(2))
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        data.load_images("mnist", "test", "files", path=tmp_path / "m")
    assert "t10k-labels-idx1-ubyte.gz" in one_line(err) and "task.data.path" in one_line(err)

    bad = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:  # labels' magic number where images belong
        f.write(idx_bytes(np.zeros(4)))
    with pytest.raises(DataError) as err:
        data.load_images("mnist", "train", "files", path=tmp_path / "m")
    assert str(bad) in one_line(err) and "magic number" in one_line(err)

    with gzip.open(bad, "wb") as f:  # header says 5 images, 4 are there
        f.write(idx_bytes(np.zeros((5, 28, 28)))[: -28 * 28])
    with pytest.raises(DataError) as err:
        data.load_images("mnist", "train", "files", path=tmp_path / "m")
    assert str(bad) in one_line(err) and "truncated" in one_line(err)

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as err:
        data.load_images("cifar10", "train", "files", path=tmp_path / "c")
    assert str(tmp_path / "c" / "data_batch_1") in one_line(err)


# --- synthetic and options -------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_synthetic_source_shapes(name, shape):
    train, train_labels = data.load_images(name, "train", "synthetic")
    test, test_labels = data.load_images(name, "test", "synthetic")
    assert train.shape == (512, *shape) and test.shape == (64, *shape)
    assert train.dtype == test.dtype == np.uint8 and train_labels.dtype == np.int64
    assert set(np.unique(train_labels)) == set(range(10))
    data.clear_cache()
    np.testing.assert_array_equal(data.load_images(name, "train", "synthetic")[0], train)  # seeded


def test_data_options_are_checked():
    assert data.data_options(None) == {"source": "tfds", "data_dir": None, "path": None}
    for bad, words in [({"sourse": "tfds"}, "unknown task.data key"), ({"source": "web"}, "task.data.source"),
                       ({"source": "files"}, "task.data.path"), ({"data_dir": 3}, "task.data.data_dir")]:
        with pytest.raises(ValueError, match=words) as err:
            data.data_options(bad)
        one_line(err)


def test_prepare_data_script_prepares_then_reads_back(tmp_path, capsys):
    import runpy
    from unittest import mock

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "prepare_data.py"))

    def fake_download(builder, *args, **kwargs):  # what a real download leaves: the metadata (+ data, mocked)
        Path(builder.data_dir).mkdir(parents=True)
        builder.info.write_to_directory(builder.data_dir)

    with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path)), \
            mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", fake_download):
        assert script["main"](["--data-dir", str(tmp_path), "--datasets", "mnist", "cifar10"]) == 0
        assert script["main"](["--data-dir", str(tmp_path), "--datasets", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "mnist: downloading and preparing into" in out and "mnist: already prepared in" in out
    assert "  test: 3 images (32, 32, 3)" in out and f"task.data.data_dir={tmp_path}" in out

"""Damaged files and bad output paths: each is refused in one line naming the file (or setting) and the fix.

Every file the project reads outside a run's own checkpoints is damaged here in each way it can be
(missing, empty, a folder in its place, unreadable, truncated, garbled, wrong shape, wrong dtype,
out-of-range values, zero items): the image datasets' original files (MNIST IDX, CIFAR-10 python
batches) and TFDS folders, the run folders' ``summary.json`` and CSV files that ``python -m
lodo.aggregate`` and ``scripts/report_*.py`` read, the paper's CSV and the README they write into,
and the GA sweep's ``ga_state.json``. Every output folder outside the run folders is tried as a file,
under a file, read-only, and failing midway: the answer is exit status 2, one ``error:`` line, and
nothing written. All in-process: no subprocess imports TensorFlow.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import gzip
import importlib.util
import io
import json
import os
import pickle
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydra_plugins.lodo_ga_sweeper.ga_sweeper import STATE_FORMAT, SweepError, load_state
from lodo.experiment import aggregate, report
from tasks import data
from tasks.image_base import DataError

ROOT = Path(__file__).resolve().parent.parent
FEW = settings(max_examples=15, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def one_line(text: str, *names) -> str:
    """``text`` is one line that names each of ``names``."""
    assert text and "\n" not in text.strip() and "Traceback" not in text, text
    for name in names:
        assert str(name) in text, (name, text)
    return text.strip()


def refused(call, *names) -> str:
    """``call()`` raises DataError in one line naming ``names``; the message."""
    with pytest.raises(DataError) as err:
        call()
    return one_line(str(err.value), *names)


def files(folder: Path) -> dict:
    """Every file and folder under ``folder``, with each file's bytes (its mtime where unreadable): what
    'nothing written' compares."""
    found = {}
    for p in sorted(folder.rglob("*")) if folder.exists() else []:
        try:
            found[p] = p.read_bytes() if p.is_file() else "folder"
        except PermissionError:
            found[p] = p.stat().st_mtime_ns
    return found


@contextlib.contextmanager
def unreadable(path: Path):
    """``path`` without read permission. Root reads anything, so there open() is made to refuse it as the
    kernel refuses everyone else."""
    mode = path.stat().st_mode
    path.chmod(0)
    real_open = io.open

    def refusing(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(path.absolute()):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        if os.geteuid() == 0:
            patch.setattr(builtins, "open", refusing)
            patch.setattr(io, "open", refusing)
        try:
            yield
        finally:
            path.chmod(mode)


def read_only_folder(tmp_path: Path) -> Path:
    """A folder nothing can be written under: read-only by mode, or (root writes anywhere chmod allows) /sys."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    folder.chmod(0o755)
    probe = Path("/sys/lodo-bad-files-test")
    try:
        probe.mkdir()
    except OSError:
        return probe
    probe.rmdir()
    pytest.skip("no folder here is unwritable")


# --- MNIST IDX files -------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def idx_set(folder: Path, n: int = 5) -> dict:
    """A good MNIST train split (compressed): image and label files, and their arrays."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gz(idx_bytes(images)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gz(idx_bytes(labels)))
    return {"images": images, "labels": labels}


IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
GOOD_IMAGES = idx_bytes(np.zeros((5, 28, 28)))


def flipped(raw: bytes, start: int, stop: int) -> bytes:
    return raw[:start] + bytes(b ^ 0xFF for b in raw[start:stop]) + raw[stop:]


def replace_with_raw(name: str, raw: bytes):
    """The .gz removed, an uncompressed file of these bytes in its place."""
    def damage(folder: Path):
        (folder / name).unlink()
        (folder / name.removesuffix(".gz")).write_bytes(raw)
    return damage


def write(name: str, raw: bytes):
    return lambda folder: (folder / name).write_bytes(raw)


# case -> (damage to a good folder, the file named, words of the message)
IDX_CASES = {
    "images_missing": (lambda f: (f / IMAGES).unlink(), None, ["train-images-idx3-ubyte.gz", "not found"]),
    "images_a_folder": (lambda f: ((f / IMAGES).unlink(), (f / IMAGES).mkdir()), IMAGES, ["is not a file"]),
    "empty_gz": (write(IMAGES, b""), IMAGES, ["is empty"]),
    "empty_uncompressed": (replace_with_raw(IMAGES, b""), IMAGES.removesuffix(".gz"), ["is empty"]),
    "gz_not_gzip": (write(IMAGES, GOOD_IMAGES), IMAGES, ["damaged", "Not a gzipped file"]),
    "gz_corrupt_deflate": (write(IMAGES, flipped(gz(GOOD_IMAGES), 12, 30)), IMAGES, ["damaged"]),
    "gz_truncated": (write(IMAGES, gz(GOOD_IMAGES)[:40]), IMAGES, ["damaged"]),
    "gz_bad_crc": (write(IMAGES, flipped(gz(GOOD_IMAGES), -8, -6)), IMAGES, ["damaged", "CRC"]),
    "labels_where_images_belong": (write(IMAGES, gz(idx_bytes(np.zeros(5)))), IMAGES, ["magic number"]),
    "float_images": (write(IMAGES, gz(idx_bytes(np.zeros((5, 28, 28)), 0x0D))), IMAGES, ["magic number"]),
    "images_of_another_size": (write(IMAGES, gz(idx_bytes(np.zeros((5, 32, 32))))), IMAGES, ["32x32"]),
    "data_truncated": (write(IMAGES, gz(GOOD_IMAGES[:-100])), IMAGES, ["truncated"]),
    "header_only": (write(IMAGES, gz(GOOD_IMAGES[:10])), IMAGES, ["truncated", "too short"]),
    "zero_images": (write(IMAGES, gz(idx_bytes(np.zeros((0, 28, 28))))), IMAGES, ["holds no images"]),
    "fewer_labels": (write(LABELS, gz(idx_bytes(np.zeros(4)))), LABELS, ["5 images", "4 labels"]),
    "label_out_of_range": (write(LABELS, gz(idx_bytes(np.array([1, 2, 10, 3, 4])))), LABELS,
                           ["label 10 at index 2", "0..9"]),
    "labels_two_dimensional": (write(LABELS, gz(idx_bytes(np.zeros((5, 1))))), LABELS, ["magic number"]),
}


@pytest.mark.parametrize("case", list(IDX_CASES))
def test_a_damaged_idx_file_is_refused_in_one_line_naming_it(tmp_path, case):
    folder = tmp_path / "mnist"
    idx_set(folder)
    damage, name, words = IDX_CASES[case]
    damage(folder)
    text = refused(lambda: data.load_images("mnist", "train", "files", path=folder), *words)
    one_line(text, folder / name if name else folder)
    assert "task.data.path" in text  # the fix


def test_an_unreadable_idx_file_and_a_path_that_is_a_file(tmp_path):
    folder = tmp_path / "mnist"
    idx_set(folder)
    with unreadable(folder / IMAGES):
        refused(lambda: data.load_images("mnist", "train", "files", path=folder), folder / IMAGES,
                "permission denied", "task.data.path")
    refused(lambda: data.load_images("mnist", "train", "files", path=folder / IMAGES), folder / IMAGES,
            "is not a folder")
    images, labels = data.load_images("mnist", "train", "files", path=folder)  # the same folder, undamaged
    assert images.shape == (5, 28, 28, 1) and labels.dtype == np.int64


@FEW
@given(garbage=st.binary(max_size=3000), compressed=st.booleans())
def test_random_bytes_as_an_idx_file_are_refused(tmp_path, garbage, compressed):
    folder = tmp_path / "mnist"
    idx_set(folder)
    if compressed:
        (folder / IMAGES).write_bytes(garbage)
        name = folder / IMAGES
    else:
        replace_with_raw(IMAGES, garbage)(folder)
        name = folder / IMAGES.removesuffix(".gz")
    data.clear_cache()
    refused(lambda: data.load_images("mnist", "train", "files", path=folder), name)


@FEW
@given(st.data())
def test_any_damage_to_a_gzip_stream_is_refused_or_harmless(tmp_path, draw):
    folder = tmp_path / "mnist"
    arrays = idx_set(folder)
    good = (folder / IMAGES).read_bytes()
    position = draw.draw(st.integers(0, len(good) - 1))
    mode = draw.draw(st.sampled_from(["flip", "cut", "insert"]))
    value = draw.draw(st.integers(1, 255))
    damaged = {"flip": good[:position] + bytes([good[position] ^ value]) + good[position + 1:],
               "cut": good[:position],
               "insert": good[:position] + bytes([value]) + good[position:]}[mode]
    (folder / IMAGES).write_bytes(damaged)
    data.clear_cache()
    try:
        images, _ = data.load_images("mnist", "train", "files", path=folder)
    except DataError as err:
        one_line(str(err), folder / IMAGES)
    else:  # a byte gzip does not check (the header's time stamp, flags, OS): the same images
        np.testing.assert_array_equal(images[..., 0], arrays["images"])


# --- CIFAR-10 python batches ----------------------------------------------------------------------

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(n: int = 2, **changes) -> dict:
    rng = np.random.default_rng(n)
    batch = {b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
             b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"f"] * n}
    batch.update({k.encode(): v for k, v in changes.items()})
    return batch


def cifar_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in BATCHES:
        (folder / name).write_bytes(pickle.dumps(cifar_batch()))
    return folder


class Exploit:
    """A pickle that would run a shell command when loaded by a plain unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled(value) -> bytes:
    return pickle.dumps(value, protocol=2)


CIFAR_CASES = {  # case -> (bytes of data_batch_2, or a damage function; words of the message)
    "empty": (b"", ["is empty"]),
    "not_a_pickle": (b"this is not a pickle", ["is not a CIFAR-10 python batch"]),
    "truncated": (pickled(cifar_batch())[:200], ["is not a CIFAR-10 python batch"]),
    "a_list": (pickled([1, 2, 3]), ["no b'data' and b'labels'"]),
    "no_labels": (pickled({b"data": cifar_batch()[b"data"]}), ["no b'data' and b'labels'"]),
    "float_pixels": (pickled(cifar_batch(data=np.zeros((2, 3072), np.float32))), ["float32", "uint8 [N, 3072]"]),
    "pixels_as_a_list": (pickled(cifar_batch(data=[[0] * 3072] * 2)), ["data list"]),
    "wrong_row_length": (pickled(cifar_batch(data=np.zeros((2, 1024), np.uint8))), ["(2, 1024)"]),
    "zero_images": (pickled(cifar_batch(data=np.zeros((0, 3072), np.uint8), labels=[])), ["holds no images"]),
    "string_labels": (pickled(cifar_batch(labels=["cat", "dog"])), ["labels of <U3", "integers 0..9"]),
    "numeric_string_labels": (pickled(cifar_batch(labels=["3", "4"])), ["labels of <U1"]),
    "float_labels": (pickled(cifar_batch(labels=[1.0, 2.5])), ["labels of float64"]),
    "bool_labels": (pickled(cifar_batch(labels=[True, False])), ["labels of bool"]),
    "labels_an_integer": (pickled(cifar_batch(labels=7)), ["labels of int"]),
    "ragged_labels": (pickled(cifar_batch(labels=[1, [2, 3]])), ["labels of"]),
    "fewer_labels": (pickled(cifar_batch(labels=[1])), ["2 images but 1 labels"]),
    "label_ten": (pickled(cifar_batch(labels=[3, 10])), ["label 10 at index 1", "0..9"]),
    "negative_label": (pickled(cifar_batch(labels=[-1, 3])), ["label -1 at index 0"]),
    "a_folder": (lambda f: ((f / "data_batch_2").unlink(), (f / "data_batch_2").mkdir()), ["is not a file"]),
    "missing": (lambda f: (f / "data_batch_2").unlink(), ["not found", "data_batch_2"]),
}


@pytest.mark.parametrize("case", list(CIFAR_CASES))
def test_a_damaged_cifar_batch_is_refused_in_one_line_naming_it(tmp_path, case):
    folder = cifar_folder(tmp_path / "cifar")
    damage, words = CIFAR_CASES[case]
    if isinstance(damage, bytes):
        (folder / "data_batch_2").write_bytes(damage)
    else:
        damage(folder)
    text = refused(lambda: data.load_images("cifar10", "train", "files", path=folder), *words)
    one_line(text, folder if case == "missing" else folder / "data_batch_2")
    assert "task.data.path" in text


def test_a_cifar_batch_cannot_run_code_and_an_unreadable_one_is_named(tmp_path):
    folder = cifar_folder(tmp_path / "cifar")
    marker = tmp_path / "ran"
    (folder / "test_batch").write_bytes(pickled(Exploit(marker)))
    refused(lambda: data.load_images("cifar10", "test", "files", path=folder), folder / "test_batch",
            "refers to", "system")
    assert not marker.exists()
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(3), protocol=5))  # numpy 2's own format
    assert data.load_images("cifar10", "test", "files", path=folder)[0].shape == (3, 32, 32, 3)
    data.clear_cache()
    with unreadable(folder / "test_batch"):
        refused(lambda: data.load_images("cifar10", "test", "files", path=folder), folder / "test_batch",
                "permission denied")


@FEW
@given(garbage=st.binary(max_size=2000))
def test_random_bytes_as_a_cifar_batch_are_refused(tmp_path, garbage):
    folder = cifar_folder(tmp_path / "cifar")
    (folder / "test_batch").write_bytes(garbage)
    data.clear_cache()
    refused(lambda: data.load_images("cifar10", "test", "files", path=folder), folder / "test_batch")


@FEW
@given(st.data())
def test_a_cifar_batch_cut_anywhere_is_refused(tmp_path, draw):
    folder = cifar_folder(tmp_path / "cifar")
    good = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(good[:draw.draw(st.integers(0, len(good) - 1))])
    data.clear_cache()
    refused(lambda: data.load_images("cifar10", "test", "files", path=folder), folder / "test_batch")


# --- TFDS folders and the image tasks ---------------------------------------------------------------

def test_a_tfds_folder_that_is_a_file_or_has_garbled_metadata(tmp_path):
    import tensorflow_datasets as tfds

    (tmp_path / "afile").write_text("x")
    refused(lambda: data.load_images("mnist", "train", "tfds", data_dir=tmp_path / "afile"), tmp_path / "afile",
            "is not a folder", "make data")
    builder = tfds.builder("mnist", data_dir=str(tmp_path))
    Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
    (Path(builder.data_dir) / "dataset_info.json").write_text('{"name": "mni')
    refused(lambda: data.load_images("mnist", "train", "tfds", data_dir=tmp_path), tmp_path, "make data")


def test_the_image_tasks_refuse_data_they_cannot_train_on_before_building_anything(tmp_path):
    from tasks.pixelcnn_mnist import PixelCNNMNIST
    from tasks.resnet18_cifar10 import ResNet18CIFAR10

    mnist = tmp_path / "mnist"
    idx_set(mnist, n=64)  # all of them would be held out for validation
    for kind in ("images-idx3", "labels-idx1"):  # the same as the test split
        (mnist / f"t10k-{kind}-ubyte.gz").write_bytes((mnist / f"train-{kind}-ubyte.gz").read_bytes())
    task = PixelCNNMNIST(data={"source": "files", "path": str(mnist)})
    refused(task.load, f"task.data.path={mnist}", "64 images", "validation")

    cifar = cifar_folder(tmp_path / "cifar")
    (cifar / "data_batch_1").write_bytes(pickled(cifar_batch(data=np.zeros((0, 3072), np.uint8), labels=[])))
    tic = time.perf_counter()
    refused(ResNet18CIFAR10(data={"source": "files", "path": str(cifar)}).load, cifar / "data_batch_1", "no images")
    assert time.perf_counter() - tic < 5  # refused while reading, not once training has compiled

    for name in BATCHES:  # the blue channel the same everywhere: normalizing would divide by zero
        batch = cifar_batch()
        batch[b"data"][:, 2048:] = 7
        (cifar / name).write_bytes(pickled(batch))
    data.clear_cache()
    task = ResNet18CIFAR10(data={"source": "files", "path": str(cifar)})
    refused(task.load, f"task.data.path={cifar}", "no variation")
    assert task._arrays is None  # a later load() tries again instead of training on it


# --- lodo.aggregate ---------------------------------------------------------------------------------

def summary(optimizer="adam", **changes) -> dict:
    base = {"task": "noisy_quadratic_bowl", "optimizer": optimizer, "hyperparameters": {"learning_rate": 0.1},
            "task_options": {"dim": 10, "noise_variance": 1.0}, "steps": 100, "seeds": [0, 1],
            "loss_final_mean": 2.0, "loss_final_std": 1.0, "loss_final_per_seed": [1.0, 3.0], "diverged": 0,
            "report_window": [99, 100], "train_time_s": 2.0, "seed_steps_per_s": 100.0, "completed": True}
    base.update(changes)
    return base


def run_folder(folder: Path, content, curve: str | None = None) -> Path:
    """A run folder as lodo.run leaves it: config.yaml, summary.json (``content``: a dict, str or bytes), curve.csv."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    if isinstance(content, dict):
        content = json.dumps(content)
    if content is not None:
        (folder / "summary.json").write_bytes(content.encode() if isinstance(content, str) else content)
    rows = "".join(f"{s},{t},{0.01 * t},{10.0 / t}\n" for s in (0, 1) for t in (50, 100))
    (folder / "curve.csv").write_text(curve if curve is not None else "seed,step,train_time_s,loss\n" + rows)
    return folder


def aggregate_main(capsys, *argv) -> tuple[int, str, list[str]]:
    status = aggregate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.strip()]


def error_line(lines: list[str], *names) -> str:
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return one_line(errors[0], *names)


# summary.json content -> what its one skip line says
BAD_SUMMARIES = {
    "only_completed": ({"completed": True}, "lacks what a table row needs (no task; no optimizer; no steps"),
    "steps_a_string": (summary(steps="abc"), "steps is 'abc', expected a positive integer"),
    "seeds_not_a_list": (summary(seeds=3), "seeds is 3, expected a non-empty list of seeds"),
    "no_seeds": (summary(seeds=[]), "seeds is [], expected"),
    "task_empty": (summary(task=""), "task is '', expected a name"),
    "loss_a_string": (summary(loss_final_mean="low"), "loss_final_mean is 'low', expected a number or null"),
    "diverged_negative": (summary(diverged=-1), "diverged is -1"),
    "more_diverged_than_seeds": (summary(diverged=3), "more than its 2 seeds"),
    "hyperparameters_a_list": (summary(hyperparameters=[1]), "hyperparameters is [1], expected an object"),
    "time_budget_loss_a_string": (summary(time_budget={"seconds": 3, "loss_mean": "x"}), "time_budget.loss_mean"),
    "a_list": ("[1, 2]", "not a JSON object"),
    "truncated": ('{"task": "noisy_quad', "unreadable summary.json"),
    "empty": ("", "unreadable summary.json"),
    "not_utf8": (b"\xff\xfe{\x00", "unreadable summary.json"),
    "nested_too_deep": ("[" * 100_000, "unreadable summary.json"),
    "not_completed": (summary(completed=False), "not completed"),
}


def test_aggregate_skips_each_damaged_summary_with_one_line_and_never_makes_a_row_of_question_marks(tmp_path, capsys):
    root = tmp_path / "runs"
    run_folder(root / "good", summary())
    for name, (content, _) in BAD_SUMMARIES.items():
        run_folder(root / name, content)
    (root / "a_folder").mkdir()
    (root / "a_folder" / "config.yaml").write_text("seed: 0\n")
    (root / "a_folder" / "summary.json").mkdir()
    status, out, lines = aggregate_main(capsys, root)
    assert status == 0, lines
    for name, (_, words) in {**BAD_SUMMARIES, "a_folder": (None, "unreadable summary.json")}.items():
        mine = [line for line in lines if line.startswith(f"skipped {root / name}:")]
        assert len(mine) == 1 and words in mine[0], (name, lines)
    assert "?" not in out and out.count("| noisy_quadratic_bowl |") == 1
    table = (root / "aggregate.csv").read_text()
    assert "?" not in table and len(table.splitlines()) == 2


@FEW
@given(content=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                            lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.sampled_from(sorted(summary())), inner, max_size=4), max_leaves=12),
       overlay=st.booleans())
def test_aggregate_of_any_json_summary_is_a_real_row_or_one_skip_line(tmp_path_factory, capsys, monkeypatch, content,
                                                                       overlay):
    monkeypatch.setattr(aggregate, "curves_figure", lambda root, frame, out_dir: [])  # seconds per example
    root = tmp_path_factory.mktemp("runs")
    if overlay and isinstance(content, dict):
        content = {**summary(), **content}  # a good summary with some fields damaged
    run_folder(root / "run", json.dumps(content, allow_nan=True))
    status, out, lines = aggregate_main(capsys, root, "--out", root / "out")
    if status == 2:
        assert lines[0].startswith(f"skipped {root / 'run'}: ") and len(lines) == 2, lines
        error_line(lines, "no finished run folder")
        assert not (root / "out").exists()
    else:  # a row of what the summary says, not of defaults
        import pandas as pd

        assert status == 0, lines
        row = pd.read_csv(root / "out" / "aggregate.csv", dtype=str, keep_default_na=False).iloc[0]
        assert (row.task, row.optimizer) == (content["task"], content["optimizer"])
        assert int(row.steps) == content["steps"] and int(row.seeds) == len(content["seeds"])


def test_aggregate_refuses_an_out_that_cannot_be_a_folder_before_any_work(tmp_path, capsys):
    root = tmp_path / "runs"
    run_folder(root / "good", summary())
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    read_only = read_only_folder(tmp_path)
    before = files(tmp_path)
    for out, words in [(afile, "is a file, not a folder"), (afile / "sub" / "out", "is a file, not a folder"),
                       (read_only / "out", "cannot")]:
        status, stdout, lines = aggregate_main(capsys, root, "--out", out)
        assert status == 2 and not stdout
        error_line(lines, out, words, "--out")
        assert files(tmp_path) == before  # nothing written, the file kept
        assert not any(line.startswith("skipped") for line in lines)  # refused before reading the runs
    status, _, lines = aggregate_main(capsys, root, "--out", tmp_path / "new" / "deeper")  # a missing parent is made
    assert status == 0 and (tmp_path / "new" / "deeper" / "aggregate.csv").is_file(), lines


def test_aggregate_that_fails_midway_writes_nothing(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    run_folder(root / "good", summary())
    out = tmp_path / "out" / "sub"

    def disk_full(fig, out_dir, stem, dpi=130):
        report.pyplot().close(fig)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / f"{stem}.png"))

    monkeypatch.setattr(aggregate, "save_figure", disk_full)
    status, _, lines = aggregate_main(capsys, root, "--out", out)
    assert status == 2
    error_line(lines, out / "aggregate_curves.png", "No space left on device")
    assert not (tmp_path / "out").exists()  # not even the folders it would have made


def test_aggregate_names_a_garbled_curve_and_keeps_the_row(tmp_path, capsys):
    root = tmp_path / "runs"
    run_folder(root / "a", summary(), curve="seed,step,train_time_s,loss\n0,10,0.1,abc\n")
    run_folder(root / "b", summary(optimizer="yogi"), curve="\x00\x01garbage")
    status, out, lines = aggregate_main(capsys, root)
    assert status == 0 and out.count("| noisy_quadratic_bowl |") == 2
    for name in ("a", "b"):
        assert f"no learning curve for {root / name}: curve.csv is missing or unreadable" in lines


# --- scripts/report_*.py ----------------------------------------------------------------------------

def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table1():
    return script("report_table1")


def report_main(capsys, module, *argv) -> tuple[int, list[str]]:
    status = module.main([str(a) for a in argv] + ["--steps", "100", "--seeds", "2"])  # the hand-made runs' scale
    _, err = capsys.readouterr()
    return status, [line for line in err.splitlines() if line.strip()]


def table1_runs(root: Path) -> Path:
    run_folder(root / "adam", summary())
    run_folder(root / "lodo", summary(optimizer="lodo"))
    return root


def test_a_report_refuses_bad_output_folders_readmes_and_paper_files_before_any_work(tmp_path, capsys, table1):
    runs = table1_runs(tmp_path / "runs")
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    garbled = tmp_path / "paper.csv"
    garbled.write_text("model,loss\nadam,1\n")
    binary = tmp_path / "binary.md"
    binary.write_bytes(b"\xff\xfe\x00")
    read_only = read_only_folder(tmp_path)
    before = files(tmp_path)
    cases = [
        ([afile], ["OUT_DIR", afile, "is a file, not a folder"]),
        ([afile / "out"], ["OUT_DIR", afile, "is a file"]),
        ([read_only / "out"], ["OUT_DIR", "cannot"]),
        ([tmp_path / "out", "--readme", tmp_path], ["--readme", tmp_path, "is not a file"]),
        ([tmp_path / "out", "--readme", tmp_path / "missing.md"], ["--readme", "missing.md", "is not a file"]),
        ([tmp_path / "out", "--readme", binary], ["--readme", binary, "unreadable"]),
        ([tmp_path / "out", "--paper", tmp_path / "none.csv"], ["--paper", "none.csv", "is not a file"]),
        ([tmp_path / "out", "--paper", garbled], [garbled, "has no optimizer column"]),
        ([tmp_path / "out", "--paper", binary], [binary, "unreadable"]),
    ]
    for argv, words in cases:
        status, lines = report_main(capsys, table1, runs, *argv)
        assert status == 2, (argv, lines)
        error_line(lines, *words)
        assert files(tmp_path) == before and not (tmp_path / "out").exists(), argv


CURVES = {  # curve.csv content -> words of the error
    "garbage": ("\x00\x01\x02 not,a\ncsv", "curve.csv"),
    "no_loss_column": ("seed,step,train_time_s\n0,1,0.1\n", "has no loss column"),
    "loss_not_a_number": ("seed,step,train_time_s,loss\n0,1,0.1,low\n", "not numbers in loss"),
    "empty": ("", "unreadable"),
}


@pytest.mark.parametrize("case", list(CURVES))
def test_a_report_that_meets_a_damaged_curve_names_it_and_writes_nothing(tmp_path, capsys, table1, case):
    runs = table1_runs(tmp_path / "runs")
    content, words = CURVES[case]
    (runs / "lodo" / "curve.csv").write_text(content)
    out = tmp_path / "results"
    status, lines = report_main(capsys, table1, runs, out)
    assert status == 2
    error_line(lines, runs / "lodo" / "curve.csv", words)
    assert not out.exists()  # table1.md was built before the figure met the curve: none of it was moved in


def test_a_report_skips_damaged_summaries_with_one_line_each(tmp_path, capsys, table1):
    runs = table1_runs(tmp_path / "runs")
    run_folder(runs / "broken", '{"task": ')
    run_folder(runs / "bare", {"completed": True})
    run_folder(runs / "no_std", {k: v for k, v in summary(optimizer="yogi").items() if k != "loss_final_std"})
    status, lines = report_main(capsys, table1, runs, tmp_path / "out")
    assert status == 0, lines
    skipped = [line for line in lines if line.startswith("skipped unfinished or crashed runs: ")]
    assert len(skipped) == 1, lines  # one line naming each run skipped, and why
    assert "bare (summary.json lacks what a table row needs (no task; no optimizer" in skipped[0]
    assert "broken (unreadable summary.json (Expecting value: line 1 column 10 (char 9)))" in skipped[0]
    assert "no_std (summary.json lacks what a table row needs (no loss_final_std))" in skipped[0]
    table = (tmp_path / "out" / "table1.md").read_text()
    assert "| Adam |" in table and "| LODO |" in table and "Yogi" not in table
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_other_reports_refuse_what_they_cannot_read(tmp_path, capsys):
    frozen, table7 = script("report_frozen"), script("report_table7")
    runs = table1_runs(tmp_path / "runs")
    status, lines = report_main(capsys, frozen, runs, tmp_path / "out")  # no run has a frozen result
    assert status == 2 and not (tmp_path / "out").exists()
    error_line(lines, "no run with a frozen-preconditioner result", "make reproduce-frozen")
    summary_path = runs / "lodo" / "summary.json"
    summary_path.write_text(json.dumps(summary(optimizer="lodo", frozen={"steps": "many"})))
    status, lines = report_main(capsys, frozen, runs, tmp_path / "out")
    assert status == 2 and any("lodo's summary.json has a damaged frozen result" in line for line in lines)

    summary_path.write_text(json.dumps(summary(optimizer="lodo", task_options={"dim": 10})))
    status, lines = report_main(capsys, table7, runs, tmp_path / "out")
    assert status == 0 and "skipped unfinished or crashed runs: lodo (summary.json lacks what a table row needs " \
        "(no task_options.noise_variance))" in lines
    assert "| LODO |" not in (tmp_path / "out" / "table7.md").read_text()
    assert "| Adam |" in (tmp_path / "out" / "table7.md").read_text()


# --- the GA sweep's ga_state.json ---------------------------------------------------------------------

SETUP = {"task": "rosenbrock", "optimizer": "adam", "arguments": [], "search_space": {"learning_rate": "rate"},
         "center": [0.1], "schedule": "rosenbrock", "population": 2, "plan": [[3.0, 20], [2.0, 20]], "seed": 0,
         "first_seed": 1000, "score_window": 0.1, "one_job_per_individual": False, "job_overrides": []}


def good_state() -> dict:
    record = {"generation": 0, "std": 3.0, "steps": 20, "mean": [-2.3], "z": [[-1.0], [-3.0]],
              "values": [[0.37], [0.05]], "seeds": [1000, 1001], "scores": [1.5, None], "wall_s": 1.0}
    return {"format": STATE_FORMAT, "setup": SETUP, "generations": [record], "mean": [-1.0], "jobs_launched": 1,
            "started": "2024-01-01T00:00:00"}


def state_refused(path: Path, *words) -> str:
    """load_state refuses ``path`` in one line naming it and ``words``, and leaves it as it was."""
    before = files(path.parent)
    with pytest.raises(SweepError) as err:
        load_state(path, SETUP)
    text = one_line(str(err.value), path, *words)
    assert files(path.parent) == before  # never replaced or deleted
    return text


def with_generation(**changes) -> dict:
    state = good_state()
    state["generations"][0].update(changes)
    return state


BAD_STATES = {  # content -> words
    "empty": ("", "not JSON"),
    "truncated": (json.dumps(good_state())[:100], "not JSON"),
    "not_utf8": (b"\xff\xfe\x00{", "not JSON"),
    "a_list": ("[]", "a JSON list"),
    "no_setup": (json.dumps({"format": STATE_FORMAT}), "no format and setup"),
    "setup_a_string": (json.dumps({**good_state(), "setup": "x"}), "no format and setup"),
    "mean_too_short": (json.dumps({**good_state(), "mean": []}), "mean is not a list of 1 numbers"),
    "mean_strings": (json.dumps({**good_state(), "mean": ["a"]}), "mean"),
    "jobs_negative": (json.dumps({**good_state(), "jobs_launched": -1}), "jobs_launched"),
    "generations_a_string": (json.dumps({**good_state(), "generations": "x"}), "generations is not a list"),
    "too_many_generations": (json.dumps({**good_state(), "generations": good_state()["generations"] * 3}),
                             "generations"),
    "generation_out_of_order": (json.dumps(with_generation(generation=4)), "generations[0] is not the record"),
    "no_scores": (json.dumps(with_generation(scores=None)), "generations[0] lacks"),
    "scores_of_another_population": (json.dumps(with_generation(scores=[1.0])), "generations[0] lacks"),
    "values_ragged": (json.dumps(with_generation(values=[[1.0], []])), "generations[0] lacks"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_damaged_ga_state_is_refused_in_one_line_and_kept(tmp_path, case):
    content, words = BAD_STATES[case]
    path = tmp_path / "ga_state.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    text = state_refused(path, words)
    if "holds a GA sweep with other settings" not in text:
        assert "move it aside" in text and "hydra.sweep.dir" in text


def test_a_ga_state_that_is_a_folder_or_unreadable_and_one_that_is_fine(tmp_path):
    path = tmp_path / "ga_state.json"
    path.mkdir()
    state_refused(path, "is not a file")
    path.rmdir()
    path.write_text(json.dumps(good_state()))
    assert load_state(path, SETUP) == json.loads(json.dumps(good_state()))
    before = path.read_bytes()
    with unreadable(path):
        state_refused(path, "cannot read", "Permission denied")
    assert path.read_bytes() == before
    other = dict(SETUP, seed=1)
    with pytest.raises(SweepError, match=r"holds a GA sweep with other settings \(seed\)"):
        load_state(path, other)


@FEW
@given(garbage=st.binary(max_size=500))
def test_random_bytes_as_a_ga_state_are_refused(tmp_path, garbage):
    path = tmp_path / "ga_state.json"
    path.write_bytes(garbage)
    state_refused(path)


@FEW
@given(st.data())
def test_a_ga_state_cut_anywhere_is_refused(tmp_path, draw):
    good = json.dumps(good_state(), indent=2).encode()
    path = tmp_path / "ga_state.json"
    path.write_bytes(good[:draw.draw(st.integers(0, len(good) - 2))])
    state_refused(path)


@pytest.fixture
def hydra_in_process(monkeypatch):
    """The real command line in this process, its Hydra global state cleared afterwards.

    Hydra's logging setup is left out (``hydra/*_logging=none``): it would close every live logging handler,
    and absl's then closes the stream it was made with, here pytest's capture.
    """
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # recorded as it was, so the "1" that cli() sets is undone too
    monkeypatch.delenv("HYDRA_FULL_ERROR")

    def run(*args) -> int:
        from lodo.experiment.cli import cli

        argv = ["lodo.run", *map(str, args), "hydra/hydra_logging=none", "hydra/job_logging=none"]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            with pytest.raises(SystemExit) as exit_:
                cli()
        finally:
            GlobalHydra.instance().clear()
        return exit_.value.code

    return run


def test_a_ga_sweep_over_a_damaged_state_stops_in_one_line_and_writes_nothing(tmp_path, capsys, hydra_in_process):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "ga_state.json").write_text('{"format": 1, "setup": ')
    before = files(tmp_path)
    sweep_args = ["-m", "hydra/sweeper=ga", "task=rosenbrock", "optimizer=adam", "hydra.sweeper.population=2",
                  "hydra.sweeper.generations=2", "hydra.sweeper.steps=10", f"hydra.sweep.dir={sweep}"]
    status = hydra_in_process(*sweep_args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(err) == 1
    one_line(err[0], sweep / "ga_state.json", "not JSON", "move it aside")
    assert files(tmp_path) == before  # no multirun.yaml, no ga.log, the state untouched

    (sweep / "ga_state.json").unlink()
    (tmp_path / "afile").write_text("mine\n")
    before = files(tmp_path)
    status = hydra_in_process(*sweep_args, f"hydra.sweeper.export_dir={tmp_path / 'afile'}")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(err) == 1
    one_line(err[0], "hydra.sweeper.export_dir", tmp_path / "afile", "is a file, not a folder")
    assert files(tmp_path) == before


@pytest.mark.parametrize("curve", ["", "\x00garbage", "seed,step\n0,1\n", "seed,step,loss\n0,10,low\n",
                                   "seed,step,loss\n0,ten,1.0\n"])
def test_a_ga_generation_whose_curve_is_damaged_scores_worst_instead_of_stopping_the_sweep(tmp_path, curve):
    from hydra_plugins.lodo_ga_sweeper.ga_sweeper import GASweeper

    (tmp_path / "curve.csv").write_text(curve)
    (tmp_path / "summary.json").write_text('{"seeds": 3, "loss_final_per_seed": "x"}')
    assert GASweeper()._scores(tmp_path, range(2), [1000, 1001], 10) == {}  # both individuals: the worst score

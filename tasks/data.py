"""The image datasets as in-memory NumPy arrays, from one of three sources.

``load_images(dataset, split, source, data_dir, path)`` returns ``(images, labels)``:
uint8 ``[N, H, W, C]`` and int64 ``[N]``. The task YAML's ``data`` block picks the
source:

- ``tfds``: TensorFlow Datasets, read from a prepared ``data_dir`` (``make data``).
  Nothing is ever downloaded here: compute nodes often have no internet, and a
  missing dataset must say how to get it instead of hanging in a download.
- ``files``: the datasets' original distribution files in a local folder (MNIST-format
  IDX files, the CIFAR-10 python batches), parsed with NumPy.
- ``synthetic``: seeded random arrays of the right shapes, for benchmarks and smoke tests.

Arrays are cached per process (read-only), so several tasks or seeds in one
process read the files once.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from tasks.image_base import DataError

DATASETS = {  # name -> (image shape, number of classes)
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
}
SPLITS = ("train", "test")
SOURCES = ("tfds", "files", "synthetic")
DATA_KEYS = ("source", "data_dir", "path")
SYNTHETIC_SIZES = {"train": 512, "test": 64}

IDX_PREFIX = {"train": "train", "test": "t10k"}
IDX_UBYTE = 0x08  # the IDX element type of uint8
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def data_options(data: dict | None) -> dict:
    """The task YAML's ``data`` block, checked and completed (``ValueError``, one line, if bad)."""
    data = dict(data or {})
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"unknown task.data key(s) {', '.join(unknown)}; valid keys: {', '.join(DATA_KEYS)}")
    options = {"source": data.get("source") or "tfds", "data_dir": data.get("data_dir"), "path": data.get("path")}
    if options["source"] not in SOURCES:
        raise ValueError(f"task.data.source must be one of {', '.join(SOURCES)}, got {options['source']!r}")
    for key in ("data_dir", "path"):
        if options[key] is not None and not isinstance(options[key], (str, os.PathLike)):
            raise ValueError(f"task.data.{key} must be a folder path or null, got {options[key]!r}")
    if options["source"] == "files" and not options["path"]:
        raise ValueError("task.data.source=files needs task.data.path=<folder with the original dataset files>")
    return options


def load_images(dataset: str, split: str, source: str = "tfds", data_dir=None, path=None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W, C], labels int64 [N])`` of one split; ``DataError`` if unreadable.

    What is read is checked here (counts, shapes, dtypes, label range), file by file, so a damaged
    dataset is refused in seconds, naming the file, instead of failing once training has compiled.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    data_dir = None if data_dir is None else os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    path = None if path is None else os.path.abspath(os.path.expanduser(os.fspath(path)))
    key = (dataset, split, source, data_dir if source == "tfds" else None, path if source == "files" else None)
    if key not in _CACHE:
        if source == "tfds":
            images, labels, where = _from_tfds(dataset, split, data_dir)
        elif source == "files":
            if path is None:
                raise DataError("task.data.source=files needs task.data.path=<folder with the original dataset files>")
            images, labels, where = _from_files(dataset, split, Path(path))
        else:
            images, labels = _synthetic(dataset, split)
            where = "the synthetic source"
        images, labels = _check(dataset, split, images, labels, where)
        images.setflags(write=False)
        labels.setflags(write=False)
        _CACHE[key] = (images, labels)
    return _CACHE[key]


def describe_source(options: dict) -> str:
    """Where a task's data comes from, as the setting that chose it (for messages)."""
    if options.get("source") == "files":
        return f"task.data.path={options.get('path')}"
    if options.get("source") == "synthetic":
        return "task.data.source=synthetic"
    return f"task.data.data_dir={options.get('data_dir') or '<the TFDS default>'}"


def clear_cache() -> None:
    _CACHE.clear()


def _check(dataset, split, images, labels, where) -> tuple[np.ndarray, np.ndarray]:
    """The last guard for every source: the arrays of ``dataset`` (labels as int64), else ``DataError``."""
    shape, classes = DATASETS[dataset]
    fix = f"the data is not {dataset}'s: " + (_how_to_get(dataset) if "TFDS" in where else "replace it")
    if images.dtype != np.uint8 or images.shape[1:] != shape or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{dataset} {split} in {where} has images {images.dtype} {images.shape} and labels "
                        f"{labels.dtype} {labels.shape}, expected uint8 [N, {', '.join(map(str, shape))}] and [N]: "
                        + fix)
    if not len(images):
        raise DataError(f"{dataset} {split} in {where} holds no images: {fix}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{dataset} {split} in {where} has {labels.dtype} labels, expected integers "
                        f"0..{classes - 1}: {fix}")
    if labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"{dataset} {split} in {where} has labels outside 0..{classes - 1}: {fix}")
    return images, labels.astype(np.int64, copy=False)


def _how_to_get(dataset: str) -> str:
    files = "the IDX files" if dataset != "cifar10" else "the cifar-10-batches-py files"
    return ("run `make data` on a machine with internet (DATA_DIR=<dir> picks the folder), or point "
            "task.data.data_dir=<dir> at a prepared TFDS folder, or use task.data.source=files "
            f"task.data.path=<folder with {files}>")


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --- TensorFlow Datasets -----------------------------------------------------------------------

def _from_tfds(dataset: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    if data_dir is not None and os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"task.data.data_dir {data_dir} is not a folder: " + _how_to_get(dataset))
    # try_gcs=False keeps the builder on data_dir; building it only reads local metadata (TFDS
    # 4.9.10 ships with its GCS access disabled), and as_dataset never downloads. Checking the
    # metadata files first avoids TFDS's own warning about an incomplete folder.
    try:
        builder = tfds.builder(dataset, data_dir=data_dir, try_gcs=False)
        variant = Path(builder.data_dir)
        prepared = (variant / "dataset_info.json").is_file() and (variant / "features.json").is_file()
        prepared = prepared and builder.is_prepared()
    except Exception as err:  # noqa: BLE001 - damaged metadata: say which folder, not TFDS's stack
        raise DataError(f"dataset {dataset} in {data_dir or 'the TFDS default folder'} has unreadable metadata "
                        f"({_first_line(err)}): prepare it again with `make data`") from None
    if not prepared:
        raise DataError(f"dataset {dataset} is not prepared in {builder.data_dir_root} (no {variant}): "
                        + _how_to_get(dataset))
    try:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False).batch(10_000)
        batches = list(tfds.as_numpy(ds))
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which folder, not TFDS's stack
        raise DataError(f"dataset {dataset} in {variant} cannot be read ({_first_line(err)}): prepare it again "
                        "with `make data`") from None
    if not batches:
        raise DataError(f"dataset {dataset} in {variant} has an empty {split} split: prepare it again with `make data`")
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]),
            f"the TFDS folder {variant}")


# --- original distribution files -----------------------------------------------------------------

def _files_fix(dataset: str) -> str:
    return f"replace it with the original {dataset} file, or point task.data.path= at a folder that holds them"


def _find(folder: Path, names: list[str], what: str, fix: str) -> Path:
    """The first of ``names`` in ``folder`` that is a file; a folder or other non-file in its place is refused."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    for name in names:
        if os.path.lexists(folder / name):
            raise DataError(f"{folder / name} is not a file (a folder, a broken link or a device): {fix}")
    raise DataError(f"{what} not found: no {' or '.join(names)} in {folder}: {fix}")


def _read_bytes(file: Path, fix: str) -> bytes:
    """The file's bytes, decompressed if it is a ``.gz``; ``DataError`` for any damage."""
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as f:
                return f.read()
        return file.read_bytes()
    except PermissionError:
        raise DataError(f"cannot read {file}: permission denied; make it readable (chmod a+r) or point "
                        f"task.data.path= elsewhere") from None
    except (OSError, EOFError, zlib.error) as err:  # bad gzip magic or CRC, truncated or corrupt deflate stream
        raise DataError(f"{file} is damaged ({_first_line(err)}): {fix}") from None


def _read_idx(file: Path, ndim: int, fix: str) -> np.ndarray:
    """An IDX array of unsigned bytes: magic 0 0 0x08 ndim, ndim big-endian uint32 sizes, then the data."""
    raw = _read_bytes(file, fix)
    if not raw:
        raise DataError(f"{file} is empty: {fix}")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise DataError(f"{file} is not an IDX file of {ndim}-D unsigned bytes (bad magic number "
                        f"{raw[:4].hex()}, expected 000008{ndim:02x}): {fix}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{file} is truncated: {len(raw)} bytes, too short for an IDX header of {ndim} sizes: {fix}")
    sizes = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = math.prod(sizes)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != expected:
        raise DataError(f"{file} is truncated or padded: its header says {'x'.join(map(str, sizes))} = "
                        f"{expected} bytes of data, it holds {data.size}: {fix}")
    return data.reshape(sizes)


def _from_files(dataset: str, split: str, folder: Path):
    if not folder.is_dir():
        raise DataError(f"task.data.path {folder} is not a folder: point it at the folder with the original "
                        f"{dataset} files")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DataError(f"cannot read the folder {folder}: permission denied; make it readable or point "
                        f"task.data.path= elsewhere")
    if dataset == "cifar10":
        return (*_read_cifar(folder, split), f"task.data.path={folder}")
    shape, classes = DATASETS[dataset]
    prefix = IDX_PREFIX[split]
    fix = f"point task.data.path at the folder holding the original {dataset} IDX files"
    image_file = _find(folder, [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte"], f"{dataset} {split} images", fix)
    label_file = _find(folder, [f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte"], f"{dataset} {split} labels", fix)
    images = _read_idx(image_file, 3, _files_fix(dataset))
    if images.shape[1:] != shape[:2]:
        raise DataError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images, {dataset} has 28x28: "
                        + _files_fix(dataset))
    if not len(images):
        raise DataError(f"{image_file} holds no images: {_files_fix(dataset)}")
    labels = _read_idx(label_file, 1, _files_fix(dataset))
    if len(images) != len(labels):
        raise DataError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels: "
                        + _files_fix(dataset))
    if labels.max() >= classes:
        raise DataError(f"{label_file} holds label {int(labels.max())} at index {int(labels.argmax())}; {dataset}'s "
                        f"labels are 0..{classes - 1}: {_files_fix(dataset)}")
    return images[..., None], labels.astype(np.int64), f"task.data.path={folder}"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain data and NumPy arrays only: a batch file cannot make the loader run other code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               *((builtins, name) for builtins in ("builtins", "__builtin__")
                 for name in ("bytes", "bytearray", "set", "frozenset", "complex")),
               *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
                 for name in ("_reconstruct", "scalar")),
               *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def _read_cifar(folder: Path, split: str):
    if not (folder / CIFAR_BATCHES[split][0]).is_file() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    pixels = 3 * 32 * 32
    classes = DATASETS["cifar10"][1]
    fix = _files_fix("cifar10")
    images, labels = [], []
    for name in CIFAR_BATCHES[split]:
        file = _find(folder, [name], f"cifar10 {split} batch",
                     "point task.data.path at the folder holding data_batch_1..5 and test_batch (or its parent "
                     "with cifar-10-batches-py/)")
        raw = _read_bytes(file, fix)
        if not raw:
            raise DataError(f"{file} is empty: {fix}")
        try:
            batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a CIFAR batch"
            raise DataError(f"{file} is not a CIFAR-10 python batch ({_first_line(err)}): {fix}") from None
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DataError(f"{file} is not a CIFAR-10 python batch (no b'data' and b'labels' entries): {fix}")
        data = batch[b"data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
            described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{file} is not a CIFAR-10 python batch (data {described}, expected uint8 [N, {pixels}]): "
                            + fix)
        if not len(data):
            raise DataError(f"{file} holds no images: {fix}")
        try:
            batch_labels = np.asarray(batch[b"labels"])
        except (TypeError, ValueError):  # ragged lists
            batch_labels = np.asarray(None)
        if batch_labels.ndim != 1 or batch_labels.dtype.kind not in "iu":
            what = (f"{batch_labels.dtype} {batch_labels.shape}" if batch_labels.ndim
                    else type(batch[b"labels"]).__name__)
            raise DataError(f"{file} has labels of {what}, expected a list of {len(data)} integers 0..{classes - 1}: "
                            + fix)
        if len(batch_labels) != len(data):
            raise DataError(f"{file} holds {len(data)} images but {len(batch_labels)} labels: {fix}")
        if batch_labels.min() < 0 or batch_labels.max() >= classes:
            bad = int(np.flatnonzero((batch_labels < 0) | (batch_labels >= classes))[0])
            raise DataError(f"{file} holds label {int(batch_labels[bad])} at index {bad}; CIFAR-10's labels are "
                            f"0..{classes - 1}: {fix}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # stored channel-major
        labels.append(batch_labels.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# --- synthetic -------------------------------------------------------------------------------------

def _synthetic(dataset: str, split: str):
    shape, classes = DATASETS[dataset]
    rng = np.random.default_rng([list(DATASETS).index(dataset), SPLITS.index(split), 0x5E7])
    n = SYNTHETIC_SIZES[split]
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int64)


# --- shared by the image tasks ---------------------------------------------------------------------

def check_int(name: str, value, minimum: int = 1, allow_none: bool = False):
    """``value`` as an int >= ``minimum`` (or None where allowed); ``ValueError`` naming the option otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        null = " or null" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{null}, got {value!r}")
    return int(value)


def check_unknown(task: str, unknown: dict, init) -> None:
    """A one-line ``ValueError`` for task options the constructor ``init`` does not take."""
    if unknown:
        import inspect

        valid = [p for p in inspect.signature(init).parameters if p not in ("self", "unknown")]
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for task {task}; valid options: "
                         f"{', '.join(valid)}")


def step_keys(seed: int, stream: int, step, count: int):
    """``count`` independent stateless RNG keys ``[count, 2]`` for one training step.

    A pure function of (seed, stream, step): a run resumed at step N draws what an
    uninterrupted run would have drawn. Philox is named explicitly so that every device
    (tf.data runs on the host; ``auto_select`` could differ elsewhere) draws the same numbers.
    """
    import tensorflow as tf

    base = tf.constant([int(seed), int(stream)], tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64), alg="philox")
    return tf.random.experimental.stateless_split(key, count, alg="philox")


def layer_seed(seed: int, *indices: int) -> int:
    """A 31-bit initializer seed for one variable of one layer, derived from the run's seed."""
    return int(np.random.SeedSequence([int(seed), *indices]).generate_state(1)[0] & 0x7FFFFFFF)

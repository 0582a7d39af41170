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
import os
import pickle
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
    """``(images uint8 [N, H, W, C], labels int64 [N])`` of one split; ``DataError`` if unreadable."""
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
            images, labels = _from_tfds(dataset, split, data_dir)
        elif source == "files":
            if path is None:
                raise DataError("task.data.source=files needs task.data.path=<folder with the original dataset files>")
            images, labels = _from_files(dataset, split, Path(path))
        else:
            images, labels = _synthetic(dataset, split)
        _check(dataset, split, images, labels, source)
        images.setflags(write=False)
        labels.setflags(write=False)
        _CACHE[key] = (images, labels)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def _check(dataset, split, images, labels, source) -> None:
    shape, classes = DATASETS[dataset]
    if images.dtype != np.uint8 or images.shape[1:] != shape or labels.shape != images.shape[:1]:
        raise DataError(f"{dataset} {split} from source {source} has images {images.dtype} {images.shape} and labels "
                        f"{labels.shape}, expected uint8 [N, {', '.join(map(str, shape))}] and [N]: the data is not {dataset}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{dataset} {split} from source {source} has labels outside 0..{classes - 1}: the data is not {dataset}")


def _how_to_get(dataset: str) -> str:
    files = "the IDX files" if dataset != "cifar10" else "the cifar-10-batches-py files"
    return ("run `make data` on a machine with internet (DATA_DIR=<dir> picks the folder), or point "
            "task.data.data_dir=<dir> at a prepared TFDS folder, or use task.data.source=files "
            f"task.data.path=<folder with {files}>")


# --- TensorFlow Datasets -----------------------------------------------------------------------

def _from_tfds(dataset: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    # try_gcs=False keeps the builder on data_dir; building it only reads local metadata (TFDS
    # 4.9.10 ships with its GCS access disabled), and as_dataset never downloads. Checking the
    # metadata files first avoids TFDS's own warning about an incomplete folder.
    builder = tfds.builder(dataset, data_dir=data_dir, try_gcs=False)
    variant = Path(builder.data_dir)
    prepared = (variant / "dataset_info.json").is_file() and (variant / "features.json").is_file()
    if not prepared or not builder.is_prepared():
        raise DataError(f"dataset {dataset} is not prepared in {builder.data_dir_root} (no {variant}): "
                        + _how_to_get(dataset))
    try:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False).batch(10_000)
        batches = list(tfds.as_numpy(ds))
    except Exception as err:  # a truncated or foreign file: say which folder, not TFDS's stack
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset {dataset} in {variant} cannot be read ({first}): prepare it again with "
                        "`make data`") from None
    if not batches:
        raise DataError(f"dataset {dataset} in {variant} has an empty {split} split: prepare it again with `make data`")
    return (np.concatenate([b[0] for b in batches]).astype(np.uint8, copy=False),
            np.concatenate([b[1] for b in batches]).astype(np.int64, copy=False))


# --- original distribution files -----------------------------------------------------------------

def _find(folder: Path, names: list[str], what: str, fix: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{what} not found: no {' or '.join(names)} in {folder}: {fix}")


def _read_idx(file: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes: magic 0 0 0x08 ndim, ndim big-endian uint32 sizes, then the data."""
    try:
        raw = gzip.open(file, "rb").read() if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {file}: {err}") from None
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise DataError(f"{file} is not an IDX file of {ndim}-D unsigned bytes (bad magic number "
                        f"{raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})")
    sizes = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(sizes)):
        raise DataError(f"{file} is truncated or padded: its header says {'x'.join(map(str, sizes))} = "
                        f"{int(np.prod(sizes))} bytes of data, it holds {data.size}")
    return data.reshape(sizes)


def _from_files(dataset: str, split: str, folder: Path):
    if not folder.is_dir():
        raise DataError(f"task.data.path {folder} is not a folder: point it at the folder with the original "
                        f"{dataset} files")
    if dataset == "cifar10":
        return _read_cifar(folder, split)
    prefix = IDX_PREFIX[split]
    fix = f"point task.data.path at the folder holding the original {dataset} IDX files"
    image_file = _find(folder, [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images-idx3-ubyte"], f"{dataset} {split} images", fix)
    label_file = _find(folder, [f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels-idx1-ubyte"], f"{dataset} {split} labels", fix)
    images = _read_idx(image_file, 3)
    labels = _read_idx(label_file, 1).astype(np.int64)
    if images.shape[1:] != DATASETS[dataset][0][:2]:
        raise DataError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images, {dataset} has 28x28")
    if len(images) != len(labels):
        raise DataError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    return images[..., None], labels


def _read_cifar(folder: Path, split: str):
    if not (folder / CIFAR_BATCHES[split][0]).is_file() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    images, labels = [], []
    for name in CIFAR_BATCHES[split]:
        file = _find(folder, [name], f"cifar10 {split} batch",
                     "point task.data.path at the folder holding data_batch_1..5 and test_batch (or its parent "
                     "with cifar-10-batches-py/)")
        try:
            with open(file, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
        except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a CIFAR batch"
            raise DataError(f"{file} is not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DataError(f"{file} is not a CIFAR-10 python batch (no b'data' and b'labels' entries)")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[b"labels"]) != len(data):
            raise DataError(f"{file} is not a CIFAR-10 python batch (data {data.dtype} {data.shape}, "
                            f"{len(batch[b'labels'])} labels; expected uint8 [N, 3072] and N labels)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # stored channel-major
        labels.append(np.asarray(batch[b"labels"], np.int64))
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

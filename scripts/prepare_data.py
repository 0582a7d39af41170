"""Download and prepare the image datasets with TensorFlow Datasets (needs internet): `make data`.

The prepared folder can then be copied to machines without internet and named in a
task's config (``task.data.data_dir=<dir>``); the tasks never download anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DATASETS = ("mnist", "fashion_mnist", "cifar10")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="TFDS data_dir to prepare into (empty: TFDS's default, "
                        "~/tensorflow_datasets or $TFDS_DATA_DIR)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, metavar="NAME",
                        help=f"which datasets (default: all of {', '.join(DATASETS)})")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    from tasks import data

    data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
    failed = []
    for name in args.datasets:
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            print(f"{name}: already prepared in {builder.data_dir}")
        else:
            print(f"{name}: downloading and preparing into {builder.data_dir} ...", flush=True)
            try:
                builder.download_and_prepare()
            except Exception as err:  # noqa: BLE001 - report every dataset, then fail
                print(f"{name}: FAILED ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})",
                      file=sys.stderr)
                failed.append(name)
                continue
        for split in data.SPLITS:  # read back through the tasks' own loader
            images, labels = data.load_images(name, split, "tfds", data_dir=builder.data_dir_root)
            print(f"  {split}: {len(images)} images {images.shape[1:]}, {len(set(labels.tolist()))} classes")
    where = data_dir or "TFDS's default folder"
    if failed:
        print(f"could not prepare {', '.join(failed)} in {where}", file=sys.stderr)
        return 1
    print(f"done: {', '.join(args.datasets)} prepared in {where}")
    if data_dir:
        print(f"tasks read them with task.data.data_dir={data_dir} (copy the folder to machines without internet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

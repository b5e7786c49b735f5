"""Build bnn_keras/_embedded/fashion_mnist_subset.npz, the dataset `load("embedded")` reads.

Takes the first 500 images of each class from Fashion-MNIST's training file and the
first 100 of each class from its t10k file (kept in file order, with their original
indices), and stores them uint8 in a compressed .npz of about 2.5 MB.

    python tools/make_embedded_dataset.py                      # Debian's copy
    python tools/make_embedded_dataset.py --source DIR --train-per-class 500 --test-per-class 100
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bnn_keras.data import DEBIAN_FASHION_MNIST, read_idx  # noqa: E402

OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "bnn_keras",
    "_embedded",
    "fashion_mnist_subset.npz",
)
MAX_BYTES = 3 * 1024 * 1024


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of every class, in increasing order."""
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    if any(len(c) < per_class for c in chosen):
        raise ValueError(f"some class has fewer than {per_class} examples")
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", default=DEBIAN_FASHION_MNIST, help="folder with the IDX .gz files"
    )
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()

    arrays = {}
    for split, prefix, per_class in (
        ("train", "train", args.train_per_class),
        ("test", "t10k", args.test_per_class),
    ):
        images = read_idx(os.path.join(args.source, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(args.source, f"{prefix}-labels-idx1-ubyte.gz"))
        index = first_per_class(labels, per_class)
        arrays[f"x_{split}"] = images[index, :, :, np.newaxis]
        arrays[f"y_{split}"] = labels[index]
        arrays[f"{split}_index"] = index.astype(np.uint16)  # row in the original file

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {size / 2**20:.2f} MiB, "
          f"{len(arrays['x_train'])} train + {len(arrays['x_test'])} test images")
    if size > MAX_BYTES:
        raise SystemExit(f"{args.output} is {size} bytes, more than the {MAX_BYTES} allowed")


if __name__ == "__main__":
    main()

"""Image-classification datasets, split and preprocessed the way the study did it.

The study (Alizadeh et al., ICLR 2019, section 3) holds out the *last* 10% of the
training set for validation, standardises every image on its own (per-image
standardisation) and uses no augmentation. `load` returns batched `tf.data` pipelines
that do exactly that, from the first of these offline sources that holds:

1. ``name="embedded"`` (the default): 6,000 real Fashion-MNIST images (500 train and
   100 test images per class) shipped inside the package, so examples, tests and CI
   run without any download.
2. ``data_dir`` already holds the dataset prepared by TensorFlow Datasets (TFDS).
3. ``raw_dir`` holds the original files (IDX files for MNIST / Fashion-MNIST, the
   CIFAR-10 binary archive); `prepare_raw` turns them into a TFDS dataset in
   ``data_dir`` once, and route 2 reads it from then on.
4. Otherwise `DataUnavailableError` names these routes. `load` never downloads.

Example:
    >>> from bnn_keras import data
    >>> splits = data.load("embedded", batch_size=100, targets="hinge")
    >>> splits.input_shape, splits.num_classes
    ((28, 28, 1), 10)
    >>> splits.train_size, splits.validation_size, splits.test_size
    (4500, 500, 1000)
    >>> images, targets = next(iter(splits.train))
    >>> images.shape, targets.shape
    (TensorShape([100, 28, 28, 1]), TensorShape([100, 10]))
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.resources
import logging
import math
import numbers
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

__all__ = [
    "DataUnavailableError",
    "DatasetSplits",
    "KNOWN_RAW",
    "TARGETS",
    "embedded_arrays",
    "load",
    "prepare_raw",
    "read_idx",
    "standardize",
]

KNOWN_RAW = ("mnist", "fashion_mnist", "cifar10")
"""Datasets `prepare_raw` can build from original files in a ``raw_dir``."""

TARGETS = ("sparse", "onehot", "hinge")
"""Target encodings: integer labels, one-hot floats, or +1/-1 for the squared hinge loss."""

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the Fashion-MNIST IDX files."""

_EMBEDDED_FILE = "fashion_mnist_subset.npz"
_IDX_FILES = {  # split -> (images, labels), the names LeCun's and Zalando's archives use
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
_CIFAR10_FOLDER = "cifar-10-batches-bin"
_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR10_LABEL_NAMES = "batches.meta.txt"


class DataUnavailableError(ValueError):
    """The dataset is neither embedded, nor prepared in ``data_dir``, nor given as raw files."""


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """Train / validation / test pipelines of one dataset, with the sizes they hold.

    Every pipeline yields batches ``(images, targets)``: ``images`` float32 NHWC,
    standardised per image and channel; ``targets`` as chosen by ``load(targets=...)``.
    Only ``train`` is shuffled (again every epoch, from ``load``'s seed).

    Example:
        >>> splits = load(limit=200, validation_fraction=0.25)
        >>> (splits.train_size, splits.validation_size, splits.test_size)
        (150, 50, 200)
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int
    validation_size: int
    test_size: int
    name: str


def load(
    name: str = "embedded",
    *,
    data_dir: str | None = None,
    raw_dir: str | None = None,
    batch_size: int = 100,
    validation_fraction: float = 0.1,
    seed: int = 0,
    targets: str = "sparse",
    limit: int | None = None,
) -> DatasetSplits:
    """Load a dataset offline as batched train / validation / test pipelines.

    Args:
        name: ``"embedded"`` (the packaged Fashion-MNIST subset), ``"mnist"``,
            ``"fashion_mnist"``, ``"cifar10"`` or any other TFDS name whose examples
            have ``image`` and ``label`` features and which has ``train`` and ``test``
            splits.
        data_dir: TFDS data directory holding (or receiving) the prepared dataset;
            ``None`` means TFDS' default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
            Not used for ``"embedded"``.
        raw_dir: folder with the original files, prepared into ``data_dir`` by
            `prepare_raw` when ``data_dir`` does not hold the dataset yet. Not used
            for ``"embedded"``.
        batch_size: examples per batch; the last batch may be smaller.
        validation_fraction: share of the training split, taken from its end, held
            out for validation (the study: 0.1).
        seed: seed of the training set's shuffle (reshuffled every epoch).
        targets: ``"sparse"`` int32 labels, ``"onehot"`` float32 vectors, or
            ``"hinge"`` float32 vectors of +1 for the class and -1 elsewhere.
        limit: keep only the first ``limit`` training and test examples (quick runs).

    Returns:
        The pipelines and their sizes. "Last" and "first" refer to the stored order:
        the file order for the embedded set, TFDS' fixed on-disk order otherwise.

    Raises:
        DataUnavailableError: no offline source holds the dataset (never downloads).
        ValueError: an unknown name, a bad option, or a raw file that is missing.

    Example:
        >>> splits = load("embedded", batch_size=50, seed=1)
        >>> model.fit(splits.train, validation_data=splits.validation, epochs=2)  # doctest: +SKIP
    """
    _check_name(name)
    data_dir, raw_dir = _folder("data_dir", data_dir), _folder("raw_dir", raw_dir)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (an integer), got {_given(batch_size)}")
    if not _is_real(validation_fraction) or not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {_given(validation_fraction)}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be >= 0 (an integer), got {_given(seed)}")
    if not isinstance(targets, str) or targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {_given(targets)}")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise ValueError(f"limit must be >= 1 (an integer) or None, got {_given(limit)}")
    batch_size, seed, limit = int(batch_size), int(seed), None if limit is None else int(limit)

    (fit, validation, test), input_shape, num_classes, (n_train, n_fit, n_test) = _sources(
        name, data_dir, raw_dir, float(validation_fraction), limit
    )

    def batches(ds: tf.data.Dataset, size: int, shuffle: bool) -> tf.data.Dataset:
        # Per-example work once, at cache time (in blocks of 1,000 images: fast to map),
        # so every epoch after the first only shuffles and batches cached float32 tensors.
        ds = ds.batch(1000).map(
            lambda x, y: (standardize(x), _encode_targets(y, num_classes, targets)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.unbatch().apply(tf.data.experimental.assert_cardinality(size)).cache()
        if shuffle:
            ds = ds.shuffle(n_fit, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=False)
        return ds.prefetch(tf.data.AUTOTUNE)

    return DatasetSplits(
        train=batches(fit, n_fit, shuffle=True),
        validation=batches(validation, n_train - n_fit, shuffle=False),
        test=batches(test, n_test, shuffle=False),
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(num_classes),
        train_size=n_fit,
        validation_size=n_train - n_fit,
        test_size=n_test,
        name=name,
    )


def _sources(
    name: str, data_dir: str | None, raw_dir: str | None, validation_fraction: float, limit: int | None
) -> tuple[tuple[tf.data.Dataset, ...], tuple[int, ...], int, tuple[int, int, int]]:
    """The unbatched fit / validation / test sets, the input shape, class count and sizes."""
    if name == "embedded":
        (x_train, y_train), (x_test, y_test) = embedded_arrays()
        x_train, y_train, x_test, y_test = (a[:limit] for a in (x_train, y_train, x_test, y_test))
        n_train, n_test = len(x_train), len(x_test)
        n_fit = _fit_size(n_train, validation_fraction)
        sets = tuple(
            tf.data.Dataset.from_tensor_slices(arrays)
            for arrays in (
                (x_train[:n_fit], y_train[:n_fit]),
                (x_train[n_fit:], y_train[n_fit:]),
                (x_test, y_test),
            )
        )
        return sets, x_train.shape[1:], 10, (n_train, n_fit, n_test)
    builder = _prepared_builder(name, data_dir, raw_dir)
    n_train = _split_size(builder, "train", limit)
    n_test = _split_size(builder, "test", limit)
    n_fit = _fit_size(n_train, validation_fraction)
    sets = (_read(builder, "train", 0, n_fit), _read(builder, "train", n_fit, n_train), _read(builder, "test", 0, n_test))
    shape, classes = builder.info.features["image"].shape, builder.info.features["label"].num_classes
    return sets, shape, classes, (n_train, n_fit, n_test)


def standardize(images: tf.Tensor) -> tf.Tensor:
    """Standardise each image, channel by channel, to mean 0 and standard deviation 1.

    `tf.image.per_image_standardization` applied to every channel of every image on
    its own (for one channel it *is* that function): ``(x - mean) / max(std, 1/sqrt(H*W))``.
    Works on one image ``[H, W, C]`` or a batch ``[..., H, W, C]``.

    Example:
        >>> x = standardize(tf.random.uniform([8, 32, 32, 3], maxval=255))
        >>> [round(float(v), 3) for v in tf.math.reduce_std(x, axis=[1, 2])[0]]
        [1.0, 1.0, 1.0]
    """
    images = tf.cast(images, tf.float32)
    # Channels become single-channel images so the TF op standardises each on its own.
    channels = tf.experimental.numpy.moveaxis(images, -1, -3)[..., tf.newaxis]
    channels = tf.image.per_image_standardization(channels)[..., 0]
    return tf.experimental.numpy.moveaxis(channels, -3, -1)


def embedded_arrays() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The packaged Fashion-MNIST subset as ``(x_train, y_train), (x_test, y_test)``.

    5,000 training images (the first 500 of each class in Fashion-MNIST's training
    file, in file order) and 1,000 test images (the first 100 of each class in the
    t10k file); images uint8 ``[N, 28, 28, 1]``, labels int64 in 0..9. Made by
    ``tools/make_embedded_dataset.py``; Fashion-MNIST is (c) Zalando SE, MIT licence.

    Example:
        >>> (x_train, y_train), (x_test, y_test) = embedded_arrays()
        >>> x_train.shape, x_test.shape, np.bincount(y_test).tolist()
        ((5000, 28, 28, 1), (1000, 28, 28, 1), [100, 100, 100, 100, 100, 100, 100, 100, 100, 100])
    """
    resource = importlib.resources.files("bnn_keras") / "_embedded" / _EMBEDDED_FILE
    with resource.open("rb") as file, np.load(file) as arrays:
        return (
            (arrays["x_train"], arrays["y_train"].astype(np.int64)),
            (arrays["x_test"], arrays["y_test"].astype(np.int64)),
        )


def prepare_raw(name: str, raw_dir: str, data_dir: str) -> str:
    """Write original dataset files as the TFDS dataset ``name`` into ``data_dir``.

    Afterwards ``tfds.builder(name, data_dir=data_dir)`` (and `load`) read it like a
    dataset TFDS had downloaded: same name, version, features and example keys. The
    files are parsed with numpy, so copies that differ from TFDS' download checksums
    (e.g. Debian's re-compressed ones) work. Every file is read and checked (format,
    image size, label range, counts) before anything is written; data is then written
    to a temporary folder in ``data_dir`` and moved into place only when complete, so
    a failure leaves no dataset that a later run would take as prepared. Does nothing
    if the dataset is already prepared there.

    Expected files in ``raw_dir``: for ``mnist`` and ``fashion_mnist``
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte``, each optionally ``.gz``; for ``cifar10``
    ``cifar-10-binary.tar.gz`` or its extracted ``cifar-10-batches-bin/`` folder.

    Returns:
        The prepared dataset's folder, ``data_dir/<name>/<version>``.

    Raises:
        ValueError: one line naming the file or folder at fault, what was expected
            and what was found.

    Example:
        >>> prepare_raw("fashion_mnist", DEBIAN_FASHION_MNIST, "/tmp/tfds")  # doctest: +SKIP
        '/tmp/tfds/fashion_mnist/3.0.1'
    """
    if not isinstance(name, str) or name not in KNOWN_RAW:
        raise ValueError(f"prepare_raw supports {KNOWN_RAW}, got {_given(name)}")
    raw_dir, data_dir = _folder("raw_dir", raw_dir), _folder("data_dir", data_dir)
    if data_dir is None:
        raise ValueError("prepare_raw needs a data_dir to write to, got None")
    with _quiet_tfds_probes():
        target = tfds.builder(name, data_dir=data_dir)
        if target.is_prepared():
            return os.fspath(target.data_path)
    if raw_dir is None or not os.path.isdir(raw_dir):
        raise ValueError(f"raw_dir {raw_dir!r} is not a directory")
    if target.data_path.exists():
        raise ValueError(
            f"{os.fspath(target.data_path)!r} exists but is not a prepared dataset: remove it"
        )

    features = target.info.features
    image_shape, num_classes = features["image"].shape, features["label"].num_classes
    if name == "cifar10":
        splits, label_names = _read_cifar10(raw_dir, num_classes)
        if label_names:
            features["label"].names = label_names
    else:
        splits = {split: _read_idx_pair(raw_dir, split, image_shape, num_classes) for split in _IDX_FILES}

    staging = _staging_folder(name, data_dir)
    try:
        with _quiet_tfds_probes():
            written = tfds.dataset_builders.store_as_tfds_dataset(
                name=name,
                version=target.version,
                features=features,
                split_datasets={
                    split: _examples(name, split, images, labels)
                    for split, (images, labels) in splits.items()
                },
                data_dir=staging,
                description=target.info.description,
                homepage=target.info.homepage,
                citation=target.info.citation,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
        target.data_path.parent.mkdir(parents=True, exist_ok=True)
        os.rename(written.data_path, target.data_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.fspath(target.data_path)


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST's format), gzipped or not.

    ``ndim``, if given, is the number of dimensions the file must have (3 for images,
    1 for labels). A file that is not such a file (not gzip, truncated, another magic
    number, a header that does not match the data) raises a one-line ValueError naming
    ``path``.

    Example:
        >>> read_idx(f"{DEBIAN_FASHION_MNIST}/t10k-labels-idx1-ubyte.gz", ndim=1).shape  # doctest: +SKIP
        (10000,)
    """
    content = _read_bytes(path)
    if len(content) < 4 or content[:3] != b"\x00\x00\x08":
        found = content[:3].hex(" ") if content else "an empty file"
        if content[:2] == b"\x1f\x8b":
            found += " (gzip data: its name must end in .gz)"
        raise ValueError(
            f"{path!r} is not an IDX file of unsigned bytes: expected it to start with "
            f"00 00 08, found {found}"
        )
    dims = content[3]
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path!r}: expected an IDX header of {ndim} dimension(s), it says {dims}")
    if len(content) < 4 + 4 * dims:
        raise ValueError(
            f"{path!r} ends inside its IDX header: {dims} dimension(s) need {4 + 4 * dims} "
            f"bytes, the file has {len(content)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(content, ">u4", count=dims, offset=4))
    data = np.frombuffer(content, np.uint8, offset=4 + 4 * dims)
    if data.size != math.prod(shape):
        said = f"{shape} ({math.prod(shape)} bytes)" if dims <= 4 else f"{dims} dimensions"
        raise ValueError(f"{path!r} holds {data.size} bytes of data, its header says {said}")
    return data.reshape(shape)


def _prepared_builder(
    name: str, data_dir: str | None, raw_dir: str | None
) -> tfds.core.DatasetBuilder:
    """The TFDS builder of ``name``, prepared from ``raw_dir`` if needed; never downloads."""
    with _quiet_tfds_probes():
        builder = _builder(name, data_dir)
        prepared = builder.is_prepared()
    features = builder.info.features
    parts = dict(features.items()) if isinstance(features, tfds.features.FeaturesDict) else {}
    if (
        not isinstance(parts.get("image"), tfds.features.Image)
        or not isinstance(parts.get("label"), tfds.features.ClassLabel)
        or None in parts["image"].shape
    ):
        raise ValueError(
            f"dataset {name!r} is not supported: it needs an 'image' feature of fixed "
            f"shape and a 'label' ClassLabel feature, it has {_brief(features)}"
        )
    if prepared:
        return builder
    if raw_dir is not None:
        if builder.name not in KNOWN_RAW:
            raise ValueError(f"raw_dir works for {KNOWN_RAW} only, got {name!r}")
        prepare_raw(builder.name, raw_dir, data_dir or os.fspath(builder.data_dir_root))
        return _builder(name, data_dir)
    raise DataUnavailableError(
        f"dataset {name!r} is not prepared in data_dir {os.fspath(builder.data_dir_root)!r} "
        "and no raw files were given: pass --data-dir with a prepared TFDS dataset, "
        "--raw-dir with the original files (e.g. Debian's dataset-fashion-mnist: "
        f"{DEBIAN_FASHION_MNIST}), or use the embedded default ('embedded')"
    )


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    unknown = (
        f"unknown dataset {name!r}: expected 'embedded', one of {KNOWN_RAW} "
        "or another TFDS image-classification dataset name"
    )
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(unknown) from None
    except (ValueError, AssertionError) as error:  # a name TFDS cannot parse, or no such config / version
        raise ValueError(f"{unknown} (TFDS: {_brief(error, 100)})") from None


def _fit_size(n_train: int, validation_fraction: float) -> int:
    """Training examples left once the last ``validation_fraction`` is held out."""
    n_fit = n_train - round(n_train * validation_fraction)
    if n_fit < 1:
        raise ValueError(
            f"validation_fraction={validation_fraction} leaves none of {n_train} examples "
            "for training"
        )
    return n_fit


def _split_size(builder: tfds.core.DatasetBuilder, split: str, limit: int | None) -> int:
    if split not in builder.info.splits:
        raise ValueError(
            f"dataset {builder.name!r} has no {split!r} split (it has {list(builder.info.splits)})"
        )
    size = builder.info.splits[split].num_examples
    return size if limit is None else min(size, limit)


def _read(builder: tfds.core.DatasetBuilder, split: str, start: int, stop: int) -> tf.data.Dataset:
    """Examples ``start:stop`` of a split, in stored order, as ``(image, label)`` pairs."""
    # TFDS rejects empty slices; an empty validation set (fraction 0) is legitimate.
    instruction = f"{split}[{start}:{stop}]" if stop > start else f"{split}[:1]"
    ds = builder.as_dataset(split=instruction, shuffle_files=False)
    ds = ds.map(lambda example: (example["image"], example["label"]))
    return ds if stop > start else ds.take(0)


def _encode_targets(labels: tf.Tensor, num_classes: int, targets: str) -> tf.Tensor:
    labels = tf.cast(labels, tf.int32)
    if targets == "sparse":
        return labels
    onehot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    return onehot if targets == "onehot" else 2.0 * onehot - 1.0


def _read_idx_pair(
    raw_dir: str, split: str, image_shape: tuple[int, ...], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, H, W, 1]`` and labels of one split from IDX files in ``raw_dir``, checked."""
    images_file, labels_file = (_find_file(raw_dir, stem) for stem in _IDX_FILES[split])
    images, labels = read_idx(images_file, ndim=3), read_idx(labels_file, ndim=1)
    height, width = image_shape[:2]
    if images.shape[1:] != (height, width):
        raise ValueError(
            f"{images_file!r}: expected images of {height}x{width} pixels, "
            f"found {images.shape[1]}x{images.shape[2]}"
        )
    if len(images) == 0:
        raise ValueError(f"{images_file!r}: expected one or more images, found none")
    if len(images) != len(labels):
        raise ValueError(
            f"{labels_file!r} holds {len(labels)} labels and {images_file!r} {len(images)} "
            "images: expected one label per image"
        )
    _check_labels(repr(labels_file), labels, num_classes)
    return images[..., np.newaxis], labels


def _find_file(raw_dir: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(raw_dir, candidate)
        if os.path.isfile(path):
            return path
    raise ValueError(f"raw_dir {raw_dir!r} has no {stem!r} (or {stem + '.gz'!r})")


def _read_cifar10(
    raw_dir: str, num_classes: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str] | None]:
    """CIFAR-10's binary batches from the archive or its extracted folder in ``raw_dir``, checked."""
    contents, where = _cifar10_contents(raw_dir)
    splits = {}
    for split, files in _CIFAR10_FILES.items():
        missing = [f for f in files if f not in contents]
        if missing:
            raise ValueError(f"{where!r} has no {missing[0]!r} for 'cifar10'")
        records = np.concatenate([_cifar10_records(where, f, contents[f], num_classes) for f in files])
        # 1 label byte, then 3x32x32 pixels, channels first
        splits[split] = (records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 0])
    if _CIFAR10_LABEL_NAMES not in contents:
        return splits, None
    source = _member(where, _CIFAR10_LABEL_NAMES)
    try:
        names = contents[_CIFAR10_LABEL_NAMES].decode("utf-8").split()
    except UnicodeDecodeError:
        raise ValueError(f"{source}: expected class names as text, one per line, found binary data") from None
    if len(names) != num_classes:
        raise ValueError(f"{source} holds {len(names)} class name(s): expected {num_classes}, one per line")
    return splits, names


def _cifar10_contents(raw_dir: str) -> tuple[dict[str, bytes], str]:
    """The batch files' bytes by base name, and the folder or archive they came from."""
    folder = os.path.join(raw_dir, _CIFAR10_FOLDER)
    archive = os.path.join(raw_dir, _CIFAR10_ARCHIVE)
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(raw_dir, "data_batch_1.bin")):
        folder = raw_dir  # raw_dir is the extracted folder itself
    if os.path.isdir(folder):
        members = (*_CIFAR10_FILES["train"], *_CIFAR10_FILES["test"], _CIFAR10_LABEL_NAMES)
        paths = {member: os.path.join(folder, member) for member in members}
        return {m: _read_bytes(path) for m, path in paths.items() if os.path.isfile(path)}, folder
    if not os.path.isfile(archive):
        raise ValueError(
            f"raw_dir {raw_dir!r} has neither {_CIFAR10_ARCHIVE!r} nor a {_CIFAR10_FOLDER + '/'!r} "
            "folder for 'cifar10'"
        )
    try:
        with tarfile.open(archive) as tar:
            return {
                os.path.basename(member.name): tar.extractfile(member).read()
                for member in tar.getmembers()
                if member.isfile() and os.path.dirname(member.name).endswith(_CIFAR10_FOLDER)
            }, archive
    except _UNREADABLE as error:
        raise ValueError(f"{archive!r} is not a readable .tar.gz archive: {_reason(error)}") from None


def _cifar10_records(where: str, file: str, content: bytes, num_classes: int) -> np.ndarray:
    """One batch file as ``[N, 3073]`` uint8 records (label byte, then pixels), checked."""
    source = _member(where, file)
    if not content or len(content) % 3073:
        raise ValueError(
            f"{source} holds {len(content)} bytes: expected one or more whole 3073-byte records "
            "(a label byte, then 3x32x32 pixels)"
        )
    records = np.frombuffer(content, np.uint8).reshape(-1, 3073)
    _check_labels(source, records[:, 0], num_classes)
    return records


def _member(where: str, file: str) -> str:
    """How messages name ``file`` of a CIFAR-10 folder or archive (quoted)."""
    if where.endswith(".tar.gz"):
        return f"{where!r} member {file!r}"
    return repr(os.path.join(where, file))


def _check_labels(source: str, labels: np.ndarray, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"{source}: expected labels in 0..{num_classes - 1}, found {int(labels[bad[0]])} "
            f"(example {int(bad[0])}; {bad.size} such)"
        )


# What reading a corrupt file raises: gzip.BadGzipFile and tarfile errors are OSError /
# TarError, a truncated stream EOFError, corrupt deflate data zlib.error.
_UNREADABLE = (OSError, EOFError, zlib.error, tarfile.TarError)


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped if its name ends in ``.gz``; a one-line ValueError if unreadable."""
    gzipped = path.endswith(".gz")
    try:
        with (gzip.open if gzipped else open)(path, "rb") as file:
            return file.read()
    except _UNREADABLE as error:
        kind = "gzip file" if gzipped else "file"
        raise ValueError(f"{path!r} is not a readable {kind}: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return "it ends before its compressed data does (truncated?)"
    if isinstance(error, tarfile.ReadError) and str(error).startswith("file could not be opened"):
        return "it is not a tar archive, compressed or plain"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _brief(error)


def _staging_folder(name: str, data_dir: str) -> str:
    """A fresh hidden folder in ``data_dir`` (created if need be) to write the dataset into."""
    try:
        os.makedirs(data_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{name}-incomplete-", dir=data_dir)
    except OSError as error:
        raise ValueError(
            f"data_dir {data_dir!r} cannot be written ({_reason(error)}): expected a folder "
            "the prepared dataset can be written to"
        ) from None


@contextlib.contextmanager
def _quiet_tfds_probes() -> Iterator[None]:
    """Hide TFDS' "Variant folder ... has no dataset_info.json" notices while we probe.

    Looking for a dataset that is not prepared yet is how `load` decides to prepare it;
    TFDS logs a warning for each such look, which would turn one-line errors into several.
    """
    logger = logging.getLogger("absl")
    notice = _VariantFolderNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class _VariantFolderNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder ")


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"name must be a dataset name such as 'embedded' or one of {KNOWN_RAW}, got {_given(name)}"
        )


def _folder(flag: str, path: object) -> str | None:
    """``path`` as a str (None stays None); a one-line ValueError if it is not a path."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise ValueError(f"{flag} must be a folder path (str) or None, got {_given(path)}")
    return os.fspath(path)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _given(value: object) -> str:
    """A short repr of a bad argument for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _brief(thing: object, limit: int = 120) -> str:
    """The first line of ``str(thing)``, at most ``limit`` characters."""
    lines = str(thing).strip().splitlines() or [""]
    line = " ".join(lines[0].split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _examples(
    name: str, split: str, images: np.ndarray, labels: np.ndarray
) -> Iterator[tuple[int, dict]]:
    """(key, example) pairs with the keys and features TFDS' own builder of ``name`` yields."""
    for index, (image, label) in enumerate(zip(images, labels)):
        example = {"image": image, "label": int(label)}
        if name == "cifar10":
            example["id"] = f"{split}_{index:05d}"
        yield index, example

"""bnn_keras.data: the embedded set, the study's splits and preprocessing, offline routes."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bnn_keras import data

DEBIAN = data.DEBIAN_FASHION_MNIST


def as_arrays(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """One pass over a batched (x, y) pipeline, concatenated."""
    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in ds))
    return np.concatenate(xs), np.concatenate(ys)


def write_idx(path: str, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def embedded():
    return data.embedded_arrays()


# --- the embedded Fashion-MNIST subset -------------------------------------------------


def test_embedded_is_class_balanced(embedded):
    (x_train, y_train), (x_test, y_test) = embedded
    assert x_train.shape == (5000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.uint8
    assert np.bincount(y_train, minlength=10).tolist() == [500] * 10
    assert np.bincount(y_test, minlength=10).tolist() == [100] * 10


def test_embedded_is_real_fashion_mnist(embedded):
    (x_train, y_train), (x_test, _) = embedded
    # Fashion-MNIST: pixel mean 72.9, std 90.0 over the full training set.
    assert 65 < x_train.mean() < 80 and 85 < x_train.std() < 95
    assert 65 < x_test.mean() < 80
    assert 0.4 < (x_train == 0).mean() < 0.6  # black background around the garments
    assert x_train.reshape(5000, -1).std(axis=1).min() > 5  # no blank images
    assert len(np.unique(x_train.reshape(5000, -1), axis=0)) == 5000  # no repeats
    # Trousers (1) cover fewer pixels than pullovers (2) and coats (4).
    ink = [(x_train[y_train == c] > 0).mean() for c in range(10)]
    assert ink[1] < ink[2] and ink[1] < ink[4]


def test_embedded_file_is_small():
    path = os.path.join(os.path.dirname(data.__file__), "_embedded", "fashion_mnist_subset.npz")
    assert os.path.getsize(path) <= 3_000_000
    assert {"LICENSE", "README.md"} <= set(os.listdir(os.path.dirname(path)))


@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason=f"{DEBIAN} (dataset-fashion-mnist) missing")
def test_embedded_is_first_per_class_of_debian_files(embedded):
    (x_train, y_train), (x_test, y_test) = embedded
    with np.load(os.path.join(os.path.dirname(data.__file__), "_embedded",
                              "fashion_mnist_subset.npz")) as npz:
        train_index, test_index = npz["train_index"], npz["test_index"]
    for x, y, index, prefix, per_class in (
        (x_train, y_train, train_index, "train", 500),
        (x_test, y_test, test_index, "t10k", 100),
    ):
        labels = data.read_idx(f"{DEBIAN}/{prefix}-labels-idx1-ubyte.gz")
        expected = np.sort(np.concatenate(
            [np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        np.testing.assert_array_equal(index, expected)
        np.testing.assert_array_equal(y, labels[index])
        images = data.read_idx(f"{DEBIAN}/{prefix}-images-idx3-ubyte.gz")
        np.testing.assert_array_equal(x[..., 0], images[index])


# --- splits, preprocessing, targets, shuffling -----------------------------------------


def test_validation_is_the_last_tenth_of_train(embedded):
    (x_train, y_train), (x_test, y_test) = embedded
    splits = data.load(batch_size=64)
    assert (splits.train_size, splits.validation_size, splits.test_size) == (4500, 500, 1000)
    assert splits.input_shape == (28, 28, 1) and splits.num_classes == 10
    assert splits.name == "embedded"
    x_val, y_val = as_arrays(splits.validation)
    np.testing.assert_array_equal(y_val, y_train[4500:])
    np.testing.assert_allclose(x_val, data.standardize(x_train[4500:]).numpy(), atol=1e-6)
    x_test_loaded, y_test_loaded = as_arrays(splits.test)
    np.testing.assert_array_equal(y_test_loaded, y_test)  # test split: not shuffled
    assert x_test_loaded.shape == (1000, 28, 28, 1)
    sizes = [int(x.shape[0]) for x, _ in splits.train]
    assert len(sizes) == 71 and sizes[-1] == 4500 - 70 * 64  # drop_remainder=False
    # Training part: exactly the first 4500 rows (as a set).
    x_fit, y_fit = as_arrays(splits.train)
    assert np.bincount(y_fit, minlength=10).tolist() == np.bincount(y_train[:4500]).tolist()
    assert x_fit.dtype == np.float32


def test_limit_and_fraction():
    splits = data.load(limit=200, validation_fraction=0.25, batch_size=32)
    assert (splits.train_size, splits.validation_size, splits.test_size) == (150, 50, 200)
    assert len(as_arrays(splits.train)[1]) == 150 and len(as_arrays(splits.validation)[1]) == 50
    none_held_out = data.load(limit=100, validation_fraction=0.0)
    assert (none_held_out.train_size, none_held_out.validation_size) == (100, 0)
    assert sum(1 for _ in none_held_out.validation) == 0


def test_per_image_standardisation():
    x, _ = next(iter(data.load(batch_size=200).test))
    assert np.abs(x.numpy().mean(axis=(1, 2, 3))).max() < 1e-5
    np.testing.assert_allclose(x.numpy().std(axis=(1, 2, 3)), 1.0, atol=1e-4)
    # Grey-scale: exactly TF's per_image_standardization.
    raw = data.embedded_arrays()[1][0][:200]
    np.testing.assert_allclose(x, tf.image.per_image_standardization(raw.astype(np.float32)),
                               atol=1e-6)


def test_colour_images_are_standardised_per_channel():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 8, 8, 3)) * [1.0, 50.0, 255.0] + [0.0, 100.0, 7.0]
    images[1, :, :, 2] = 3.0  # a flat channel: divided by 1/sqrt(64) instead of 0
    out = data.standardize(images.astype(np.float32)).numpy()
    mean = images.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(images.std(axis=(1, 2), keepdims=True), 1 / 8)
    np.testing.assert_allclose(out, (images - mean) / std, rtol=1e-4, atol=1e-4)
    assert out.shape == (4, 8, 8, 3)
    np.testing.assert_allclose(data.standardize(images[0]).numpy(), out[0], atol=1e-6)


def test_targets(embedded):
    y_expected = embedded[0][1][4500:]
    _, sparse = as_arrays(data.load(targets="sparse").validation)
    _, onehot = as_arrays(data.load(targets="onehot").validation)
    _, hinge = as_arrays(data.load(targets="hinge").validation)
    assert sparse.dtype == np.int32 and onehot.dtype == hinge.dtype == np.float32
    np.testing.assert_array_equal(sparse, y_expected)
    np.testing.assert_array_equal(onehot, np.eye(10)[y_expected])
    assert set(np.unique(hinge)) == {-1.0, 1.0}
    assert (hinge == 1.0).sum(axis=1).tolist() == [1] * 500
    np.testing.assert_array_equal(hinge.argmax(axis=1), y_expected)


def test_shuffling_follows_the_seed():
    def epochs(seed, n=2):
        train = data.load(seed=seed, limit=1000).train
        return [as_arrays(train)[1] for _ in range(n)]

    first, second = epochs(seed=3)
    again = epochs(seed=3, n=1)[0]
    other = epochs(seed=4, n=1)[0]
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.5
    assert (first != second).mean() > 0.5  # reshuffled every epoch
    assert sorted(first) == sorted(other) == sorted(data.embedded_arrays()[0][1][:900])
    _, val_a = as_arrays(data.load(seed=3, limit=1000).validation)
    _, val_b = as_arrays(data.load(seed=4, limit=1000).validation)
    np.testing.assert_array_equal(val_a, val_b)  # only training data is shuffled


# --- raw files -> TFDS (route 3), prepared TFDS data (route 2) ------------------------


def fake_idx_dir(path, rng, n_train=30, n_test=10):
    os.makedirs(path)
    raw = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), np.uint8), rng.integers(0, 10, n_train)),
        "test": (rng.integers(0, 256, (n_test, 28, 28), np.uint8), rng.integers(0, 10, n_test)),
    }
    for prefix, split, ext in (("train", "train", ".gz"), ("t10k", "test", "")):  # gz and plain
        write_idx(f"{path}/{prefix}-images-idx3-ubyte{ext}", raw[split][0])
        write_idx(f"{path}/{prefix}-labels-idx1-ubyte{ext}", raw[split][1])
    return raw


def match_rows(stored: np.ndarray, raw: np.ndarray) -> list[int]:
    """For each stored image, its row in ``raw`` (images are random, so unique)."""
    flat = raw.reshape(len(raw), -1)
    return [int(np.flatnonzero((flat == s.reshape(-1)).all(axis=1))[0]) for s in stored]


def test_prepare_raw_idx_round_trips(tmp_path):
    raw = fake_idx_dir(tmp_path / "raw", np.random.default_rng(1))
    data_dir = tmp_path / "tfds"
    prepared = data.prepare_raw("mnist", str(tmp_path / "raw"), str(data_dir))
    assert prepared == str(data_dir / "mnist" / "3.0.1")
    assert os.listdir(data_dir) == ["mnist"]  # the staging folder is gone

    builder = tfds.builder("mnist", data_dir=str(data_dir))  # tfds' own registered builder
    assert builder.is_prepared() and str(builder.version) == "3.0.1"
    for split, (images, labels) in raw.items():
        stored = list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())
        x = np.stack([s["image"] for s in stored])
        y = np.array([s["label"] for s in stored])
        rows = match_rows(x, images)
        assert sorted(rows) == list(range(len(images)))
        np.testing.assert_array_equal(x[..., 0], images[rows])
        np.testing.assert_array_equal(y, labels[rows])

    splits = data.load("mnist", data_dir=str(data_dir), batch_size=7, validation_fraction=0.2)
    assert (splits.train_size, splits.validation_size, splits.test_size) == (24, 6, 10)
    assert splits.input_shape == (28, 28, 1) and splits.num_classes == 10
    tfds_order = np.stack([s["image"] for s in builder.as_dataset(
        split="train", shuffle_files=False).as_numpy_iterator()])
    x_val, _ = as_arrays(splits.validation)
    np.testing.assert_allclose(x_val, data.standardize(tfds_order[24:]).numpy(), atol=1e-6)
    # Already prepared: nothing to read or write.
    assert data.prepare_raw("mnist", str(tmp_path / "absent"), str(data_dir)) == prepared


def test_load_prepares_raw_files_once(tmp_path):
    raw = fake_idx_dir(tmp_path / "raw", np.random.default_rng(2))
    data_dir = str(tmp_path / "tfds")
    splits = data.load("fashion_mnist", raw_dir=str(tmp_path / "raw"), data_dir=data_dir,
                       validation_fraction=0.1)
    assert (splits.train_size, splits.validation_size, splits.test_size) == (27, 3, 10)
    _, y_test = as_arrays(splits.test)
    assert sorted(y_test.tolist()) == sorted(raw["test"][1].tolist())
    names = tfds.builder("fashion_mnist", data_dir=data_dir).info.features["label"].names
    assert names[0] == "T-shirt/top"
    # Prepared now: the raw folder is no longer needed.
    os.rename(tmp_path / "raw", tmp_path / "gone")
    assert data.load("fashion_mnist", data_dir=data_dir).test_size == 10


def fake_cifar10(rng, n_per_batch=2, n_test=3):
    files, raw = {}, {"train": ([], []), "test": ([], [])}
    for name, n, split in [(f"data_batch_{i}.bin", n_per_batch, "train") for i in range(1, 6)] + [
        ("test_batch.bin", n_test, "test")
    ]:
        labels = rng.integers(0, 10, n, np.uint8)
        chw = rng.integers(0, 256, (n, 3, 32, 32), np.uint8)
        files[name] = np.concatenate([labels[:, None], chw.reshape(n, -1)], axis=1).tobytes()
        raw[split][0].append(chw.transpose(0, 2, 3, 1))
        raw[split][1].append(labels)
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    files["batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
    return files, {s: (np.concatenate(x), np.concatenate(y)) for s, (x, y) in raw.items()}


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_prepare_raw_cifar10_round_trips(tmp_path, layout):
    files, raw = fake_cifar10(np.random.default_rng(3))
    raw_dir = tmp_path / "raw"
    os.makedirs(raw_dir / "cifar-10-batches-bin")
    if layout == "archive":
        with tarfile.open(raw_dir / "cifar-10-binary.tar.gz", "w:gz") as tar:
            for name, content in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        os.rmdir(raw_dir / "cifar-10-batches-bin")
    else:
        for name, content in files.items():
            (raw_dir / "cifar-10-batches-bin" / name).write_bytes(content)

    data_dir = str(tmp_path / "tfds")
    data.prepare_raw("cifar10", str(raw_dir), data_dir)
    builder = tfds.builder("cifar10", data_dir=data_dir)
    assert builder.info.features["label"].names[:2] == ["airplane", "automobile"]
    for split, (images, labels) in raw.items():
        for example in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator():
            prefix, index = example["id"].decode().split("_")
            assert prefix == split
            np.testing.assert_array_equal(example["image"], images[int(index)])
            assert example["label"] == labels[int(index)]
        assert builder.info.splits[split].num_examples == len(labels)

    splits = data.load("cifar10", data_dir=data_dir, batch_size=4, validation_fraction=0.2)
    assert (splits.train_size, splits.validation_size, splits.test_size) == (8, 2, 3)
    assert splits.input_shape == (32, 32, 3)
    x, _ = as_arrays(splits.test)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), 0.0, atol=1e-5)  # per image and channel
    np.testing.assert_allclose(x.std(axis=(1, 2)), 1.0, atol=1e-4)


def test_any_tfds_name_is_read_from_data_dir(tmp_path):
    """Route 2 for a name outside KNOWN_RAW: a prepared 'kmnist' in data_dir."""
    data_dir = str(tmp_path / "tfds")
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (12, 28, 28, 1), np.uint8)
    tfds.dataset_builders.store_as_tfds_dataset(
        name="kmnist", version=tfds.builder("kmnist", data_dir=data_dir).version,
        features=tfds.builder("kmnist", data_dir=data_dir).info.features,
        split_datasets={
            split: [(i, {"image": images[i], "label": i % 10}) for i in range(n)]
            for split, n in (("train", 12), ("test", 5))
        },
        data_dir=data_dir,
    )
    splits = data.load("kmnist", data_dir=data_dir, validation_fraction=0.25, targets="onehot")
    assert (splits.train_size, splits.validation_size, splits.test_size) == (9, 3, 5)
    _, y = as_arrays(splits.test)
    assert y.shape == (5, 10) and y.sum() == 5


# --- errors ------------------------------------------------------------------------------


def test_no_data_fails_fast_and_names_the_routes(tmp_path):
    data_dir = tmp_path / "tfds"
    os.makedirs(data_dir)
    start = time.monotonic()
    with pytest.raises(data.DataUnavailableError) as error:
        data.load("cifar10", data_dir=str(data_dir))
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ValueError)
    for route in ("--data-dir", "--raw-dir", DEBIAN, "'embedded'", "'cifar10'", str(data_dir)):
        assert route in message
    assert os.listdir(data_dir) == []
    with pytest.raises(data.DataUnavailableError):
        data.load("mnist", data_dir=str(tmp_path / "absent"))
    assert not os.path.exists(tmp_path / "absent")


def test_missing_raw_file_is_named(tmp_path):
    fake_idx_dir(tmp_path / "raw", np.random.default_rng(5))
    os.remove(tmp_path / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(ValueError, match="'t10k-labels-idx1-ubyte'"):
        data.load("mnist", raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="cifar-10-binary.tar.gz"):
        data.prepare_raw("cifar10", str(tmp_path / "raw"), str(tmp_path / "tfds"))
    assert not os.path.exists(tmp_path / "tfds")  # files are read before anything is written


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "no_such_dataset"}, "unknown dataset 'no_such_dataset'"),
        ({"name": "imdb_reviews"}, "'imdb_reviews' is not supported"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\)"),
        ({"validation_fraction": -0.1}, r"validation_fraction must be in \[0, 1\)"),
        ({"targets": "softmax"}, "targets must be one of"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"limit": 1, "validation_fraction": 0.9}, "leaves none of 1 examples for training"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load(data_dir=str(tmp_path), **kwargs)


def test_prepare_raw_rejects_other_names(tmp_path):
    with pytest.raises(ValueError, match="prepare_raw supports"):
        data.prepare_raw("svhn_cropped", str(tmp_path), str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="raw_dir works for"):
        data.load("kmnist", raw_dir=str(tmp_path), data_dir=str(tmp_path / "tfds"))

"""Faulty raw files, folders, arguments and TF_CONFIG end in one short line naming the culprit.

Every fault below is a file (or setting) wrong on purpose; each must raise a ValueError that
bnn_keras words itself (raised from its own code, so the CLI prints it as
``bnn-keras: error: ...`` with exit 2), in one line of at most 300 characters that names the
file and says what was expected and what was found, and must leave ``data_dir`` without a
dataset that a later run would take as prepared.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import bnn_keras
from bnn_keras import cli, data, distribute

PACKAGE = Path(bnn_keras.__file__).resolve().parent


def assert_one_short_line_of_ours(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    """The error is a ValueError raised in bnn_keras, one line, <= 300 characters, with `needles`."""
    error, message = excinfo.value, str(excinfo.value)
    assert type(error) in (ValueError, data.DataUnavailableError), f"{type(error).__name__}: {message[:300]}"
    assert Path(str(excinfo.traceback[-1].path)).resolve().is_relative_to(PACKAGE), excinfo.traceback[-1]
    assert "\n" not in message and len(message) <= 300, f"{len(message)} characters: {message[:400]!r}"
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def assert_nothing_prepared(name: str, data_dir: Path) -> None:
    """No dataset (nor a staging folder) that a later run could take as prepared."""
    assert not data_dir.exists() or not any(data_dir.iterdir()), sorted(data_dir.iterdir())
    assert not tfds.builder(name, data_dir=str(data_dir)).is_prepared()


# --- IDX files (MNIST, Fashion-MNIST) ---------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def good_idx_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 30),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),  # plain files too
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 10),
    }


def write_idx_dir(path: Path, fault_file: str | None = None, fault=None) -> None:
    path.mkdir(parents=True)
    for file, array in good_idx_arrays().items():
        content = idx_bytes(array)
        if file == fault_file:
            content = fault(content, array)
        elif file.endswith(".gz"):
            content = gzip.compress(content, mtime=0)
        (path / file).write_bytes(content)


def with_label(labels: np.ndarray, index: int, value: int) -> np.ndarray:
    labels = labels.copy()
    labels[index] = value
    return labels


# (id, faulty file, its content from (good IDX bytes, good array), words the message must hold)
IDX_FAULTS = [
    ("garbage-gz", "train-images-idx3-ubyte.gz", lambda c, a: b"these bytes are not gzip" * 4, ["not a readable gzip file"]),
    ("truncated-gz", "train-images-idx3-ubyte.gz", lambda c, a: gzip.compress(c, mtime=0)[:2000], ["truncated"]),
    ("empty-gz", "train-labels-idx1-ubyte.gz", lambda c, a: b"", ["00 00 08", "empty"]),
    ("wrong-magic", "train-labels-idx1-ubyte.gz", lambda c, a: gzip.compress(b"\x00\x00\x09" + c[3:]), ["00 00 08", "00 00 09"]),
    ("gzip-named-plain", "t10k-labels-idx1-ubyte", lambda c, a: gzip.compress(c), ["00 00 08", "1f 8b 08", "end in .gz"]),
    ("garbage-plain", "t10k-labels-idx1-ubyte", lambda c, a: b"\x89PNG\r\n\x1a\n" * 8, ["00 00 08", "89 50 4e"]),
    ("255-dims", "t10k-images-idx3-ubyte", lambda c, a: c[:3] + b"\xff" + c[4:], ["3 dimension", "255"]),
    ("header-cut", "t10k-labels-idx1-ubyte", lambda c, a: c[:6], ["header", "8 bytes", "has 6"]),
    ("data-cut", "t10k-images-idx3-ubyte", lambda c, a: c[:-100], ["7740 bytes", "(10, 28, 28)", "7840 bytes"]),
    ("27x27-images", "t10k-images-idx3-ubyte", lambda c, a: idx_bytes(a[:, :27, :27]), ["28x28", "27x27"]),
    ("no-images", "t10k-images-idx3-ubyte", lambda c, a: idx_bytes(a[:0]), ["one or more images", "none"]),
    ("label-12", "train-labels-idx1-ubyte.gz", lambda c, a: gzip.compress(idx_bytes(with_label(a, 3, 12))), ["0..9", "found 12"]),
    ("9-labels-10-images", "t10k-labels-idx1-ubyte", lambda c, a: idx_bytes(a[:9]), ["9 labels", "10 images", "t10k-images-idx3-ubyte"]),
    ("labels-as-images", "t10k-labels-idx1-ubyte", lambda c, a: idx_bytes(a.reshape(10, 1, 1)), ["1 dimension", "says 3"]),
]
IDX_FAULT = {f[0]: f for f in IDX_FAULTS}


@pytest.mark.parametrize("file, fault, needles", [f[1:] for f in IDX_FAULTS], ids=[f[0] for f in IDX_FAULTS])
def test_faulty_idx_file_is_one_line_naming_it(tmp_path, file, fault, needles):
    write_idx_dir(tmp_path / "raw", file, fault)
    with pytest.raises(ValueError) as excinfo:
        data.load("fashion_mnist", raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "tfds"))
    assert_one_short_line_of_ours(excinfo, repr(str(tmp_path / "raw" / file)), *needles)
    assert not (tmp_path / "tfds").exists()  # every file is checked before anything is written
    assert_nothing_prepared("fashion_mnist", tmp_path / "tfds")


def test_read_idx_says_what_it_expected_and_read_the_good_files(tmp_path):
    write_idx_dir(tmp_path / "raw")
    arrays = good_idx_arrays()
    for file, array in arrays.items():  # the fixture itself is right: gz and plain read back
        np.testing.assert_array_equal(data.read_idx(str(tmp_path / "raw" / file)), array)
    with pytest.raises(ValueError) as excinfo:
        data.read_idx(str(tmp_path / "raw" / "t10k-labels-idx1-ubyte"), ndim=3)
    assert_one_short_line_of_ours(excinfo, "t10k-labels-idx1-ubyte", "3 dimension", "says 1")
    (tmp_path / "cut").write_bytes(bytes([0, 0, 8, 255]) + b"\x00\x00\x00\x02" * 255 + b"\x07")
    with pytest.raises(ValueError) as excinfo:  # no expectation given: the header is summarised
        data.read_idx(str(tmp_path / "cut"))
    assert_one_short_line_of_ours(excinfo, "'" + str(tmp_path / "cut") + "'", "holds 1 bytes", "255 dimensions")


# --- CIFAR-10 binary batches ------------------------------------------------------------


def good_cifar_files() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    files = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate([rng.integers(0, 10, (2, 1)), rng.integers(0, 256, (2, 3072))], axis=1)
        files[name] = records.astype(np.uint8).tobytes()
    files["batches.meta.txt"] = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n"
    return files


def tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def with_first_label(batch: bytes, label: int) -> bytes:
    return bytes([label]) + batch[1:]


# (id, layout, {file: content from the good files}, the name the message must hold, words)
CIFAR_FAULTS = [
    ("garbage-tarball", "archive", {"*": lambda f: b"not a tarball at all " * 50}, "cifar-10-binary.tar.gz", ["not a tar archive"]),
    ("truncated-tarball", "archive", {"*": lambda f: tarball(f)[: len(tarball(f)) // 2]}, "cifar-10-binary.tar.gz", ["truncated"]),
    ("empty-test-batch", "folder", {"test_batch.bin": lambda f: b""}, "test_batch.bin", ["0 bytes", "3073-byte records"]),
    ("empty-test-batch-in-tarball", "archive", {"test_batch.bin": lambda f: b""}, "member 'test_batch.bin'", ["0 bytes", "3073-byte records"]),
    ("half-a-record", "folder", {"data_batch_3.bin": lambda f: f["data_batch_3.bin"][:-1000]}, "data_batch_3.bin", ["5146 bytes", "3073-byte records"]),
    ("label-11", "folder", {"test_batch.bin": lambda f: with_first_label(f["test_batch.bin"], 11)}, "test_batch.bin", ["0..9", "found 11"]),
    ("3-class-names", "folder", {"batches.meta.txt": lambda f: b"cat\ndog\nbird\n"}, "batches.meta.txt", ["3 class name", "expected 10"]),
    ("3-class-names-in-tarball", "archive", {"batches.meta.txt": lambda f: b"cat\ndog\nbird\n"}, "member 'batches.meta.txt'", ["3 class name", "expected 10"]),
    ("binary-class-names", "folder", {"batches.meta.txt": lambda f: bytes(range(128, 256))}, "batches.meta.txt", ["text", "binary"]),
]


def write_cifar_dir(raw: Path, layout: str, faults: dict) -> None:
    files = good_cifar_files()
    files = {**files, **{name: make(files) for name, make in faults.items() if name != "*"}}
    if layout == "archive":
        raw.mkdir(parents=True)
        content = faults["*"](files) if "*" in faults else tarball(files)
        (raw / "cifar-10-binary.tar.gz").write_bytes(content)
    else:
        (raw / "cifar-10-batches-bin").mkdir(parents=True)
        for name, content in files.items():
            (raw / "cifar-10-batches-bin" / name).write_bytes(content)


@pytest.mark.parametrize("layout, faults, culprit, needles", [f[1:] for f in CIFAR_FAULTS], ids=[f[0] for f in CIFAR_FAULTS])
def test_faulty_cifar10_file_is_one_line_naming_it(tmp_path, layout, faults, culprit, needles):
    write_cifar_dir(tmp_path / "raw", layout, faults)
    with pytest.raises(ValueError) as excinfo:
        data.load("cifar10", raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "tfds"))
    assert_one_short_line_of_ours(excinfo, str(tmp_path / "raw"), culprit, *needles)
    assert not (tmp_path / "tfds").exists()
    assert_nothing_prepared("cifar10", tmp_path / "tfds")


# --- the data folder ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_data_dir_is_one_line_naming_it(tmp_path, where):
    if where == "proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    write_idx_dir(tmp_path / "raw")
    (tmp_path / "a_file").write_text("not a folder")
    data_dir = "/proc/tfds" if where == "proc" else str(tmp_path / "a_file" / "tfds")
    with pytest.raises(ValueError) as excinfo:
        data.load("mnist", raw_dir=str(tmp_path / "raw"), data_dir=data_dir)
    assert_one_short_line_of_ours(excinfo, f"data_dir {data_dir!r}", "cannot be written")
    assert not os.path.exists(data_dir)


def test_a_failure_while_writing_leaves_nothing_and_the_next_run_prepares(tmp_path, monkeypatch):
    write_idx_dir(tmp_path / "raw")
    data_dir = tmp_path / "tfds"
    real_examples = data._examples

    def examples_then_a_full_disk(name, split, images, labels):
        yield from list(real_examples(name, split, images, labels))[:5]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data, "_examples", examples_then_a_full_disk)
    with pytest.raises(Exception, match="No space left on device"):
        data.load("mnist", raw_dir=str(tmp_path / "raw"), data_dir=str(data_dir))
    assert_nothing_prepared("mnist", data_dir)  # no staging folder, nothing half-written
    monkeypatch.setattr(data, "_examples", real_examples)
    splits = data.load("mnist", raw_dir=str(tmp_path / "raw"), data_dir=str(data_dir), validation_fraction=0.2)
    assert (splits.train_size, splits.validation_size, splits.test_size) == (24, 6, 10)
    assert os.listdir(data_dir) == ["mnist"]


# --- the arguments of load and prepare_raw ----------------------------------------------


BAD_ARGUMENTS = [
    ({"name": None}, "name must be a dataset name", "got None"),
    ({"name": 3}, "name must be a dataset name", "got 3"),
    ({"name": ""}, "name must be a dataset name", "got ''"),
    ({"name": "a b"}, "unknown dataset 'a b'", "TFDS: "),
    ({"name": "mnist/no_such_config"}, "unknown dataset 'mnist/no_such_config'", "no_such_config"),
    ({"name": "mnist:9.9.9"}, "unknown dataset 'mnist:9.9.9'", "9.9.9"),
    ({"batch_size": 2.5}, "batch_size must be >= 1 (an integer)", "got 2.5"),
    ({"batch_size": "100"}, "batch_size must be >= 1 (an integer)", "got '100'"),
    ({"batch_size": True}, "batch_size must be >= 1 (an integer)", "got True"),
    ({"limit": 2.5}, "limit must be >= 1 (an integer) or None", "got 2.5"),
    ({"limit": True}, "limit must be >= 1 (an integer) or None", "got True"),
    ({"seed": "0"}, "seed must be >= 0 (an integer)", "got '0'"),
    ({"seed": 1.5}, "seed must be >= 0 (an integer)", "got 1.5"),
    ({"validation_fraction": "0.1"}, "validation_fraction must be in [0, 1)", "got '0.1'"),
    ({"name": "mnist", "data_dir": 3}, "data_dir must be a folder path", "got 3"),
    ({"name": "mnist", "raw_dir": b"/tmp"}, "raw_dir must be a folder path", "got b'/tmp'"),
    ({"batch_size": list(range(100))}, "batch_size must be >= 1 (an integer)", "got [0, 1, 2"),
]


@pytest.mark.parametrize("kwargs, expected, given", BAD_ARGUMENTS, ids=[repr(k)[:40] for k, _, _ in BAD_ARGUMENTS])
def test_bad_load_argument_is_one_line_saying_what_was_expected(tmp_path, kwargs, expected, given):
    kwargs = {"data_dir": str(tmp_path / "tfds"), **kwargs}
    with pytest.raises(ValueError) as excinfo:
        data.load(**kwargs)
    assert_one_short_line_of_ours(excinfo, expected, given)  # a long value is shown cut short
    assert not (tmp_path / "tfds").exists()


def test_numpy_integers_and_path_objects_are_accepted(tmp_path):
    splits = data.load("embedded", batch_size=np.int64(40), limit=np.int32(100), seed=np.int64(1),
                       validation_fraction=np.float32(0.2), data_dir=tmp_path)
    assert (splits.train_size, splits.validation_size, splits.test_size) == (80, 20, 100)
    assert next(iter(splits.train))[0].shape[0] == 40


@pytest.mark.parametrize("kwargs, expected", [
    ({"raw_dir": None}, "raw_dir None is not a directory"),
    ({"data_dir": None}, "needs a data_dir"),
])
def test_bad_prepare_raw_argument_is_one_line(tmp_path, kwargs, expected):
    kwargs = {"name": "mnist", "raw_dir": str(tmp_path), "data_dir": str(tmp_path / "tfds"), **kwargs}
    with pytest.raises(ValueError) as excinfo:
        data.prepare_raw(**kwargs)
    assert_one_short_line_of_ours(excinfo, expected)


# --- TF_CONFIG ------------------------------------------------------------------------------


BAD_TF_CONFIGS = [
    ("not json", "not JSON"),
    ('{"cluster": {"worker": ["a:1"]},', "not JSON"),
    ("[1, 2]", "got an array"),
    ('"worker"', "got a string"),
    ('{"task": "worker"}', 'its "task" must hold'),
    ('{"task": {"type": "worker", "index": "0"}}', 'its "task" must hold'),
    ('{"task": {"type": "worker", "index": -1}}', 'its "task" must hold'),
    ('{"task": {"type": 0, "index": 0}}', 'its "task" must hold'),
    ('{"cluster": ["a:1", "b:2"]}', 'its "cluster" must map job names'),
    ('{"cluster": {"worker": "a:1"}}', 'its "cluster" must map job names'),
    ('{"cluster": {"worker": []}}', 'its "cluster" must map job names'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "has 1 'worker' address"),
]


@pytest.mark.parametrize("config, expected", BAD_TF_CONFIGS, ids=[c for c, _ in BAD_TF_CONFIGS])
def test_bad_tf_config_is_one_line_naming_it(monkeypatch, config, expected):
    monkeypatch.setenv("TF_CONFIG", config)
    for call in (distribute.is_chief, lambda: distribute.get_strategy("multi-worker")):
        with pytest.raises(ValueError) as excinfo:
            call()
        assert_one_short_line_of_ours(excinfo, "TF_CONFIG", expected)


def test_tf_config_shape_in_the_message_is_valid_tf_config(monkeypatch):
    """The example the message gives is itself accepted (and names a chief)."""
    monkeypatch.setenv("TF_CONFIG", "nope")
    with pytest.raises(ValueError) as excinfo:
        distribute.is_chief()
    example = str(excinfo.value).split(" like ", 1)[1].split("; got", 1)[0].replace('"host:port", ...', '"host:port"')
    monkeypatch.setenv("TF_CONFIG", example)
    assert json.loads(example)["task"] == {"type": "worker", "index": 0}
    assert distribute.is_chief() is True


# --- through the CLI ------------------------------------------------------------------------

CLI_TRAIN = ["train", "mnist_mlp", "--hidden-units", "16", "--epochs", "1", "--limit", "100", "--verbose", "0"]


def faulty_raw_dir(tmp_path: Path, fault: str) -> tuple[str, str, str]:
    """(raw_dir, dataset, the file the message must name) with one fault."""
    raw = tmp_path / "raw"
    if fault in IDX_FAULT:
        _, file, make, _ = IDX_FAULT[fault]
        write_idx_dir(raw, file, make)
        return str(raw), "fashion_mnist", str(raw / file)
    write_cifar_dir(raw, "folder", {"batches.meta.txt": lambda f: b"cat dog bird"})
    return str(raw), "cifar10", str(raw / "cifar-10-batches-bin" / "batches.meta.txt")


@pytest.mark.parametrize("fault", ["garbage-gz", "27x27-images", "3-class-names"])
def test_cli_prints_one_line_exit_2_and_tfds_says_nothing(tmp_path, capsys, caplog, monkeypatch, fault):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    raw, dataset, culprit = faulty_raw_dir(tmp_path, fault)
    with caplog.at_level(logging.WARNING):
        status = cli.main([*CLI_TRAIN, "--dataset", dataset, "--raw-dir", raw,
                           "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("bnn-keras: error: ") and err.count("\n") == 1 and len(err) <= 320, err
    assert repr(culprit) in err
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # no TFDS notices
    assert not (tmp_path / "tfds").exists() and not (tmp_path / "out").exists()


def test_cli_bad_tf_config_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{'cluster': {}}")  # Python, not JSON
    status = cli.main([*CLI_TRAIN, "--strategy", "multi-worker", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("bnn-keras: error: TF_CONFIG must be a JSON object") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_real_cli_process_prints_exactly_one_line(tmp_path):
    """The whole stderr of `python -m bnn_keras.cli` (TFDS' notices included) is the one line."""
    raw, dataset, culprit = faulty_raw_dir(tmp_path, "garbage-gz")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "bnn_keras.cli", *CLI_TRAIN, "--dataset", dataset, "--raw-dir", raw,
         "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"bnn-keras: error: {culprit!r} is not a readable gzip file: Not a gzipped file (b'th')\n"
    assert not (tmp_path / "tfds").exists()

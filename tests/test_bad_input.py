"""Bad input ends in one line saying what was expected and what was given, exit status 2 and
nothing written; a NaN/inf loss ends in one line, exit status 1, keeping the last good state."""

import json
import os
import zipfile

import numpy as np
import pytest
import tensorflow as tf

import bnn_keras as bk
from bnn_keras import cli, models, training

TINY = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "8", "--epochs", "2", "--batch-size", "50", "--verbose", "0"]


def _snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _one_line_error(capsys, status, message, code, *, out=""):
    captured = capsys.readouterr()
    assert status == code, captured.err
    assert captured.out == out
    assert captured.err.count("\n") == 1 and captured.err.startswith("bnn-keras: error: "), captured.err
    assert message in captured.err
    assert "Traceback" not in captured.err
    return captured.err


BAD_FLAGS = [
        (["--dataset", "no_such_dataset", "--data-dir", "{tmp}/tfds"], "unknown dataset 'no_such_dataset': expected 'embedded', one of ('mnist', 'fashion_mnist', 'cifar10') or another TFDS"),
        (["--dataset", "mnist", "--data-dir", "{tmp}/a_file"], "data_dir '{tmp}/a_file' is a file: expected a TFDS data folder"),
        (["--dataset", "mnist", "--raw-dir", "{tmp}/a_file"], "raw_dir '{tmp}/a_file' is a file: expected a folder of original dataset files"),
        (["--out", "{tmp}/a_file"], "output folder '{tmp}/a_file' is a file: expected a folder or a path that does not exist yet"),
        (["--opt", "beta_2=fast"], "hyperparameter beta_2 of optimiser 'adam' must be a finite number (default 0.999), got 'fast'"),
        (["--opt", "amsgrad=1"], "hyperparameter amsgrad of optimiser 'adam' must be true or false (default False), got 1"),
        (["--optimizer", "bop", "--opt", "threshold=small"], "hyperparameter threshold of optimiser 'bop' must be a finite number (default 1e-08), got 'small'"),
        (["--strategy", "horovod"], "argument --strategy: invalid choice: 'horovod'"),
        (["--strategy", "multi-worker"], "strategy 'multi-worker' expects the cluster in the TF_CONFIG environment variable, got none"),
        (["--strategy", "tpu"], "strategy 'tpu' expects a TPU it can connect to, got none"),
        (["--lr", "nan"], "argument --lr: expected a number > 0, got nan"),
        (["--lr-end", "inf"], "argument --lr-end: expected a number > 0, got inf"),
        (["--switch-bn-momentum", "1"], "argument --switch-bn-momentum: expected a number in [0, 1), got 1"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (["--epochs", "2.5"], "argument --epochs: expected an integer >= 1, got '2.5'"),
        (["--hidden-units", "0"], "argument --hidden-units: expected an integer >= 1, got 0"),
        (["--limit", "1"], "validation set is empty: 1 training examples, limit 1"),
        (["--variant", "float", "--schedule", "two-stage", "--pretrain-epochs", "1"], "variant 'float' has no binary layers to clip: schedule must be 'vanilla', got 'two-stage'"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f).replace("{tmp}/", "") for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    (tmp_path / "a_file").write_text("not a folder")
    before = _snapshot(tmp_path)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "out")]
    _one_line_error(capsys, cli.main(TINY + flags + out), message.replace("{tmp}", str(tmp_path)), 2)
    assert _snapshot(tmp_path) == before


def test_unreadable_run_state_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"recipe": ')  # as no atomic write leaves it, e.g. edited by hand
    before = _snapshot(tmp_path)
    err = _one_line_error(capsys, cli.main(TINY + ["--out", str(out)]), f"cannot read '{out}/run.json' (JSONDecodeError", 2)
    assert "--overwrite" in err
    assert _snapshot(tmp_path) == before


def _lambda_model_file(folder):
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Lambda(lambda x: 2 * x)])
    path = folder / "lambda.keras"
    model.save(path)
    return path


def _truncated_model_file(folder):
    whole = folder / "whole.keras"
    models.mlp((4,), 2, hidden_units=(3,)).save(whole)
    path = folder / "truncated.keras"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "x.keras").write_text("not a model") and d / "x.keras", "cannot load a Keras model from"),
        (_truncated_model_file, "cannot load a Keras model from"),
        (lambda d: (d / "folder.keras").mkdir() or d / "folder.keras", "is not a Keras model: expected a .keras or .h5 file or a SavedModel directory"),
        (lambda d: d / "missing.keras", "no such model file or directory"),
        (_lambda_model_file, "Lambda"),  # safe mode: no arbitrary code from a model file
    ],
    ids=["text", "truncated", "folder", "missing", "lambda-safe-mode"],
)
def test_bad_model_files_are_one_line_exit_2(make, message, tmp_path, capsys):
    path = make(tmp_path)
    before = _snapshot(tmp_path)
    err = _one_line_error(capsys, cli.main(["export", str(path), "--out", str(tmp_path / "m.tflite")]), message, 2)
    assert str(path) in err
    assert _snapshot(tmp_path) == before  # no flatbuffer, no report


def test_keras_safe_mode_refuses_the_lambda_model(tmp_path):
    path = _lambda_model_file(tmp_path)
    with pytest.raises(ValueError, match="safe_mode"):
        tf.keras.models.load_model(path, safe_mode=True)


def test_binary_only_schedule_on_a_model_without_larq_layers_says_so():
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError) as error:
        model.fit(np.zeros((4, 4)), np.zeros((4, 2)), verbose=0, callbacks=[bk.callbacks.ClippingSchedule(switch_epoch=0)])
    assert "expected a model with switchable quantisers or weight clips" in str(error.value)
    assert "got one with none" in str(error.value) and "\n" not in str(error.value)


def test_absurd_learning_rate_stops_in_the_first_epoch_with_exit_1(tmp_path, capsys):
    out = tmp_path / "run"
    argv = TINY + ["--optimizer", "sgd", "--lr", "1e30", "--lr-schedule", "constant", "--out", str(out)]
    err = _one_line_error(capsys, cli.main(argv), "the training loss became ", 1)
    # checked once per execution block ("auto": the epoch's 6 steps), so the block is named
    assert " in epoch 1, batches 1-6 of 6: training stopped; no epoch had finished" in err
    assert os.listdir(out) == ["run.json"]  # no history, no summary, no best model


def test_absurd_learning_rate_one_step_per_execution_names_the_batch(tmp_path, capsys):
    out = tmp_path / "run"
    argv = TINY + ["--optimizer", "sgd", "--lr", "1e30", "--lr-schedule", "constant", "--out", str(out)]
    err = _one_line_error(capsys, cli.main(argv + ["--steps-per-execution", "1"]), "the training loss became ", 1)
    assert " in epoch 1, batch 2 of 6: training stopped; no epoch had finished" in err  # in the block of 1-6 above
    assert os.listdir(out) == ["run.json"]


@pytest.mark.parametrize(
    "block, poisoned, where",
    [("1", 2, "batch 3 of 6"), ("3", 3, "batches 4-6 of 6")],  # a hook per batch / per block of 3
)
def test_nan_mid_run_keeps_the_last_good_epoch_and_the_same_command_resumes_from_it(
    tmp_path, capsys, monkeypatch, nan_at, block, poisoned, where
):
    out = tmp_path / "run"
    argv = TINY + ["--out", str(out), "--steps-per-execution", block]
    nan_at(1, poisoned)  # a NaN weight from epoch 2 (0-based 1), batch `poisoned` (0-based) on
    err = _one_line_error(capsys, cli.main(argv), f"the training loss became nan in epoch 2, {where}: training stopped;", 1)
    assert "keeps the backup of the 1 finished epoch(s) and the best model so far (best_model.keras)" in err
    assert {"run.json", "backup", "history.json", "history.csv", "best_model.keras"} == set(os.listdir(out))
    with open(out / "history.json") as file:
        assert [row["epoch"] for row in json.load(file)] == [0]
    best = tf.keras.models.load_model(out / "best_model.keras", compile=False, safe_mode=True)
    assert all(np.isfinite(w).all() for w in best.get_weights())

    monkeypatch.undo()
    assert cli.main(argv) == 0
    with open(out / "summary.json") as file:
        summary = json.load(file)
    assert summary["resumed_at_epochs"] == [1] and summary["total_epochs"] == 2
    assert np.isfinite(summary["final_val_accuracy"])


def test_truncated_zip_is_not_a_zip(tmp_path):
    """The 'truncated' case above really is a damaged archive, not just a wrong name."""
    assert not zipfile.is_zipfile(_truncated_model_file(tmp_path))

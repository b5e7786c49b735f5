"""bnn-keras train --model-file / training.run(model=...): the recipe's protocol on a user's own Larq model."""

import json

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras
from bnn_keras import cli, training
from bnn_keras.quantizers import SwitchableSteSign

FLAGS = ["--schedule", "vanilla-then-clipped", "--switch-epoch", "1", "--epochs", "2", "--limit", "600",
         "--batch-size", "50", "--verbose", "0"]


def users_model(input_shape=(28, 28, 1), classes=10, lambda_layer=False, softmax=False):
    """A small Larq MLP written the way Larq's docs write one: string quantisers and clips."""
    tf.keras.utils.set_random_seed(11)
    inputs = tf.keras.Input(input_shape)
    x = tf.keras.layers.Flatten()(inputs)
    if lambda_layer:
        x = tf.keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    x = lq.layers.QuantDense(32, kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)(x)
    x = tf.keras.layers.BatchNormalization(momentum=0.5)(x)
    x = lq.layers.QuantDense(classes, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                             kernel_constraint="weight_clip", use_bias=False)(x)
    x = tf.keras.layers.BatchNormalization()(x)
    if softmax:
        x = tf.keras.layers.Activation("softmax")(x)
    return tf.keras.Model(inputs, x, name="users_mlp")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "mine.keras"
    users_model().save(path)
    return path


def test_the_recipe_trains_a_model_file_with_its_schedule(model_file, tmp_path, capsys):
    before = model_file.read_bytes()
    out = tmp_path / "run"
    assert cli.main(["train", "mnist_mlp", "--model-file", str(model_file), "--out", str(out), *FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["own_model"]["quantizers"] == 3 and summary["own_model"]["weight_clips"] == 2
    assert summary["switched_at_epoch"] == 1 and summary["recipe"]["model_file"] == str(model_file)
    history = json.loads((out / "history.json").read_text())
    assert [row["clipping_phase"] for row in history] == [0.0, 1.0]
    assert [row["bn_momentum"] for row in history] == [0.85, 0.85]  # the recipe's BN momentum, not the file's 0.5
    assert model_file.read_bytes() == before  # the user's file is not touched
    best = tf.keras.models.load_model(out / "best_model.keras")
    assert isinstance(best.layers[2].kernel_quantizer, SwitchableSteSign)

    # The same run from Python on the loaded model: the same numbers (the file changes nothing).
    recipe = training.get_recipe("mnist_mlp").override(
        model_file=None, schedule="vanilla-then-clipped", switch_epoch=1, epochs=2, limit=600, batch_size=50,
        verbose=0, output_dir=str(tmp_path / "python"))
    result = training.run(recipe.replace(model_kwargs={}), model=tf.keras.models.load_model(model_file))
    np.testing.assert_allclose([r["val_accuracy"] for r in result["history"]], [r["val_accuracy"] for r in history])
    np.testing.assert_allclose([r["loss"] for r in result["history"]], [r["loss"] for r in history], rtol=1e-6)
    assert result["recipe"]["model_sha256"] != summary["recipe"]["model_sha256"]  # a model's digest, not a file's

    # The same command again: finished, nothing trained.
    assert cli.main(["train", "mnist_mlp", "--model-file", str(model_file), "--out", str(out), *FLAGS]) == 0
    # Another file in that folder: its digest differs, so the run is refused before anything is written.
    other = tmp_path / "other.keras"
    users_model(classes=10).save(other)
    other_model = tf.keras.models.load_model(other)
    other_model.layers[2].kernel.assign(other_model.layers[2].kernel + 1.0)
    other_model.save(other)
    capsys.readouterr()
    assert cli.main(["train", "mnist_mlp", "--model-file", str(other), "--out", str(out), *FLAGS]) == 2
    assert "model_sha256" in capsys.readouterr().err


@pytest.mark.parametrize("shape, classes, message", [
    ((32, 32, 3), 10, "model 'users_mlp' takes inputs of shape (32, 32, 3), but dataset 'embedded' has (28, 28, 1)"),
    ((28, 28, 1), 7, "model 'users_mlp' has 7 outputs, but dataset 'embedded' has 10 classes"),
])
def test_a_model_that_does_not_fit_the_data_is_refused_in_one_line(shape, classes, message, tmp_path, capsys):
    path = tmp_path / "m.keras"
    users_model(shape, classes).save(path)
    out = tmp_path / "run"
    assert cli.main(["train", "mnist_mlp", "--model-file", str(path), "--out", str(out), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_model_file_with_code_needs_unsafe_load(tmp_path, capsys):
    path = tmp_path / "lambda.keras"
    users_model(lambda_layer=True).save(path)
    out = tmp_path / "run"
    assert cli.main(["train", "mnist_mlp", "--model-file", str(path), "--out", str(out), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "Lambda" in err and err.count("\n") == 1 and not out.exists()
    flags = ["--limit", "300", "--batch-size", "50", "--verbose", "0", "--epochs", "1"]
    assert cli.main(["train", "mnist_mlp", "--model-file", str(path), "--unsafe-load", "--out", str(out), *flags]) == 0
    assert json.loads((out / "summary.json").read_text())["own_model"]["left"][0][:2] == ["double", "layer"]


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "two-stage", "--pretrain-epochs", "1"], "schedule 'two-stage' needs the float twin"),
    (["--hidden-units", "64"], "model_kwargs hidden_units set bnn_keras' own builders, not a model file"),
    (["--import", "no_such_module_here"], "--import 'no_such_module_here': no such module on sys.path"),
])
def test_settings_that_do_not_apply_to_a_model_file_are_refused(argv, message, model_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "mnist_mlp", "--model-file", str(model_file), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_a_softmax_output_is_trained_as_probabilities():
    assert training._ends_in_softmax(users_model(softmax=True))
    assert not training._ends_in_softmax(users_model())
    model = users_model(softmax=True)
    recipe = training.get_recipe("mnist_mlp").replace(model_kwargs={}, loss="crossentropy")
    run_model = bnn_keras.make_switchable(model)
    training._compile(run_model, recipe, 1, 1, 1.0, from_logits=not training._ends_in_softmax(run_model))
    assert run_model.loss.get_config()["from_logits"] is False


def test_a_killed_run_of_a_model_file_resumes_to_the_same_history(model_file, tmp_path):
    """SIGKILLed mid-epoch 1 (the first clipped epoch), started again: the uninterrupted run's numbers."""
    import os
    import signal
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.path.dirname(here) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["train", "mnist_mlp", "--model-file", str(model_file), "--limit", "300", "--epochs", "3",
            "--batch-size", "50", "--schedule", "vanilla-then-clipped", "--switch-epoch", "1", "--verbose", "0"]

    def run(out, kill_at=None):
        prefix = [sys.executable, "-m", "bnn_keras.cli"] if kill_at is None else [
            sys.executable, os.path.join(here, "helpers", "killed_run.py"), kill_at]
        done = subprocess.run(prefix + argv + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == (0 if kill_at is None else -signal.SIGKILL), done.stderr[-2000:]

    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    run(whole)
    run(pieces, "batch:1:2")
    assert [r["epoch"] for r in json.loads((pieces / "history.json").read_text())] == [0]
    run(pieces)
    wall = {"epoch_time_s"}
    rows = [[{k: v for k, v in r.items() if k not in wall} for r in json.loads((out / "history.json").read_text())]
            for out in (whole, pieces)]
    assert rows[0] == rows[1] and [r["clipping_phase"] for r in rows[0]] == [0.0, 1.0, 1.0]
    assert json.loads((pieces / "summary.json").read_text())["resumed_at_epochs"] == [1]


def test_a_nested_model_trains_without_dead_zone_columns_and_says_why(tmp_path, capsys):
    """Its input-quantised layer reads a nested model's Input: once, the run crashed at the first epoch's end."""
    tf.keras.utils.set_random_seed(5)
    flat_in = tf.keras.Input((28, 28, 1))
    flat = tf.keras.Model(flat_in, tf.keras.layers.Flatten()(flat_in), name="flat")
    head_in = tf.keras.Input((784,))
    head = tf.keras.Model(head_in, lq.layers.QuantDense(
        10, use_bias=False, input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
        name="deep")(head_in), name="head")
    inputs = tf.keras.Input((28, 28, 1))
    model = tf.keras.Model(inputs, head(flat(inputs)), name="outer")
    recipe = training.get_recipe("mnist_mlp").override(
        epochs=1, limit=200, batch_size=50, verbose=1, output_dir=str(tmp_path / "run"))
    result = training.run(recipe.replace(model_kwargs={}), model=model)
    assert result["total_epochs"] == 1 and result["own_model"]["quantizers"] == 2
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert not any(key.startswith("dead_zone") for key in history[0])
    printed = capsys.readouterr().out
    assert ("bnn-keras: no dead-zone columns: cannot read the inputs of layers ['deep'] from model 'outer''s "
            "inputs (a shared or nested layer?): layer 'deep' reads the input of a nested model") in printed

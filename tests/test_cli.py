"""bnn-keras CLI: flags reach the recipe, mistakes are one line with exit status 2, --help works."""

import json
import os
import re
import subprocess
import sys

import pytest

from bnn_keras import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nope"], "argument RECIPE: invalid choice: 'nope'"),
        (["train", "mnist_mlp", "--epochs", "-1"], "argument --epochs: expected an integer >= 1, got -1"),
        (["train", "mnist_mlp", "--epochs", "ten"], "argument --epochs: expected an integer >= 1, got 'ten'"),
        (["train", "mnist_mlp", "--lr", "0"], "argument --lr: expected a number > 0, got 0"),
        (["train", "mnist_mlp", "--lr", "-0.001"], "argument --lr: expected a number > 0, got -0.001"),
        (["train", "mnist_mlp", "--bn-momentum", "1.0"], "argument --bn-momentum: expected a number in [0, 1), got 1.0"),
        (["train", "mnist_mlp", "--bn-momentum", "-0.1"], "argument --bn-momentum: expected a number in [0, 1), got -0.1"),
        (["train", "mnist_mlp", "--optimizer", "adamw"], "argument --optimizer: invalid choice: 'adamw'"),
        (["train", "mnist_mlp", "--variant", "xnor"], "argument --variant: invalid choice: 'xnor'"),
        (["train", "mnist_mlp", "--schedule", "late"], "argument --schedule: invalid choice: 'late'"),
        (["train", "mnist_mlp", "--opt", "beta_2"], "argument --opt: expected KEY=VALUE, got 'beta_2'"),
        (["train", "mnist_mlp", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "mnist_mlp", "--width-multiplier", "0.5"], "model_kwargs width_multiplier not accepted by model 'mlp'"),
        (["train", "mnist_mlp", "--variant", "float"], "variant 'float' has no binary layers to clip"),
        (["train", "mnist_mlp", "--schedule", "vanilla-then-clipped"], "needs switch_epoch or patience"),
        (["train", "mnist_mlp", "--opt", "nope=1", "--limit", "100", "--epochs", "1"], "unknown hyperparameter(s) nope for optimiser 'adam'"),
        (["study", "--tables", "nope"], "argument --tables: invalid choice: 'nope'"),
        (["study", "--seeds", "0"], "argument --seeds: expected an integer in [1, 1000], got 0"),
        # 2**31 runs per cell: refused at once (it used to build the grid until memory ran out)
        (["study", "--quick", "--seeds", "2147483648"], "argument --seeds: expected an integer in [1, 1000], got 2147483648"),
        (["fly"], "argument COMMAND: invalid choice: 'fly'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_mistakes_are_one_line_exit_2_and_write_nothing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders (runs/...) would land here
    out = tmp_path / "out"
    extra = ["--out", str(out)] if argv[:1] in (["train"], ["study"]) and "--bogus" not in argv else []
    assert cli.main(argv + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("bnn-keras: error: ")
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_dataset_is_one_line(tmp_path, capsys):
    argv = ["train", "mnist_mlp", "--dataset", "mnist", "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnn-keras: error: dataset 'mnist' is not prepared") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["study", "--help"], ["export", "--help"]])
def test_help_exits_0(argv, capsys):
    assert cli.main(argv) == 0
    assert "usage: bnn-keras" in capsys.readouterr().out


def test_train_help_explains_every_flag(capsys):
    cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--dataset", "--data-dir", "--raw-dir", "--limit", "--epochs", "--batch-size", "--optimizer", "--lr",
        "--lr-end", "--bn-momentum", "--variant", "--schedule", "--switch-epoch", "--patience", "--seed", "--out",
        "--hidden-units", "--width-multiplier", "--weight-clip", "--clipping", "--lr-factor",
        "--switch-bn-momentum", "--pretrain-epochs", "--loss", "--opt", "--lr-scaling", "--verbose",
        "--strategy", "--overwrite", "--nondeterministic",
    ):
        assert flag in text


def test_train_flags_reach_the_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train", "mnist_mlp", "--limit", "200", "--hidden-units", "8", "8", "--epochs", "2", "--batch-size", "50",
        "--lr", "0.01", "--lr-schedule", "constant", "--bn-momentum", "0.9", "--schedule", "vanilla-then-clipped",
        "--switch-epoch", "1", "--lr-factor", "0.5", "--switch-bn-momentum", "0.8", "--weight-clip", "glorot",
        "--opt", "beta_2=0.99", "--seed", "3", "--verbose", "2", "--out", str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Epoch 2/2" in printed and "best val accuracy" in printed  # progress lines
    summary = json.loads((out / "summary.json").read_text())
    recipe = summary["recipe"]
    assert recipe["model_kwargs"] == {"hidden_units": [8, 8], "weight_clip": "glorot"}
    assert (recipe["limit"], recipe["epochs"], recipe["batch_size"], recipe["seed"]) == (200, 2, 50, 3)
    assert (recipe["lr_start"], recipe["bn_momentum"], recipe["optimizer_kwargs"]) == (0.01, 0.9, {"beta_2": 0.99})
    assert (recipe["switch_epoch"], recipe["lr_factor"], recipe["switch_bn_momentum"]) == (1, 0.5, 0.8)
    assert recipe["lr_end"] == 3e-6 and recipe["dataset"] == "embedded"  # untouched recipe defaults
    history = json.loads((out / "history.json").read_text())
    assert [(r["clipping_phase"], r["lr"], r["bn_momentum"]) for r in history] == [
        (0.0, pytest.approx(0.01), 0.9), (1.0, pytest.approx(0.005), 0.8)
    ]


def test_study_quick_with_overrides_reaches_every_cell(tmp_path, monkeypatch, capsys):
    from bnn_keras import training

    seen = []

    def fake_run(recipe):
        seen.append(recipe)
        recipe.out.mkdir(parents=True)
        summary = {"best_val_accuracy": 0.8, "best_epoch": 0, "best_epoch_1based": 1,
                   "test_accuracy_at_best": 0.75, "test_error_at_best": 0.25, "recipe": recipe.to_dict()}
        training.write_json(recipe.out / "summary.json", summary)
        training.write_json(recipe.out / "history.json", [{"epoch": 0, "val_accuracy": 0.8}])
        return summary

    monkeypatch.setattr(training, "run", fake_run)
    out = tmp_path / "study"
    argv = ["study", "--quick", "--tables", "bn_momentum", "clipping", "--epochs", "2", "--limit", "300", "--out", str(out)]
    assert cli.main(argv) == 0
    assert len(seen) == 2 * 7  # 2 quick seeds x (4 + 4 cells - 1 shared: bn 0.85 == clipping both)
    assert {(r.dataset, r.epochs, r.limit, r.model_kwargs["hidden_units"]) for r in seen} == {("embedded", 2, 300, (128, 128))}
    assert {r.seed for r in seen} == {0, 1}
    assert "| test error, this study (n=2) | 25.00 ± 0.00% |" in (out / "tables.md").read_text()
    assert "study: 14 trained, 0 already done, 2 copied" in capsys.readouterr().out


def test_an_internal_value_error_is_reported_as_a_bug_not_as_bad_input(tmp_path, capsys, monkeypatch):
    """A ValueError raised inside TensorFlow (not by bnn_keras' checks): exit 3, traceback in a file."""
    import tensorflow as tf

    from bnn_keras import training

    monkeypatch.setattr(training, "run", lambda recipe, overwrite=False, **_: tf.convert_to_tensor([2 ** 70]))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert cli.main(["train", "mnist_mlp", "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnn-keras: internal error (ValueError: ")
    report = next(tmp_path.glob("bnn-keras-error-*.txt"))
    assert str(report) in err
    text = report.read_text()
    assert "Traceback (most recent call last)" in text and "convert_to_tensor" in text


def test_bad_input_raised_by_bnn_keras_is_still_exit_2(capsys, monkeypatch):
    from bnn_keras import training

    monkeypatch.setattr(training, "run", lambda recipe, overwrite=False, **_: training.get_recipe("imagenet"))
    assert cli.main(["train", "mnist_mlp"]) == 2
    assert capsys.readouterr().err.startswith("bnn-keras: error: unknown recipe 'imagenet': expected one of ")


# TensorFlow's C++ start-up lines: absl's pre-init notice, "I0000 00:00:..." style records.
TF_NOISE = re.compile(
    r"absl::InitializeLog|^[IWE]\d{4} \d\d:\d\d:\d\d|cpu_feature_guard|oneDNN|rebuild TensorFlow|^WARNING:tensorflow", re.M
)


def _command(*argv, **env):
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-m", "bnn_keras.cli", *argv], capture_output=True, text=True,
                          env=environment, timeout=300, cwd=REPO)


def test_the_command_line_shows_its_own_lines_not_tensorflows(tmp_path):
    result = _command("train", "mnist_mlp", "--limit", "200", "--hidden-units", "8", "--epochs", "1",
                      "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert TF_NOISE.findall(result.stdout + result.stderr) == []
    assert "bnn-keras: best val accuracy" in result.stdout
    exported = _command("export", str(tmp_path / "run" / "best_model.keras"), "--out", str(tmp_path / "m.tflite"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert TF_NOISE.findall(exported.stdout + exported.stderr) == [] and "wrote " in exported.stdout


def test_verbose_2_shows_tensorflows_log_too(tmp_path):
    result = _command("train", "mnist_mlp", "--limit", "200", "--hidden-units", "8", "--epochs", "1",
                      "--verbose", "2", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert TF_NOISE.search(result.stderr)

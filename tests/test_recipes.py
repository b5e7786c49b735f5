"""The study's recipes: their settings, the thin scripts in recipes/, and 1-epoch runs of each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import cli, data, study, training

ROOT = Path(__file__).resolve().parents[1]


def test_mnist_mlp_has_the_study_settings():
    r = training.get_recipe("mnist_mlp")
    assert (r.model, r.model_kwargs, r.variant) == ("mlp", {"hidden_units": (2048, 2048, 2048)}, "binaryconnect")
    assert (r.optimizer, r.lr_start, r.lr_end, r.lr_schedule) == ("adam", 1e-3, 3e-6, "exponential")
    assert (r.epochs, r.batch_size, r.bn_momentum, r.bn_epsilon, r.loss) == (250, 100, 0.85, 1e-4, "squared_hinge")
    assert (r.validation_fraction, r.schedule, r.clipping) == (0.1, "clipped", "both")
    assert r.dataset == "embedded"  # runs offline out of the box; --dataset mnist for the study's data


def test_cifar10_vgg10_has_the_study_settings():
    r = training.get_recipe("cifar10_vgg10")
    assert (r.model, r.model_kwargs["width_multiplier"], r.dataset) == ("vgg10", 1.0, "cifar10")
    assert (r.optimizer, r.lr_start, r.lr_end) == ("adam", 3e-3, 2e-6)
    assert (r.epochs, r.batch_size, r.bn_momentum, r.loss) == (500, 50, 0.9, "squared_hinge")


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'imagenet': expected one of cifar10_resnet18, cifar10_vgg10, mnist_mlp"):
        training.get_recipe("imagenet")


def test_recipe_scripts_are_thin_views_of_the_registry(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import recipes
    import recipes.cifar10_vgg10
    import recipes.mnist_mlp
    import recipes.study

    assert set(recipes.SCRIPTS) == {*training.RECIPES, "study"}
    for name, script in recipes.SCRIPTS.items():
        assert (ROOT / "recipes" / script).is_file()
    assert recipes.mnist_mlp.RECIPE is training.RECIPES["mnist_mlp"]
    assert recipes.cifar10_vgg10.RECIPE is training.RECIPES["cifar10_vgg10"]
    assert recipes.study.TABLES is study.TABLES
    assert recipes.RECIPES is training.RECIPES


def test_to_dict_round_trip():
    for recipe in training.RECIPES.values():
        assert training.Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    with pytest.raises(ValueError, match="unknown recipe field"):
        training.Recipe.from_dict({"epochz": 1})


def _standardised_embedded_test_set(limit):
    """The first `limit` embedded test images, standardised per image (numpy), and their labels."""
    _, (images, labels) = data.embedded_arrays()
    x = images[:limit].astype("float64")
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(x.std(axis=(1, 2), keepdims=True), 1 / np.sqrt(x.shape[1] * x.shape[2]))
    return ((x - mean) / std).astype("float32"), labels[:limit]


def _summary_and_history_agree(out, chance_margin):
    """best_epoch is the argmax of the logged val_accuracy, the test accuracy is that epoch's and
    beats chance (10 classes: 0.1) by `chance_margin`; return (summary, history rows)."""
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "history.json").read_text())
    val = [row["val_accuracy"] for row in rows]
    best = int(np.argmax(val))
    assert val.count(max(val)) == 1, val
    assert (summary["best_epoch"], summary["best_epoch_1based"]) == (best, best + 1)
    assert summary["best_val_accuracy"] == val[best]
    assert summary["test_accuracy_at_best"] == rows[best]["test_accuracy"]
    assert summary["test_accuracy_at_best"] > 0.1 + chance_margin
    return summary, rows


def test_mnist_mlp_script_runs_end_to_end(tmp_path):
    """`python recipes/mnist_mlp.py` from the checkout under test (PYTHONPATH = its root, as a user
    of a source checkout runs it), 3 epochs on 900 / 100 / 1000 examples; seed 0 learns (val
    accuracy 0.45, 0.47, 0.46: best epoch 2 of 3, test accuracy 0.566 there, 0.559 at epoch 3;
    a net that does not learn: 0.04 val)."""
    out = tmp_path / "mlp"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    script = ROOT / "recipes" / "mnist_mlp.py"
    # Where `import bnn_keras` goes for the script: its own folder first on sys.path, then PYTHONPATH
    # (found, not imported: no TensorFlow start-up).
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util, sys; sys.path[0] = sys.argv[1]; "
         "print(importlib.util.find_spec('bnn_keras').origin)", str(script.parent)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert where.stdout.strip() == str(ROOT / "bnn_keras" / "__init__.py"), where.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, str(script), "--limit", "1000", "--hidden-units", "32",
         "--epochs", "3", "--verbose", "0", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"summary.json", "history.csv", "history.json", "best_model.keras", "curves.png"} <= set(os.listdir(out))
    summary, rows = _summary_and_history_agree(out, chance_margin=0.3)
    assert summary["recipe"]["name"] == "mnist_mlp" and summary["recipe"]["epochs"] == 3
    assert (summary["train_size"], summary["validation_size"], summary["test_size"]) == (900, 100, 1000)
    assert summary["params"]["trainable"] == 784 * 32 + 32 * 10 + 2 * (32 + 10)
    # The fixture tells best from last: best_model.keras must hold epoch 2's weights, not epoch 3's.
    assert summary["best_epoch"] < 2 and rows[-1]["test_accuracy"] != summary["test_accuracy_at_best"]
    model = tf.keras.models.load_model(out / "best_model.keras", compile=False, safe_mode=True)
    x, labels = _standardised_embedded_test_set(1000)
    correct = int(np.sum(np.argmax(model(x, training=False).numpy(), axis=1) == labels))
    assert correct == round(summary["test_accuracy_at_best"] * 1000)


def test_cifar10_vgg10_recipe_runs_end_to_end(tmp_path):
    """1 epoch on 360 / 40 / 400 embedded examples; BN momentum 0.5 so that 8 steps move the
    moving statistics. Seed 0: test accuracy 0.343 (a net that does not learn: 0.09)."""
    out = tmp_path / "vgg"
    argv = ["train", "cifar10_vgg10", "--dataset", "embedded", "--limit", "400", "--width-multiplier", "0.0625",
            "--bn-momentum", "0.5", "--epochs", "1", "--verbose", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    assert {"summary.json", "history.csv", "history.json", "best_model.keras", "curves.png"} <= set(os.listdir(out))
    summary, _ = _summary_and_history_agree(out, chance_margin=0.15)  # best_model.keras: the MLP test
    assert summary["recipe"]["model"] == "vgg10" and summary["recipe"]["batch_size"] == 50
    assert (summary["recipe"]["lr_start"], summary["recipe"]["loss"]) == (3e-3, "squared_hinge")
    assert (summary["total_epochs"], summary["recipe"]["bn_momentum"]) == (1, 0.5)

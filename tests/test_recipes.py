"""The study's recipes: their settings, the thin scripts in recipes/, and 1-epoch runs of each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnn_keras import cli, study, training

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
    with pytest.raises(ValueError, match="unknown recipe 'imagenet': expected one of cifar10_vgg10, mnist_mlp"):
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


def test_mnist_mlp_script_runs_end_to_end(tmp_path):
    out = tmp_path / "mlp"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PYTHONPATH", None)  # the script must find the package from the checkout itself
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "mnist_mlp.py"), "--limit", "200", "--hidden-units", "8",
         "--epochs", "1", "--verbose", "0", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"summary.json", "history.csv", "history.json", "best_model.keras", "curves.png"} <= set(os.listdir(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["name"] == "mnist_mlp" and summary["recipe"]["epochs"] == 1
    assert summary["params"]["trainable"] == 784 * 8 + 8 * 10 + 2 * (8 + 10)


def test_cifar10_vgg10_recipe_runs_end_to_end(tmp_path):
    out = tmp_path / "vgg"
    argv = ["train", "cifar10_vgg10", "--dataset", "embedded", "--limit", "100", "--width-multiplier", "0.0625",
            "--epochs", "1", "--verbose", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["model"] == "vgg10" and summary["recipe"]["batch_size"] == 50
    assert summary["total_epochs"] == 1 and 0 <= summary["test_accuracy_at_best"] <= 1
    assert {"summary.json", "history.csv", "history.json", "best_model.keras", "curves.png"} <= set(os.listdir(out))

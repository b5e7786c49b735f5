"""training.run end to end on tiny real data: files, schedules, two-stage hand-over, reporting."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import bnn_keras as bk
from bnn_keras import data, models, training
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import SwitchableSteSign
from bnn_keras.training import Recipe

FILES = {"best_model.keras", "curves.png", "history.csv", "history.json", "summary.json"}

TINY = Recipe(
    name="tiny",
    limit=500,  # 450 train / 50 validation / 500 test images of the embedded Fashion-MNIST subset
    model_kwargs={"hidden_units": (32, 32)},
    epochs=2,
    batch_size=50,
    lr_start=1e-2,
    lr_end=1e-3,
    verbose=0,
)


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    """vanilla-then-clipped, constant LR, switch at epoch 1 with LR x0.1 and BN momentum 0.5."""
    out = tmp_path_factory.mktemp("switched")
    recipe = TINY.replace(
        schedule="vanilla-then-clipped", switch_epoch=1, lr_factor=0.1, switch_bn_momentum=0.5,
        lr_schedule="constant", output_dir=str(out),
    )
    return recipe, training.run(recipe)


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """two-stage with a spy on copy_weights that records, from each Keras layer's own weights list,
    every variable of both models before and after the copy, and the binary model's predictions
    on the validation and test images right after it."""
    out = tmp_path_factory.mktemp("two_stage")
    arrays = {split: _arrays(split, "hinge") for split in ("validation", "test")}
    seen = {"labels": {split: labels for split, (_, labels) in arrays.items()}}
    original = models.copy_weights

    def values(model):
        return {(layer.name, w.name): np.array(_latent(w)) for layer in model.layers for w in layer.weights}

    def spy(source, target):
        seen["target_before"] = values(target)
        count = original(source, target)
        seen["source"], seen["target"] = values(source), values(target)
        seen["float_layers"] = [layer.name for layer in source.layers if layer.weights]
        seen["predictions"] = {split: target.predict(images, verbose=0) for split, (images, _) in arrays.items()}
        seen["target_name"] = target.name
        return count

    models.copy_weights = spy
    try:
        recipe = TINY.replace(
            schedule="two-stage", pretrain_epochs=2, epochs=1, switch_bn_momentum=0.6, output_dir=str(out)
        )
        result = training.run(recipe)
    finally:
        models.copy_weights = original
    return recipe, result, seen


@pytest.fixture(scope="module")
def gradients_only(tmp_path_factory):
    """clipped with clipped STE only (weight clipping off), cross-entropy, constant LR 0.1, 3 epochs:
    latent weights grow past 1, and validation accuracy peaks at epoch 1 (0.52, 0.72, 0.70)."""
    out = tmp_path_factory.mktemp("gradients_only")
    recipe = TINY.replace(
        schedule="clipped", clipping="gradients", loss="crossentropy", epochs=3,
        lr_schedule="constant", lr_start=0.1, output_dir=str(out),
    )
    return recipe, training.run(recipe)


def _arrays(split, targets, limit=500):
    """Images and class labels of one split ("validation" / "test") of the embedded subset."""
    splits = data.load("embedded", limit=limit, batch_size=50, targets=targets)
    images, labels = (np.concatenate(part) for part in zip(*getattr(splits, split).as_numpy_iterator()))
    return images, labels if targets == "sparse" else np.argmax(labels, axis=1)  # hinge: +1 at the class


def _latent(variable):
    return tf.convert_to_tensor(getattr(variable, "latent_variable", variable)).numpy()


def _history_csv(out):
    with open(os.path.join(out, "history.csv"), newline="") as file:
        return list(csv.DictReader(file))


def test_switch_happens_at_the_configured_epoch(switched):
    recipe, result = switched
    rows = result["history"]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [r["clipping_phase"] for r in rows] == [0.0, 1.0]
    assert [r["bn_momentum"] for r in rows] == [0.85, 0.5]
    assert rows[0]["lr"] == pytest.approx(1e-2) and rows[1]["lr"] == pytest.approx(1e-3)
    assert result["switched_at_epoch"] == 1
    written = _history_csv(recipe.output_dir)
    assert [float(r["clipping_phase"]) for r in written] == [0.0, 1.0]
    assert [float(r["lr"]) for r in written] == pytest.approx([1e-2, 1e-3])
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "stage"} <= set(written[0])


def test_run_writes_every_file_and_nothing_else(switched):
    recipe, _ = switched
    assert set(os.listdir(recipe.output_dir)) == FILES  # no temporary files left behind
    with open(os.path.join(recipe.output_dir, "history.json")) as file:
        assert len(json.load(file)) == 2
    with open(os.path.join(recipe.output_dir, "curves.png"), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_reports_test_accuracy_at_the_best_validation_epoch(switched):
    recipe, result = switched
    with open(os.path.join(recipe.output_dir, "summary.json")) as file:
        summary = json.load(file)
    rows = result["history"]
    val = [r["val_accuracy"] for r in rows]
    best = int(np.argmax(val))  # first epoch with the maximum
    assert summary["best_epoch"] == best and summary["best_epoch_1based"] == best + 1
    assert summary["best_val_accuracy"] == pytest.approx(val[best])
    assert summary["test_accuracy_at_best"] == pytest.approx(rows[best]["test_accuracy"])
    assert summary["test_error_at_best"] == pytest.approx(1 - rows[best]["test_accuracy"])
    assert summary["final_test_accuracy"] == pytest.approx(rows[-1]["test_accuracy"])
    assert (summary["epochs"], summary["train_size"], summary["validation_size"], summary["test_size"]) == (2, 450, 50, 500)
    assert summary["params"]["trainable"] == 784 * 32 + 32 * 32 + 32 * 10 + 2 * (32 + 32 + 10)
    assert summary["wall_time_s"] > 0
    assert summary["distillation"] is None and "own_model" not in summary  # neither asked for
    # A dense-only model on the CPU: "auto" picks XLA and one execution block per epoch (450 / 50 = 9 steps).
    speed = summary["speed"]
    assert (speed["device"], speed["jit_compile"], speed["steps_per_execution"]) == ("CPU", True, 9)
    assert speed["description"].startswith("XLA on (")
    assert Recipe.from_dict(summary["recipe"]) == recipe
    assert summary["test_accuracy_at_best"] > 0.4  # real images, 10 classes: it learned something


def test_best_model_holds_the_best_epoch_weights_and_accuracy_is_argmax(switched):
    recipe, result = switched
    model = tf.keras.models.load_model(os.path.join(recipe.output_dir, "best_model.keras"))
    assert model.optimizer is None  # weights only, no optimiser state
    switches = {type(s).__name__: s.clipping_enabled for s in bk.find_switchables(model)}
    assert switches == {"SwitchableSteSign": True, "SwitchableWeightClip": True}
    splits = data.load("embedded", limit=500, batch_size=50, targets="hinge")
    images, targets = zip(*splits.test.as_numpy_iterator())
    predictions = model.predict(np.concatenate(images), verbose=0)
    labels = np.argmax(np.concatenate(targets), axis=1)  # +1 at the class, -1 elsewhere
    accuracy = float(np.mean(np.argmax(predictions, axis=1) == labels))
    assert accuracy == pytest.approx(result["test_accuracy_at_best"], abs=1e-6)


def test_two_stage_binary_model_starts_from_the_float_weights(two_stage):
    """Every variable of every float layer (kernels, gamma, beta, moving mean and variance), as Keras
    lists it, is in the binary model after the copy; the binary model's own values differed."""
    _, _, seen = two_stage
    assert seen["target_name"] == "mlp_binaryconnect"
    assert seen["float_layers"] == ["dense_1", "bn_1", "dense_2", "bn_2", "dense_out", "bn_out"]
    copied = list(seen["source"])
    assert {name.split("/")[-1] for _, name in copied} == {
        "kernel:0", "gamma:0", "beta:0", "moving_mean:0", "moving_variance:0"}
    assert len(copied) == 3 + 3 * 4
    for key in copied:
        np.testing.assert_array_equal(seen["target"][key], seen["source"][key], err_msg=str(key))
        # trained float values against the binary model's own initial ones
        assert np.all(seen["target_before"][key] != seen["source"][key]), key
    for key in set(seen["target"]) - set(copied):  # the clipping flags only, untouched
        assert "clipped" in key[1] or "clip_enabled" in key[1], key
        assert seen["target"][key] == seen["target_before"][key] == 1.0


def test_two_stage_history_has_both_stages(two_stage):
    recipe, result, seen = two_stage
    rows = result["history"]
    assert [(r["epoch"], r["stage"], r["stage_epoch"]) for r in rows] == [
        (0, "pretrain", 0), (1, "pretrain", 1), (2, "finetune", 0),
    ]
    assert [r["clipping_phase"] for r in rows] == [0.0, 0.0, 1.0]
    assert [r["bn_momentum"] for r in rows] == [0.85, 0.85, 0.6]
    assert [r["lr"] for r in rows] == pytest.approx([1e-2, 1e-3, 1e-2])
    assert [r["stage"] for r in _history_csv(recipe.output_dir)] == ["pretrain", "pretrain", "finetune"]
    assert result["best_epoch"] == 0 and result["total_epochs"] == 3 and result["stage_boundary_epoch"] == 2
    assert result["test_accuracy_at_best"] == pytest.approx(rows[2]["test_accuracy"])
    # Seeded numbers of this run (50 validation / 500 test images), each also recomputed here: the
    # binarised accuracies from the binary model's predictions right after the copy, the rest from rows.
    for split, field, expected in (("validation", "binarised_val_accuracy", 0.38), ("test", "binarised_test_accuracy", 0.314)):
        recomputed = np.mean(np.argmax(seen["predictions"][split], axis=1) == seen["labels"][split])
        assert recomputed == pytest.approx(expected, abs=1e-6)
        assert result[field] == pytest.approx(recomputed, abs=1e-6)
    assert [r["val_accuracy"] for r in rows] == pytest.approx([0.56, 0.82, 0.80], abs=1e-6)
    assert [r["test_accuracy"] for r in rows] == pytest.approx([0.492, 0.652, 0.722], abs=1e-6)
    assert result["pretrain_best_epoch"] == 1
    assert result["pretrain_best_val_accuracy"] == pytest.approx(max(r["val_accuracy"] for r in rows[:2]))
    assert result["pretrain_test_accuracy_at_best"] == pytest.approx(rows[1]["test_accuracy"])
    assert set(os.listdir(recipe.output_dir)) == FILES
    model = tf.keras.models.load_model(os.path.join(recipe.output_dir, "best_model.keras"))
    assert {s.clipping_enabled for s in bk.find_switchables(model)} == {True}  # fine-tuned clipped
    assert {l.momentum for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)} == {0.6}


def test_clipped_gradients_only_with_crossentropy(gradients_only):
    """Clipped STE on, weight clipping off: latent weights beyond 1 exist and get exactly no gradient."""
    recipe, result = gradients_only
    assert [r["clipping_phase"] for r in result["history"]] == [1.0, 1.0, 1.0]
    model = tf.keras.models.load_model(os.path.join(recipe.output_dir, "best_model.keras"))
    states = {(type(s).__name__, s.clipping_enabled) for s in bk.find_switchables(model)}
    assert states == {("SwitchableSteSign", True), ("SwitchableWeightClip", False)}
    # seeded numbers, and the summary's test accuracy recomputed from the best model's predictions
    assert result["test_accuracy_at_best"] == pytest.approx(0.638, abs=1e-6)
    images, labels = _arrays("test", "sparse")
    logits = model.predict(images, verbose=0)
    assert np.mean(np.argmax(logits, axis=1) == labels) == pytest.approx(result["test_accuracy_at_best"], abs=1e-6)

    kernels = [l.kernel for l in model.layers if hasattr(l, "kernel")]
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def kernel_gradients():
        with tf.GradientTape() as tape:
            value = loss(labels[:100], model(images[:100], training=False))
        return [g.numpy() for g in tape.gradient(value, [k.latent_variable for k in kernels])]

    clipped = kernel_gradients()
    bk.set_clipping(model, False)  # the same weights and forward pass with the vanilla (identity) STE
    vanilla = kernel_gradients()
    for kernel, g_clipped, g_vanilla in zip(kernels, clipped, vanilla):
        outside = np.abs(_latent(kernel)) > 1
        assert outside.sum() > 0  # weight clipping really was off
        assert np.count_nonzero(g_vanilla[outside]) > 0  # so the zeros below are the clipping's
        np.testing.assert_array_equal(g_clipped, np.where(outside, 0.0, g_vanilla))


def test_test_accuracy_at_best_is_the_best_validation_epochs_not_the_last(gradients_only):
    recipe, result = gradients_only
    with open(os.path.join(recipe.output_dir, "history.json")) as file:
        rows = json.load(file)
    val = [r["val_accuracy"] for r in rows]
    best = val.index(max(val))  # the first epoch with the highest validation accuracy
    assert best == 1 and rows[best]["test_accuracy"] != rows[-1]["test_accuracy"]  # the fixture can tell
    with open(os.path.join(recipe.output_dir, "summary.json")) as file:
        summary = json.load(file)
    assert (summary["best_epoch"], summary["best_epoch_1based"]) == (best, best + 1)
    assert summary["best_val_accuracy"] == rows[best]["val_accuracy"]
    assert summary["test_accuracy_at_best"] == rows[best]["test_accuracy"]
    assert summary["test_error_at_best"] == pytest.approx(1 - rows[best]["test_accuracy"])
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert [r["best_epoch"] for r in rows] == [0.0, 1.0, 1.0]


def test_set_clipping_parts_sets_each_switchable():
    model = models.mlp((4,), 2, hidden_units=(3,), variant="binarynet")
    for parts, ste, clip in [("weights", False, True), ("gradients", True, False), ("both", True, True), ("none", False, False)]:
        training.set_clipping_parts(model, parts)
        states = {(type(s), s.clipping_enabled) for s in bk.find_switchables(model)}
        assert states == {(SwitchableSteSign, ste), (SwitchableWeightClip, clip)}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be an integer >= 1, got 2.5"),
        ({"lr_start": 0.0}, "lr_start must be a number > 0, got 0.0"),
        ({"bn_momentum": 1.0}, "bn_momentum must be a number in [0, 1), got 1.0"),
        ({"switch_bn_momentum": -0.1}, "switch_bn_momentum must be a number in [0, 1) or None, got -0.1"),
        ({"batch_size": "10"}, "batch_size must be an integer >= 1, got '10'"),
        ({"variant": "xnor"}, "unknown variant 'xnor': expected one of 'float', 'binaryconnect', 'binarynet'"),
        ({"schedule": "late"}, "unknown schedule 'late': expected one of 'clipped', 'vanilla', 'vanilla-then-clipped', 'two-stage'"),
        ({"optimizer": "adamw"}, "unknown optimizer 'adamw'"),
        ({"loss": "hinge"}, "unknown loss 'hinge'"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
        ({"model_kwargs": {"width_multiplier": 2}}, "model_kwargs width_multiplier not accepted by model 'mlp'"),
        ({"schedule": "vanilla-then-clipped"}, "needs switch_epoch or patience, got neither"),
        ({"schedule": "vanilla-then-clipped", "switch_epoch": 2}, "switch_epoch must be < epochs (2) to switch at all, got 2"),
        ({"schedule": "two-stage"}, "pretrain_epochs must be an integer >= 1 for schedule 'two-stage', got 0"),
        ({"variant": "float"}, "variant 'float' has no binary layers to clip: schedule must be 'vanilla', got 'clipped'"),
        ({"clipping": "weights", "schedule": "vanilla"}, "clipping 'weights' needs schedule 'clipped', 'two-stage' or 'three-step'"),
        ({"lr_end": None}, "lr_end must be a number > 0 for the exponential schedule, got None"),
        ({"limit": 0}, "limit must be an integer >= 1 or None, got 0"),
    ],
)
def test_recipe_validation_says_what_was_expected_and_given(changes, message):
    with pytest.raises(ValueError) as error:
        TINY.replace(**changes)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_settings_write_nothing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(data.DataUnavailableError):
        training.run(TINY.replace(dataset="mnist", data_dir=str(tmp_path / "empty"), output_dir=str(out)))
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        training.run(TINY.replace(optimizer_kwargs={"nope": 1}, output_dir=str(out)))
    assert not out.exists()


def test_override_merges_model_and_optimizer_kwargs():
    recipe = training.RECIPES["mnist_mlp"].override(epochs=3, model_kwargs={"weight_clip": "glorot"}, optimizer_kwargs={"beta_2": 0.99})
    assert recipe.model_kwargs == {"hidden_units": (2048, 2048, 2048), "weight_clip": "glorot"}
    assert recipe.optimizer_kwargs == {"beta_2": 0.99} and recipe.epochs == 3
    vgg = training.RECIPES["mnist_mlp"].override(model="vgg10", model_kwargs={"width_multiplier": 0.5})
    assert vgg.model_kwargs == {"width_multiplier": 0.5}  # the MLP's hidden_units dropped
    assert training.RECIPES["mnist_mlp"].out == training.RECIPES["mnist_mlp"].out.__class__("runs/mnist_mlp")


def test_the_best_row_is_the_first_of_tied_best_epochs():
    rows = [{"val_accuracy": 0.5}, {"val_accuracy": 0.7}, {"val_accuracy": 0.6}, {"val_accuracy": 0.7}]
    assert training._best_row(rows) == (1, rows[1])
    assert training._best_row(rows, "val_accuracy")[0] == 1

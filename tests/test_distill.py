"""Distillation from the float twin (`bnn_keras.distill`) and per-stage weight decay: the numbers."""

import json

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import models, training
from bnn_keras.distill import DistillingModel, distillation_loss
from bnn_keras.recipe import Recipe


def _numpy_kd(teacher, student, temperature):
    """T^2 KL(softmax(t/T) || softmax(s/T)) per example, by hand."""

    def log_softmax(z):
        z = z / temperature
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    lt, ls = log_softmax(teacher), log_softmax(student)
    return temperature**2 * (np.exp(lt) * (lt - ls)).sum(axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 8.0])
def test_distillation_loss_matches_a_numpy_reference(temperature):
    rng = np.random.default_rng(3)
    teacher, student = rng.normal(0, 3, (6, 10)), rng.normal(0, 3, (6, 10))
    got = distillation_loss(teacher, student, temperature).numpy()
    np.testing.assert_allclose(got, _numpy_kd(teacher, student, temperature), rtol=1e-5, atol=1e-6)
    assert (got > 0).all()


def test_distillation_loss_is_zero_for_identical_outputs_and_equal_for_probabilities():
    logits = np.random.default_rng(0).normal(0, 2, (4, 5)).astype("float32")
    np.testing.assert_allclose(distillation_loss(logits, logits, 3.0).numpy(), 0.0, atol=1e-6)
    probs = tf.nn.softmax(logits).numpy()
    student = np.roll(logits, 1, axis=-1)
    np.testing.assert_allclose(
        distillation_loss(probs, tf.nn.softmax(student), 3.0, from_logits=False).numpy(),
        distillation_loss(logits, student, 3.0).numpy(),
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="temperature must be a number > 0, got 0"):
        distillation_loss(logits, logits, 0)


def test_zero_probabilities_are_floored_at_1e_minus_12_and_stay_finite():
    # A saturated teacher (a hard 0) at a high temperature: log(1e-12) / 8 is -3.45, not -inf.
    teacher = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], np.float32)
    student = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)
    got = distillation_loss(teacher, student, 8.0, from_logits=False).numpy()
    expected = _numpy_kd(np.log(np.maximum(teacher, 1e-12)), np.log(student), 8.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert np.isfinite(got).all() and (got > 0).all()


def test_distillation_gradient_reaches_the_student_only():
    teacher = tf.Variable([[2.0, -1.0, 0.5]])
    student = tf.Variable([[0.0, 0.0, 0.0]])
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(distillation_loss(teacher, student, 2.0))
    assert tape.gradient(loss, teacher) is None
    # d/ds of T^2 KL at T: T * (softmax(s/T) - softmax(t/T))
    expected = 2.0 * (tf.nn.softmax(student / 2.0) - tf.nn.softmax(teacher / 2.0)).numpy()
    np.testing.assert_allclose(tape.gradient(loss, student).numpy(), expected, rtol=1e-5)


def _pair(seed=0):
    tf.keras.utils.set_random_seed(seed)
    teacher = models.mlp((4, 4, 1), 3, hidden_units=(8,), variant="float")
    student = models.mlp((4, 4, 1), 3, hidden_units=(8,), variant="binarynet")
    return student, teacher


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_distilling_model_loss_is_the_weighted_sum_and_the_teacher_stays_frozen(weight):
    student, teacher = _pair()
    model = DistillingModel(student, teacher, temperature=2.0, weight=weight)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.SquaredHinge())
    x = np.random.default_rng(1).normal(size=(5, 4, 4, 1)).astype("float32")
    y = np.where(np.eye(3)[[0, 1, 2, 0, 1]] > 0, 1.0, -1.0).astype("float32")
    y_pred = model(x, training=True)
    label = float(tf.keras.losses.SquaredHinge()(y, y_pred))
    kd = float(np.mean(_numpy_kd(teacher(x, training=False).numpy(), y_pred.numpy(), 2.0)))
    got = float(model.compute_loss(tf.constant(x), tf.constant(y), y_pred))
    assert got == pytest.approx(weight * kd + (1 - weight) * label, rel=1e-5)
    before = [w.copy() for w in teacher.get_weights()]
    history = model.fit(x, y, epochs=2, verbose=0)
    assert "distill_loss" in history.history and history.history["distill_loss"][0] > 0
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    # the student's own weights are the trained ones, and nothing of the teacher is in them
    assert len(model.get_weights()) == len(student.get_weights())


def test_distilling_model_saves_as_its_student(tmp_path):
    student, teacher = _pair()
    model = DistillingModel(student, teacher, temperature=4.0)
    model.compile(optimizer="adam", loss="squared_hinge")
    path = tmp_path / "student.keras"
    model.save(path)
    loaded = tf.keras.models.load_model(path, compile=False)
    x = np.ones((2, 4, 4, 1), "float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), student.predict(x, verbose=0))


def test_distilling_model_refuses_a_teacher_of_other_outputs():
    student, _ = _pair()
    other = models.mlp((4, 4, 1), 5, hidden_units=(8,), variant="float")
    with pytest.raises(ValueError, match=r"gives outputs of shape \(None, 3\) but teacher .* \(None, 5\)"):
        DistillingModel(student, other, temperature=2.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0}, "temperature must be a number > 0, got 0"),
    ({"temperature": float("nan")}, "temperature must be a number > 0, got nan"),
    ({"temperature": "2"}, "temperature must be a number > 0, got '2'"),
    ({"temperature": 2.0, "weight": 0}, r"weight must be a number in \(0, 1\], got 0"),
    ({"temperature": 2.0, "weight": 1.5}, r"weight must be a number in \(0, 1\], got 1.5"),
])
def test_distilling_model_refuses_a_bad_temperature_or_weight_in_one_line(kwargs, message):
    student, teacher = _pair()
    with pytest.raises(ValueError, match=f"^{message}$"):
        DistillingModel(student, teacher, **kwargs)


# ----------------------------------------------------------------------------- weight decay


def _one_step(optimizer, decay, variables_out):
    """One step of the recipe's optimiser on a tiny model; the kernels and BN gammas before and after."""
    recipe = Recipe(optimizer=optimizer, lr_schedule="constant", lr_start=0.01, lr_end=None, epochs=1)
    tf.keras.utils.set_random_seed(0)
    model = models.mlp((4, 4, 1), 3, hidden_units=(8,), variant="binaryconnect", weight_clip=None)
    training._compile(model, recipe, epochs=1, steps_per_epoch=1, lr_scale=1.0, weight_decay=decay)
    x = np.random.default_rng(2).normal(size=(8, 4, 4, 1)).astype("float32")
    y = np.where(np.eye(3)[np.arange(8) % 3] > 0, 1.0, -1.0).astype("float32")
    kernels = [v for v in model.trainable_variables if "kernel" in v.name]
    gammas = [v for v in model.trainable_variables if "gamma" in v.name]
    before = [v.numpy().copy() for v in kernels + gammas]
    model.train_on_batch(x, y)
    variables_out.extend([before, [v.numpy() for v in kernels + gammas], len(kernels)])


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "momentum"])
def test_weight_decay_is_decoupled_lr_times_decay_times_the_weight_on_kernels_only(optimizer):
    plain, decayed = [], []
    _one_step(optimizer, 0.0, plain)
    _one_step(optimizer, 0.5, decayed)
    (before, after_plain, n), (before_d, after_decayed, _) = plain, decayed
    for i, (w0, w0_d, a, b) in enumerate(zip(before, before_d, after_plain, after_decayed)):
        np.testing.assert_array_equal(w0, w0_d)  # same seed, same start
        if i < n:  # kernel: the optimiser's own step plus -lr * decay * w (AdamW), the gradient untouched
            np.testing.assert_allclose(b - a, -0.01 * 0.5 * w0, rtol=1e-4, atol=1e-7)
            assert np.abs(b - a).max() > 1e-4
        else:  # BN gamma: no decay
            np.testing.assert_array_equal(a, b)


def test_weight_decay_per_stage_is_recorded_and_checked():
    recipe = Recipe(schedule="two-stage", pretrain_epochs=1, weight_decay=5e-6, finetune_weight_decay=0.0)
    assert recipe.stage_weight_decay("pretrain") == 5e-6 and recipe.stage_weight_decay("finetune") == 0.0
    assert Recipe(weight_decay=5e-5).stage_weight_decay("train") == 5e-5
    with pytest.raises(ValueError, match="finetune_weight_decay needs a float stage"):
        Recipe(finetune_weight_decay=1e-5)
    with pytest.raises(ValueError, match="weight decay is set twice"):
        Recipe(weight_decay=1e-5, optimizer_kwargs={"weight_decay": 1e-4})
    with pytest.raises(ValueError, match="weight_decay does not apply to 'bop'"):
        Recipe(optimizer="bop", weight_decay=1e-5)


# ----------------------------------------------------------------------------- the staged schedules


@pytest.fixture(scope="module")
def three_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("three_step")
    recipe = Recipe(
        limit=200, model_kwargs={"hidden_units": (16,)}, variant="binarynet", schedule="three-step",
        pretrain_epochs=1, activation_epochs=2, epochs=2, batch_size=50, distill=2.0, distill_weight=0.5,
        weight_decay=5e-6, finetune_weight_decay=0.0, lr_factor=0.5, verbose=0, output_dir=str(out),
    )
    return training.run(recipe), out


def test_three_step_trains_float_then_binary_activations_then_fully_binary(three_step):
    summary, out = three_step
    rows = summary["history"]
    assert [(r["epoch"], r["stage"], r["stage_epoch"]) for r in rows] == [
        (0, "pretrain", 0), (1, "activations", 0), (2, "activations", 1), (3, "finetune", 0), (4, "finetune", 1)]
    assert "distill_loss" not in rows[0] and all(r["distill_loss"] > 0 for r in rows[1:])
    assert summary["stage_boundaries"] == {"activations": 1, "finetune": 3}
    assert summary["weight_decay"] == {"pretrain": 5e-6, "activations": 5e-6, "finetune": 0.0}
    assert summary["distillation"] == {"temperature": 2.0, "weight": 0.5}
    for key in ("pretrain_best_epoch", "handed_over_val_accuracy", "activations_best_epoch", "binarised_val_accuracy"):
        assert key in summary
    # the LR of each stage after the float one starts at lr_start * lr_factor
    assert rows[1]["lr"] == pytest.approx(5e-4) and rows[3]["lr"] == pytest.approx(5e-4)
    written = json.loads((out / "summary.json").read_text())
    assert written["stage_boundaries"] == {"activations": 1, "finetune": 3}


def test_three_step_best_model_is_the_fully_binary_student(three_step):
    _, out = three_step
    model = tf.keras.models.load_model(out / "best_model.keras", compile=False)
    kernels = [layer for layer in model.layers if getattr(layer, "kernel_quantizer", None) is not None]
    inputs = [layer for layer in model.layers if getattr(layer, "input_quantizer", None) is not None]
    assert len(kernels) == 2 and len(inputs) == 2  # binarynet: both layers fully binary (input binarised too)


def test_distillation_under_mirrored_strategy_matches_one_device():
    """Two replicas of 16 = one device's batch of 32: the same KL term, losses and weights."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.path.dirname(here) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, os.path.join(here, "helpers", "mirrored_distill.py")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["two_kd"], out["one_kd"], rtol=1e-4)
    np.testing.assert_allclose(out["two_loss"], out["one_loss"], rtol=1e-4)
    assert out["max_weight_diff"] < 1e-5  # SGD: without the per-replica scaling of the KL term it is 0.7
    assert min(out["one_kd"]) > 0

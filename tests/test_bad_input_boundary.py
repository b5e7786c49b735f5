"""Nonsense refused at the public boundary (issue 13, items 7-9): one line naming the argument
or flag, what was expected and what was given; the values on the right side of each bound
still accepted."""

import inspect
import json

import numpy as np
import pytest
import tensorflow as tf

import bnn_keras as bk
from bnn_keras import callbacks, cli, models, optimizers, recipe
from bnn_keras.recipe import Recipe, Rule

T = ["train", "mnist_mlp", "--hidden-units", "16", "--epochs", "1", "--limit", "100", "--verbose", "0"]


def _raises(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message
    return error


# --------------------------------------------------------------------------- optimisers


@pytest.mark.parametrize("name, kwargs, message", [
    ("adam", {"beta_1": -5}, "hyperparameter beta_1 of optimiser 'adam' must be a number in [0, 1), got -5"),
    ("adam", {"beta_2": 1.0}, "hyperparameter beta_2 of optimiser 'adam' must be a number in [0, 1), got 1.0"),
    ("adam", {"clipnorm": -1}, "hyperparameter clipnorm of optimiser 'adam' must be a number > 0 or None, got -1"),
    ("adam", {"clipvalue": float("nan")}, "hyperparameter clipvalue of optimiser 'adam' must be a number > 0 or None, got nan"),
    ("sgd", {"momentum": 1.5}, "hyperparameter momentum of optimiser 'sgd' must be a number in [0, 1], got 1.5"),
    ("rmsprop", {"epsilon": 0.0}, "hyperparameter epsilon of optimiser 'rmsprop' must be a number > 0, got 0.0"),
    ("bop", {"threshold": -1}, "hyperparameter threshold of optimiser 'bop' must be a number >= 0, got -1"),
    ("bop", {"gamma": 0}, "hyperparameter gamma of optimiser 'bop' must be a number in (0, 1], got 0"),
    ("bop", {"latent_hyperparameters": {"beta_1": -5}}, "hyperparameter beta_1 of optimiser 'adam' must be a number in [0, 1), got -5"),
])
def test_out_of_range_hyperparameters_are_refused_by_get(name, kwargs, message):
    _raises(lambda: optimizers.get(name, **kwargs), message)


@pytest.mark.parametrize("learning_rate", [-1, 0, float("nan"), float("inf"), "0.1", True])
def test_a_learning_rate_must_be_a_finite_positive_number_or_a_schedule(learning_rate):
    _raises(lambda: optimizers.get("adam", learning_rate=learning_rate),
            f"learning_rate must be a number > 0 or a LearningRateSchedule, got {learning_rate!r}")


def test_values_on_the_inside_of_each_bound_and_numpy_scalars_are_accepted():
    adam = optimizers.get("adam", learning_rate=np.float32(1e-30), beta_1=0.0, beta_2=np.float32(0.5), clipnorm=None,
                          amsgrad=np.bool_(True), ema_overwrite_frequency=np.int64(3))
    assert (adam.beta_1, adam.beta_2, adam.clipnorm, adam.amsgrad, adam.ema_overwrite_frequency) == (0.0, 0.5, None, True, 3)
    assert float(adam.learning_rate.numpy()) == pytest.approx(1e-30)
    assert optimizers.get("sgd", momentum=1.0).momentum == 1.0
    bop = optimizers.get("bop", threshold=0, gamma=1.0)
    assert (bop.bop.get_config()["threshold"], bop.bop.get_config()["gamma"]) == (0.0, 1.0)
    schedule = optimizers.ExponentialDecayPerEpoch(1e-3, 1e-5, epochs=3, steps_per_epoch=2)
    assert optimizers.current_learning_rate(optimizers.get("adam", learning_rate=schedule)) == pytest.approx(1e-3)


def test_name_is_not_a_hyperparameter_of_get_and_not_listed_as_one():
    with pytest.raises(ValueError) as error:
        optimizers.get("adam", name="foo")
    message = str(error.value)
    assert message.startswith("unknown hyperparameter(s) name for optimiser 'adam': expected some of ")
    accepted = message.partition("expected some of ")[2].split(", ")
    assert "name" not in accepted and {"beta_1", "beta_2", "epsilon", "amsgrad", "clipnorm"} <= set(accepted)


@pytest.mark.parametrize("key, message", [
    ("learning_rate", "optimizer_kwargs (--opt) cannot set learning_rate: the learning rate is lr_start, lr_end and lr_schedule (--lr, --lr-end, --lr-schedule)"),
    ("name", "optimizer_kwargs (--opt) cannot set name: it would only rename the Keras object; the optimiser is chosen by optimizer (--optimizer)"),
])
def test_a_recipe_refuses_optimizer_kwargs_that_are_not_hyperparameters(key, message):
    _raises(lambda: Recipe(optimizer_kwargs={key: 0.5}), message)


# --------------------------------------------------------------------------- schedules and callbacks


@pytest.mark.parametrize("args, message", [
    ((float("inf"), 1e-3, 3, 10), "start must be a number > 0, got inf"),
    ((1e-3, float("nan"), 3, 10), "end must be a number > 0, got nan"),
    ((1e-3, 1e-4, True, 10), "epochs must be an integer >= 1, got True"),
    ((1e-3, "x", 3, 10), "end must be a number > 0, got 'x'"),
])
def test_exponential_decay_refuses_non_finite_or_mistyped_arguments(args, message):
    _raises(lambda: optimizers.ExponentialDecayPerEpoch(*args), message)


def test_exponential_decay_takes_numpy_integers_and_floats():
    schedule = optimizers.ExponentialDecayPerEpoch(np.float32(1e-2), 1e-4, np.int64(3), np.int32(2))
    assert (schedule.epochs, schedule.steps_per_epoch) == (3, 2)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4)], [1e-2, 1e-3, 1e-4], rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"switch_epoch": 1, "lr_factor": float("inf")}, "lr_factor must be > 0 and finite, got inf"),
    ({"switch_epoch": 1, "lr_factor": "x"}, "lr_factor must be > 0 and finite, got 'x'"),
    ({"switch_epoch": True}, "switch_epoch must be an integer >= 0, got True"),
    ({"switch_epoch": 1, "patience": True}, "patience must be an integer >= 1, got True"),
    ({"switch_epoch": 1, "min_delta": "x"}, "min_delta must be a number >= 0, got 'x'"),
])
def test_clipping_schedule_refuses_nonsense_in_one_line(kwargs, message):
    _raises(lambda: callbacks.ClippingSchedule(**kwargs), message)


def test_clipping_schedule_takes_numpy_integers_as_integers():
    schedule = callbacks.ClippingSchedule(switch_epoch=np.int64(2), patience=np.int32(3), bn_momentum=np.float32(0.5))
    config = schedule.get_config()
    assert (config["switch_epoch"], config["patience"], config["bn_momentum"]) == (2, 3, 0.5)
    assert type(config["switch_epoch"]) is int and type(config["patience"]) is int
    json.dumps(config)  # a numpy integer would not serialise


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("builder, shape", [(models.mlp, (4,)), (models.vgg10, (8, 8, 1))])
def test_builders_refuse_a_non_finite_bn_epsilon(builder, shape):
    _raises(lambda: builder(shape, 2, bn_epsilon=float("inf")), "bn_epsilon must be a number > 0, got inf")


@pytest.mark.parametrize("call, message", [
    (lambda: models.mlp((4,), 2, hidden_units=16), "hidden_units must be a sequence of integers >= 1, got 16"),
    (lambda: models.mlp((4,), 2, hidden_units=(8, 2.5)), "each of hidden_units must be an integer >= 1, got 2.5"),
    (lambda: models.mlp((4,), 2, hidden_units=(2**63,)),
     "each of hidden_units must be an integer >= 1 and at most 9223372036854775807, got 9223372036854775808"),
    (lambda: models.vgg10((8, 8, 1), 2, width_multiplier=float("inf")), "width_multiplier must be a number > 0, got inf"),
    (lambda: models.vgg10((7, 8, 1), 2), "vgg10 needs images of at least 8x8 (it pools 2x2 three times), got input shape (7, 8, 1)"),
])
def test_builders_refuse_mistyped_sizes_in_one_line(call, message):
    _raises(call, message)


@pytest.mark.parametrize("model_name, shape, size, kwargs", [
    ("mlp", (28, 28, 1), (7, 5), {}),
    ("vgg10", (9, 11, 3), 1 / 128, {"variant": "binarynet"}),
])
def test_the_memory_check_counts_kerass_own_weights_and_refuses_one_byte_short(model_name, shape, size, kwargs, monkeypatch):
    builder, name = models.get(model_name), "hidden_units" if model_name == "mlp" else "width_multiplier"
    model = builder(shape, 10, **{name: size}, **kwargs)
    weights = sum(int(np.prod(w.shape)) for w in model.weights if w.shape.rank)  # the scalar clipping flags aside
    assert weights < 62_500  # under 1 MB at 16 bytes each: the message counts bytes
    monkeypatch.setattr(models, "_physical_memory", lambda: 16 * weights, raising=False)
    builder(shape, 10, **{name: size}, **kwargs)  # exactly fits
    monkeypatch.setattr(models, "_physical_memory", lambda: 16 * weights - 1, raising=False)
    with pytest.raises(ValueError) as error:
        builder(shape, 10, **{name: size}, **kwargs)
    assert str(error.value).startswith(f"{name} ")
    assert f"make a model of {weights} parameters, which needs about {16 * weights} bytes to train" in str(error.value)
    assert str(error.value).endswith(f"more than this machine's {16 * weights - 1} bytes of memory")
    assert getattr(models, f"{model_name}_parameters")(shape, 10, size) == weights


def test_set_clipping_refuses_anything_but_a_boolean_and_changes_nothing():
    model = models.mlp((4,), 2, hidden_units=(3,), clipped=False)
    for value in ("yes", 1, None):
        _raises(lambda: bk.set_clipping(model, value), f"clipped must be True or False, got {value!r}")
    assert not any(s.clipping_enabled for s in bk.find_switchables(model))
    assert bk.set_clipping(model, np.bool_(True)) == 4  # two kernel quantisers, two weight clips


# --------------------------------------------------------------------------- rules


def test_integer_rules_stop_at_int64_and_the_seed_at_what_tensorflow_takes():
    tf.keras.utils.set_random_seed(2**32 - 1)  # TensorFlow's own limit, measured
    with pytest.raises(ValueError):
        tf.keras.utils.set_random_seed(2**32)
    assert Recipe(seed=2**32 - 1).seed == 2**32 - 1
    _raises(lambda: Recipe(seed=2**32), "seed must be an integer >= 0 and at most 4294967295, got 4294967296")
    assert recipe.SEED_MAX == 2**32 - 1
    assert Recipe(batch_size=2**63 - 1).batch_size == 2**63 - 1
    _raises(lambda: Recipe(batch_size=2**63),
            "batch_size must be an integer >= 1 and at most 9223372036854775807, got 9223372036854775808")
    assert Rule("int", 0, 4294967295).expected == "an integer in [0, 4294967295]"
    assert Recipe(switch_epoch=np.int64(2), schedule="vanilla-then-clipped", epochs=3).switch_epoch == 2


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, message", [
    (T + ["--opt", "beta_1=-5"], "hyperparameter beta_1 of optimiser 'adam' must be a number in [0, 1), got -5"),
    (T + ["--opt", "clipnorm=-1"], "hyperparameter clipnorm of optimiser 'adam' must be a number > 0 or None, got -1"),
    (T + ["--opt", "clipvalue=NaN"], "hyperparameter clipvalue of optimiser 'adam' must be a number > 0 or None, got nan"),
    (T + ["--opt", "learning_rate=0.5"], "optimizer_kwargs (--opt) cannot set learning_rate: the learning rate is lr_start, lr_end and lr_schedule (--lr, --lr-end, --lr-schedule)"),
    (T + ["--opt", "name=foo"], "optimizer_kwargs (--opt) cannot set name: it would only rename the Keras object"),
    (T + ["--opt", "bogus=1"], "unknown hyperparameter(s) bogus for optimiser 'adam': expected some of {adam}\n"),
    (T + ["--batch-size", "10000000000000000000"], "argument --batch-size: expected an integer >= 1 and at most 9223372036854775807, got 10000000000000000000"),
    (T + ["--seed", "99999999999999999999"], "argument --seed: expected an integer >= 0 and at most 4294967295, got 99999999999999999999"),
    (T + ["--hidden-units", "2000000000"], "hidden_units [2000000000] make a model of 1.59e+12 parameters, which needs about 25.5 TB to train"),
    (["train", "cifar10_vgg10", "--dataset", "embedded", "--width-multiplier", "1e12", "--epochs", "1", "--limit", "100", "--verbose", "0"],
     "width_multiplier 1e+12 and input shape (28, 28, 1) make a model of 1.03e+31 parameters, which needs about 1.65e+32 bytes to train"),
], ids=lambda v: " ".join(v[-2:]) if isinstance(v, list) else None)
def test_the_command_line_refuses_each_in_one_line_exit_2_writing_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    status = cli.main(argv + ["--out", str(out)])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("bnn-keras: error: "), captured.err
    adam = sorted(set(inspect.signature(tf.keras.optimizers.Adam).parameters) - {"learning_rate", "name", "kwargs"})
    assert message.replace("{adam}", ", ".join(adam)) in captured.err
    assert not out.exists()

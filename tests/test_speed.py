"""The speed settings: what "auto" picks and why, the explicit choices, bad values, and that
a run's numbers do not depend on them (steps per execution: bit-identical; XLA: rounding)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import cli, models, speed, training
from bnn_keras.recipe import Recipe


def _mlp():
    return models.mlp((28, 28, 1), 10, hidden_units=(16,))


def _vgg():
    return models.vgg10((32, 32, 3), 10, width_multiplier=1 / 16)


class _Replicas:
    """A stand-in strategy with `n` replicas on CPUs (this machine has one device)."""

    def __init__(self, n):
        self.num_replicas_in_sync = n
        self.extended = type("Extended", (), {"worker_devices": tuple(f"/device:CPU:{i}" for i in range(n))})()


def test_auto_on_this_cpu_picks_xla_for_dense_networks_and_not_for_convolutional_ones():
    dense = speed.choose(_mlp(), steps_per_epoch=45)
    conv = speed.choose(_vgg(), steps_per_epoch=45)
    assert speed.device_kind() == "CPU"
    assert (dense.jit_compile, conv.jit_compile) == (True, False)
    assert "no convolution layers" in dense.jit_reason and "convolution layers" in conv.jit_reason
    assert dense.steps_per_execution == conv.steps_per_execution == 45


def test_auto_block_is_the_epoch_up_to_the_cap_and_explicit_values_win():
    model = _mlp()
    assert speed.choose(model, steps_per_epoch=6).steps_per_execution == 6
    assert speed.choose(model, steps_per_epoch=540).steps_per_execution == speed.AUTO_STEPS_CAP == 64
    assert speed.choose(model, steps_per_execution=7, steps_per_epoch=540).steps_per_execution == 7
    off = speed.choose(model, jit="off", steps_per_execution=1)
    assert (off.jit_compile, off.steps_per_execution, off.steps_reason) == (False, 1, "asked for")
    assert speed.choose(_vgg(), jit="on").jit_compile is True


def test_auto_on_a_gpu_and_under_several_replicas(monkeypatch):
    monkeypatch.setattr(speed, "device_kind", lambda strategy=None: "GPU")
    gpu = speed.choose(_vgg(), steps_per_epoch=10)
    assert gpu.jit_compile is True and gpu.device == "GPU" and "on paper" in gpu.jit_reason
    monkeypatch.undo()
    replicated = speed.choose(_mlp(), strategy=_Replicas(2), steps_per_epoch=10)
    assert replicated.jit_compile is False and "2 replicas" in replicated.jit_reason


def test_has_convolutions_looks_inside_nested_models():
    inner = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Conv2D(2, 3)])
    outer = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), inner, tf.keras.layers.Flatten(), tf.keras.layers.Dense(3)])
    assert speed.has_convolutions(outer) and not speed.has_convolutions(_mlp())


@pytest.mark.parametrize("field, value, message", [
    ("jit", "fast", "unknown jit 'fast': expected one of 'auto', 'on', 'off'"),
    ("jit", True, "unknown jit True: expected one of 'auto', 'on', 'off'"),
    ("steps_per_execution", 0, "steps_per_execution must be 'auto' or an integer >= 1, got 0"),
    ("steps_per_execution", "many", "steps_per_execution must be 'auto' or an integer >= 1, got 'many'"),
    ("steps_per_execution", 2.0, "steps_per_execution must be 'auto' or an integer >= 1, got 2.0"),
    ("steps_per_execution", True, "steps_per_execution must be 'auto' or an integer >= 1, got True"),
])
def test_bad_speed_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError) as error:
        Recipe(**{field: value})
    assert str(error.value) == message


@pytest.mark.parametrize("flags, expected", [
    (["--steps-per-execution", "0"], "argument --steps-per-execution: expected 'auto' or an integer >= 1, got 0"),
    (["--steps-per-execution", "x"], "argument --steps-per-execution: expected 'auto' or an integer >= 1, got 'x'"),
    (["--jit", "yes"], "argument --jit: invalid choice: 'yes' (choose from"),
])
def test_bad_speed_flags_exit_2_with_one_line(tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    assert cli.main(["train", "mnist_mlp", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists()


TINY = dict(limit=300, model_kwargs={"hidden_units": (8,)}, epochs=2, batch_size=50, verbose=0)


def _run(tmp_path, name, **speed_settings):
    recipe = training.RECIPES["mnist_mlp"].replace(output_dir=str(tmp_path / name), **{**TINY, **speed_settings})
    return training.run(recipe)


def _numbers(result):
    keep = ("loss", "accuracy", "val_loss", "val_accuracy", "test_accuracy")
    return [[row[k] for k in keep] for row in result["history"]]


def test_summary_says_what_auto_chose_and_why(tmp_path, capsys):
    result = _run(tmp_path, "auto", verbose=2)
    with open(tmp_path / "auto" / "summary.json") as file:
        chosen = json.load(file)["speed"]
    assert chosen == result["speed"]
    assert (chosen["jit_compile"], chosen["steps_per_execution"], chosen["device"]) == (True, 6, "CPU")  # 270 / 50
    assert chosen["description"] == speed.choose(_mlp(), steps_per_epoch=6).describe()
    assert f"bnn-keras: speed: {chosen['description']}" in capsys.readouterr().out


def test_blocks_of_steps_change_no_number_and_xla_only_rounding(tmp_path):
    plain = _run(tmp_path, "plain", jit="off", steps_per_execution=1)
    blocks = _run(tmp_path, "blocks", jit="off", steps_per_execution="auto")
    xla = _run(tmp_path, "xla", jit="on", steps_per_execution="auto")
    assert (plain["speed"]["steps_per_execution"], blocks["speed"]["steps_per_execution"]) == (1, 6)
    assert _numbers(blocks) == _numbers(plain)  # the same steps, bit for bit
    np.testing.assert_allclose(_numbers(xla), _numbers(plain), rtol=1e-4)
    # accuracies are counts over 30 / 30 / 300 examples: rounding moves none of them
    assert [r[1::2] for r in _numbers(xla)] == [r[1::2] for r in _numbers(plain)]


def test_xla_with_op_determinism_and_max_pooling_is_avoided_by_auto_and_refused_for_on(tmp_path, capsys):
    """TensorFlow: "MaxPool gradient ops do not yet have a deterministic XLA implementation" (at the first step)."""
    vgg = _vgg()
    assert speed.xla_nondeterministic_layers(vgg) == ["pool_2", "pool_4", "pool_6"]
    with pytest.raises(ValueError) as error:
        speed.choose(vgg, jit="on", deterministic=True)
    assert str(error.value) == (
        "jit 'on' cannot train 'vgg10_binaryconnect' deterministically: XLA has no deterministic gradient for "
        "max pooling (pool_2 and more); pass --nondeterministic (deterministic=False), or --jit auto / off")
    assert speed.choose(vgg, jit="on", deterministic=False).jit_compile is True
    out = tmp_path / "run"
    argv = ["train", "cifar10_vgg10", "--dataset", "embedded", "--width-multiplier", "0.0625", "--jit", "on",
            "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "jit 'on' cannot train 'vgg10_binaryconnect' deterministically" in err
    assert not out.exists() or not any(out.iterdir())


def test_auto_on_a_gpu_keeps_xla_off_for_max_pooling_under_op_determinism(monkeypatch):
    monkeypatch.setattr(speed, "device_kind", lambda strategy=None: "GPU")
    plan = speed.choose(_vgg(), deterministic=True)
    assert plan.jit_compile is False and plan.jit_reason == "auto: max pooling (pool_2) has no deterministic XLA gradient"
    assert speed.choose(_mlp(), deterministic=True).jit_compile is True


def test_the_plan_reads_as_it_was_chosen():
    """The words, not just the fields: what the run log and summary.json show."""
    on = speed.choose(_mlp(), steps_per_epoch=45)
    assert on.describe() == (
        "XLA on (auto: CPU, no convolution layers (XLA measured 2x faster on the 3x2048 MLP)); "
        "45 step(s) per execution (auto: the epoch's 45 steps)")
    off = speed.choose(_vgg(), steps_per_epoch=540)
    assert off.describe() == (
        "XLA off (auto: CPU, convolution layers (XLA measured 1.6-2x slower on VGG-10)); "
        "64 step(s) per execution (auto: at most 64)")
    assert speed.choose(_mlp(), steps_per_epoch=1).steps_per_execution == 1  # an epoch of one step: blocks of one


def test_choose_checks_its_own_arguments():
    with pytest.raises(ValueError, match="^unknown jit 'fast': expected one of 'auto', 'on', 'off'$"):
        speed.choose(_mlp(), jit="fast")
    with pytest.raises(ValueError, match="^steps_per_execution must be 'auto' or an integer >= 1, got 0$"):
        speed.choose(_mlp(), steps_per_execution=0)


def test_device_kind_reads_the_strategy_devices():
    gpus = _Replicas(2)
    gpus.extended.worker_devices = ("/job:localhost/replica:0/task:0/device:GPU:0", "/device:GPU:1")
    assert speed.device_kind(gpus) == "GPU"
    assert speed.device_kind(_Replicas(2)) == "CPU"

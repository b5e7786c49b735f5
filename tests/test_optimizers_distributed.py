"""LayerwiseLrScaling under MirroredStrategy, and the optimisers module's split (names, numbers)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import bnn_keras.optimizers as bko
from bnn_keras import constraints, layerwise, lr_schedules

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------- MirroredStrategy

# Two logical CPUs must be configured before TensorFlow starts, hence a fresh process.
# Two SGD steps of a bias-free Dense 8->4 with weight clipping at 0.3, scaled by
# m = 1/H = 2.83 in "update" mode, on one device and mirrored over two CPUs.
MIRRORED_STEPS = r"""
import json, os, sys
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()
import numpy as np
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.optimizers import LayerwiseLrScaling

X = np.random.RandomState(0).randn(32, 8).astype("float32")
Y = np.random.RandomState(1).randn(32, 4).astype("float32")
W0 = np.random.RandomState(2).uniform(-0.6, 0.6, (8, 4)).astype("float32")

def train(strategy):
    with strategy.scope():
        clip = SwitchableWeightClip(0.3, enabled=True)
        layer = tf.keras.layers.Dense(4, use_bias=False, kernel_constraint=clip)
        model = tf.keras.Sequential([tf.keras.Input((8,)), layer])
        layer.kernel.assign(W0)
        opt = LayerwiseLrScaling(tf.keras.optimizers.SGD(0.05), mode="update")
        model.compile(opt, "mse")
    model.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    kernel = layer.kernel
    parts = getattr(kernel, "values", (kernel,))
    return {"kernel": [p.numpy().tolist() for p in parts],
            "constraint_kept": all(p.constraint is clip for p in parts)}

json.dump({"one": train(tf.distribute.OneDeviceStrategy("/cpu:0")),
           "two": train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))}, sys.stdout)
"""


def numpy_update_mode_sgd(clip_before_scaling: bool) -> np.ndarray:
    """BinaryConnect's clip(w + m * step) over the script's two batches; optionally the bug."""
    x = np.random.RandomState(0).randn(32, 8)
    y = np.random.RandomState(1).randn(32, 4)
    w = np.random.RandomState(2).uniform(-0.6, 0.6, (8, 4)).astype("float32").astype("float64")
    m = 1 / np.sqrt(1.5 / (8 + 4))
    for batch in (slice(0, 16), slice(16, 32)):
        xb, yb = x[batch], y[batch]
        step = -0.05 * xb.T @ (2 * (xb @ w - yb)) / yb.size  # SGD on the mean squared error
        if clip_before_scaling:
            w = np.clip(w + m * (np.clip(w + step, -0.3, 0.3) - w), -0.3, 0.3)
        else:
            w = np.clip(w + m * step, -0.3, 0.3)
    return w


@pytest.fixture(scope="module")
def mirrored_steps():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", MIRRORED_STEPS], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_numpy_reference_tells_clipping_after_scaling_from_before():
    right, wrong = numpy_update_mode_sgd(False), numpy_update_mode_sgd(True)
    assert (np.sign(right) != np.sign(wrong)).sum() >= 5  # the fixture can see the defect


def test_update_mode_on_one_device_matches_numpy(mirrored_steps):
    (kernel,) = mirrored_steps["one"]["kernel"]
    np.testing.assert_allclose(kernel, numpy_update_mode_sgd(False), rtol=0, atol=1e-6)


def test_update_mode_mirrored_over_two_cpus_matches_one_device(mirrored_steps):
    (one,) = mirrored_steps["one"]["kernel"]
    replicas = mirrored_steps["two"]["kernel"]
    assert len(replicas) == 2
    for kernel in replicas:
        np.testing.assert_allclose(kernel, one, rtol=0, atol=1e-6)
    assert mirrored_steps["one"]["constraint_kept"] and mirrored_steps["two"]["constraint_kept"]


# --------------------------------------------------------------------------- the split

PRE_SPLIT_ALL = ("NAMES", "BopCaseOptimizer", "ExponentialDecayPerEpoch", "LayerwiseLrScaling",
                 "PiecewiseConstantPerEpoch", "current_learning_rate", "get", "scale_learning_rate")
REGISTERED = ("BopCaseOptimizer", "ExponentialDecayPerEpoch", "LayerwiseLrScaling",
              "PiecewiseConstantPerEpoch")


def test_every_pre_split_name_is_still_importable_from_optimizers():
    assert tuple(bko.__all__) == PRE_SPLIT_ALL
    moved = {"ExponentialDecayPerEpoch": lr_schedules, "PiecewiseConstantPerEpoch": lr_schedules,
             "current_learning_rate": lr_schedules, "scale_learning_rate": lr_schedules,
             "LayerwiseLrScaling": layerwise, "glorot_limit": constraints}
    for name, home in moved.items():
        assert getattr(bko, name) is getattr(home, name), name


@pytest.mark.parametrize("name", REGISTERED)
def test_serialisation_names_are_unchanged(name):
    cls = getattr(bko, name)
    assert cls.__name__ == name
    assert tf.keras.utils.get_registered_name(cls) == f"bnn_keras>{name}"
    assert tf.keras.utils.get_registered_object(f"bnn_keras>{name}") is cls
    assert tf.keras.utils.get_custom_objects()[name] is cls  # Larq's registration


# Optimiser configs exactly as a .keras file saved before the split holds them (model.save of
# LayerwiseLrScaling(get("adam", ExponentialDecayPerEpoch(1e-2, 1e-4, 3, 2)), {"kernel": 2.0})
# after scale_learning_rate(opt, 0.5); and of get("bop", PiecewiseConstantPerEpoch(...))).
PRE_SPLIT_LAYERWISE = json.loads("""{"module": "bnn_keras.optimizers",
 "class_name": "LayerwiseLrScaling", "registered_name": "bnn_keras>LayerwiseLrScaling",
 "config": {"name": "LayerwiseLrScaling", "weight_decay": 0, "clipnorm": null,
  "global_clipnorm": null, "clipvalue": null, "use_ema": false, "ema_momentum": 0.99,
  "ema_overwrite_frequency": null, "jit_compile": false, "is_legacy_optimizer": false,
  "optimizer": {"module": "keras.optimizers", "class_name": "Adam", "registered_name": null,
   "config": {"name": "Adam", "weight_decay": null, "clipnorm": null, "global_clipnorm": null,
    "clipvalue": null, "use_ema": false, "ema_momentum": 0.99, "ema_overwrite_frequency": null,
    "jit_compile": false, "is_legacy_optimizer": false,
    "learning_rate": {"module": "bnn_keras.optimizers", "class_name": "ExponentialDecayPerEpoch",
     "registered_name": "bnn_keras>ExponentialDecayPerEpoch",
     "config": {"steps_per_epoch": 2, "scale": 0.5, "name": "exponential_decay_per_epoch",
                "start": 0.01, "end": 0.0001, "epochs": 3}},
    "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": false}},
  "multipliers": {"kernel": 2.0}, "mode": "update"}}""")
PRE_SPLIT_BOP = json.loads("""{"module": "bnn_keras.optimizers", "class_name": "BopCaseOptimizer",
 "registered_name": "bnn_keras>BopCaseOptimizer",
 "config": {"name": "BopCaseOptimizer",
  "bop": {"module": "larq.optimizers", "class_name": "Bop", "registered_name": "Bop",
          "config": {"name": "Bop", "threshold": 1e-08, "gamma": 0.0001}},
  "latent_optimizer": {"module": "keras.optimizers.legacy", "class_name": "Adam",
   "registered_name": null,
   "config": {"name": "Adam", "decay": 0.0, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07,
    "amsgrad": false,
    "learning_rate": {"module": "bnn_keras.optimizers", "class_name": "PiecewiseConstantPerEpoch",
     "registered_name": "bnn_keras>PiecewiseConstantPerEpoch",
     "config": {"steps_per_epoch": 2, "scale": 1.0, "name": "piecewise_constant_per_epoch",
                "boundaries_epochs": [1], "values": [0.01, 0.001]}}}}}}""")


def test_optimiser_configs_saved_before_the_split_still_load():
    opt = tf.keras.optimizers.deserialize(PRE_SPLIT_LAYERWISE, use_legacy_optimizer=False)
    assert type(opt) is bko.LayerwiseLrScaling and opt.mode == "update"
    assert opt.multiplier(tf.Variable(tf.zeros((3, 2)), name="dense/kernel")) == 2.0
    schedule = opt.inner_optimizer._learning_rate
    assert type(schedule) is bko.ExponentialDecayPerEpoch and float(schedule.scale) == 0.5
    # step 2 = epoch 1: 1e-2 * (1e-4 / 1e-2) ** (1 / 2) = 1e-3, times the saved scale 0.5
    assert float(schedule(2)) == np.float32(5e-4)
    bop = tf.keras.optimizers.deserialize(PRE_SPLIT_BOP, use_legacy_optimizer=True)
    assert type(bop) is bko.BopCaseOptimizer and bop.bop.get_config()["threshold"] == 1e-8
    assert type(bop.default.learning_rate) is bko.PiecewiseConstantPerEpoch
    latent_rates = [float(bop.default.learning_rate(step)) for step in (1, 2)]
    assert latent_rates == [np.float32(1e-2), np.float32(1e-3)]


@pytest.mark.parametrize("start,end,epochs,steps_per_epoch,scale", [
    (1e-3, 3e-6, 250, 540, 1.0),  # the study's MNIST MLP
    (1e-3, 3e-6, 250, 540, 0.1),  # after a drop
    (3e-3, 2e-6, 500, 7, 0.37),
    (2e-3, 5e-2, 40, 13, 1.0),  # increasing
    (1e-3, 1e-6, 1, 5, 1.0),  # one epoch: `start` throughout
])
def test_exponential_decay_on_keras_is_bit_for_bit_the_study_formula(
        start, end, epochs, steps_per_epoch, scale):
    steps = np.arange((epochs + 3) * steps_per_epoch)  # every step, and past the last epoch
    exponent = np.minimum(steps // steps_per_epoch, epochs - 1) / max(epochs - 1, 1)
    # The pre-Keras implementation: float64 throughout, times the float32 scale, then float32.
    expected = np.float32(start * (end / start) ** exponent * np.float64(np.float32(scale)))
    schedule = bko.ExponentialDecayPerEpoch(start, end, epochs, steps_per_epoch, scale=scale)
    np.testing.assert_array_equal(schedule(tf.constant(steps)).numpy(), expected)

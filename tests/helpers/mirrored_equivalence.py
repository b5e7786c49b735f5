"""Subprocess body: one device vs MirroredStrategy over two logical CPUs, same global batch.

Prints a JSON line with the max weight difference and both loss curves.
"""

import json
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()

import larq as lq  # noqa: E402
import numpy as np  # noqa: E402

import bnn_keras  # noqa: E402
from bnn_keras.callbacks import ClippingSchedule  # noqa: E402
from bnn_keras.distribute import scaling_plan  # noqa: E402

X = np.random.RandomState(0).randn(128, 12).astype("float32")
Y = np.where(np.eye(4)[np.random.RandomState(1).randint(0, 4, 128)] > 0, 1.0, -1.0).astype("float32")


def train(strategy, per_replica_batch, base_lr):
    plan = scaling_plan(strategy, per_replica_batch, base_lr)
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        inp = tf.keras.Input((12,))
        x = lq.layers.QuantDense(32, use_bias=False, kernel_quantizer="switchable_ste_sign",
                                 kernel_constraint="switchable_weight_clip")(inp)
        x = tf.keras.layers.BatchNormalization(synchronized=True)(x)
        x = lq.layers.QuantDense(4, use_bias=False, input_quantizer="switchable_ste_sign",
                                 kernel_quantizer="switchable_ste_sign",
                                 kernel_constraint="switchable_weight_clip")(x)
        model = tf.keras.Model(inp, x)
        model.compile(tf.keras.optimizers.Adam(plan.learning_rate), tf.keras.losses.SquaredHinge())
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(plan.global_batch)
    history = model.fit(data, epochs=4, verbose=0,
                        callbacks=[ClippingSchedule(switch_epoch=2, monitor="loss", verbose=0)])
    flags = [float(v.numpy()) for s in bnn_keras.find_switchables(model)
             for v in getattr(s.switch_variable, "values", [s.switch_variable])]
    return model.get_weights(), history.history["loss"], flags, plan.describe()


one_w, one_loss, one_flags, _ = train(tf.distribute.OneDeviceStrategy("/cpu:0"), 32, 0.01)
# Two replicas of 16 = the same global batch of 32; the scaling rule doubles 0.005 to 0.01.
two_w, two_loss, two_flags, description = train(
    tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 16, 0.005)
json.dump({
    "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(one_w, two_w)),
    "one_loss": one_loss, "two_loss": two_loss,
    "one_flags": one_flags, "two_flags": two_flags, "description": description,
}, sys.stdout)

"""Subprocess body: distillation (`DistillingModel`) on one device vs MirroredStrategy over two logical CPUs.

Same global batch; prints a JSON line with the max weight difference and both loss and KL curves.
"""

import json
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()

import numpy as np  # noqa: E402

from bnn_keras import models  # noqa: E402
from bnn_keras.distill import DistillingModel  # noqa: E402

X = np.random.RandomState(0).randn(128, 12).astype("float32")
Y = np.where(np.eye(4)[np.random.RandomState(1).randint(0, 4, 128)] > 0, 1.0, -1.0).astype("float32")


def train(strategy, lr):
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        teacher = models.mlp((12,), 4, hidden_units=(16,), variant="float", synchronized_bn=True)
        student = models.mlp((12,), 4, hidden_units=(16,), variant="binarynet", synchronized_bn=True)
        model = DistillingModel(student, teacher, temperature=2.0, weight=0.5)
        model.compile(tf.keras.optimizers.SGD(lr), tf.keras.losses.SquaredHinge())  # SGD: a mis-scaled term shows
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(32)
    history = model.fit(data, epochs=3, verbose=0)
    return model.get_weights(), history.history["loss"], history.history["distill_loss"]


one_w, one_loss, one_kd = train(tf.distribute.OneDeviceStrategy("/cpu:0"), 0.1)
two_w, two_loss, two_kd = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 0.1)
json.dump({
    "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(one_w, two_w)),
    "one_loss": one_loss, "two_loss": two_loss, "one_kd": one_kd, "two_kd": two_kd,
}, sys.stdout)

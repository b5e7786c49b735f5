"""Our quantisers lower to LCE binary convolutions, and the LCE interpreter agrees with Keras."""

import re

import larq as lq
import larq_compute_engine as lce
import numpy as np
import pytest
import tensorflow as tf
from larq_compute_engine.tflite.python.interpreter import Interpreter

import bnn_keras
from bnn_keras.constraints import SwitchableWeightClip


@pytest.mark.parametrize("quantizer,clipped", [
    ("switchable_ste_sign", False),
    ("switchable_ste_sign", True),
    ("vanilla_ste_sign", False),
    ("clipped_ste_sign", False),
])
def test_quantconv2d_with_our_quantizers_becomes_lce_bconv2d(quantizer, clipped):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((8, 8, 32))
    x = lq.layers.QuantConv2D(32, 3, padding="same", pad_values=1.0, use_bias=False,
                              input_quantizer=quantizer, kernel_quantizer=quantizer,
                              kernel_constraint=SwitchableWeightClip())(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    model = tf.keras.Model(inp, x)
    bnn_keras.set_clipping(model, clipped)
    flatbuffer = lce.convert_keras_model(model)
    assert b"LceBconv2d" in flatbuffer
    assert not re.search(rb"CONV_2D", flatbuffer)  # the conv did not stay float
    x_in = np.random.RandomState(1).randn(4, 8, 8, 32).astype("float32")
    out = Interpreter(flatbuffer, num_threads=1).predict(x_in)
    np.testing.assert_allclose(out, model(x_in).numpy(), rtol=0, atol=1e-4)

"""LCE 0.16 pitfalls: zero-padded binary convs on small maps, and scaled kernels over the folding limit.

The expectations come from outside bnn_keras: LCE's own converter and interpreter (what
it computes wrongly), Keras' outputs (what the file must compute), and the sizes of the
kernels (TensorFlow's 2^30-bit constant-folding limit).
"""

import logging

import larq as lq
import larq_compute_engine as lce
import numpy as np
import pytest
import tensorflow as tf
from larq_compute_engine.tflite.python.interpreter import Interpreter

import bnn_keras  # noqa: F401
from bnn_keras import export
from bnn_keras.export import pitfalls

logging.getLogger("larq.layers_base").setLevel(logging.ERROR)  # "starved weights": irrelevant here


def _single_conv(size, kernel=3, *, filters=16, channels=32, dilation=1, strides=1, pad_values=0.0,
                 kernel_quantizer="ste_sign", use_bias=False, activation=None, padding="same"):
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((*size, channels))
    conv = lq.layers.QuantConv2D(
        filters, kernel, strides=strides, dilation_rate=dilation, padding=padding, pad_values=pad_values,
        use_bias=use_bias, activation=activation, bias_initializer="random_normal",
        input_quantizer="ste_sign", kernel_quantizer=kernel_quantizer, name="conv",
    )
    return tf.keras.Model(inputs, conv(inputs), name="single_conv")


def _inputs(model, n=4):
    return np.random.default_rng(1).standard_normal((n, *model.inputs[0].shape[1:])).astype(np.float32)


def _lce_outputs(flatbuffer, x):
    return Interpreter(flatbuffer, num_threads=1).predict(x)


# Geometry -> whether plain LCE 0.16 gets the SAME zero-padded conv wrong (measured: 51 of
# 51 random geometries agree with "effective kernel larger than the map").
GEOMETRIES = [
    (dict(size=(2, 2)), True),
    (dict(size=(1, 1)), True),
    (dict(size=(2, 3)), True),
    (dict(size=(4, 4), dilation=2), True),  # effective kernel 5
    (dict(size=(3, 3)), False),
    (dict(size=(5, 5), dilation=2), False),
    (dict(size=(2, 2), kernel=1), False),
    (dict(size=(2, 2), pad_values=1.0), False),
]


@pytest.mark.parametrize("geometry,wrong", GEOMETRIES, ids=[str(g) for g, _ in GEOMETRIES])
def test_zero_padding_pitfall_is_where_lce_computes_wrongly(geometry, wrong):
    model = _single_conv(**geometry)
    x = _inputs(model)
    raw = _lce_outputs(lce.convert_keras_model(model), x)  # LCE alone, no bnn_keras rewrite
    lce_is_wrong = bool(np.any(np.abs(raw - model(x).numpy()) > 1e-3))
    assert lce_is_wrong == wrong
    assert (pitfalls.zero_padding_pitfall(model.get_layer("conv")) is not None) == wrong


CASES = [
    dict(size=(2, 2)),
    dict(size=(1, 1), use_bias=True, activation="relu", channels=64),
    dict(size=(2, 3), kernel_quantizer="magnitude_aware_sign", use_bias=True),
    dict(size=(4, 4), dilation=2),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_small_map_zero_padded_conv_exports_keras_outputs(case):
    model = _single_conv(**case)
    x = _inputs(model)
    expected = model(x).numpy()
    result = export.convert(model, verify=False)
    actual = _lce_outputs(result.flatbuffer, x)
    # float rounding of integer sums plus a bias: a few ulps of the largest output
    assert np.max(np.abs(actual - expected)) <= 1e-6 * max(1.0, np.max(np.abs(expected)))
    (row,) = result.report.layers
    assert row.binary and "LceBconv2d" in row.ops
    k = 3 if case.get("dilation", 1) == 1 else 5
    (h, w) = case["size"]
    assert row.note.startswith(f"SAME zero padding with a {k}x{k} kernel on a {h}x{w} map")
    assert any(note.startswith("layer 'conv' rewritten for LCE 0.16") for note in result.report.notes)


def test_xcore_keeps_small_map_zero_padded_conv_float():
    """xcore lowers no SAME zero padding, so it computes right and nothing is rewritten."""
    model = _single_conv((2, 2))
    assert pitfalls.zero_padding_pitfall(model.get_layer("conv"), "xcore") is None
    with pytest.warns(UserWarning, match="no binary op"):
        result = export.convert(model, lce_target="xcore", verify=False)
    assert result.report.notes == [] and not result.report.layers[0].binary


def test_subclassed_small_map_conv_is_refused_naming_the_layer():
    class Block(tf.keras.Model):
        def __init__(self):
            super().__init__(name="block")
            self.conv = lq.layers.QuantConv2D(8, 3, padding="same", input_quantizer="ste_sign",
                                              kernel_quantizer="ste_sign", name="tiny_conv")

        def call(self, x):
            return self.conv(x)

    inputs = tf.keras.Input((2, 2, 32))
    model = tf.keras.Model(inputs, Block()(inputs))
    refusal = r"^layer 'tiny_conv': SAME zero padding with a 3x3 kernel on a 2x2 map.*pad_values=1\.0"
    with pytest.raises(export.ExportError, match=refusal):
        export.convert(model, verify=False)
    # A map as large as the kernel converts.
    inputs = tf.keras.Input((3, 3, 32))
    assert export.convert(tf.keras.Model(inputs, Block()(inputs)), verify=False).report.binary_ops == 1


def test_padding_share_is_the_kernel_taps_off_the_map():
    """On a 1x1 map only the centre tap touches the pixel: the other 8 taps' sums are the share."""
    model = _single_conv((1, 1), filters=4)
    conv = model.get_layer("conv")
    taps = np.sign(conv.kernel.numpy()).sum(axis=2)  # (3, 3, filters); no kernel weight is exactly 0
    expected = taps.sum(axis=(0, 1)) - taps[1, 1]
    np.testing.assert_array_equal(pitfalls._padding_share(conv, (1, 1))[0, 0], expected)


# -- scaled kernels over TensorFlow's constant-folding limit (2^30 bits = 2^25 float32 values) --

def _conv_layer(shape, kernel, filters, quantizer):
    layer = lq.layers.QuantConv2D(filters, kernel, input_quantizer="ste_sign", kernel_quantizer=quantizer,
                                  kernel_initializer="zeros")
    layer.build((None, *shape))
    return layer


def test_fold_limit_pitfall_names_the_real_reason_at_the_measured_sizes():
    """fc6 as a conv (37.7M weights): float with magnitude_aware_sign, binary with ste_sign
    (benchmarks/lce_large_conv.py); the limit is at 2^25 Mul operand values."""
    fc6 = _conv_layer((6, 6, 256), 6, 4096, "magnitude_aware_sign")
    reason = pitfalls.fold_limit_pitfall(fc6)
    assert reason.startswith("its scaled kernel (37,748,736 weights) is too large to constant-fold")
    assert "2^30 bits (33,554,432 float32 values)" in reason
    assert pitfalls.split_parts(fc6) == 2  # 2 x 18.9M weights
    assert pitfalls.fold_limit_pitfall(_conv_layer((6, 6, 256), 6, 4096, "ste_sign")) is None
    # 1x1 convs with 32 filters: sign(w) * scale has 32 * C + 32 operand values.
    assert pitfalls.fold_limit_pitfall(_conv_layer((1, 1, 2**20 - 1), 1, 32, "magnitude_aware_sign")) is None
    assert pitfalls.fold_limit_pitfall(_conv_layer((1, 1, 2**20), 1, 32, "magnitude_aware_sign")) is not None


def test_split_scaled_conv_lowers_every_part_with_keras_outputs(monkeypatch):
    """A limit of 16 filters' worth splits 40 filters in 3 (14 + 13 + 13): three LceBconv2d, same outputs."""
    model = _single_conv((6, 6), filters=40, channels=64, pad_values=1.0,
                         kernel_quantizer="magnitude_aware_sign", use_bias=True)
    monkeypatch.setattr(pitfalls, "FOLD_LIMIT_VALUES", 3 * 3 * 64 * 16 + 16)
    x = _inputs(model)
    expected = model(x).numpy()
    result = export.convert(model, verify=False)
    # Keras sums n = 3 x 3 x 64 products of +-1 and +-scale in float32: rounding grows like
    # sqrt(n) * 2**-24 * (n * scale) (0.00003 here); one flipped kernel sign moves an output by 2 * scale (0.08).
    n = 3 * 3 * 64
    scale = np.mean(np.abs(model.layers[-1].kernel.numpy()), axis=(0, 1, 2)).max()
    assert np.max(np.abs(_lce_outputs(result.flatbuffer, x) - expected)) <= np.sqrt(n) * 2**-24 * n * scale
    (row,) = result.report.layers
    assert row.ops.count("LceBconv2d") == 3 and "CONV_2D" not in row.ops and row.binary
    assert row.note.startswith("split into 3 binary convs")
    # 40 filters x 9 taps x 64 channels bit-packed (2 int32 words), plus a multiplier and a bias per filter
    assert 40 * 9 * 2 * 4 <= row.bytes <= 40 * 9 * 2 * 4 + 40 * 2 * 4 + 64

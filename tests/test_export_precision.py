"""Export reports read precision from Larq's metadata and binary MACs from the file; BN statistics for checks.

Expectations come from outside the code under test: Larq's ``precision`` attributes,
MAC counts by hand, Keras' weights, and LCE's interpreter.
"""

import json

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from larq_compute_engine.tflite.python.interpreter import Interpreter

import bnn_keras  # noqa: F401
from bnn_keras import export
from bnn_keras.export.rewrite import quantizer_precision


@lq.utils.set_precision(1)
def marked_sign(x):
    """A user's sign quantiser, marked 1-bit the way Larq documents."""
    return lq.math.sign(x)


@lq.utils.set_precision(1)
def marked_step(x):
    """1-bit, but 0/1: not a sign LCE lowers."""
    return lq.math.heaviside(x)


@lq.utils.set_precision(2)
def marked_two_bit(x):
    return tf.clip_by_value(tf.round(x), -1.0, 1.0)


def unmarked_sign(x):
    return lq.math.sign(x)


@pytest.mark.parametrize("quantizer,binarizing", [
    (lq.quantizers.ste_sign, True),
    (lq.quantizers.approx_sign, True),
    (lq.quantizers.swish_sign, True),
    (marked_sign, True),
    (marked_step, False),
    (marked_two_bit, False),
    (unmarked_sign, False),  # Larq's metadata says nothing: not counted
    (lq.quantizers.ste_heaviside, False),
], ids=lambda q: getattr(q, "__name__", str(q)))
def test_function_quantizers_binarize_by_larq_precision(quantizer, binarizing):
    assert export.is_binarizing(quantizer) == binarizing
    assert export.is_binarizing(quantizer, kernel=True) == binarizing
    if hasattr(quantizer, "precision"):  # set by larq.utils.set_precision
        assert quantizer_precision(quantizer) == quantizer.precision


@pytest.mark.parametrize("quantizer", [lq.quantizers.ste_sign, marked_sign], ids=lambda q: q.__name__)
def test_function_quantised_dense_is_reported_binary_and_ideal_1_bit(quantizer):
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((64,))
    dense = lq.layers.QuantDense(16, input_quantizer=quantizer, kernel_quantizer=quantizer,
                                 kernel_constraint="weight_clip", name="dense")
    model = tf.keras.Model(inputs, dense(inputs))
    result = export.convert(model, verify=False)
    (row,) = result.report.layers
    assert row.binary and "LceBconv2d" in row.ops and "FULLY_CONNECTED" not in row.ops
    assert row.note == "binary dense rewritten as a 1x1 LceBconv2d"
    assert row.binary_params == 64 * 16
    assert row.ideal_bytes == 64 * 16 / 8 + 16 * 4  # 1 bit per weight, 32 per bias
    assert result.report.binary_mac_share == 1.0
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    actual = Interpreter(result.flatbuffer, num_threads=1).predict(x)
    np.testing.assert_allclose(actual, model(x).numpy(), rtol=0, atol=1e-4)


def test_binary_mac_share_counts_layers_the_file_holds_as_binary():
    """On xcore a SAME zero-padded conv stays float: its MACs are not binary, though Keras' layer is."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((6, 6, 32))
    binary = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                  padding="same", use_bias=False)
    x = lq.layers.QuantConv2D(32, 3, pad_values=1.0, name="lowered", **binary)(inputs)
    x = lq.layers.QuantConv2D(16, 3, pad_values=0.0, name="kept_float", **binary)(x)
    result = export.convert(tf.keras.Model(inputs, x), lce_target="xcore", verify=False)
    assert [r.binary for r in result.report.layers] == [True, False]
    lowered, kept_float = 6 * 6 * 3 * 3 * 32 * 32, 6 * 6 * 3 * 3 * 32 * 16  # pixels x kernel weights
    assert result.report.binary_mac_share == pytest.approx(lowered / (lowered + kept_float))


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_report_of_a_model_without_macs_or_parameters_is_valid_json(tmp_path):
    inputs = tf.keras.Input((4,))
    model = tf.keras.Model(inputs, tf.keras.layers.Activation("relu")(inputs), name="no_macs")
    with pytest.warns(UserWarning, match="no binary op"):
        result = export.export(model, tmp_path / "m.tflite", verify=False)
    report = result.report
    assert report.binary_mac_share is None and report.ratio_to_ideal is None
    data = _strict_json(report.to_json())
    assert data["binary_mac_share"] is None and data["ratio_to_ideal"] is None
    assert _strict_json(export.report_path(tmp_path / "m.tflite").read_text())["binary_mac_share"] is None
    assert "binary MACs n/a" in report.table() and "file/ideal n/a" in report.table()


def test_report_json_turns_any_nan_or_infinity_into_null():
    result = export.convert(_tiny_binary_conv(), verify=False)
    report = result.report
    report.verification = {"max_abs_diff": float("inf"), "values": [np.float32("nan"), 1.5]}
    data = _strict_json(report.to_json())
    assert data["verification"] == {"max_abs_diff": None, "values": [None, 1.5]}


def _tiny_binary_conv():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((4, 4, 32))
    conv = lq.layers.QuantConv2D(8, 3, padding="same", pad_values=1.0, input_quantizer="ste_sign",
                                 kernel_quantizer="ste_sign", kernel_constraint="weight_clip")
    return tf.keras.Model(inputs, conv(inputs))


# -- randomize_batch_norm: any model --

def _bn_reference(x, bn):
    """Keras' BatchNormalization at inference, from its weights (gamma 1 / beta 0 when absent)."""
    gamma = bn.gamma.numpy() if bn.gamma is not None else 1.0
    beta = bn.beta.numpy() if bn.beta is not None else 0.0
    return gamma * (x - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon) + beta


def _bn_without_scale_and_center():
    inputs = tf.keras.Input((8,))
    x = tf.keras.layers.BatchNormalization(scale=False, name="no_scale")(inputs)
    x = tf.keras.layers.BatchNormalization(center=False, name="no_center")(x)
    return tf.keras.Model(inputs, x)


def test_randomize_batch_norm_without_scale_or_center():
    model = _bn_without_scale_and_center()
    export.randomize_batch_norm(model, seed=3)
    no_scale, no_center = model.get_layer("no_scale"), model.get_layer("no_center")
    for bn in (no_scale, no_center):
        assert np.all(bn.moving_mean.numpy() != 0.0)  # were 0
        assert np.all((bn.moving_variance.numpy() >= 5.0) & (bn.moving_variance.numpy() <= 50.0))  # were 1
    assert np.all(no_scale.beta.numpy() != 0.0) and no_scale.gamma is None
    assert np.all(no_center.gamma.numpy() != 1.0) and no_center.beta is None
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    expected = _bn_reference(_bn_reference(x, no_scale), no_center)
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Seeded: the same seed gives the same statistics on a fresh model, another seed others.
    again, other = _bn_without_scale_and_center(), _bn_without_scale_and_center()
    export.randomize_batch_norm(again, seed=3)
    export.randomize_batch_norm(other, seed=4)
    np.testing.assert_array_equal(again.get_layer("no_center").moving_mean.numpy(), no_center.moving_mean.numpy())
    assert not np.allclose(other.get_layer("no_center").moving_mean.numpy(), no_center.moving_mean.numpy())


def test_randomize_batch_norm_reaches_nested_models():
    inner_sequential = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.BatchNormalization(name="bn_seq")],
                                           name="inner_sequential")
    inner_inputs = tf.keras.Input((8,))
    inner_functional = tf.keras.Model(
        inner_inputs, tf.keras.layers.BatchNormalization(name="bn_func")(inner_inputs), name="inner_functional"
    )
    inputs = tf.keras.Input((8,))
    x = tf.keras.layers.BatchNormalization(name="bn_outer")(inputs)
    model = tf.keras.Model(inputs, inner_functional(inner_sequential(x)))
    export.randomize_batch_norm(model, seed=1)
    bns = [model.get_layer("bn_outer"), inner_sequential.get_layer("bn_seq"), inner_functional.get_layer("bn_func")]
    for bn in bns:
        assert np.all(bn.moving_mean.numpy() != 0.0) and np.all(bn.moving_variance.numpy() >= 5.0), bn.name
    means = [bn.moving_mean.numpy() for bn in bns]
    assert not np.allclose(means[1], means[2])  # each layer its own draw
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    expected = x
    for bn in bns:
        expected = _bn_reference(expected, bn)
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)

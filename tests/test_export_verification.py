"""Verification against Keras catches files that are wrong on purpose, by the amount they are wrong.

Each check exports a tiny model that differs from a reference Keras model in one known
way (a flipped kernel sign, a bias shifted by 0.01, a bias dropped, a swapped top class),
computes the difference itself from the interpreter's outputs and Keras' `predict`, and
checks that `export.check_flatbuffer` reports that difference and fails exactly when it should.
Every model is converted once per module.
"""

from __future__ import annotations

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import export
from bnn_keras.export.verify import check_flatbuffer

IN, OUT = 16, 8
FLIPPED = (3, 5)  # (input, unit) of the one kernel weight whose sign the flipped model negates
SHIFT = 0.01


def _binary_dense(kernel: np.ndarray, bias: np.ndarray, name: str) -> tf.keras.Model:
    """x -> binary QuantDense(8) with the given latent kernel and bias: rewritten as a 1x1 bconv."""
    inputs = tf.keras.Input((IN,), name="x")
    layer = lq.layers.QuantDense(
        OUT, input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip", name="dense"
    )
    model = tf.keras.Model(inputs, layer(inputs), name=name)
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    return model


def _float_head(bias: list[float], name: str) -> tf.keras.Model:
    """x -> Dense(4) with a zero kernel: every output row is `bias`, whatever the input."""
    inputs = tf.keras.Input((IN,), name="x")
    layer = tf.keras.layers.Dense(len(bias), kernel_initializer="zeros", name="head")
    model = tf.keras.Model(inputs, layer(inputs), name=name)
    layer.bias.assign(np.asarray(bias, np.float32))
    return model


def _lce_file(model: tf.keras.Model) -> bytes:
    return export.convert(model, "lce", verify=False).flatbuffer


def _outputs(model: tf.keras.Model, flatbuffer: bytes, target: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Keras outputs, interpreter outputs), computed here, not by `_verify`."""
    (actual,) = export.FlatbufferRunner(flatbuffer, target).predict(x)
    return model.predict(x, verbose=0), actual


@pytest.fixture(scope="module")
def binary():
    """The reference binary dense model (non-zero bias) and three files wrong on purpose."""
    rng = np.random.default_rng(15)
    kernel = rng.uniform(-1.0, 1.0, (IN, OUT)).astype(np.float32)
    bias = rng.uniform(-4.0, 4.0, OUT).astype(np.float32)  # non-integer: ±1 sums are even integers
    x = rng.standard_normal((64, IN)).astype(np.float32)
    reference = _binary_dense(kernel, bias, "reference")

    flipped_kernel = kernel.copy()
    flipped_kernel[FLIPPED] *= -1.0
    return {
        "x": x,
        "bias": bias,
        "reference": reference,
        "flipped": _lce_file(_binary_dense(flipped_kernel, bias, "flipped")),
        "shifted": _lce_file(_binary_dense(kernel, bias + SHIFT, "shifted")),
        "no_bias": _lce_file(_binary_dense(kernel, np.zeros_like(bias), "no_bias")),
    }


def test_rewritten_binary_dense_keeps_its_bias(binary, tmp_path):
    result = export.export(
        binary["reference"], tmp_path / "reference.tflite", target="lce", verify_inputs=binary["x"], max_abs_diff=1e-4
    )
    assert result.report.rewritten_dense == ["dense"]
    assert export.flatbuffer_ops(result.flatbuffer).count("LceBconv2d") == 1
    expected, actual = _outputs(binary["reference"], result.flatbuffer, "lce", binary["x"])
    assert np.max(np.abs(expected - actual)) <= 1e-5 * max(1.0, np.max(np.abs(expected)))
    assert np.all(np.argmax(actual, -1) == np.argmax(expected, -1))


def test_dropped_bias_fails_verification(binary):
    reference, x = binary["reference"], binary["x"]
    expected, actual = _outputs(reference, binary["no_bias"], "lce", x)
    # Each unit loses exactly its bias (the ±1 sums are unchanged).
    np.testing.assert_allclose(expected - actual, np.broadcast_to(binary["bias"], expected.shape), atol=1e-5)
    agreement = np.mean(np.argmax(expected, -1) == np.argmax(actual, -1))
    assert agreement < 0.99  # the bias decides the top class of some inputs
    with pytest.raises(export.ExportVerificationError) as error:
        check_flatbuffer(reference, binary["no_bias"], "lce", x, "given", min_top1=0.99, max_abs_diff=1e-4)
    diff = np.max(np.abs(binary["bias"]))
    assert f": top-1 agreement {100 * agreement:.1f}% < 99.0%; max |diff| {diff:.3g} > 0.0001 " in str(error.value)


def test_one_flipped_kernel_sign_is_measured(binary):
    reference, x = binary["reference"], binary["x"]
    expected, actual = _outputs(reference, binary["flipped"], "lce", x)
    diff = float(np.max(np.abs(expected - actual)))
    # sign(w) flips for one weight of one unit: that unit moves by exactly 2 on every input.
    assert diff == pytest.approx(2.0, abs=1e-5)
    assert np.max(np.abs(np.delete(expected - actual, FLIPPED[1], axis=1))) <= 1e-5
    with pytest.raises(export.ExportVerificationError, match=r"max \|diff\| 2 > 1\b"):
        check_flatbuffer(reference, binary["flipped"], "lce", x, "given", min_top1=0.0, max_abs_diff=diff / 2)
    v = check_flatbuffer(reference, binary["flipped"], "lce", x, "given", min_top1=0.0, max_abs_diff=2 * diff)
    assert v["max_abs_diff"] == pytest.approx(diff, abs=1e-6)
    assert v["top1_agreement_strict"] == pytest.approx(np.mean(np.argmax(expected, -1) == np.argmax(actual, -1)))
    assert v["num_inputs"] == len(x) and v["max_abs_diff_allowed"] == 2 * diff


def test_small_constant_shift_is_caught_only_by_max_abs_diff(binary):
    reference, x = binary["reference"], binary["x"]
    expected, actual = _outputs(reference, binary["shifted"], "lce", x)
    np.testing.assert_allclose(actual - expected, SHIFT, atol=1e-5)
    assert np.all(np.argmax(actual, -1) == np.argmax(expected, -1))  # top-1 cannot see it
    with pytest.raises(export.ExportVerificationError, match=r": max \|diff\| 0.01 > 0.001 ") as error:
        check_flatbuffer(reference, binary["shifted"], "lce", x, "given", min_top1=0.99, max_abs_diff=1e-3)
    assert "top-1" not in str(error.value)
    v = check_flatbuffer(reference, binary["shifted"], "lce", x, "given", min_top1=0.99, max_abs_diff=0.1)
    assert v["max_abs_diff"] == pytest.approx(float(np.max(np.abs(expected - actual))), abs=1e-6)
    assert v["max_abs_diff"] == pytest.approx(SHIFT, abs=1e-5)
    assert v["top1_agreement"] == v["top1_agreement_strict"] == 1.0


@pytest.fixture(scope="module")
def second_class_file():
    """A TFLite file whose every output is (9.99, 10, 0, 0): its top-1 is class 1."""
    return export.convert(_float_head([9.99, 10.0, 0.0, 0.0], "file"), "tflite", verify=False).flatbuffer


@pytest.mark.parametrize(
    "keras_bias, tie",
    [
        ([10.0, 9.99, 0.0, 0.0], False),  # class 0 leads by a relative 1e-3: a real disagreement
        ([10.0, 10.0 - 1e-6, 0.0, 0.0], True),  # within 1e-7 relative: a tie, either class is right
    ],
    ids=["gap-1e-3", "tie-1e-7"],
)
def test_top1_ties_count_only_within_float_rounding(second_class_file, keras_bias, tie):
    model = _float_head(keras_bias, "keras")
    x = np.random.default_rng(3).standard_normal((8, IN)).astype(np.float32)
    expected, actual = _outputs(model, second_class_file, "tflite", x)
    assert np.all(np.argmax(expected, -1) == 0) and np.all(np.argmax(actual, -1) == 1)
    v = check_flatbuffer(model, second_class_file, "tflite", x, "given", min_top1=0.0, max_abs_diff=None)
    assert v["top1_agreement_strict"] == 0.0
    assert v["top1_agreement"] == (1.0 if tie else 0.0)
    if not tie:
        with pytest.raises(export.ExportVerificationError, match=r"top-1 agreement 0.0% < 99.0%"):
            check_flatbuffer(model, second_class_file, "tflite", x, "given", min_top1=0.99, max_abs_diff=None)


def test_the_dense_rewrite_says_why_it_skips_a_layer():
    from bnn_keras.export import rewrite_binary_dense

    def binary_dense(name):
        return lq.layers.QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign", name=name)

    inputs = tf.keras.Input((3, 8))
    model = tf.keras.Model(inputs, binary_dense("on_sequence")(inputs))
    _, rewritten, skipped = rewrite_binary_dense(model)
    assert rewritten == []
    assert skipped == {"on_sequence": "only rank-2 inputs with known width are rewritten, its input is (None, 3, 8)"}

    class Subclassed(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = binary_dense("inside")

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(tf.zeros((1, 8)))
    same, rewritten, skipped = rewrite_binary_dense(subclassed)
    assert same is subclassed and rewritten == []
    assert skipped == {"inside": "its input shape is unknown"}  # a subclassed model records no input shapes

    class Wrapper(tf.keras.Model):  # a subclassed model around a functional backbone
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def call(self, x):
            return self.backbone(x)

    inputs = tf.keras.Input((8,))
    wrapper = Wrapper(tf.keras.Model(inputs, binary_dense("in_backbone")(inputs)))
    wrapper(tf.zeros((1, 8)))
    same, rewritten, skipped = rewrite_binary_dense(wrapper)
    assert same is wrapper and rewritten == []
    assert skipped == {"in_backbone": "the model is subclassed, so its graph cannot be rebuilt"}


def test_the_rewritten_model_computes_a_whole_batch_like_the_original():
    from bnn_keras.export import rewrite_binary_dense

    tf.keras.utils.set_random_seed(4)
    inputs = tf.keras.Input((16,))
    x = lq.layers.QuantDense(8, input_quantizer="ste_sign", kernel_quantizer="ste_sign", name="b1")(inputs)
    model = tf.keras.Model(inputs, x)
    model.get_layer("b1").bias.assign(np.linspace(-1, 1, 8).astype(np.float32))
    rewritten, names, _ = rewrite_binary_dense(model)
    assert names == ["b1"]
    batch = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    out = rewritten(batch).numpy()
    assert out.shape == (5, 8)
    np.testing.assert_array_equal(out, model(batch).numpy())

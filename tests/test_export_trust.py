"""Verification checks what the file computes, not only its argmax, and says where it departs.

The issue's case: a Bi-Real-style network at 64x64 input on which all 100 random N(0, 1)
inputs land on one Keras class, so top-1 agreement is 100% whatever the file computes.
Its file is wrong on purpose: converted from a twin whose `bn_1` statistics differ (mean
shifted by half a standard deviation), so every logit moves by a tenth of the logit scale
while every argmax stays. Verification must fail on the values and name `bn_1`. The
legitimate cases are the same network's own file (passes, localises nothing) and an
untrained BinaryNet MLP in stock TFLite, whose outputs move by sign flips at pre-sign
values of exactly 0 (told apart from wrong values). Every expectation is computed here,
from Keras' predictions, the BatchNorm weights and the interpreter's outputs.
"""

from __future__ import annotations

import inspect
import json

import larq as lq
import larq_compute_engine
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras  # noqa: F401  (registers the custom objects)
from bnn_keras import export, models
from bnn_keras.export import verify

SHAPE = (64, 64, 3)
WIDTH, BLOCKS = 8, 3
SHIFTED = "bn_1"  # the twin's BatchNorm whose moving mean is shifted
SHIFT = 0.5  # standard deviations
BINARY = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)


def _bireal(name: str) -> tf.keras.Model:
    """stem conv -> BN -> pool -> 3 x (sign -> binary 3x3 conv -> BN -> + shortcut) -> GAP -> dense."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input(SHAPE, name="image")
    x = tf.keras.layers.Conv2D(WIDTH, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = tf.keras.layers.BatchNormalization(name="stem_bn")(x)
    x = tf.keras.layers.MaxPool2D(2, name="stem_pool")(x)
    for b in range(BLOCKS):
        y = lq.layers.QuantConv2D(WIDTH, 3, padding="same", pad_values=1.0, name=f"bconv_{b}", **BINARY)(x)
        y = tf.keras.layers.BatchNormalization(name=f"bn_{b}")(y)
        x = tf.keras.layers.Add(name=f"add_{b}")([x, y])
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = tf.keras.layers.Dense(10, name="logits")(x)
    return export.randomize_batch_norm(tf.keras.Model(inputs, outputs, name=name))


@pytest.fixture(scope="module")
def issue():
    """The reference network, its twin (bn_1 shifted), random inputs and the twin's LCE file."""
    reference = _bireal("bireal")
    twin = _bireal("bireal")
    bn = twin.get_layer(SHIFTED)
    bn.moving_mean.assign(bn.moving_mean + SHIFT * tf.sqrt(bn.moving_variance))
    x = np.random.default_rng(0).standard_normal((100, *SHAPE)).astype(np.float32)
    return {
        "reference": reference,
        "twin": twin,
        "x": x,
        "twin_file": export.convert(twin, "lce", verify=False).flatbuffer,
    }


@pytest.fixture
def converts_the_twin(issue, monkeypatch):
    """LCE's converter hands back the twin's file whatever model it is given: a converter bug."""
    monkeypatch.setattr(larq_compute_engine, "convert_keras_model", lambda model, **options: issue["twin_file"])


def test_a_file_off_by_a_tenth_of_the_logit_scale_fails_though_every_argmax_agrees(issue, converts_the_twin):
    expected = issue["reference"].predict(issue["x"], verbose=0)
    (actual,) = export.FlatbufferRunner(issue["twin_file"], "lce").predict(issue["x"])
    assert np.max(np.abs(actual - issue["twin"].predict(issue["x"], verbose=0))) < 1e-4  # it is the twin's file
    assert len(np.unique(np.argmax(expected, -1))) == 1  # random inputs land on one class
    assert np.all(np.argmax(actual, -1) == np.argmax(expected, -1))  # top-1 agreement 100%
    scale = np.max(np.abs(expected))
    relative = np.max(np.abs(actual - expected), -1) / scale
    assert np.min(relative) > 0.1  # every input off by over a tenth of the logit scale
    largest = np.max(relative)
    with pytest.raises(export.ExportVerificationError) as error:
        export.convert(issue["reference"], "lce", verify_inputs=issue["x"])
    message = str(error.value)
    assert "\n" not in message and "top-1" not in message  # every argmax agrees: the values fail
    assert f"output 'logits' off by more than {verify.OUTPUT_RTOL:g} x its scale {scale:.3g} on 100% of inputs" \
        in message
    assert f"up to {largest:.2g} x" in message
    where = "first wrong layer 'bn_1' (BatchNormalization, computed in one with 'bconv_1'): 100% of its elements off"
    assert where in message
    assert "untrained BatchNormalization" not in message  # the old hint sent users the wrong way


def test_the_networks_own_file_passes_within_float_rounding_and_notes_the_single_class(issue):
    result = export.convert(issue["reference"], "lce", verify_inputs=issue["x"], localise=True)
    v = result.report.verification
    expected = issue["reference"].predict(issue["x"], verbose=0)
    (actual,) = export.FlatbufferRunner(result.flatbuffer, "lce").predict(issue["x"])
    relative = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert relative < 1e-5  # 9e-7 measured: float rounding, a hundredth of the tolerance
    assert v["class_values"]["logits"]["max_relative_diff"] < 1e-5  # its own Keras batches round apart slightly
    assert v["class_values"]["logits"]["wrong_inputs"] == 0.0
    assert v["class_values"]["logits"]["keras_classes"] == len(np.unique(np.argmax(expected, -1))) == 1
    single = "all 100 verification inputs land on one Keras class of output 'logits'"
    assert any(single in note for note in result.report.notes)
    assert v["localisation"]["kind"] == "none"
    assert any(n.startswith("localised: every compared layer") for n in result.report.notes)


def test_localisation_names_the_shifted_layer_with_its_numbers(issue):
    reference, x = issue["reference"], issue["x"]
    v = verify.check_flatbuffer(
        reference, issue["twin_file"], "lce", x, "random", min_top1=0.99, max_abs_diff=None,
        output_rtol=verify.OUTPUT_RTOL, max_wrong_share=1.0, localise=True,
    )
    found = v["localisation"]
    assert (found["kind"], found["layer"]) == ("wrong values", SHIFTED)
    by_name = {c["name"]: c for c in found["layers"]}
    order = [layer.name for layer in reference.layers]
    above = [name for name in by_name if order.index(name) < order.index(SHIFTED)]
    assert above and all(by_name[name]["wrong_share"] == 0.0 for name in above)
    # On the file's own (right) inputs bn_1 moves each channel by SHIFT sigma x gamma / sqrt(var + eps).
    bn = issue["twin"].get_layer(SHIFTED)
    variance = bn.moving_variance.numpy()
    moves = SHIFT * np.sqrt(variance) * np.abs(bn.gamma.numpy()) / np.sqrt(variance + bn.epsilon)
    assert by_name[SHIFTED]["max_abs_diff"] == pytest.approx(float(np.max(moves)), rel=1e-4)
    assert by_name[SHIFTED]["wrong_share"] == by_name[SHIFTED]["replay_wrong_share"] == 1.0
    # Localisation compares layers within the check's own output_rtol (the default when it has none).
    for rtol, kind in ((0.5, "none"), (None, "wrong values")):
        again = verify.check_flatbuffer(
            reference, issue["twin_file"], "lce", x, "random", min_top1=0.0, max_abs_diff=None,
            output_rtol=rtol, max_wrong_share=1.0, localise=True,
        )["localisation"]
        assert again["kind"] == kind


def test_the_cli_flags_reach_the_check(issue, converts_the_twin, tmp_path, capsys):
    path, out = tmp_path / "bireal.keras", tmp_path / "bireal.tflite"
    issue["reference"].save(path)
    np.save(tmp_path / "x.npy", issue["x"])
    argv = [str(path), "--out", str(out), "--verify-data", str(tmp_path / "x.npy")]
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "first wrong layer 'bn_1'" in err and not out.exists()
    assert export.main([*argv, "--max-wrong-share", "1", "--localise"]) == 0  # allowed: written, and said where
    printed = capsys.readouterr().out
    assert "note: localised: first wrong layer 'bn_1' (BatchNormalization, computed in one with 'bconv_1')" in printed
    saved = json.loads(export.report_path(out).read_text())
    assert saved["verification"]["max_wrong_share"] == 1.0 and saved["verification"]["localisation"]["layer"] == "bn_1"
    assert export.main([*argv, "--output-rtol", "0.5"]) == 0  # a tolerance above the 0.18 x off passes


def test_sign_flips_at_exact_zeros_are_told_apart_from_wrong_values():
    tf.keras.utils.set_random_seed(0)
    model = models.mlp((28, 28, 1), 10, hidden_units=(64,), variant="binarynet")  # untrained BN: identity
    x = np.random.default_rng(0).standard_normal((100, 28, 28, 1)).astype(np.float32)
    flatbuffer = export.convert(model, "tflite", verify=False).flatbuffer
    (actual,) = export.FlatbufferRunner(flatbuffer, "tflite").predict(x)
    expected = model.predict(x, verbose=0)
    pre_sign = tf.keras.Model(model.inputs, model.get_layer("bn_1").output).predict(x, verbose=0)
    zeros = np.sum(pre_sign == 0, axis=1)  # integer accumulators of 0, mapped to exactly 0
    # A flipped sign moves dense_out's accumulator by 2, bn_out by 2 / sqrt(1 + eps): whole flips,
    # at most one per zero, and none on inputs without a zero.
    bn = model.get_layer("bn_out")
    flips = np.abs(actual - expected) / (2 / np.sqrt(1 + bn.epsilon))
    assert np.allclose(flips, np.round(flips), atol=1e-3)
    assert np.all(np.round(flips).max(-1) <= zeros)
    off = np.max(np.abs(actual - expected), -1) > verify.OUTPUT_RTOL * np.max(np.abs(expected))
    assert 0.1 < np.mean(off) < 1 and not np.any(off & (zeros == 0))
    v = verify.check_flatbuffer(
        model, flatbuffer, "tflite", x, "random", min_top1=0.0, max_abs_diff=None,
        output_rtol=verify.OUTPUT_RTOL, max_wrong_share=1.0, localise=True,
    )
    assert v["class_values"]["bn_out"]["wrong_inputs"] == pytest.approx(np.mean(off))
    found = v["localisation"]
    assert (found["kind"], found["layer"]) == ("sign flips", "bn_out")
    by_name = {c["name"]: c for c in found["layers"]}
    assert by_name["bn_1"]["wrong_share"] == 0.0  # the pre-sign values agree within rounding
    assert by_name["bn_out"]["replay_wrong_share"] == 0.0  # and bn_out is right on the file's own signs
    assert "sign flips from 'bn_out' (BatchNormalization, computed in one with 'dense_out') on:" in found["summary"]


def test_fused_ops_whose_names_mislead_are_not_reported_as_wrong():
    """LCE fuses conv -> pool -> BN -> ReLU; some tensors are named after a layer they are not the output of."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((8, 8, 3), name="image")
    x = lq.layers.QuantConv2D(32, 3, padding="same", kernel_quantizer="ste_sign", use_bias=False, name="conv_1")(inputs)
    x = tf.keras.layers.MaxPool2D(2, name="pool_1")(x)
    x = tf.keras.layers.BatchNormalization(name="bn_1")(x)
    x = tf.keras.layers.Activation("relu", name="relu_1")(x)
    x = lq.layers.QuantConv2D(32, 3, padding="same", kernel_quantizer="ste_sign", use_bias=False, name="conv_2")(x)
    x = tf.keras.layers.BatchNormalization(name="bn_2")(x)
    x = tf.keras.layers.Activation("relu", name="relu_2")(x)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    outputs = tf.keras.layers.Dense(10, name="dense_out")(x)
    model = export.randomize_batch_norm(tf.keras.Model(inputs, outputs, name="cnn_binaryconnect"))
    x = np.random.default_rng(0).standard_normal((32, 8, 8, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match="no binary op"):
        result = export.convert(model, "lce", verify_inputs=x, localise=True)
    found = result.report.verification["localisation"]
    keras_bn_1 = tf.keras.Model(model.inputs, model.get_layer("bn_1").output).predict(x[:1], verbose=0)
    misleading = [c for c in found["layers"] if c["wrong_share"] > 0]
    # bn_1's tensor holds its scaled input, before the shift: it differs from Keras' bn_1 output,
    # and the layers below agree, so it is not the output of bn_1.
    assert [c["name"] for c in misleading] == ["bn_1"] and np.max(np.abs(keras_bn_1)) > 0
    assert not misleading[0]["confirmed"]
    assert found["kind"] == "none"


def _mlp_float() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    return export.randomize_batch_norm(models.mlp((28, 28, 1), 10, hidden_units=(64,), variant="float"))


def test_a_wrong_layer_below_a_fused_op_whose_name_misleads_is_still_the_one_named():
    """LCE computes dense_1 -> bn_1 -> relu_1 in one op whose name is cut before 'relu_1'."""
    reference, twin = _mlp_float(), _mlp_float()
    kernel = twin.get_layer("dense_out").kernel
    kernel.assign(kernel * 1.5)
    x = np.random.default_rng(0).standard_normal((50, 28, 28, 1)).astype(np.float32)
    with pytest.warns(UserWarning, match="no binary op"):
        flatbuffer = export.convert(twin, "lce", verify=False).flatbuffer
    v = verify.check_flatbuffer(
        reference, flatbuffer, "lce", x, "random", min_top1=0.0, max_abs_diff=None,
        output_rtol=verify.OUTPUT_RTOL, max_wrong_share=1.0, localise=True,
    )
    found = v["localisation"]
    by_name = {c["name"]: c for c in found["layers"]}
    assert "bn_1" not in by_name and by_name["relu_1"]["wrong_share"] == 0.0  # the fused op's output is relu_1's
    assert by_name["relu_1"]["computed_with"] == ["bn_1", "dense_1"]
    assert (found["kind"], found["layer"]) == ("wrong values", "bn_out")
    assert by_name["bn_out"]["computed_with"] == ["dense_out"]
    expected = np.max(np.abs(twin.predict(x, verbose=0) - reference.predict(x, verbose=0)))
    assert by_name["bn_out"]["max_abs_diff"] == pytest.approx(expected, abs=1e-4)
    assert "first wrong layer 'bn_out' (BatchNormalization, computed in one with 'dense_out'): 100%" in found["summary"]


def _head(extra_bias: float = 0.0, bump: float = 0.0) -> tf.keras.Model:
    """x (6) -> Dense(4); plus `extra_bias` on every output, and `bump` where x[0] > 0 (x[0] is -1 or 1)."""
    inputs = tf.keras.Input((6,), name="x")
    head = tf.keras.layers.Dense(4, kernel_initializer=tf.keras.initializers.GlorotUniform(0), name="head")
    outputs = head(inputs)
    head.bias.assign(np.full(4, extra_bias, np.float32))
    if bump:
        gate = tf.keras.layers.Dense(4, kernel_initializer="zeros", name="gate")
        step = tf.keras.layers.ReLU(name="step")(gate(inputs))
        gate.kernel.assign(np.eye(6, 4, dtype=np.float32)[:, :1].repeat(4, 1) * bump)  # bump x relu(x[0])
        outputs = tf.keras.layers.Add(name="bumped")([outputs, step])
    return tf.keras.Model(inputs, outputs, name="head_model")


@pytest.fixture(scope="module")
def head_inputs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 6)).astype(np.float32)
    x[:, 0] = np.where(np.arange(100) < 15, 1.0, -1.0)  # 15 of 100 inputs have x[0] = 1
    return x


def test_the_default_tolerance_is_relative_to_the_output_scale(head_inputs):
    assert (verify.OUTPUT_RTOL, verify.MAX_WRONG_SHARE) == (1e-4, 0.1)  # documented in the README
    defaults = inspect.signature(export.convert).parameters
    assert defaults["output_rtol"].default == verify.OUTPUT_RTOL and defaults["max_wrong_share"].default == 0.1
    reference, x = _head(), head_inputs
    scale = float(np.max(np.abs(reference.predict(x, verbose=0))))
    for factor, fails in [(2.0, True), (0.5, False)]:
        file = export.convert(_head(extra_bias=factor * 1e-4 * scale), "tflite", verify=False).flatbuffer
        check = lambda: verify.check_flatbuffer(  # noqa: E731
            reference, file, "tflite", x, "given", min_top1=0.99, max_abs_diff=None, output_rtol=verify.OUTPUT_RTOL
        )
        if fails:
            with pytest.raises(export.ExportVerificationError, match=r"on 100% of inputs \(> 10%\), up to 0.0002 x"):
                check()
        else:
            assert check()["class_values"]["head"]["max_relative_diff"] == pytest.approx(0.5e-4, rel=1e-2)


def test_a_file_wrong_on_a_share_of_inputs_fails_above_max_wrong_share(head_inputs):
    reference, x = _head(), head_inputs
    file = export.convert(_head(bump=0.1), "tflite", verify=False).flatbuffer
    (actual,) = export.FlatbufferRunner(file, "tflite").predict(x)
    wrong = np.max(np.abs(actual - reference.predict(x, verbose=0)), -1) > 1e-3
    assert np.array_equal(wrong, x[:, 0] > 0)  # off by 0.1 exactly where x[0] = 1: 15 of 100
    options = {"min_top1": 0.0, "max_abs_diff": None, "output_rtol": verify.OUTPUT_RTOL}
    with pytest.raises(export.ExportVerificationError, match=r"on 15% of inputs \(> 10%\)"):
        verify.check_flatbuffer(reference, file, "tflite", x, "given", **options)
    v = verify.check_flatbuffer(reference, file, "tflite", x, "given", max_wrong_share=0.15, **options)
    assert v["class_values"]["head"]["wrong_inputs"] == 0.15


def test_a_real_lce_kernel_bug_is_localised_at_its_layer():
    """LCE 0.16 computes a SAME zero-padded binary 3x3 conv on a 2x2 map wrongly (converted here
    straight with LCE, without bnn_keras' rewrite of that case); prefixes of the model tell where."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((8, 8, 3), name="image")
    x = tf.keras.layers.Conv2D(32, 3, strides=2, padding="same", name="stem")(inputs)
    x = tf.keras.layers.BatchNormalization(name="stem_bn")(x)
    x = tf.keras.layers.MaxPool2D(2, name="pool")(x)  # 2x2x32
    y = lq.layers.QuantConv2D(32, 3, padding="same", pad_values=0.0, name="bconv", **BINARY)(x)
    y = tf.keras.layers.BatchNormalization(name="bn")(y)
    x = tf.keras.layers.Add(name="add")([x, y])
    x = tf.keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = export.randomize_batch_norm(tf.keras.Model(inputs, tf.keras.layers.Dense(10, name="logits")(x)))
    x = np.random.default_rng(0).standard_normal((100, 8, 8, 3)).astype(np.float32)
    for end, wrong in [("pool", False), ("bn", True)]:  # the model up to `end`, converted on its own
        prefix = tf.keras.Model(model.inputs, model.get_layer(end).output)
        (actual,) = export.FlatbufferRunner(bytes(larq_compute_engine.convert_keras_model(prefix)), "lce").predict(x)
        expected = prefix.predict(x, verbose=0)
        off = np.abs(actual.reshape(expected.shape) - expected) > verify.OUTPUT_RTOL * np.max(np.abs(expected))
        assert np.mean(off) > 0.5 if wrong else not np.any(off)
    flatbuffer = bytes(larq_compute_engine.convert_keras_model(model))
    with pytest.raises(export.ExportVerificationError) as error:
        verify.check_flatbuffer(
            model, flatbuffer, "lce", x, "random", min_top1=0.99, max_abs_diff=None, output_rtol=verify.OUTPUT_RTOL
        )
    message = str(error.value)
    assert "(first wrong layer 'bn' (BatchNormalization, computed in one with 'bconv'): " in message
    assert message.endswith("wrong values, not sign flips (a broken kernel, or weights that differ from Keras'))")


def _localise_module():
    import importlib

    return importlib.import_module("bnn_keras.export.localise")  # the package's `localise` is the function


def _comparison(name: str, wrong_share: float, replay: float | None):
    return _localise_module().LayerComparison(
        name=name, class_name="TFOpLambda" if replay is None else "BatchNormalization", tensor=name, scale=20.0,
        wrong_share=wrong_share, wrong_inputs=4, max_abs_diff=2.9, confirmed=True, computed_with=[],
        replay_wrong_share=replay, replay_max_abs_diff=None if replay is None else 3e-5,
    )


def test_a_layer_that_cannot_be_replayed_inherits_the_flips_of_the_layer_before_it():
    """QuickNet's case: BN right on the file's own inputs, then a TFOpLambda add off on 1.8% of its elements."""
    localise_module = _localise_module()

    layers = [_comparison("bn_9", 0.0027, 0.0), _comparison("add_5", 0.0027, None),
              _comparison("bn_10", 0.0165, 0.0), _comparison("add_6", 0.0182, None)]
    kind, layer, summary = localise_module._verdict([_comparison("stem_bn", 0.0, 0.0), *layers], 16)
    assert (kind, layer) == ("sign flips", "bn_9")  # a layer with nothing off is not where it departs
    assert localise_module._verdict([_comparison("stem_bn", 0.0, 0.0)], 16)[:2] == ("none", None)
    # The same add as the first layer off is judged against Keras: 1.8% > FLIP_SHARE is wrong values.
    kind, layer, summary = localise_module._verdict(layers[3:], 16)
    assert (kind, layer) == ("wrong values", "add_6") and 0.0182 > localise_module.FLIP_SHARE
    assert summary.startswith("first wrong layer 'add_6' (TFOpLambda): 2% of its elements off against Keras, ")
    # A replayable layer whose own inputs give it wrong values is judged on the replay, and says so.
    kind, layer, summary = localise_module._verdict([_comparison("bn_11", 0.5, 0.25)], 16)
    assert (kind, layer) == ("wrong values", "bn_11")
    assert summary.startswith("first wrong layer 'bn_11' (BatchNormalization): 25% of its elements off from the file's own inputs, ")


def _top1(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.mean(np.argmax(expected, -1) == np.argmax(actual, -1)))


def test_a_top1_moved_only_by_sign_flips_is_excused_and_a_broken_kernel_is_not():
    tf.keras.utils.set_random_seed(0)
    model = models.mlp((28, 28, 1), 10, hidden_units=(64,), variant="binarynet")  # flips at exact zeros
    x = np.random.default_rng(0).standard_normal((100, 28, 28, 1)).astype(np.float32)
    flatbuffer = export.convert(model, "tflite", verify=False).flatbuffer
    (actual,) = export.FlatbufferRunner(flatbuffer, "tflite").predict(x)
    expected = model.predict(x, verbose=0)
    top1 = _top1(expected, actual)
    assert top1 < 0.99  # the sign flips move some top classes: top-1 alone would fail the file
    options = dict(min_top1=0.99, max_abs_diff=None, output_rtol=verify.OUTPUT_RTOL, max_wrong_share=1.0)
    v = verify.check_flatbuffer(model, flatbuffer, "tflite", x, "random", **options)
    assert v["top1_excused"] is True and top1 <= v["top1_agreement"] < 0.99  # ties count either way
    assert any(n.startswith(f"top-1 agreement {100 * v['top1_agreement']:.1f}% < 99.0% is excused") for n in v["notes"])
    # A broken kernel (one output unit's signs flipped) moves top classes with wrong values: not excused.
    broken = tf.keras.models.clone_model(model)
    broken.set_weights(model.get_weights())
    kernel = broken.get_layer("dense_out").kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[i, 3] for i in range(kernel.shape[0])], -kernel[:, 3]))
    bad_file = export.convert(broken, "tflite", verify=False).flatbuffer
    (bad,) = export.FlatbufferRunner(bad_file, "tflite").predict(x)
    assert _top1(expected, bad) < 0.99
    with pytest.raises(export.ExportVerificationError, match=r"top-1 agreement .*wrong values"):
        verify.check_flatbuffer(model, bad_file, "tflite", x, "random", **options)

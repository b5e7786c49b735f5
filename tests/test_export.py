"""Export to LCE / TFLite: op names, byte sizes, fidelity against Keras, safe failures.

Conversions take seconds each, so every model is converted once (module-scoped cache)
and the checks share it. Untrained BatchNormalization maps a zero accumulator to exactly
0, where a sign flips on float rounding; `export.randomize_batch_norm` gives BN layers trained-looking
statistics so the comparisons measure the exporter, not that degenerate tie.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras
from bnn_keras import export, models
from bnn_keras.constraints import SwitchableWeightClip

HIDDEN = 64  # MLP: 28x28x1 -> 64 -> 10
CNN_INPUT = (8, 8, 3)
CNN_FILTERS = 32
BINARY_KERNEL_LAYERS = (lq.layers.QuantDense, lq.layers.QuantConv2D)


def _mlp(variant: str) -> tf.keras.Model:
    return export.randomize_batch_norm(models.mlp((28, 28, 1), 10, hidden_units=(HIDDEN,), variant=variant))


def _cnn(variant: str, clipped: bool = False) -> tf.keras.Model:
    """conv -> pool -> BN [-> ReLU] -> conv -> BN [-> ReLU] -> flatten -> dense -> BN."""
    binary_input = variant == "binarynet"

    def quant(**kwargs):
        if variant == "float":
            return {"use_bias": False, **kwargs}
        extra = {"input_quantizer": bnn_keras.quantizers.SwitchableSteSign(clipped)} if binary_input else {}
        return {
            "use_bias": False,
            "kernel_quantizer": bnn_keras.quantizers.SwitchableSteSign(clipped),
            "kernel_constraint": SwitchableWeightClip(enabled=clipped),
            **extra,
            **kwargs,
        }

    def act(x, name):
        return x if binary_input else tf.keras.layers.Activation("relu", name=name)(x)

    pad = 1.0 if binary_input else 0.0
    inputs = tf.keras.Input(CNN_INPUT, name="image")
    x = lq.layers.QuantConv2D(CNN_FILTERS, 3, padding="same", pad_values=pad, name="conv_1", **quant())(inputs)
    x = tf.keras.layers.MaxPool2D(2, name="pool_1")(x)
    x = act(tf.keras.layers.BatchNormalization(name="bn_1")(x), "relu_1")
    x = lq.layers.QuantConv2D(CNN_FILTERS, 3, padding="same", pad_values=pad, name="conv_2", **quant())(x)
    x = act(tf.keras.layers.BatchNormalization(name="bn_2")(x), "relu_2")
    x = tf.keras.layers.Flatten(name="flatten")(x)
    x = lq.layers.QuantDense(10, name="dense_out", **quant())(x)
    outputs = tf.keras.layers.BatchNormalization(name="bn_out")(x)
    return export.randomize_batch_norm(tf.keras.Model(inputs, outputs, name=f"cnn_{variant}"))


def _kernel_layers(model):
    return [layer for layer in model.layers if isinstance(layer, BINARY_KERNEL_LAYERS)]


def _source(model, kind, tmp_path):
    if kind == "object":
        return model
    path = tmp_path / f"{model.name}.{kind}"
    model.save(path)
    return str(path)


# (model, variant, source): every variant of both models, each saved format used.
ROUND_TRIPS = [
    ("mlp", "float", "h5"),
    ("mlp", "binaryconnect", "keras"),
    ("mlp", "binarynet", "object"),
    ("cnn", "float", "keras"),
    ("cnn", "binaryconnect", "object"),
    ("cnn", "binarynet", "h5"),  # clipped phase: switchable quantisers in both phases convert
]


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            name, variant, kind = case
            tmp = tmp_path_factory.mktemp(f"{name}_{variant}_{kind}")
            model = _mlp(variant) if name == "mlp" else _cnn(variant, clipped=variant == "binarynet")
            if variant == "binarynet" and name == "cnn":
                assert bnn_keras.find_switchables(model)[0].clipping_enabled
            out = tmp / "model.tflite"
            verify_inputs = "embedded" if (name, variant) == ("mlp", "binarynet") else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = export.export(
                    _source(model, kind, tmp), out, target="lce",
                    verify_inputs=verify_inputs, num_verify=200,
                )
            user_warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
            cache[case] = (model, result, out, user_warnings)
        return cache[case]

    return get


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=["-".join(c) for c in ROUND_TRIPS])
def test_lce_round_trip(round_trips, case):
    name, variant, _ = case
    model, result, out, user_warnings = round_trips(case)
    ops = export.flatbuffer_ops(result.flatbuffer)
    n_kernel = len(_kernel_layers(model))
    n_conv = sum(isinstance(layer, lq.layers.QuantConv2D) for layer in _kernel_layers(model))

    if variant == "binarynet":
        # Every binary-input-and-kernel layer, the rewritten dense ones included.
        assert ops.count("LceBconv2d") == n_kernel
        assert "FULLY_CONNECTED" not in ops and "CONV_2D" not in ops
        assert all(r.binary for r in result.report.layers if r.name in {l.name for l in _kernel_layers(model)})
        assert not any("no binary op" in w for w in user_warnings)
    else:
        assert "LceBconv2d" not in ops
        assert ops.count("CONV_2D") == n_conv
        assert ops.count("FULLY_CONNECTED") == n_kernel - n_conv
        assert any("no binary op" in w for w in user_warnings)  # lce without binary layers warns
        reason = "input not binarised" if variant == "binaryconnect" else "input and kernel not binarised"
        assert all(r.note.startswith(reason) for r in result.report.layers if r.name in {l.name for l in _kernel_layers(model)})

    # Fidelity within the thresholds.
    v = result.report.verification
    assert v["top1_agreement"] == 1.0 and v["top1_agreement_strict"] == 1.0
    assert v["max_abs_diff"] <= 1e-4 * max(1.0, v["max_abs_reference"])
    if (name, variant) == ("mlp", "binarynet"):
        assert v["inputs"] == "embedded test" and v["num_inputs"] == 200

    # Report totals consistent with the file.
    report = result.report
    assert report.file_bytes == len(result.flatbuffer) == os.path.getsize(out)
    assert report.layer_bytes + report.unattributed_bytes <= report.file_bytes
    assert report.unattributed_bytes == 0
    saved = json.loads(export.report_path(out).read_text())
    assert saved["file_bytes"] == report.file_bytes and saved["file"] == "model.tflite"
    assert [l["name"] for l in saved["layers"]] == [r.name for r in report.layers]


def test_binarynet_sizes_are_bit_packed(round_trips):
    """Packed filters: out * kh * kw * ceil(in / 32) int32 words, plus 2 floats per channel."""
    model, result, _, _ = round_trips(("cnn", "binarynet", "h5"))
    by_name = {r.name: r for r in result.report.layers}
    for layer in _kernel_layers(model):
        kernel = layer.kernel.shape
        kh, kw = (kernel[0], kernel[1]) if len(kernel) == 4 else (1, 1)
        cin, cout = kernel[-2], kernel[-1]
        packed = cout * kh * kw * math.ceil(cin / 32) * 4
        post = 2 * 4 * cout  # at most a float multiplier and bias per channel (BN folded)
        assert packed <= by_name[layer.name].bytes <= packed + post + 64, layer.name
        assert by_name[layer.name].ops[-1] == "LceBconv2d"
        assert by_name[layer.name].binary_params == cin * cout * kh * kw
    # Ideal: 1 bit per binary weight, 32 per other parameter (BN: 4 per channel); no flags.
    binary = sum(int(np.prod(l.kernel.shape)) for l in _kernel_layers(model))
    bn = sum(4 * l.gamma.shape[0] for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization))
    assert result.report.ideal_bytes == pytest.approx(binary / 8 + 4 * bn)
    assert result.report.binary_mac_share == pytest.approx(1.0)
    assert result.report.layer_bytes < 2 * result.report.ideal_bytes  # tiny model: 3 channels pad to 32


def test_mlp_report_names_ops_per_layer(round_trips):
    _, result, _, _ = round_trips(("mlp", "binarynet", "object"))
    rows = {r.name: r for r in result.report.layers}
    assert result.report.rewritten_dense == ["dense_1", "dense_out"]
    assert rows["dense_1"].ops == ["RESHAPE", "LceQuantize", "LceBconv2d"]
    assert rows["dense_out"].ops[0] == "LceBconv2d"
    assert rows["dense_1"].note == "binary dense rewritten as a 1x1 LceBconv2d"
    # 784 inputs pack into 25 int32 words per filter; BN folds into one int32 threshold
    # per channel (the output is bit-packed for the next layer); + the 16 B reshape target.
    assert rows["dense_1"].bytes == 64 * 25 * 4 + 64 * 4 + 16
    # The last layer writes floats: a multiplier and a bias per channel instead.
    assert rows["dense_out"].bytes == 10 * 2 * 4 + 2 * 10 * 4
    assert rows["bn_1"].ops == [] and rows["bn_1"].bytes == 0
    table = result.report.table()
    assert "| dense_1 | QuantDense | RESHAPE, LceQuantize, LceBconv2d | 6,672 |" in table


def test_dense_rewrite_preserves_outputs_exactly():
    rng = np.random.default_rng(0)
    for model, shape in ((_mlp("binarynet"), (28, 28, 1)), (_cnn("binarynet"), CNN_INPUT)):
        rewritten, names, skipped = export.rewrite_binary_dense(model)
        assert names == [l.name for l in model.layers if isinstance(l, lq.layers.QuantDense)]
        assert skipped == {}
        x = rng.standard_normal((64, *shape)).astype(np.float32)
        assert np.max(np.abs(rewritten(x).numpy() - model(x).numpy())) == 0.0
    # Float and binary-weight-only dense layers are left alone.
    model = _mlp("binaryconnect")
    assert export.rewrite_binary_dense(model) == (model, [], {})


def test_dense_rewrite_in_nested_sequential_model():
    inner = tf.keras.Sequential(
        [
            tf.keras.Input((16,)),
            lq.layers.QuantDense(8, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                 kernel_constraint="weight_clip", name="inner_dense"),
        ],
        name="inner",
    )
    inputs = tf.keras.Input((16,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="head")(inner(inputs)))
    rewritten, names, _ = export.rewrite_binary_dense(model)
    assert names == ["inner_dense"]
    x = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    assert np.max(np.abs(rewritten(x).numpy() - model(x).numpy())) == 0.0


def test_rewrite_shrinks_the_file():
    model = _mlp("binarynet")
    with pytest.warns(UserWarning, match="no binary op"):
        plain = export.convert(model, "lce", rewrite_dense=False)
    rewritten = export.convert(model, "lce")
    assert "LceBconv2d" not in export.flatbuffer_ops(plain.flatbuffer)
    assert export.flatbuffer_ops(plain.flatbuffer).count("FULLY_CONNECTED") == 2
    rows = {r.name: r for r in plain.report.layers}
    assert rows["dense_1"].note.startswith("binary dense layer not rewritten (rewrite_dense=False)")
    assert rows["dense_1"].bytes == 784 * 64 * 4 + 64 * 4  # float32 weights, BN folded into them + a bias
    # 32 bits -> 1 bit per weight, for both dense layers.
    saved = 4 * (784 * 64 + 64 * 10) - 4 * (64 * 25 + 10 * 2)
    assert plain.report.file_bytes - rewritten.report.file_bytes == pytest.approx(saved, abs=1024)
    assert rewritten.report.file_bytes < plain.report.file_bytes / 15
    assert plain.report.verification["top1_agreement"] == 1.0


def test_tflite_keeps_binary_layers_float(round_trips, tmp_path):
    model = _cnn("binarynet")
    path = tmp_path / "cnn.keras"
    model.save(path)
    result = export.convert(str(path), "tflite")
    ops = export.flatbuffer_ops(result.flatbuffer)
    assert not [op for op in ops if op.startswith("Lce")]
    assert ops.count("CONV_2D") == 2 and ops.count("FULLY_CONNECTED") == 1
    assert "SIGN" in ops  # larq's sign runs as float ops
    assert not any(r.binary for r in result.report.layers)
    assert all("stock TFLite has no binary ops" in r.note for r in result.report.layers if r.name.startswith(("conv", "dense")))
    assert result.report.verification["top1_agreement"] == 1.0
    # Float weights: 32 bits each, so about 32x the bit-packed LCE file's weights.
    _, lce_result, _, _ = round_trips(("cnn", "binarynet", "h5"))
    binary = sum(int(np.prod(l.kernel.shape)) for l in _kernel_layers(model))
    assert result.report.layer_bytes >= 4 * binary
    assert result.report.file_bytes > 8 * lce_result.report.file_bytes


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda d: (d / "x.keras").write_text("not a model") and d / "x.keras", "cannot load a Keras model"),
        (lambda d: d / "missing.keras", "no such model file"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "is not a Keras model"),
    ],
    ids=["text-named-keras", "missing", "not-keras-suffix"],
)
def test_bad_model_paths_are_one_line_errors(tmp_path, make_path, message):
    path = make_path(tmp_path)
    out = tmp_path / "out.tflite"
    with pytest.raises(export.ExportError, match=message) as error:
        export.export(str(path), out)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    assert not out.exists() and not export.report_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({path.name} - {"missing.keras"})


def test_bad_options_fail_before_converting(tmp_path):
    model = _mlp("float")
    out = tmp_path / "out.tflite"
    with pytest.raises(export.ExportError, match="target must be one of 'lce', 'tflite', got 'gpu'"):
        export.export(model, out, target="gpu")
    with pytest.raises(export.ExportError, match="lce_target must be"):
        export.convert(model, lce_target="riscv")
    with pytest.raises(export.ExportError, match="LCE converter options"):
        export.convert(model, "tflite", inference_input_type=tf.int8)
    with pytest.raises(export.ExportError, match=r"shape \(3, 5\), the model expects \(N, 28, 28, 1\)"):
        export.convert(model, verify_inputs=np.zeros((3, 5)))
    with pytest.raises(export.ExportError, match="no such verification file"):
        export.convert(model, verify_inputs=str(tmp_path / "nope.npy"))
    with pytest.raises(export.ExportError, match="cannot load verification data 'no_such_set'"):
        export.convert(model, verify_inputs="no_such_set")
    with pytest.raises(export.ExportError, match="output folder does not exist"):
        export.export(model, tmp_path / "missing" / "out.tflite")
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_leaves_no_file(tmp_path, monkeypatch):
    model = _tiny_float_model()
    x = np.random.default_rng(2).standard_normal((50, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    original = export.FlatbufferRunner.predict
    monkeypatch.setattr(export.FlatbufferRunner, "predict", lambda self, x: [-y for y in original(self, x)])
    out = tmp_path / "tiny.tflite"
    with pytest.raises(export.ExportVerificationError) as error:
        export.export(model, out, target="tflite", verify_inputs=str(tmp_path / "x.npy"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("tflite flatbuffer disagrees with Keras on 50 x.npy inputs: top-1 agreement")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]  # no output, no temp file


def test_save_is_atomic(round_trips, tmp_path, monkeypatch):
    _, result, _, _ = round_trips(("mlp", "binarynet", "object"))
    out = tmp_path / "m.tflite"
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(out):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(export.ExportError, match="cannot write .*disk full"):
        export.save(result, out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "replace", real_replace)
    assert export.save(result, out) == out
    assert out.read_bytes() == result.flatbuffer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite", "m.tflite.report.json"]


def test_is_binarizing_recognises_sign_quantizers():
    for q in ("ste_sign", "approx_sign", "swish_sign", "vanilla_ste_sign", "clipped_ste_sign",
              "switchable_ste_sign", lq.quantizers.SteSign(), bnn_keras.quantizers.SwitchableSteSign(True)):
        assert export.is_binarizing(q), q
    for q in (None, "ste_heaviside", "ste_tern", "dorefa_quantizer", lq.quantizers.NoOp(precision=1)):
        assert not export.is_binarizing(q), q
    assert export.is_binarizing("magnitude_aware_sign", kernel=True)
    assert not export.is_binarizing("magnitude_aware_sign")


def test_cli_writes_file_and_prints_report(tmp_path, capsys):
    model = _mlp("binarynet")
    path = tmp_path / "mlp.keras"
    model.save(path)
    out = tmp_path / "mlp.tflite"
    argv = [str(path), "--target", "lce", "--out", str(out), "--verify-data", "embedded", "--num-verify", "50"]
    assert export.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| dense_1 | QuantDense | RESHAPE, LceQuantize, LceBconv2d | 6,672 |" in printed
    assert "verified on 50 embedded test inputs" in printed
    assert os.path.getsize(out) == json.loads(export.report_path(out).read_text())["file_bytes"]
    # Errors: one line on stderr, exit status 2, nothing written.
    assert export.main([str(tmp_path / "nope.keras"), "--out", str(tmp_path / "x.tflite")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "x.tflite").exists()


def _tiny_float_model(seed: int = 0) -> tf.keras.Model:
    inputs = tf.keras.Input((6,))
    head = tf.keras.layers.Dense(4, kernel_initializer=tf.keras.initializers.GlorotUniform(seed), name="head")
    return tf.keras.Model(inputs, head(inputs), name="tiny")


def test_int8_io_is_passed_to_lce_and_verified():
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    model = _tiny_float_model()
    with pytest.warns(UserWarning, match="int8 input requested but the flatbuffer's input is not int8"):
        export.convert(model, inference_input_type=tf.int8, inference_output_type=tf.int8, verify=False)
    x = np.random.default_rng(0).standard_normal((200, 6)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LCE: default int8 range "only for latency tests"
        result = export.convert(
            model, inference_input_type=tf.int8, inference_output_type=tf.int8,
            experimental_default_int8_range=(-4.0, 4.0), verify_inputs=x, num_verify=len(x), min_top1=0.5,
        )
    assert result.report.notes == []  # the file's input and output are int8
    assert "FULLY_CONNECTED" in export.flatbuffer_ops(result.flatbuffer)
    assert result.report.options["experimental_default_int8_range"] == (-4.0, 4.0)

    interpreter = Interpreter(result.flatbuffer)
    step_in, step_out = interpreter.input_scales[0], interpreter.output_scales[0]
    assert step_in == pytest.approx(8 / 255) and step_out == pytest.approx(8 / 255)  # (-4, 4) in 255 steps
    expected = model.predict(x, verbose=0)
    # Inside the int8 range: a saturated output would differ by far more than rounding.
    assert np.max(np.abs(x)) < 4 - step_in and np.max(np.abs(expected)) < 4 - step_out
    # Rounding budget: half an input step on each input (times the unit's sum |w|), half an
    # output step, and int8 weights (step <= max |w| / 127) off by half a step, times the
    # quantised inputs' sum |x| (each |x| + half a step). The int32 bias rounds far finer.
    kernel = model.get_layer("head").kernel.numpy()
    bound = (
        0.5 * step_in * np.abs(kernel).sum(0).max()
        + 0.5 * step_out
        + 0.5 * np.abs(kernel).max() / 127 * (np.abs(x).sum(1).max() + 0.5 * step_in * x.shape[1])
    )
    assert bound < 3 * step_out  # a few output steps
    (actual,) = export.FlatbufferRunner(result.flatbuffer, "lce").predict(x)
    v = result.report.verification  # int8 I/O quantised and dequantised by the runner
    assert v["max_abs_diff"] == pytest.approx(np.max(np.abs(expected - actual)), abs=1e-6)
    assert v["max_abs_diff"] <= bound
    # The top class changes only where Keras' top two are within twice the bound.
    top_two = np.sort(expected, -1)[:, -2:]
    changed = np.argmax(actual, -1) != np.argmax(expected, -1)
    assert np.all(top_two[changed, 1] - top_two[changed, 0] <= 2 * bound)
    assert v["top1_agreement_strict"] == pytest.approx(1 - np.mean(changed))
    assert v["top1_agreement"] >= 0.5


def test_xcore_reports_zero_padded_same_conv_as_float():
    inputs = tf.keras.Input((6, 6, 32))
    x = lq.layers.QuantConv2D(32, 3, padding="same", pad_values=0.0, use_bias=False, name="conv",
                              input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                              kernel_constraint="weight_clip")(inputs)
    model = tf.keras.Model(inputs, x, name="zero_pad")
    with pytest.warns(UserWarning, match="no binary op"):
        result = export.convert(model, lce_target="xcore", verify=False)
    (row,) = result.report.layers
    assert row.ops == ["LceQuantize", "LceDequantize", "CONV_2D"] and not row.binary
    assert row.note == "SAME padding with pad_values=0 is unsupported on xcore; use pad_values=1.0"
    assert result.report.lce_target == "xcore"

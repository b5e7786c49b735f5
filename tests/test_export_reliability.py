"""Export's failures as a user meets them: a kill or a full disk mid-write, a model file
that carries code, custom layers, long messages, bad flags, and regressors' verification.

Every command-line check runs ``bnn-keras export`` (`bnn_keras.cli.main`) and expects
exit status 0, or one line ``bnn-keras: error: ...`` with exit status 2 and nothing
written. Models are tiny float Dense layers converted with the stock TFLite converter.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import cli, export, files, models
from bnn_keras.export import conversion, loading
from bnn_keras.export.errors import one_line
from bnn_keras.export.verify import check_flatbuffer

REPO = Path(__file__).resolve().parent.parent
IN = 6


def _dense(units: int, seed: int = 0, bias: float = 0.0, name: str = "dense") -> tf.keras.Model:
    inputs = tf.keras.Input((IN,), name="x")
    layer = tf.keras.layers.Dense(units, kernel_initializer=tf.keras.initializers.GlorotUniform(seed), name="head")
    model = tf.keras.Model(inputs, layer(inputs), name=name)
    layer.bias.assign(np.full(units, bias, np.float32))
    return model


def _saved(model: tf.keras.Model, path: Path) -> str:
    model.save(path)
    return str(path)


def _export(capsys, *argv: str) -> tuple[int, str]:
    """``bnn-keras export ARGV`` in this process: (exit status, stderr, or stdout when 0).

    A failure must be one line ``bnn-keras: error: ...`` with exit status 2.
    """
    status = cli.main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    if status == 0:
        return status, captured.out
    assert status == 2 and captured.err.count("\n") == 1 and captured.err.startswith("bnn-keras: error: "), captured.err
    return status, captured.err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- 1. the file and its report


def test_the_report_holds_the_file_size_and_sha256_and_check_pair_compares_them(tmp_path):
    out = tmp_path / "m.tflite"
    export.export(_dense(4), out, target="tflite", verify=False)
    report = json.loads(export.report_path(out).read_text())
    assert report["file_bytes"] == out.stat().st_size and report["file_sha256"] == _sha256(out)
    assert conversion.check_pair(out)["file_sha256"] == _sha256(out)

    payload = bytearray(out.read_bytes())
    payload[-1] ^= 1  # same size, one bit off
    out.write_bytes(bytes(payload))
    with pytest.raises(export.ExportError, match=r"m.tflite.report.json' describes another file than '.*m.tflite'"):
        conversion.check_pair(out)
    export.report_path(out).unlink()
    with pytest.raises(export.ExportError, match=r"no pair: '.*m.tflite.report.json' does not exist"):
        conversion.check_pair(out)


KILLED_SAVE = """
import hashlib, os, signal, sys
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tensorflow as tf
from bnn_keras import export

out, units = sys.argv[1], int(sys.argv[2])
inputs = tf.keras.Input((6,))
result = export.convert(tf.keras.Model(inputs, tf.keras.layers.Dense(units)(inputs)), "tflite", verify=False)
print(hashlib.sha256(result.flatbuffer).hexdigest(), flush=True)
pair, replace = {out, out + ".report.json"}, os.replace

def replace_then_die(src, dst):  # SIGKILL once the first of the two files is in place
    replace(src, dst)
    if os.fspath(dst) in pair:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
export.save(result, out)
"""


def test_a_kill_between_the_two_writes_leaves_no_mismatched_pair_and_the_next_export_cleans_up(tmp_path):
    out = tmp_path / "m.tflite"
    report = export.report_path(out)
    export.export(_dense(4), out, target="tflite", verify=False)  # the earlier pair
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(out), "40"], env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    new_sha256 = killed.stdout.split()[-1]

    # Whatever is on disk, a report never describes another file than the one beside it.
    if report.exists():
        described = json.loads(report.read_text())
        assert (described.get("file_bytes"), described.get("file_sha256")) == (out.stat().st_size, _sha256(out))
    assert _sha256(out) == new_sha256 and not report.exists()  # the file moved in first, its report not yet
    left = {p.name for p in tmp_path.iterdir()} - {"m.tflite"}
    assert left and all(files.TEMPORARY.fullmatch(name) for name in left)  # the staged report (and the old one)
    with pytest.raises(export.ExportError, match="does not exist"):
        conversion.check_pair(out)

    other = tmp_path / ".m-v2.tflite-abc123.tmp.tflite"  # another FILE's temporary: not this export's
    other.write_bytes(b"x")
    result = export.export(_dense(4), out, target="tflite", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "m.tflite", "m.tflite.report.json"]
    assert conversion.check_pair(out)["file_sha256"] == hashlib.sha256(result.flatbuffer).hexdigest()


@pytest.fixture
def small_disk(tmpfs):
    """A 64 KiB tmpfs (needs root; skipped where it cannot be mounted)."""
    return tmpfs("64k")


def test_a_full_disk_keeps_the_earlier_pair_and_leaves_no_temporaries(tmp_path, small_disk, capsys):
    out = small_disk / "m.tflite"
    export.export(_dense(4), out, target="tflite", verify=False)
    before = {p.name: p.read_bytes() for p in small_disk.iterdir()}
    assert sorted(before) == ["m.tflite", "m.tflite.report.json"]
    big = _saved(_dense(4000), tmp_path / "big.keras")  # 24,000 float weights: 96 KB > 64 KiB
    status, err = _export(capsys, big, "--out", out, "--target", "tflite", "--no-verify")
    assert status == 2
    assert {p.name: p.read_bytes() for p in small_disk.iterdir()} == before  # the earlier pair, no temporaries
    assert f"cannot write '{out}': no space left on its device" in err
    assert conversion.check_pair(out)["file_bytes"] == len(before["m.tflite"])


def test_an_unwritable_output_folder_is_one_line_before_converting(tmp_path, capsys, monkeypatch):
    model = _saved(_dense(4), tmp_path / "m.keras")
    monkeypatch.setattr(conversion, "_to_flatbuffer", lambda *a: pytest.fail("converted before checking --out"))
    status, err = _export(capsys, model, "--out", "/proc/x.tflite", "--target", "tflite")
    assert status == 2 and "cannot write '/proc/x.tflite': its folder takes no new files" in err


# --------------------------------------------------------------------------- 2. model files that carry code


def _marker_lambda(marker: str):
    """A function that creates `marker` when it runs: stored as bytecode (and its closure)."""
    return lambda x: (open(marker, "w").close(), x)[1]


def _code_model(marker: Path, path: Path) -> str:
    """Save a model whose Lambda layer creates `marker` at `path`."""
    inputs = tf.keras.Input((IN,), name="x")
    model = tf.keras.Model(inputs, tf.keras.layers.Lambda(_marker_lambda(str(marker)), name="touch")(inputs))
    model.save(path)
    marker.unlink()  # building (and tracing) the model ran the function
    return str(path)


def test_an_h5_lambda_is_refused_before_it_runs_and_loads_with_unsafe_load(tmp_path, capsys):
    import h5py

    marker = tmp_path / "ran"
    path = _code_model(marker, tmp_path / "evil.h5")
    with h5py.File(path) as h5:
        assert '"function_type": "lambda"' in h5.attrs["model_config"]  # stored as bytecode
    out = tmp_path / "evil.tflite"
    status, err = _export(capsys, path, "--out", out, "--target", "tflite")
    assert status == 2 and not marker.exists()
    assert f"'{path}' holds a Lambda layer 'touch', which would run code once loaded: refused; pass --unsafe-load" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.h5"]

    status, _ = _export(capsys, path, "--out", out, "--target", "tflite", "--no-verify", "--unsafe-load")
    assert status == 0 and marker.exists()  # trusted: its code ran
    assert conversion.check_pair(out)["layers"][0]["kind"] == "Lambda"


def test_a_saved_model_is_checked_through_its_keras_metadata(tmp_path):
    marker = tmp_path / "ran"
    evil = _code_model(marker, tmp_path / "evil_saved_model")
    with pytest.raises(export.ExportError, match=r"holds a Lambda layer 'touch', .*pass unsafe_load=True only"):
        export.convert(evil, "tflite", verify=False)
    assert not marker.exists()

    plain = _saved(_dense(4), tmp_path / "plain_saved_model")
    assert export.convert(plain, "tflite", verify=False).report.layers[0].name == "head"
    os.unlink(Path(plain) / "keras_metadata.pb")
    with pytest.raises(export.ExportError, match=r"has no keras_metadata.pb, so its layers cannot be checked"):
        export.convert(plain, "tflite", verify=False)


def test_find_code_looks_into_nested_configs_and_passes_our_own_models():
    nested = {"class_name": "Functional", "config": {"name": "outer", "layers": [
        {"class_name": "Sequential", "config": {"name": "inner", "layers": [
            {"class_name": "Lambda", "config": {"name": "deep", "function": ["4wEA", None, None]}}]}}]}}
    assert loading.find_code(nested) == "Lambda layer 'deep'"
    custom = {"class_name": "Custom", "config": {"name": "gate", "fn": ["4wEA", None, None], "fn_type": "lambda"}}
    assert loading.find_code(custom) == "serialised Python function in layer 'gate'"
    tf_op = {"class_name": "TFOpLambda", "config": {"name": "w", "function": "io.write_file"}}
    assert loading.find_code(tf_op) == "TFOpLambda layer 'w' calling tf.io.write_file"
    assert loading.find_code({"class_name": "TFOpLambda", "config": {"name": "a", "function": "math.add"}}) is None
    binarynet = models.mlp((4,), 2, hidden_units=(3,), variant="binarynet")
    assert loading.find_code(json.loads(binarynet.to_json())) is None


# --------------------------------------------------------------------------- 3. --import


LAYERS_MODULE = """
import tensorflow as tf

@tf.keras.utils.register_keras_serializable(package="reliability")
class Doubling(tf.keras.layers.Layer):
    def call(self, x):
        return 2.0 * x
"""


def test_import_registers_custom_layers_before_loading(tmp_path, capsys, monkeypatch):
    (tmp_path / "reliability_layers.py").write_text(LAYERS_MODULE)
    (tmp_path / "broken_layers.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = tf.keras.utils.get_custom_objects()
    try:
        import reliability_layers

        inputs = tf.keras.Input((IN,))
        path = _saved(tf.keras.Model(inputs, reliability_layers.Doubling()(inputs)), tmp_path / "custom.keras")
        del registry["reliability>Doubling"], sys.modules["reliability_layers"]  # as in a new process
        out = tmp_path / "custom.tflite"

        status, err = _export(capsys, path, "--out", out, "--target", "tflite")
        assert status == 2 and "names module 'reliability_layers', which Keras would import" in err
        assert "--import reliability_layers" in err and not out.exists()
        status, err = _export(capsys, path, "--out", out, "--target", "tflite", "--import", "reliability_layers")
        assert status == 0, err
        assert conversion.check_pair(out)["layers"][0]["kind"] == "Doubling"

        status, err = _export(capsys, path, "--out", out, "--import", "no_such_layers")
        assert status == 2 and "--import 'no_such_layers': no such module on sys.path" in err
        status, err = _export(capsys, path, "--out", out, "--import", "broken_layers")
        assert status == 2 and "--import 'broken_layers': importing it failed: RuntimeError: needs a GPU" in err
    finally:
        registry.pop("reliability>Doubling", None)
        for name in ("reliability_layers", "broken_layers"):
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------- 4. long messages


def test_a_long_message_keeps_its_advice_at_the_end():
    advice = "pass --data-dir with a prepared dataset, or use the embedded default ('embedded')"
    message = "dataset 'mnist' is not prepared (e.g. see: the docs) " + "because of a long reason " * 20 + f": {advice}"
    assert len(message) > 500
    text = one_line(ValueError(message))
    assert text.startswith("ValueError: dataset 'mnist' is not prepared") and text.endswith(f" ... {advice}")
    assert len(text) <= len("ValueError: ") + 300
    # No clause to keep whole: the message stays as it is (one line).
    assert one_line(ValueError("word " * 100)) == "ValueError: " + ("word " * 100).strip()


# --------------------------------------------------------------------------- 5. --default-int8-range


def test_the_int8_range_must_be_finite_before_the_converter_sees_it(tmp_path, capsys, monkeypatch):
    model = _saved(_dense(4), tmp_path / "m.keras")
    import larq_compute_engine as lce

    monkeypatch.setattr(lce, "convert_keras_model", lambda *a, **k: pytest.fail("the converter got the range"))
    for low, high in [("0", "inf"), ("-inf", "1"), ("nan", "1"), ("2", "-2e3")]:
        status, err = _export(capsys, model, "--out", tmp_path / "m.tflite", "--default-int8-range", low, high)
        assert status == 2 and "--default-int8-range must be two finite numbers MIN < MAX, got (" in err, err
    with pytest.raises(export.ExportError, match=r"experimental_default_int8_range must be two finite numbers"):
        export.convert(_dense(4), experimental_default_int8_range=(0.0, float("inf")), verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]


def test_negative_numbers_in_scientific_notation_are_values(tmp_path, capsys):
    model = _saved(_dense(4), tmp_path / "m.keras")
    out = tmp_path / "m.tflite"
    status, err = _export(capsys, model, "--out", out, "--default-int8-range", "-1e3", "1E3", "--int8-io", "--no-verify")
    assert status == 0, err
    assert conversion.check_pair(out)["options"]["experimental_default_int8_range"] == [-1000.0, 1000.0]


# --------------------------------------------------------------------------- 6. outputs without a class axis


@pytest.fixture(scope="module")
def regressor():
    """A Dense(1) regressor, its TFLite file, a twin whose bias is 0.5 higher, and inputs."""
    model = _dense(1, seed=4, bias=0.25, name="regressor")
    x = np.random.default_rng(7).standard_normal((32, IN)).astype(np.float32)
    flatbuffer = export.convert(model, "tflite", verify=False).flatbuffer
    return model, flatbuffer, _dense(1, seed=4, bias=0.75, name="twin"), x


def test_a_regressor_file_off_by_half_fails_verification(regressor):
    model, flatbuffer, twin, x = regressor
    (actual,) = export.FlatbufferRunner(flatbuffer, "tflite").predict(x)
    expected = twin.predict(x, verbose=0)
    diff = float(np.max(np.abs(expected - actual)))
    assert diff == pytest.approx(0.5, abs=1e-5)
    allowed = 1e-3 * max(1.0, float(np.max(np.abs(expected))))
    with pytest.raises(export.ExportVerificationError) as error:
        check_flatbuffer(twin, flatbuffer, "tflite", x, "given", min_top1=0.99, max_abs_diff=None)
    assert f"output 'head' max |diff| {diff:.3g} > {allowed:.3g} (0.001 x max(1, max |Keras output|))" in str(error.value)
    # A tolerance wider than the error passes it.
    v = check_flatbuffer(
        twin, flatbuffer, "tflite", x, "given", min_top1=0.99, max_abs_diff=None, value_rtol=0.6
    )
    assert v["value_outputs"]["head"]["max_abs_diff"] == pytest.approx(diff, abs=1e-6)


def test_the_right_regressor_file_passes_and_says_which_check_applied(regressor, tmp_path, capsys):
    model, flatbuffer, _, x = regressor
    v = check_flatbuffer(model, flatbuffer, "tflite", x, "given", min_top1=0.99, max_abs_diff=None)
    assert v["top1_outputs"] == [] and list(v["value_outputs"]) == ["head"] and v["value_rtol"] == 1e-3
    assert v["value_outputs"]["head"]["max_abs_diff"] <= 1e-5
    assert v["top1_agreement"] == v["top1_agreement_strict"] == 1.0  # no class axis: none can disagree

    path = _saved(model, tmp_path / "regressor.keras")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "regressor.tflite"
    argv = ["--out", out, "--target", "tflite", "--verify-data", tmp_path / "x.npy", "--value-rtol", "0.01"]
    status, printed = _export(capsys, path, *argv, "--max-abs-diff", "1e-4")
    assert status == 0, printed
    assert "outputs without a class axis within 0.01 x max(1, max |Keras output|)" in printed
    assert "top-1 agreement" not in printed
    saved = conversion.check_pair(out)["verification"]
    assert saved["max_abs_diff_allowed"] == 1e-4 and saved["value_rtol"] == 0.01
    reference = float(np.max(np.abs(model.predict(x, verbose=0))))
    assert saved["value_outputs"]["head"]["allowed"] == pytest.approx(0.01 * max(1.0, reference))
    status, err = _export(capsys, path, *argv, "--max-abs-diff", "-1")
    assert status == 2 and "argument --max-abs-diff: expected a number >= 0, got -1" in err


# --------------------------------------------------------------------------- 7. clear errors up front


def test_verification_sizes_and_advice_name_export_flags(tmp_path, capsys, monkeypatch):
    import tensorflow_datasets as tfds

    model = _saved(_dense(4), tmp_path / "m.keras")
    out = tmp_path / "m.tflite"
    needed = 999_999_999 * IN * 4 / 2**30
    status, err = _export(capsys, model, "--out", out, "--num-verify", "999999999")
    assert status == 2 and f"--num-verify 999999999 needs {needed:.1f} GiB of verification inputs" in err
    for bad in ("0", "-3"):
        status, err = _export(capsys, model, "--out", out, "--num-verify", bad)
        assert status == 2 and f"argument --num-verify: expected an integer >= 1, got {bad}" in err

    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "no_tfds"))
    status, err = _export(capsys, model, "--out", out, "--verify-data", "mnist", "--target", "tflite")
    assert status == 2 and "cannot load verification data 'mnist': it is not prepared" in err
    assert "--verify-data 'embedded' or a .npy file" in err and "--data-dir" not in err and "--raw-dir" not in err

    first, second = tf.keras.Input((IN,)), tf.keras.Input((IN,))
    two = _saved(tf.keras.Model([first, second], tf.keras.layers.Add()([first, second]), name="two"), tmp_path / "two.keras")
    status, err = _export(capsys, two, "--out", out)
    assert status == 2 and "single-input models only, 'two' has 2; use --no-verify" in err and "verify=False" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "two.keras"]


def test_the_allowed_difference_grows_with_outputs_larger_than_one():
    model = _dense(1, seed=4, bias=6.0, name="large")
    x = np.random.default_rng(7).standard_normal((32, IN)).astype(np.float32)
    flatbuffer = export.convert(model, "tflite", verify=False).flatbuffer
    v = check_flatbuffer(model, flatbuffer, "tflite", x, "given", min_top1=0.99, max_abs_diff=None)
    largest = float(np.max(np.abs(model.predict(x, verbose=0))))
    assert largest > 4.0
    assert v["value_outputs"]["head"]["allowed"] == pytest.approx(1e-3 * largest)


def test_max_wrong_share_is_an_inclusive_bound():
    """Every input off (a constant shift: top-1 still agrees): passes only at max_wrong_share 1.0."""
    model, twin = _dense(10, seed=2, bias=0.0, name="classes"), _dense(10, seed=2, bias=0.5, name="twin")
    x = np.random.default_rng(3).standard_normal((20, IN)).astype(np.float32)
    flatbuffer = export.convert(model, "tflite", verify=False).flatbuffer
    v = check_flatbuffer(twin, flatbuffer, "tflite", x, "given", min_top1=0.99, max_abs_diff=None, output_rtol=1e-4, max_wrong_share=1.0)
    assert v["class_values"]["head"]["wrong_inputs"] == 1.0 and v["top1_agreement"] == 1.0
    with pytest.raises(export.ExportVerificationError, match=r"on 100% of inputs \(> 99%\)"):
        check_flatbuffer(twin, flatbuffer, "tflite", x, "given", min_top1=0.99, max_abs_diff=None, output_rtol=1e-4,
                         max_wrong_share=0.99)


def test_localisation_is_only_run_on_a_pass_when_asked_for():
    model = _dense(10, seed=2, name="classes")
    x = np.random.default_rng(3).standard_normal((8, IN)).astype(np.float32)
    flatbuffer = export.convert(model, "tflite", verify=False).flatbuffer
    v = check_flatbuffer(model, flatbuffer, "tflite", x, "given", min_top1=0.99, max_abs_diff=None, output_rtol=1e-4)
    assert "localisation" not in v and not any(n.startswith("localised") for n in v["notes"])


def test_a_max_abs_diff_of_zero_is_met_by_a_bit_exact_file():
    """Integer weights and inputs: Keras and TFLite sum exactly, so the bound 0 passes (it is inclusive)."""
    inputs = tf.keras.Input((IN,))
    layer = tf.keras.layers.Dense(3, kernel_initializer="ones", bias_initializer="zeros", name="head")
    model = tf.keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(0).integers(-3, 4, (8, IN)).astype(np.float32)
    flatbuffer = export.convert(model, "tflite", verify=False).flatbuffer
    v = check_flatbuffer(model, flatbuffer, "tflite", x, "given", min_top1=0.0, max_abs_diff=0.0)
    assert v["max_abs_diff"] == 0.0 and v["max_abs_diff_allowed"] == 0.0

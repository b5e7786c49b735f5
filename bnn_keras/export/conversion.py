"""`convert` a model to a checked, described flatbuffer; `save` or `export` it to a file.

``target="lce"`` runs `larq_compute_engine.convert_keras_model` after rewriting binary
dense layers as 1x1 binary convolutions; ``target="tflite"`` runs the stock
`tf.lite.TFLiteConverter`, so binary layers stay float. `save` writes the file, then its
report with the file's size and sha256; `check_pair` says whether the two still match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import math
import numbers
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import tensorflow as tf

from bnn_keras import files
from bnn_keras.export.attribution import build_report
from bnn_keras.export.errors import ExportError, one_line
from bnn_keras.export.flatbuffer import check_target
from bnn_keras.export.loading import ModelLike, as_model
from bnn_keras.export.report import ConversionReport, json_text
from bnn_keras.export.pitfalls import rewrite_lce_pitfalls
from bnn_keras.export.rewrite import rewrite_binary_dense
from bnn_keras.export.verify import (
    MAX_WRONG_SHARE,
    OUTPUT_RTOL,
    VALUE_RTOL,
    VerifyInputs,
    check_flatbuffer,
    check_output_options,
    verification_inputs,
)

__all__ = ["LCE_TARGETS", "ExportResult", "check_pair", "convert", "export", "report_path", "save"]

LCE_TARGETS: tuple[str, ...] = ("arm", "xcore")
"""Hardware targets Larq Compute Engine's converter knows."""


@dataclasses.dataclass
class ExportResult:
    """The flatbuffer and what it holds."""

    flatbuffer: bytes
    report: ConversionReport

    def __repr__(self) -> str:
        return f"ExportResult({self.report.model_name!r} -> {self.report.target}, {len(self.flatbuffer):,} bytes)"

    def save(self, out_path: str | os.PathLike) -> Path:
        """Write the flatbuffer, then ``OUT.report.json``; see `save`."""
        return save(self, out_path)


def _dtype(value: Any, name: str) -> tf.dtypes.DType:
    try:
        dtype = tf.as_dtype(value)
    except TypeError:
        dtype = None
    if dtype not in (tf.float32, tf.int8):
        raise ExportError(f"{name} must be tf.float32 or tf.int8, got {value!r}")
    return dtype


def _int8_range(value: Any) -> tuple[float, float]:
    """(min, max), both finite and min < max: LCE's converter crashes (SIGSEGV) on an infinite one."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ExportError(f"experimental_default_int8_range must be two finite numbers MIN < MAX, got {value!r}")
    return low, high


def _converter_options(
    target: str,
    lce_target: str,
    inference_input_type: Any,
    inference_output_type: Any,
    experimental_default_int8_range: tuple[float, float] | None,
) -> tuple[tf.dtypes.DType, tf.dtypes.DType, tuple[float, float] | None]:
    """The checked (input type, output type, int8 range) for the converter."""
    check_target(target)
    if lce_target not in LCE_TARGETS:
        raise ExportError(f"lce_target must be 'arm' or 'xcore', got {lce_target!r}")
    input_type = _dtype(inference_input_type, "inference_input_type")
    output_type = _dtype(inference_output_type, "inference_output_type")
    int8_range = None
    if experimental_default_int8_range is not None:
        int8_range = _int8_range(experimental_default_int8_range)
    if target == "tflite" and (input_type != tf.float32 or output_type != tf.float32 or int8_range):
        raise ExportError(
            "int8 I/O and experimental_default_int8_range are LCE converter options; "
            "target='tflite' exports a float model"
        )
    return input_type, output_type, int8_range


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_thresholds(min_top1: float, num_verify: int, max_abs_diff: float | None, value_rtol: float) -> None:
    if not (_is_number(min_top1) and 0.0 <= min_top1 <= 1.0):
        raise ExportError(f"min_top1 must be a number in [0, 1], got {min_top1!r}")
    if not (isinstance(num_verify, numbers.Integral) and not isinstance(num_verify, bool) and num_verify >= 1):
        raise ExportError(f"num_verify must be an integer >= 1, got {num_verify!r}")
    if max_abs_diff is not None and not (_is_number(max_abs_diff) and max_abs_diff >= 0):
        raise ExportError(f"max_abs_diff must be a number >= 0 or None, got {max_abs_diff!r}")
    if not (_is_number(value_rtol) and value_rtol > 0):
        raise ExportError(f"value_rtol must be a number > 0, got {value_rtol!r}")


def _to_flatbuffer(
    model: tf.keras.Model, options: dict[str, Any]
) -> tuple[bytes, tf.keras.Model, list[str], dict[str, str], dict[str, str]]:
    """(flatbuffer, the model converted, rewritten dense layers, skipped ones and why, pitfall rewrites)."""
    target = options["target"]
    converted_model, rewritten, skipped, fixes = model, [], {}, {}
    try:
        if target == "lce":
            import larq_compute_engine as lce

            if options["rewrite_dense"]:
                converted_model, rewritten, skipped = rewrite_binary_dense(model)
            converted_model, fixes = rewrite_lce_pitfalls(converted_model, options["lce_target"])
            flatbuffer = lce.convert_keras_model(
                converted_model,
                inference_input_type=tf.as_dtype(options["inference_input_type"]),
                inference_output_type=tf.as_dtype(options["inference_output_type"]),
                target=options["lce_target"],
                experimental_default_int8_range=options["experimental_default_int8_range"],
            )
        else:
            flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{target} conversion of {model.name!r} failed: {one_line(error)}") from None
    return bytes(flatbuffer), converted_model, rewritten, skipped, fixes


def _warn(report: ConversionReport) -> None:
    """Warn (at `convert`'s caller) of an LCE file without binary ops and of int8 I/O not met."""
    if report.target == "lce" and report.binary_ops == 0:
        warnings.warn(
            f"model {report.model_name!r} has no layer with binarised input and kernel that LCE "
            "lowers: the LCE flatbuffer holds no binary op (it is a float TFLite model)",
            UserWarning,
            stacklevel=3,
        )
    for note in report.notes:
        if note.startswith("int8 "):
            warnings.warn(note, UserWarning, stacklevel=3)


def convert(
    model_or_path: ModelLike,
    target: str = "lce",
    *,
    inference_input_type: Any = tf.float32,
    inference_output_type: Any = tf.float32,
    experimental_default_int8_range: tuple[float, float] | None = None,
    lce_target: str = "arm",
    rewrite_dense: bool = True,
    verify: bool = True,
    verify_inputs: VerifyInputs = None,
    num_verify: int = 100,
    min_top1: float = 0.99,
    max_abs_diff: float | None = None,
    value_rtol: float = VALUE_RTOL,
    output_rtol: float | None = OUTPUT_RTOL,
    max_wrong_share: float = MAX_WRONG_SHARE,
    localise: bool = False,
    seed: int = 0,
    unsafe_load: bool = False,
) -> ExportResult:
    """Convert a Keras model to a flatbuffer, check it against Keras, and report on it.

    Args:
        model_or_path: a `tf.keras.Model`, or a saved ``.keras`` / ``.h5`` / SavedModel.
        target: ``"lce"`` (Larq Compute Engine, binary ops) or ``"tflite"`` (stock, float).
        inference_input_type, inference_output_type: ``tf.float32`` or ``tf.int8``
            (LCE only), passed to `larq_compute_engine.convert_keras_model`.
        experimental_default_int8_range: (min, max) fallback int8 range (LCE only).
        lce_target: ``"arm"`` or ``"xcore"``; xcore cannot lower SAME zero-padded bconvs.
        rewrite_dense: rewrite binary `QuantDense` layers as 1x1 binary convs (LCE only).
        verify: run the flatbuffer and compare with Keras (`bnn_keras.export.verify`).
        verify_inputs: an array, a ``.npy`` path, or a dataset name for
            `bnn_keras.data.load` (its test split); None draws seeded N(0, 1) inputs.
        num_verify: at most this many verification inputs.
        min_top1: lowest top-1 agreement with Keras that passes (0 to 1), for outputs
            with a class axis (a last axis of more than one value).
        max_abs_diff: largest max |output difference| that passes; None: not checked
            (binary activations flip on float rounding near 0, so top-1 is the default).
        value_rtol: an output without a class axis (one value per example) passes when
            max |diff| <= value_rtol x max(1, max |Keras output|); int8 outputs need more.
        output_rtol: an input's class output is off when its max |diff| > output_rtol x
            the output's max |Keras output| (float rounding: 1e-6); None: not checked.
        max_wrong_share: most share of inputs whose class outputs may be off (sign flips
            of pre-sign values within rounding of 0 move a few); a file off on more fails.
        localise: also on a pass, name where the file departs from Keras in the report
            (a failure always does): ``verification["localisation"]`` and a note.
        seed: seed of the random verification inputs.
        unsafe_load: load a saved model even if it carries code (a `Lambda` layer):
            only for a file you trust (`bnn_keras.export.loading`).

    Returns:
        `ExportResult` with the flatbuffer bytes and the `ConversionReport`.

    Raises:
        ExportError: unreadable model, bad option, conversion failure (one line).
        ExportVerificationError: outputs disagree with Keras beyond the thresholds.

    Warns:
        UserWarning: ``target="lce"`` and the flatbuffer holds no binary op.

    ```python
    result = convert(model, "lce", verify_inputs="embedded", num_verify=200)
    result.report.file_bytes, result.report.verification["top1_agreement"]
    ```
    """
    input_type, output_type, int8_range = _converter_options(
        target, lce_target, inference_input_type, inference_output_type, experimental_default_int8_range
    )
    _check_thresholds(min_top1, num_verify, max_abs_diff, value_rtol)
    check_output_options(output_rtol, max_wrong_share)
    model = as_model(model_or_path, unsafe_load=unsafe_load)
    if not model.built or not model.inputs:
        raise ExportError(f"model {model.name!r} has no defined inputs: build it on an Input first")
    # Inputs before converting, so a bad dataset name fails fast.
    inputs = verification_inputs(verify_inputs, model, num_verify, seed) if verify else None
    options: dict[str, Any] = {
        "target": target,
        "inference_input_type": input_type.name,
        "inference_output_type": output_type.name,
        "experimental_default_int8_range": int8_range,
        "lce_target": lce_target,
        "rewrite_dense": rewrite_dense,
    }
    flatbuffer, converted_model, rewritten, skipped, fixes = _to_flatbuffer(model, options)
    report = build_report(
        model, converted_model, flatbuffer, target=target, lce_target=lce_target,
        rewrite_dense=rewrite_dense, rewritten=rewritten, skipped=skipped, options=options, fixes=fixes,
    )
    _warn(report)
    if inputs is not None:
        report.verification = check_flatbuffer(
            model, flatbuffer, target, *inputs, min_top1=min_top1, max_abs_diff=max_abs_diff, value_rtol=value_rtol,
            output_rtol=output_rtol, max_wrong_share=max_wrong_share, localise=localise,
        )
        report.notes.extend(report.verification["notes"])
    return ExportResult(flatbuffer, report)


def report_path(out_path: str | os.PathLike) -> Path:
    """Where the report of ``OUT`` goes: ``OUT.report.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".report.json")


def _check_out_path(out_path: Path) -> None:
    """`out_path` can be written: its folder exists and takes new files, and it is no folder."""
    if not out_path.parent.is_dir():
        raise ExportError(f"output folder does not exist: {str(out_path.parent)!r}")
    if out_path.is_dir():
        raise ExportError(f"output path is a folder: {str(out_path)!r}")
    try:
        os.unlink(_stage(out_path, b""))
    except OSError as error:
        raise ExportError(
            f"cannot write {str(out_path)!r}: its folder takes no new files ({error.strerror or error})"
        ) from None


def _temporaries(out_path: Path) -> list[Path]:
    """Temporary files a killed `save` to `out_path` left (`bnn_keras.files.TEMPORARY` names)."""
    own = [
        re.compile(re.escape(f".{path.name}-") + r"\w+\.tmp" + re.escape(path.suffix))
        for path in (out_path, report_path(out_path))
    ]
    return [
        out_path.parent / name
        for name in os.listdir(out_path.parent)
        if files.TEMPORARY.fullmatch(name) and any(pattern.fullmatch(name) for pattern in own)
    ]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage(path: Path, payload: bytes) -> str:
    """Write `payload` to a new temporary file beside `path`, named as `bnn_keras.files` does."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", suffix=f".tmp{path.suffix}", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # an ordinary file's mode, not mkstemp's 0600
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def _swap_in(out_path: Path, staged_model: str, staged_report: str) -> None:
    """Move the staged pair into place so that a report on disk always describes the file beside it.

    The old report steps aside (kept until the new file is in place), then the file moves
    in, then its report: a kill in between leaves the new file without a report, never
    beside the old one.
    """
    report_file = report_path(out_path)
    old_report = None
    if report_file.exists():
        old_report = _stage(report_file, b"")
        os.replace(report_file, old_report)
    try:
        os.replace(staged_model, out_path)
    except BaseException:
        if old_report is not None:
            os.replace(old_report, report_file)
        raise
    try:
        os.replace(staged_report, report_file)
    finally:
        if old_report is not None:
            os.unlink(old_report)


def _write_error(out_path: Path, error: OSError, size: int) -> ExportError:
    if error.errno == errno.ENOSPC:  # while staging: nothing was moved yet
        return ExportError(
            f"cannot write {str(out_path)!r}: no space left on its device for the {size:,}-byte file "
            "and its report; what was there is unchanged"
        )
    return ExportError(f"cannot write {str(out_path)!r}: {error.strerror or one_line(error)}")


def save(result: ExportResult, out_path: str | os.PathLike) -> Path:
    """Write ``OUT`` (the flatbuffer), then ``OUT.report.json``, which holds its size and sha256.

    Both are written in full to temporary files in the same folder first (``.OUT-*.tmp*``,
    as `bnn_keras.files` names them, with an ordinary file's mode under the umask), then
    moved into place, the flatbuffer first: when writing fails (a full disk), what was
    there is left as it was; a report on disk always describes the file beside it (see
    `check_pair`). Temporary files of an earlier `save` to ``OUT`` that was killed are
    removed first. Exports into one folder write their pairs in turn (a lock on the folder).

    ```python
    save(convert(model, "lce"), "model.tflite")   # -> model.tflite, model.tflite.report.json
    check_pair("model.tflite")["file_sha256"]
    ```
    """
    out_path = Path(out_path)
    _check_out_path(out_path)
    with files.locked_folder(out_path.parent, wait=True):  # exports into one folder write their pairs in turn
        return _save_pair(result, out_path)


def _save_pair(result: ExportResult, out_path: Path) -> Path:
    for temporary in _temporaries(out_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    data = result.report.to_dict()
    data.update(
        file=out_path.name,
        file_bytes=len(result.flatbuffer),
        file_sha256=hashlib.sha256(result.flatbuffer).hexdigest(),
    )
    staged: list[str] = []
    try:
        staged.append(_stage(out_path, result.flatbuffer))
        staged.append(_stage(report_path(out_path), json_text(data).encode("utf-8")))
        _swap_in(out_path, *staged)
    except OSError as error:
        raise _write_error(out_path, error, len(result.flatbuffer)) from None
    finally:
        for temporary in staged:  # moved into place, or left over from a failure
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    return out_path


def check_pair(out_path: str | os.PathLike) -> dict[str, Any]:
    """The report of ``OUT`` if it describes the file ``OUT`` (byte size and sha256), else `ExportError`.

    ```python
    report = check_pair("model.tflite")   # raises when an export was cut short
    report["file_sha256"], report["verification"]
    ```
    """
    out_path = Path(out_path)
    report_file = report_path(out_path)
    for path in (out_path, report_file):
        if not path.is_file():
            raise ExportError(f"{str(out_path)!r} and its report are no pair: {str(path)!r} does not exist")
    try:
        data = files.read_json(report_file)
        payload = out_path.read_bytes()
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot check {str(out_path)!r} against its report: {one_line(error)}") from None
    if not isinstance(data, dict) or "file_sha256" not in data:
        raise ExportError(f"{str(report_file)!r} holds no file_sha256 (written by an older bnn_keras): export again")
    sha256 = hashlib.sha256(payload).hexdigest()
    if data.get("file_bytes") != len(payload) or data["file_sha256"] != sha256:
        raise ExportError(
            f"{str(report_file)!r} describes another file than {str(out_path)!r} "
            f"({data.get('file_bytes')} bytes, sha256 {str(data['file_sha256'])[:12]}..., the file has "
            f"{len(payload)} bytes, sha256 {sha256[:12]}...): export again"
        )
    return data


def export(model_or_path: ModelLike, out_path: str | os.PathLike, target: str = "lce", **options: Any) -> ExportResult:
    """`convert` then `save`: nothing is written unless conversion and verification pass.

    ```python
    result = export("runs/vgg10/model.keras", "vgg10.tflite", target="lce")
    ```
    """
    out_path = Path(out_path)
    _check_out_path(out_path)  # before converting, which takes seconds
    result = convert(model_or_path, target, **options)
    save(result, out_path)
    return result

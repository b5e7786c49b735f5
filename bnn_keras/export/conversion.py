"""`convert` a model to a checked, described flatbuffer; `save` or `export` it to a file.

``target="lce"`` runs `larq_compute_engine.convert_keras_model` after rewriting binary
dense layers as 1x1 binary convolutions; ``target="tflite"`` runs the stock
`tf.lite.TFLiteConverter`, so binary layers stay float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
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
from bnn_keras.export.rewrite import rewrite_binary_dense
from bnn_keras.export.verify import VerifyInputs, check_flatbuffer, verification_inputs

__all__ = ["LCE_TARGETS", "ExportResult", "convert", "export", "report_path", "save"]

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
        """Write the flatbuffer and ``OUT.report.json`` atomically; see `save`."""
        return save(self, out_path)


def _dtype(value: Any, name: str) -> tf.dtypes.DType:
    try:
        dtype = tf.as_dtype(value)
    except TypeError:
        dtype = None
    if dtype not in (tf.float32, tf.int8):
        raise ExportError(f"{name} must be tf.float32 or tf.int8, got {value!r}")
    return dtype


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
        low, high = (float(v) for v in experimental_default_int8_range)
        if not low < high:
            raise ExportError(f"experimental_default_int8_range needs min < max, got ({low}, {high})")
        int8_range = (low, high)
    if target == "tflite" and (input_type != tf.float32 or output_type != tf.float32 or int8_range):
        raise ExportError(
            "int8 I/O and experimental_default_int8_range are LCE converter options; "
            "target='tflite' exports a float model"
        )
    return input_type, output_type, int8_range


def _check_thresholds(min_top1: float, num_verify: int) -> None:
    if not 0.0 <= min_top1 <= 1.0:
        raise ExportError(f"min_top1 must be in [0, 1], got {min_top1!r}")
    if num_verify < 1:
        raise ExportError(f"num_verify must be >= 1, got {num_verify!r}")


def _to_flatbuffer(
    model: tf.keras.Model, options: dict[str, Any]
) -> tuple[bytes, tf.keras.Model, list[str], dict[str, str]]:
    """(flatbuffer, the model converted, rewritten dense layers, skipped ones and why)."""
    target = options["target"]
    converted_model, rewritten, skipped = model, [], {}
    try:
        if target == "lce":
            import larq_compute_engine as lce

            if options["rewrite_dense"]:
                converted_model, rewritten, skipped = rewrite_binary_dense(model)
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
    return bytes(flatbuffer), converted_model, rewritten, skipped


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
    seed: int = 0,
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
        verify: run the flatbuffer and compare with Keras (max |diff|, top-1 agreement).
        verify_inputs: an array, a ``.npy`` path, or a dataset name for
            `bnn_keras.data.load` (its test split); None draws seeded N(0, 1) inputs.
        num_verify: at most this many verification inputs.
        min_top1: lowest top-1 agreement with Keras that passes (0 to 1).
        max_abs_diff: largest max |output difference| that passes; None: not checked
            (binary activations flip on float rounding near 0, so top-1 is the default).
        seed: seed of the random verification inputs.

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
    _check_thresholds(min_top1, num_verify)
    model = as_model(model_or_path)
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
    flatbuffer, converted_model, rewritten, skipped = _to_flatbuffer(model, options)
    report = build_report(
        model, converted_model, flatbuffer, target=target, lce_target=lce_target,
        rewrite_dense=rewrite_dense, rewritten=rewritten, skipped=skipped, options=options,
    )
    _warn(report)
    if inputs is not None:
        report.verification = check_flatbuffer(
            model, flatbuffer, target, *inputs, min_top1=min_top1, max_abs_diff=max_abs_diff
        )
    return ExportResult(flatbuffer, report)


def report_path(out_path: str | os.PathLike) -> Path:
    """Where the report of ``OUT`` goes: ``OUT.report.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".report.json")


def _check_out_folder(out_path: Path) -> None:
    if not out_path.parent.is_dir():
        raise ExportError(f"output folder does not exist: {str(out_path.parent)!r}")


def save(result: ExportResult, out_path: str | os.PathLike) -> Path:
    """Write ``OUT`` (the flatbuffer) and ``OUT.report.json``, each atomically.

    Both go through a temporary file in the same folder and `os.replace`
    (`bnn_keras.files`), with an ordinary file's mode under the umask; when anything
    fails, neither is left behind (a report written before a failing flatbuffer is removed).

    ```python
    save(convert(model, "lce"), "model.tflite")   # -> model.tflite, model.tflite.report.json
    ```
    """
    out_path = Path(out_path)
    _check_out_folder(out_path)
    if out_path.is_dir():
        raise ExportError(f"output path is a folder: {str(out_path)!r}")
    report_file = report_path(out_path)
    data = result.report.to_dict()
    data["file"] = out_path.name
    files.write_text(report_file, json_text(data))
    try:
        files.write_bytes(out_path, result.flatbuffer)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(report_file)
        if isinstance(error, OSError):
            raise ExportError(f"cannot write {str(out_path)!r}: {one_line(error)}") from None
        raise
    return out_path


def export(model_or_path: ModelLike, out_path: str | os.PathLike, target: str = "lce", **options: Any) -> ExportResult:
    """`convert` then `save`: nothing is written unless conversion and verification pass.

    ```python
    result = export("runs/vgg10/model.keras", "vgg10.tflite", target="lce")
    ```
    """
    out_path = Path(out_path)
    _check_out_folder(out_path)  # before converting, which takes seconds
    result = convert(model_or_path, target, **options)
    save(result, out_path)
    return result

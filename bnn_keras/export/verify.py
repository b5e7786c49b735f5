"""Check a flatbuffer against Keras: the inputs to run, and the agreement that passes.

An output with a class axis (last axis longer than 1) is checked twice:

- top-1 agreement >= min_top1, counting Keras outputs tied for the top as either class;
- its values: an input is off when max |diff| > output_rtol x the output's scale (max
  |Keras output| over the inputs), and at most max_wrong_share of the inputs may be off.
  Top-1 alone measures nothing when every input lands on one Keras class (the report
  notes it); a file off by a tenth of the logit scale still agrees on every argmax.

Binary activations flip where a pre-sign value is within float rounding of 0, which moves
the outputs of a few inputs by more than rounding: hence a share of inputs, not all. Such
a flip can move the top class of an input too (a chaotic untrained network: QuickNet with
random BatchNorm statistics moves 2 of 100), so a top-1 agreement under min_top1 is
excused when it is the only failure, the localisation finds sign flips (not wrong values),
and every input whose top class moved is among the inputs off (the result says
``top1_excused`` and a note says why). An
output without a class axis (one value per example, e.g. a regressor's) passes when
max |diff| <= value_rtol x max(1, max |Keras output|) on every input. A bound on max
|output difference| of every output is optional. On a failure (or on request) the report
says where the file departs (`bnn_keras.export.localise`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import tensorflow as tf

from bnn_keras.export.errors import ExportError, ExportVerificationError, one_line
from bnn_keras.export.flatbuffer import FlatbufferRunner, parse
from bnn_keras.export.localise import localise as localise_departure

__all__ = [
    "LOCALISE_INPUTS",
    "MAX_VERIFY_BYTES",
    "MAX_WRONG_SHARE",
    "OUTPUT_RTOL",
    "VALUE_RTOL",
    "VerifyInputs",
    "check_flatbuffer",
    "check_output_options",
    "verification_inputs",
]

VerifyInputs = Union[np.ndarray, str, os.PathLike, None]
"""An array, a ``.npy`` path, a dataset name, or None for seeded N(0, 1) noise."""

_TIE_RTOL = 1e-5  # Keras outputs this close (relative) to the top one count as tied for top-1

VALUE_RTOL = 1e-3
"""Default tolerance of outputs without a class axis, relative to max(1, max |Keras output|)."""

OUTPUT_RTOL = 1e-4
"""Default tolerance of class outputs per input, relative to the output's max |Keras output|.

Float rounding measured on the test models' LCE and TFLite files: at most 1.2e-6 at the
outputs, 1.9e-6 at intermediate layers."""

MAX_WRONG_SHARE = 0.1
"""Default most share of inputs whose class outputs may be off beyond `OUTPUT_RTOL` (sign flips)."""

LOCALISE_INPUTS = 16
"""Inputs localisation compares on: those whose outputs are off the most."""

_TFLITE_INT8 = 9  # tflite::TensorType_INT8: quantised outputs are off by whole steps, not rounding

MAX_VERIFY_BYTES = 1 << 30
"""Most memory (1 GiB) the verification inputs may take: num_verify x input values x 4 bytes."""


def _read_inputs(verify_inputs: VerifyInputs, num_verify: int) -> tuple[Any, str]:
    """(inputs, description) from an array, a .npy file or a dataset's test split."""
    if isinstance(verify_inputs, np.ndarray):
        return verify_inputs, "given"
    if isinstance(verify_inputs, (str, os.PathLike)) and str(verify_inputs).endswith(".npy"):
        if not Path(verify_inputs).is_file():
            raise ExportError(f"no such verification file: {str(verify_inputs)!r}")
        try:
            x = np.load(verify_inputs, allow_pickle=False)
        except Exception as error:
            raise ExportError(f"cannot read {str(verify_inputs)!r}: {one_line(error)}") from None
        return x, Path(verify_inputs).name
    if isinstance(verify_inputs, str):
        from bnn_keras import data  # lazily: only verification by dataset name needs it

        try:
            splits = data.load(verify_inputs, batch_size=min(num_verify, 256), limit=num_verify)
        except data.DataUnavailableError:  # its advice names train's flags, which export has not
            raise ExportError(
                f"cannot load verification data {verify_inputs!r}: it is not prepared in the TFDS data "
                "folder ($TFDS_DATA_DIR, default ~/tensorflow_datasets): set TFDS_DATA_DIR to a folder "
                "that holds it prepared, or give verify_inputs 'embedded' or a .npy file of inputs"
            ) from None
        except ValueError as error:
            raise ExportError(f"cannot load verification data {verify_inputs!r}: {one_line(error)}") from None
        return np.concatenate([images.numpy() for images, _ in splits.test]), f"{verify_inputs} test"
    raise ExportError(
        f"verify_inputs must be an array, a .npy path or a dataset name, got {type(verify_inputs).__name__}"
    )


def _check_memory(num_verify: int, shape: tuple[int | None, ...]) -> None:
    """Refuse `num_verify` inputs of `shape` that would take more than `MAX_VERIFY_BYTES`."""
    if any(d is None for d in shape):
        return
    values = int(np.prod(shape, dtype=np.int64))
    needed = num_verify * values * 4
    if needed > MAX_VERIFY_BYTES:
        raise ExportError(
            f"num_verify {num_verify} needs {needed / 2**30:,.1f} GiB of verification inputs "
            f"({num_verify:,} x {values:,} values x 4 bytes), over the {MAX_VERIFY_BYTES / 2**30:g} GiB "
            f"limit: use num_verify <= {MAX_VERIFY_BYTES // (4 * values):,}"
        )


def verification_inputs(
    verify_inputs: VerifyInputs, model: tf.keras.Model, num_verify: int, seed: int
) -> tuple[np.ndarray, str]:
    """(inputs, description): an array, a .npy file, a dataset name, or seeded N(0, 1) noise."""
    shape = tuple(model.inputs[0].shape[1:]) if len(model.inputs) == 1 else None
    if shape is None:
        raise ExportError(
            f"verification supports single-input models only, {model.name!r} has {len(model.inputs)}; use verify=False"
        )
    if not isinstance(verify_inputs, np.ndarray) and not str(verify_inputs).endswith(".npy"):
        _check_memory(num_verify, shape)
    if verify_inputs is None:
        if any(d is None for d in shape):
            raise ExportError(f"cannot draw random inputs for the unknown input shape {shape}")
        rng = np.random.default_rng(seed)
        return rng.standard_normal((num_verify, *shape)).astype(np.float32), "random N(0,1)"
    x, source = _read_inputs(verify_inputs, num_verify)
    x = np.asarray(x, dtype=np.float32)[:num_verify]
    if x.shape[1:] != shape or len(x) == 0:
        raise ExportError(
            f"verification inputs have shape {x.shape}, the model expects (N, {', '.join(map(str, shape))})"
        )
    return x, source


def _has_class_axis(output: np.ndarray) -> bool:
    """Whether a batch of outputs holds class scores: a last axis of more than one value."""
    return output.ndim >= 2 and output.shape[-1] > 1


def _agreement(expected: list[np.ndarray], actual: list[np.ndarray]) -> tuple[list[float], list[float], list[float]]:
    """Per output: max |diff|, and for class scores strict and tie-aware top-1 agreement."""
    diffs, strict, tie_aware = [], [], []
    for e, a in zip(expected, actual):
        a = a.reshape(e.shape)
        diffs.append(float(np.max(np.abs(e - a))))
        if _has_class_axis(e):
            e2, a2 = e.reshape(-1, e.shape[-1]), a.reshape(-1, e.shape[-1])
            strict.append(float(np.mean(np.argmax(e2, -1) == np.argmax(a2, -1))))
            tie_aware.append(float(np.mean(~_top_moved(e2, a2))))
    return diffs, strict, tie_aware


def _top_moved(e2: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """Per row of class scores: whether the file's top class is not (tied for) Keras' top.

    Keras outputs that tie for the top (common in untrained binary nets, whose logits are
    integers) make either class a correct top-1.
    """
    chosen = np.take_along_axis(e2, np.argmax(a2, -1)[:, None], -1)[:, 0]
    return ~(chosen >= np.max(e2, -1) - _TIE_RTOL * np.maximum(1.0, np.max(np.abs(e2), -1)))  # NaN: moved


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and bool(np.isfinite(value))


def check_output_options(output_rtol: float | None, max_wrong_share: float) -> None:
    """Raise `ExportError` unless `output_rtol` is None or > 0 and `max_wrong_share` is in [0, 1]."""
    if output_rtol is not None and not (_is_number(output_rtol) and output_rtol > 0):
        raise ExportError(f"output_rtol must be a number > 0 or None, got {output_rtol!r}")
    if not (_is_number(max_wrong_share) and 0.0 <= max_wrong_share <= 1.0):
        raise ExportError(f"max_wrong_share must be a number in [0, 1], got {max_wrong_share!r}")


def _relative(e: np.ndarray, a: np.ndarray) -> tuple[float, np.ndarray]:
    """(the output's scale max |Keras output|, each input's max |diff| over that scale)."""
    e2, a2 = e.reshape(len(e), -1), a.reshape(len(e), -1)
    scale = float(np.max(np.abs(e2))) if e2.size else 0.0
    return scale, np.max(np.abs(a2 - e2), axis=1) / max(scale, np.finfo(np.float32).tiny)


def _class_values(e: np.ndarray, a: np.ndarray, output_rtol: float | None, quantised: bool) -> dict[str, Any]:
    """One class output's values against Keras: its scale, per-input relative differences, classes reached."""
    scale, relative = _relative(e, a)
    checked = output_rtol is not None and not quantised
    return {
        "scale": scale,
        "max_relative_diff": float(np.max(relative)),
        "median_relative_diff": float(np.median(relative)),
        "wrong_inputs": float(np.mean(relative > output_rtol)) if checked else None,
        "checked": checked,
        "int8": quantised,
        "keras_classes": int(len(np.unique(np.argmax(e.reshape(-1, e.shape[-1]), -1)))),
        "classes": int(e.shape[-1]),
    }


def _top1_failure(result: dict[str, Any], min_top1: float) -> str:
    return f"top-1 agreement {100 * result['top1_agreement']:.1f}% < {100 * min_top1:.1f}%"


def _flipped_within_rounding(expected: list[np.ndarray], actual: list[np.ndarray], output_rtol: float) -> int:
    """Inputs whose top class moved (beyond ties) though their outputs agree within `output_rtol`."""
    count = 0
    for e, a in zip(expected, actual):
        if _has_class_axis(e):
            moved = _top_moved(e.reshape(-1, e.shape[-1]), a.reshape(-1, e.shape[-1]))
            _, relative = _relative(e, a)
            count += int(np.sum(moved.reshape(len(e), -1).any(axis=1) & (relative <= output_rtol)))
    return count


def _failures(result: dict[str, Any], min_top1: float, max_abs_diff: float | None) -> list[str]:
    """What in `result` is beyond the thresholds, one phrase each."""
    failures = []
    if result["top1_agreement"] < min_top1:
        failures.append(_top1_failure(result, min_top1))
    if max_abs_diff is not None and result["max_abs_diff"] > max_abs_diff:
        failures.append(f"max |diff| {result['max_abs_diff']:.3g} > {max_abs_diff:.3g}")
    for name, value in result["class_values"].items():
        if value["wrong_inputs"] is not None and value["wrong_inputs"] > result["max_wrong_share"]:
            failures.append(
                f"output {name!r} off by more than {result['output_rtol']:g} x its scale {value['scale']:.3g} "
                f"on {100 * value['wrong_inputs']:.0f}% of inputs (> {100 * result['max_wrong_share']:g}%), "
                f"up to {value['max_relative_diff']:.2g} x"
            )
    for name, value in result["value_outputs"].items():
        if value["max_abs_diff"] > value["allowed"]:
            failures.append(
                f"output {name!r} max |diff| {value['max_abs_diff']:.3g} > {value['allowed']:.3g} "
                f"({result['value_rtol']:g} x max(1, max |Keras output|))"
            )
    return failures


def _notes(class_values: dict[str, dict[str, Any]], num_inputs: int) -> list[str]:
    """Report notes: class outputs whose inputs all land on one Keras class (top-1 tells nothing there)."""
    return [
        f"all {num_inputs} verification inputs land on one Keras class of output {name!r} "
        f"(of {value['classes']}): top-1 agreement measures nothing there, only its values do; "
        "verify on real data (verify_inputs, --verify-data) to exercise the classes"
        for name, value in class_values.items()
        if value["keras_classes"] == 1 and num_inputs > 1
    ]


def _worst_inputs(expected: list[np.ndarray], actual: list[np.ndarray], count: int) -> np.ndarray:
    """Indices of the `count` inputs whose outputs are off the most, relative to each output's scale."""
    relative = np.max([_relative(e, a)[1] for e, a in zip(expected, actual)], axis=0)
    return np.argsort(-relative, kind="stable")[:count]


def _int8_outputs(flatbuffer: bytes, count: int) -> list[bool]:
    """Whether each output of the file is int8 (all False where it cannot be parsed, e.g. several subgraphs)."""
    try:
        parsed = parse(flatbuffer)
    except ExportError:
        return [False] * count
    return [parsed.tensor_types[t] == _TFLITE_INT8 for t in parsed.outputs]


def check_flatbuffer(
    model: tf.keras.Model,
    flatbuffer: bytes,
    runner_target: str,
    x: np.ndarray,
    source: str,
    *,
    min_top1: float,
    max_abs_diff: float | None,
    value_rtol: float = VALUE_RTOL,
    output_rtol: float | None = None,
    max_wrong_share: float = MAX_WRONG_SHARE,
    localise: bool = False,
) -> dict[str, Any]:
    """Run `flatbuffer` and `model` on `x`; the agreement, or `ExportVerificationError`.

    Outputs with a class axis are checked by top-1 agreement (``top1_outputs``; the
    agreement is 1.0 when there is none) and, when `output_rtol` is given (`convert`
    gives `OUTPUT_RTOL`), by their values: at most `max_wrong_share` of the inputs may
    have max |diff| > `output_rtol` x the output's max |Keras output| (``class_values``;
    an int8 output, off by whole quantisation steps, is not checked so). The others pass
    by max |diff| <= `value_rtol` x max(1, max |Keras output|) (``value_outputs``: each
    one's max |diff| and the allowed one). A failure names the first layer where the file
    departs (`bnn_keras.export.localise`, on the `LOCALISE_INPUTS` inputs off the most);
    with `localise` a pass records it too (``localisation`` and a note).

    ```python
    check_flatbuffer(model, flatbuffer, "lce", x, "given", min_top1=0.99, max_abs_diff=None, output_rtol=1e-4)
    # {'inputs': 'given', 'num_inputs': 100, 'max_abs_diff': 0.0, 'top1_agreement': 1.0, ...}
    ```
    """
    check_output_options(output_rtol, max_wrong_share)
    expected = [np.asarray(y) for y in tf.nest.flatten(model.predict(x, batch_size=64, verbose=0))]
    actual = FlatbufferRunner(flatbuffer, runner_target).predict(x)
    actual = [a.reshape(e.shape) for e, a in zip(expected, actual)]
    diffs, strict, tie_aware = _agreement(expected, actual)
    names = list(model.output_names)
    if len(names) != len(expected):
        names = [f"output_{i}" for i in range(len(expected))]
    quantised = _int8_outputs(flatbuffer, len(expected))
    class_values = {
        name: _class_values(e, a, output_rtol, q)
        for name, e, a, q in zip(names, expected, actual, quantised)
        if _has_class_axis(e)
    }
    value_outputs = {
        name: {"max_abs_diff": diff, "allowed": value_rtol * max(1.0, float(np.max(np.abs(e))))}
        for name, e, diff in zip(names, expected, diffs)
        if not _has_class_axis(e)
    }
    result = {
        "inputs": source,
        "num_inputs": int(len(x)),
        "max_abs_diff": max(diffs),
        "max_abs_reference": max(float(np.max(np.abs(e))) for e in expected),
        "top1_agreement": min(tie_aware) if tie_aware else 1.0,
        "top1_agreement_strict": min(strict) if strict else 1.0,
        "min_top1": min_top1,
        "max_abs_diff_allowed": max_abs_diff,
        "top1_outputs": [name for name, e in zip(names, expected) if _has_class_axis(e)],
        "class_values": class_values,
        "output_rtol": output_rtol,
        "max_wrong_share": max_wrong_share,
        "value_outputs": value_outputs,
        "value_rtol": value_rtol,
        "notes": _notes(class_values, len(x)),
    }
    failures = _failures(result, min_top1, max_abs_diff)
    if failures or localise:
        worst = _worst_inputs(expected, actual, LOCALISE_INPUTS)
        found = localise_departure(model, flatbuffer, runner_target, x[worst], rtol=output_rtol or OUTPUT_RTOL)
        result["localisation"] = found.to_dict()
        if localise:
            result["notes"].append(f"localised: {found.summary}")
        top1 = _top1_failure(result, min_top1)
        if (
            failures == [top1] and found.kind == "sign flips" and output_rtol is not None
            and _flipped_within_rounding(expected, actual, output_rtol) == 0
        ):  # every input whose top-1 moved is one the sign flips moved: within max_wrong_share
            failures = []
            result["top1_excused"] = True
            result["notes"].append(
                f"{top1} is excused: every input whose top class moved is among those whose outputs "
                f"sign flips moved ({found.summary.split(':', 1)[0]}), and those stay within max_wrong_share"
            )
    if failures:
        raise ExportVerificationError(
            f"{runner_target} flatbuffer disagrees with Keras on {len(x)} {source} inputs: "
            + "; ".join(failures)
            + f" ({found.summary})"
        )
    return result

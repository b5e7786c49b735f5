"""Check a flatbuffer against Keras: the inputs to run, and the agreement that passes.

Binary activations flip where a pre-sign value is within float rounding of 0, so the
default check of an output with a class axis (last axis longer than 1) is top-1
agreement, counting Keras outputs tied for the top as either class. An output without
one (one value per example, e.g. a regressor's) has no top-1: it passes when
max |diff| <= value_rtol x max(1, max |Keras output|), value_rtol 1e-3 by default.
A bound on max |output difference| of every output is optional.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import tensorflow as tf

from bnn_keras.export.errors import ExportError, ExportVerificationError, one_line
from bnn_keras.export.flatbuffer import FlatbufferRunner
from bnn_keras.export.rewrite import binary_input, leaf_layers

__all__ = ["MAX_VERIFY_BYTES", "VALUE_RTOL", "VerifyInputs", "check_flatbuffer", "verification_inputs"]

VerifyInputs = Union[np.ndarray, str, os.PathLike, None]
"""An array, a ``.npy`` path, a dataset name, or None for seeded N(0, 1) noise."""

_TIE_RTOL = 1e-5  # Keras outputs this close (relative) to the top one count as tied for top-1

VALUE_RTOL = 1e-3
"""Default tolerance of outputs without a class axis, relative to max(1, max |Keras output|)."""

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
            top_a = np.argmax(a2, -1)
            strict.append(float(np.mean(np.argmax(e2, -1) == top_a)))
            # Keras outputs that tie for the top (common in untrained binary nets, whose
            # logits are integers) make either class a correct top-1.
            tolerance = _TIE_RTOL * np.maximum(1.0, np.max(np.abs(e2), -1))
            chosen = np.take_along_axis(e2, top_a[:, None], -1)[:, 0]
            tie_aware.append(float(np.mean(chosen >= np.max(e2, -1) - tolerance)))
    return diffs, strict, tie_aware


def _failures(result: dict[str, Any], min_top1: float, max_abs_diff: float | None) -> list[str]:
    """What in `result` is beyond the thresholds, one phrase each."""
    failures = []
    if result["top1_agreement"] < min_top1:
        failures.append(f"top-1 agreement {100 * result['top1_agreement']:.1f}% < {100 * min_top1:.1f}%")
    if max_abs_diff is not None and result["max_abs_diff"] > max_abs_diff:
        failures.append(f"max |diff| {result['max_abs_diff']:.3g} > {max_abs_diff:.3g}")
    for name, value in result["value_outputs"].items():
        if value["max_abs_diff"] > value["allowed"]:
            failures.append(
                f"output {name!r} max |diff| {value['max_abs_diff']:.3g} > {value['allowed']:.3g} "
                f"({result['value_rtol']:g} x max(1, max |Keras output|))"
            )
    return failures


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
) -> dict[str, Any]:
    """Run `flatbuffer` and `model` on `x`; the agreement, or `ExportVerificationError`.

    Outputs with a class axis are checked by top-1 agreement (``top1_outputs``; the
    agreement is 1.0 when there is none), the others by max |diff| <= `value_rtol` x
    max(1, max |Keras output|) (``value_outputs``: each one's max |diff| and the allowed one).

    ```python
    check_flatbuffer(model, flatbuffer, "lce", x, "given", min_top1=0.99, max_abs_diff=None)
    # {'inputs': 'given', 'num_inputs': 100, 'max_abs_diff': 0.0, 'top1_agreement': 1.0, ...}
    ```
    """
    expected = [np.asarray(y) for y in tf.nest.flatten(model.predict(x, batch_size=64, verbose=0))]
    actual = FlatbufferRunner(flatbuffer, runner_target).predict(x)
    diffs, strict, tie_aware = _agreement(expected, actual)
    names = list(model.output_names)
    if len(names) != len(expected):
        names = [f"output_{i}" for i in range(len(expected))]
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
        "value_outputs": value_outputs,
        "value_rtol": value_rtol,
    }
    failures = _failures(result, min_top1, max_abs_diff)
    if failures:
        hint = ""
        if any(binary_input(layer) for layer in leaf_layers(model)):
            hint = (
                " (binary activations flip where a pre-sign value is within float rounding "
                "of 0, e.g. behind an untrained BatchNormalization)"
            )
        raise ExportVerificationError(
            f"{runner_target} flatbuffer disagrees with Keras on {len(x)} {source} inputs: "
            + "; ".join(failures)
            + hint
        )
    return result

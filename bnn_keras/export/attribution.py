"""Attribute a flatbuffer's ops and constant bytes to Keras layers, and build the report.

TFLite names a tensor after the Keras ops that produced it (``model/conv_1/Conv2D;...``);
fused names can lead with an activation or be cut off, so weight-carrying ops are matched
to a Keras kernel by shape first. Each layer also gets its ideal size (1 bit per binary
weight by Larq's precision, 32 per other parameter) and, when it stayed float, the reason;
the binary-MAC share counts the layers that became binary ops in the file. A file holding
a binary conv LCE 0.16 computes wrongly (`bnn_keras.export.pitfalls`) is refused.
"""

from __future__ import annotations

from typing import Any

import larq as lq
import numpy as np
import tensorflow as tf

from bnn_keras._switch import find_switchables
from bnn_keras.export.errors import ExportError
from bnn_keras.export.flatbuffer import BINARY_OPS, Flatbuffer, Op, parse
from bnn_keras.export.pitfalls import fold_limit_pitfall, wrong_zero_padded_bconvs
from bnn_keras.export.report import ConversionReport, LayerReport
from bnn_keras.export.rewrite import (
    binary_input,
    binary_kernel,
    has_kernel,
    is_binary_precision,
    kernel_quantizer,
    leaf_layers,
)

__all__ = ["build_report"]

_TFLITE_INT8 = 9  # tflite::TensorType_INT8
_FILTER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "LceBconv2d")


def _layer_of(tensor_name: str, known: set[str], model_name: str) -> list[str]:
    """Keras layer names in a TFLite tensor name like 'model/conv_1/Conv2D;model/bn_1/...'."""
    found = []
    for part in tensor_name.split(";"):
        components = part.split("/")
        if components and components[0] == model_name:
            components = components[1:]
        for component in components[:-1] or components:
            if component in known:
                if component not in found:
                    found.append(component)
                break
    return found


def _filter_shape(op: Op, parsed: Flatbuffer) -> tuple[int, ...] | None:
    """The shape of a weight-carrying op's constant filter, else None."""
    if op.name not in _FILTER_OPS or len(op.inputs) < 2:
        return None
    index = op.inputs[1]
    if index < 0 or not parsed.tensor_bytes[index]:
        return None
    return parsed.tensor_shapes[index]


def _kernel_fits(layer: tf.keras.layers.Layer, filter_shape: tuple[int, ...]) -> bool:
    """Whether a flatbuffer filter (OHWI, packed OHW[I/32], depthwise 1HW[I*M], FC OI) is `layer`'s."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        depthwise = getattr(layer, "depthwise_kernel", None)
        if depthwise is None:
            return False
        h, w, i, m = (int(d) for d in depthwise.shape)
        return filter_shape == (1, h, w, i * m)
    shape = tuple(int(d) for d in kernel.shape)
    if len(shape) == 2:
        shape = (1, 1, *shape)
    if len(shape) != 4:
        return False
    h, w, i, o = shape
    if len(filter_shape) == 2:
        return filter_shape == (o, h * w * i)
    return len(filter_shape) == 4 and filter_shape[:3] == (o, h, w) and filter_shape[3] in (i, -(-i // 32))


class _Attribution:
    """Walks the ops once, giving each op and its not-yet-counted constants to one layer."""

    def __init__(self, model: tf.keras.Model, converted_name: str, parsed: Flatbuffer):
        self.parsed = parsed
        self.converted_name = converted_name
        self.layers = leaf_layers(model)
        self.by_name = {layer.name: layer for layer in self.layers}
        self.output_layers = [t._keras_history.layer.name for t in tf.nest.flatten(model.outputs)]
        self.kernel_layers = [layer for layer in self.layers if has_kernel(layer)]
        self.ops_of: dict[str, list[str]] = {name: [] for name in self.by_name}
        self.bytes_of: dict[str, int] = {name: 0 for name in self.by_name}
        self.fused_into: dict[str, str] = {}
        self.unattributed = 0
        self.owner_of_op: list[str | None] = []
        self._with_kernel_op: set[str] = set()
        self._counted: set[int] = set()  # buffers already counted (shared constants count once)
        for op in parsed.ops:
            self._add(op)

    def _candidates(self, op: Op) -> list[str]:
        """Layers named by the op's output tensors (and a binary op's input)."""
        named = list(op.outputs)
        if op.name in BINARY_OPS and op.inputs:
            # A binary op may write bit-packed output named after the *next* layer's input
            # quantiser; its own input is named after this layer's quantiser.
            named = [op.inputs[0], *named]
        candidates: list[str] = []
        for t in named:
            for name in _layer_of(self.parsed.tensor_names[t], set(self.by_name), self.converted_name):
                if name not in candidates:
                    candidates.append(name)
        return candidates

    def _kernel_owner(self, op: Op, candidates: list[str]) -> str | None:
        """The layer whose kernel is this op's filter, preferring a named candidate."""
        filter_shape = _filter_shape(op, self.parsed)
        if filter_shape is None:
            return None
        # Fused names can lead with an activation, or be cut off (TFLite keeps 50
        # characters), or be a graph output's: match the weights to a Keras kernel.
        fits = [
            layer.name
            for layer in self.kernel_layers
            if layer.name not in self._with_kernel_op and _kernel_fits(layer, filter_shape)
        ]
        owner = next((n for n in candidates if n in fits), fits[0] if fits else None)
        if owner is not None:
            self._with_kernel_op.add(owner)
        return owner

    def _owner(self, op: Op, candidates: list[str]) -> str | None:
        owner = self._kernel_owner(op, candidates)
        if owner is None and candidates:
            # Constants belong to a layer with weights (a BN's beta in 'relu/Relu;bn/add').
            owner = next((n for n in candidates if self.by_name[n].weights), candidates[0])
        if owner is None and any(t in self.parsed.outputs for t in op.outputs):
            owner = next((n for n in self.output_layers if n in self.by_name), None)  # names lost
        return owner

    def _constant_bytes(self, op: Op) -> int:
        """Bytes of the op's constant inputs whose buffers were not counted before."""
        parsed, constant = self.parsed, 0
        for t in op.inputs:
            if t >= 0 and parsed.tensor_bytes[t] and parsed.tensor_buffers[t] not in self._counted:
                self._counted.add(parsed.tensor_buffers[t])
                constant += parsed.tensor_bytes[t]
        return constant

    def _add(self, op: Op) -> None:
        candidates = self._candidates(op)
        owner = self._owner(op, candidates)
        self.owner_of_op.append(owner)
        constant = self._constant_bytes(op)
        if owner is None:
            self.unattributed += constant
            return
        self.ops_of[owner].append(op.name)
        self.bytes_of[owner] += constant
        for other in candidates:
            if other != owner:
                self.fused_into.setdefault(other, owner)


def _float_reason(layer: tf.keras.layers.Layer, target: str, lce_target: str, skipped: dict[str, str], rewrite_dense: bool) -> str:
    """Why a layer with a kernel stayed a float op."""
    is_binary_input, is_binary_kernel = binary_input(layer), binary_kernel(layer)
    if not is_binary_input and not is_binary_kernel:
        return "input and kernel not binarised"
    if target == "tflite":
        return "stock TFLite has no binary ops: binary layers stay float (use target='lce')"
    if not is_binary_input:
        return "input not binarised (binary weights alone run as a float op)"
    if not is_binary_kernel:
        return "kernel not binarised"
    if isinstance(layer, lq.layers.QuantDense):
        if not rewrite_dense:
            return "binary dense layer not rewritten (rewrite_dense=False): LCE keeps dense float"
        return f"binary dense layer not rewritten: {skipped.get(layer.name, 'unknown reason')}"
    if not isinstance(layer, lq.layers.QuantConv2D):
        return f"LCE has no binary kernel for {type(layer).__name__}"
    return _binary_conv_float_reason(layer, lce_target)


def _binary_conv_float_reason(layer: lq.layers.QuantConv2D, lce_target: str) -> str:
    """Why LCE kept a binary `QuantConv2D` float."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "LCE needs channels_last"
    groups = int(getattr(layer, "groups", 1) or 1)
    channels = int(layer.kernel.shape[-2]) * groups
    if groups > 1 and channels and (channels // groups) % 32:
        return (
            f"grouped binary conv needs a multiple of 32 input channels per group "
            f"(has {channels // groups})"
        )
    too_large = fold_limit_pitfall(layer)
    if too_large:
        return too_large
    pad_values = float(tf.keras.backend.get_value(getattr(layer, "pad_values", 0.0)))
    if layer.padding == "same" and pad_values != 1.0 and lce_target != "arm":
        return f"SAME padding with pad_values={pad_values:g} is unsupported on {lce_target}; use pad_values=1.0"
    return "LCE kept it float (no rule matched; see the LCE converter's log)"


def _switch_flags(model: tf.keras.Model) -> set[int]:
    """Ids of bnn_keras' scalar switch variables, which are not parameters of the network."""
    return {id(s.switch_variable) for s in find_switchables(model)}


def _parameter_bits(model: tf.keras.Model) -> dict[str, tuple[int, int, float]]:
    """Per layer: (parameters, binary parameters, ideal bits); switch flags excluded.

    A kernel is binary by Larq's metadata (`is_binary_precision` of its quantiser).
    """
    flags = _switch_flags(model)
    seen: set[int] = set()
    result = {}
    for layer in leaf_layers(model):
        binary_weights = is_binary_precision(kernel_quantizer(layer))
        kernels = {id(getattr(layer, a, None)) for a in ("kernel", "depthwise_kernel")}
        params = binary = 0
        for weight in layer.weights:
            if id(weight) in flags or id(weight) in seen:
                continue
            seen.add(id(weight))
            count = int(np.prod(weight.shape))
            params += count
            if binary_weights and id(weight) in kernels:
                binary += count
        result[layer.name] = (params, binary, binary + 32.0 * (params - binary))
    return result


def _layer_macs(layer: tf.keras.layers.Layer, flags: set[int]) -> int | None:
    """MACs per example as Larq's `ModelProfile` counts them, without bnn_keras' switch flags.

    A MAC layer of Larq's (`larq.models.mac_containing_layers`: conv, dense) does output
    pixels x non-bias weights MACs; each scalar switch flag would add one 32-bit "MAC" per
    output pixel, so flags are left out. (Larq's profile itself fails on a quantiser
    function without ``precision``.) None: no static output shape.
    """
    if not isinstance(layer, lq.models.mac_containing_layers):
        return 0
    try:
        shape = layer.output_shape
    except (AttributeError, RuntimeError):
        return None
    if isinstance(shape, list) or any(d is None for d in shape[1:]):
        return None
    pixels = int(np.prod(shape[1:-1]))  # Larq's output pixels: H x W, or steps, or 1
    weights = sum(int(np.prod(w.shape)) for w in layer.weights if id(w) not in flags and "bias" not in w.name)
    return pixels * weights


def _binary_mac_share(model: tf.keras.Model, reports: list[LayerReport]) -> float | None:
    """MACs of the layers that became binary ops in the file over all MACs; None without MACs or when unknown."""
    flags = _switch_flags(model)
    binary = {r.name for r in reports if r.binary}
    total = in_binary = 0
    for layer in leaf_layers(model):
        macs = _layer_macs(layer, flags)
        if macs is None:
            return None
        total += macs
        in_binary += macs if layer.name in binary else 0
    return in_binary / total if total > 0 else None


def _layer_reports(
    attribution: _Attribution,
    bits: dict[str, tuple[int, int, float]],
    *,
    target: str,
    lce_target: str,
    rewrite_dense: bool,
    rewritten: list[str],
    skipped: dict[str, str],
    fixes: dict[str, str],
) -> list[LayerReport]:
    """One `LayerReport` per Keras layer: its ops, bytes, ideal size and a note."""
    reports = []
    for layer in attribution.layers:
        params, binary_params, ideal_bits = bits[layer.name]
        ops = attribution.ops_of[layer.name]
        binary = any(op in BINARY_OPS for op in ops)
        note = ""
        if layer.name in rewritten and binary:
            note = "binary dense rewritten as a 1x1 LceBconv2d"
        elif layer.name in fixes and binary:
            note = fixes[layer.name]
        elif has_kernel(layer) and not binary:
            note = _float_reason(layer, target, lce_target, skipped, rewrite_dense)
        elif not ops:
            note = (
                f"fused into {attribution.fused_into[layer.name]}"
                if layer.name in attribution.fused_into
                else "no op of its own (folded into a neighbouring op, or identity at inference)"
            )
        reports.append(
            LayerReport(
                name=layer.name,
                kind=type(layer).__name__,
                ops=ops,
                bytes=attribution.bytes_of[layer.name],
                params=params,
                binary_params=binary_params,
                ideal_bytes=ideal_bits / 8.0,
                binary=binary,
                note=note,
            )
        )
    return reports


def _op_counts(parsed: Flatbuffer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in parsed.ops:
        counts[op.name] = counts.get(op.name, 0) + 1
    return counts


def _notes(target: str, options: dict[str, Any], parsed: Flatbuffer, fixes: dict[str, str]) -> list[str]:
    """Model-wide notes: float-only target, layers rewritten for LCE, int8 I/O asked for but not produced."""
    notes = [f"layer {name!r} rewritten for LCE 0.16: {note}" for name, note in fixes.items()]
    if target == "tflite":
        notes.append("stock TFLite has no binary ops: every binary layer runs as a float op")
    for kind, requested, tensors in (
        ("input", options.get("inference_input_type"), parsed.inputs),
        ("output", options.get("inference_output_type"), parsed.outputs),
    ):
        if requested == "int8" and any(parsed.tensor_types[t] != _TFLITE_INT8 for t in tensors):
            notes.append(
                f"int8 {kind} requested but the flatbuffer's {kind} is not int8: LCE needs "
                "quantisation statistics (fake-quant ops or experimental_default_int8_range)"
            )
    return notes


def build_report(
    model: tf.keras.Model,
    converted_model: tf.keras.Model,
    flatbuffer: bytes,
    *,
    target: str,
    lce_target: str,
    rewrite_dense: bool,
    rewritten: list[str],
    skipped: dict[str, str],
    options: dict[str, Any],
    fixes: dict[str, str] | None = None,
) -> ConversionReport:
    """Describe `flatbuffer`, converted from `converted_model` (`model` after the rewrites).

    `fixes`: per layer rewritten by `bnn_keras.export.pitfalls`, what was done and why.

    Raises:
        ExportError: the file holds a binary conv LCE 0.16 computes wrongly (SAME zero
            padding on a map smaller than the kernel, in a model that could not be rewritten).
    """
    fixes = fixes or {}
    parsed = parse(flatbuffer)
    attribution = _Attribution(model, converted_model.name, parsed)
    wrong = wrong_zero_padded_bconvs(flatbuffer)
    if wrong:
        index, why = next(iter(wrong.items()))
        raise ExportError(
            f"layer {attribution.owner_of_op[index] or '?'!r}: {why}, which LCE 0.16 computes wrongly, "
            "and bnn_keras could not rewrite it (in a subclassed model, or its input shape is unknown): "
            "use pad_values=1.0 or a larger feature map"
        )
    reports = _layer_reports(
        attribution,
        _parameter_bits(model),
        target=target,
        lce_target=lce_target,
        rewrite_dense=rewrite_dense,
        rewritten=rewritten,
        skipped=skipped,
        fixes=fixes,
    )
    return ConversionReport(
        target=target,
        lce_target=lce_target if target == "lce" else None,
        model_name=model.name,
        layers=reports,
        file_bytes=len(flatbuffer),
        ideal_bytes=sum(r.ideal_bytes for r in reports),
        binary_mac_share=_binary_mac_share(model, reports),
        op_counts=_op_counts(parsed),
        options=options,
        rewritten_dense=list(rewritten),
        unattributed_bytes=attribution.unattributed,
        notes=_notes(target, options, parsed, fixes),
    )

r"""Binary convolutions LCE 0.16 computes wrongly or leaves float, rewritten exactly before converting.

`rewrite_lce_pitfalls` (called by `convert` for ``target="lce"``) finds two patterns and
swaps each layer for an equivalent one LCE converts right; the report notes each rewrite.

- **SAME zero padding on a map smaller than the kernel** (`zero_padding_pitfall`, arm
  target). LCE pads with +1 and then subtracts, per output pixel, the kernel taps that
  fell on the padding; that correction assumes the effective kernel (``(k - 1) * d + 1``)
  fits in the map (``core/bconv2d/zero_padding_correction.h``), so on a 2x2 map a 3x3
  conv gets most outputs wrong. The rewrite pads with +1 (which LCE computes right)
  and subtracts the padding's share itself, a constant:

  $$\mathrm{conv}_0(x) = \mathrm{conv}_1(x) - C, \quad
  C_{yxo} = \sum_{\text{taps } (a, b) \text{ off the map at } (y, x)} \sum_c q(w)_{abco}$$

  With ±1 inputs and weights every term is an integer, so the outputs are unchanged.
- **A scaled binary kernel too large to constant-fold** (`fold_limit_pitfall`). LCE
  lowers a conv only when its binarised kernel is a constant. A scaled sign
  (`MagnitudeAwareSign`: sign(w) times the mean |w| per filter) is folded by
  TensorFlow's constant-folding hook, which skips any op whose operands exceed 2^30 bits
  (``kOperandsSizeThreshold``, 128 MiB: `FOLD_LIMIT_VALUES` float32 values); a larger
  kernel stays float with a run-time quantiser. Plain signs are folded by LCE's own
  quantise op, without that limit. The rewrite splits the filters into convs under the
  limit and concatenates their outputs; each filter's scale depends on that filter
  only, so the outputs are unchanged.

```python
model, notes = rewrite_lce_pitfalls(model, "arm")   # {layer name: what was rewritten, why}
```
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import larq as lq
import numpy as np
import tensorflow as tf
from flatbuffers import flexbuffers

from bnn_keras.export.rewrite import (
    binary_input,
    binary_kernel,
    is_binarizing,
    kernel_quantizer,
    leaf_layers,
    replace_layers,
)

__all__ = [
    "FOLD_LIMIT_VALUES",
    "fold_limit_pitfall",
    "rewrite_lce_pitfalls",
    "split_parts",
    "wrong_zero_padded_bconvs",
    "zero_padding_pitfall",
]

FOLD_LIMIT_VALUES: int = 2**30 // 32
"""Float32 values in the largest operands TensorFlow's constant folding takes (2^30 bits)."""


def _binary_conv(layer: tf.keras.layers.Layer) -> bool:
    """A channels-last binary `QuantConv2D` (input and kernel binarised)."""
    return (
        isinstance(layer, lq.layers.QuantConv2D)
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and binary_input(layer)
        and binary_kernel(layer)
    )


def _groups(layer: lq.layers.QuantConv2D) -> int:
    return int(getattr(layer, "groups", 1) or 1)


def _map_size(layer: tf.keras.layers.Layer) -> tuple[int, int] | None:
    """(height, width) of `layer`'s input, None when not static or several inputs."""
    try:
        shape = layer.input_shape
    except (AttributeError, RuntimeError):
        return None
    if isinstance(shape, list) or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def _effective_kernel(layer: lq.layers.QuantConv2D) -> tuple[int, int]:
    return tuple((int(k) - 1) * int(d) + 1 for k, d in zip(layer.kernel_size, layer.dilation_rate))


def zero_padding_pitfall(layer: tf.keras.layers.Layer, lce_target: str = "arm") -> str | None:
    """Why LCE 0.16 would compute binary conv `layer` wrongly (SAME zero padding, kernel over the map), else None.

    Only the arm target lowers SAME zero padding (xcore keeps such a conv float, which is right).

    ```python
    zero_padding_pitfall(conv_3x3_on_2x2_map)   # 'SAME zero padding with a 3x3 kernel on a 2x2 map: ...'
    ```
    """
    if lce_target != "arm" or not _binary_conv(layer) or layer.padding != "same":
        return None
    if float(tf.keras.backend.get_value(layer.pad_values)) != 0.0:
        return None
    size, kernel = _map_size(layer), _effective_kernel(layer)
    if size is None or all(k <= s for k, s in zip(kernel, size)):
        return None
    return (
        f"SAME zero padding with a {kernel[0]}x{kernel[1]} kernel on a {size[0]}x{size[1]} map, which LCE 0.16 "
        "computes wrongly (its zero-padding correction assumes the kernel fits in the map)"
    )


def _schema():
    """The TFLite flatbuffer schema bindings: TensorFlow's, else the copy LCE ships."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:  # pragma: no cover - depends on the TensorFlow build
        from larq_compute_engine.mlir.python import tflite_schema as schema
    return schema


def wrong_zero_padded_bconvs(flatbuffer: bytes) -> dict[int, str]:
    """Op index -> why, for each ``LceBconv2d`` of a one-subgraph flatbuffer that LCE 0.16 computes wrongly.

    The file-side check of `zero_padding_pitfall`: SAME zero padding with an effective
    kernel larger than the op's input map (read from the op's options and tensor shapes).
    """
    schema = _schema()
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    graph = model.Subgraphs(0)
    found = {}
    for index in range(graph.OperatorsLength()):
        op = graph.Operators(index)
        if model.OperatorCodes(op.OpcodeIndex()).CustomCode() != b"LceBconv2d" or not op.CustomOptionsLength():
            continue
        options = flexbuffers.Loads(bytes(op.CustomOptionsAsNumpy()))
        if options.get("padding") != schema.Padding.SAME or options.get("pad_values") != 0:
            continue
        _, height, width, _ = (int(d) for d in graph.Tensors(op.Inputs(0)).ShapeAsNumpy())
        _, kh, kw, _ = (int(d) for d in graph.Tensors(op.Inputs(1)).ShapeAsNumpy())
        kh = (kh - 1) * int(options.get("dilation_height_factor", 1)) + 1
        kw = (kw - 1) * int(options.get("dilation_width_factor", 1)) + 1
        if kh > height or kw > width:
            found[index] = f"SAME zero padding with a {kh}x{kw} kernel on a {height}x{width} map"
    return found


def _folded_values(layer: lq.layers.QuantConv2D, filters: int) -> int:
    """Float32 operand values of the largest op folding `filters` of the scaled kernel (Mul or Mean)."""
    per_filter = int(np.prod(layer.kernel.shape[:-1]))
    return per_filter * filters + max(filters, 3)  # Mul: sign(w) and scales; Mean: |w| and 3 axes


def fold_limit_pitfall(layer: tf.keras.layers.Layer, limit: int | None = None) -> str | None:
    """Why LCE leaves binary conv `layer` float because its scaled kernel cannot be constant-folded, else None.

    `limit`: float32 operand values TensorFlow folds (None: `FOLD_LIMIT_VALUES`).

    ```python
    fold_limit_pitfall(conv_6x6x256x4096_magnitude_aware)   # 'its scaled kernel (37,748,736 weights) ...'
    ```
    """
    if not _binary_conv(layer) or is_binarizing(kernel_quantizer(layer)):  # a plain sign: LCE folds it itself
        return None
    filters = int(layer.kernel.shape[-1])
    if _folded_values(layer, filters) <= (FOLD_LIMIT_VALUES if limit is None else limit):
        return None
    return (
        f"its scaled kernel ({int(np.prod(layer.kernel.shape)):,} weights) is too large to constant-fold: "
        f"TensorFlow folds no op whose operands exceed 2^30 bits ({FOLD_LIMIT_VALUES:,} float32 values), so "
        "LCE finds no constant binary filter and keeps the kernel float with a run-time quantiser"
    )


def split_parts(layer: lq.layers.QuantConv2D, limit: int | None = None) -> int | None:
    """The fewest convs over slices of `layer`'s filters that each fold under `limit` (None: `FOLD_LIMIT_VALUES`).

    None when a single filter is over the limit, or the conv is grouped (a slice would
    cut its groups).
    """
    limit = FOLD_LIMIT_VALUES if limit is None else limit
    filters = int(layer.kernel.shape[-1])
    if _groups(layer) > 1:
        return None
    for parts in range(1, filters + 1):
        if _folded_values(layer, math.ceil(filters / parts)) <= limit:
            return parts
    return None


def _quiet_quant_conv(**kwargs) -> lq.layers.QuantConv2D:
    """A `QuantConv2D`, without Larq's "starved weights" log (irrelevant for conversion)."""
    larq_log = logging.getLogger("larq.layers_base")
    level = larq_log.level
    larq_log.setLevel(logging.ERROR)
    try:
        return lq.layers.QuantConv2D(**kwargs)
    finally:
        larq_log.setLevel(level)


def _conv_kwargs(conv: lq.layers.QuantConv2D) -> dict:
    """`conv`'s arguments, sharing its quantiser objects (their state, e.g. a switch, stays one)."""
    return dict(
        filters=conv.filters,
        kernel_size=conv.kernel_size,
        strides=conv.strides,
        padding=conv.padding,
        pad_values=conv.pad_values,
        dilation_rate=conv.dilation_rate,
        groups=_groups(conv),
        activation=conv.activation,
        use_bias=conv.use_bias,
        input_quantizer=conv.input_quantizer,
        kernel_quantizer=conv.kernel_quantizer,
    )


def _padding_share(conv: lq.layers.QuantConv2D, size: tuple[int, int]) -> np.ndarray:
    """C of the module docstring: per output pixel and filter, the binarised taps that fall off the map."""
    latent = tf.constant(conv.kernel.numpy())  # a plain tensor: custom gradients refuse variables
    taps = np.asarray(conv.kernel_quantizer(latent), dtype=np.float64).sum(axis=2)  # (kh, kw, filters)
    outside = []
    for n, k, s, d in zip(size, conv.kernel_size, conv.strides, conv.dilation_rate):
        out = -(-n // s)
        before = max((out - 1) * s + (k - 1) * d + 1 - n, 0) // 2  # TensorFlow's SAME padding
        rows = np.arange(out)[:, None] * s - before + np.arange(k)[None, :] * d
        outside.append((rows < 0) | (rows >= n))  # (out, k)
    off_map = outside[0][:, None, :, None] | outside[1][None, :, None, :]  # (out_h, out_w, kh, kw)
    return np.einsum("yxab,abo->yxo", off_map.astype(np.float64), taps)


class _ZeroPaddingAsOnePadding(tf.keras.layers.Layer):
    """A SAME zero-padded binary conv computed as the one-padded conv minus the padding's share.

    The share is subtracted before the bias is added, so with ±1 weights the sum stays an
    exact integer, as in Keras. Keeps the conv's name, so flatbuffer tensors still name
    it; used only for conversion.
    """

    def __init__(self, conv: lq.layers.QuantConv2D):
        super().__init__(name=conv.name, dtype=conv.dtype)
        self._conv = conv
        self.conv = _quiet_quant_conv(
            **{**_conv_kwargs(conv), "pad_values": 1.0, "activation": None, "use_bias": False, "name": "one_padded"}
        )

    def build(self, input_shape: tf.TensorShape) -> None:
        self.conv.build(input_shape)
        self.conv.kernel.assign(self._conv.kernel)
        self._share = _padding_share(self._conv, (int(input_shape[1]), int(input_shape[2]))).astype(np.float32)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        # -(C - y), not y - C: LCE 0.16 fuses a constant added to a conv's output into the
        # conv's per-filter bias, even a per-pixel one (which then fails at run time).
        outputs = -(tf.constant(self._share[None]) - self.conv(inputs))
        if self._conv.use_bias:
            outputs = outputs + self._conv.bias
        return self._conv.activation(outputs)


class _SplitBinaryConv(tf.keras.layers.Layer):
    """A binary conv computed as several over consecutive slices of its filters, outputs concatenated.

    Keeps the conv's name, so flatbuffer tensors still name it; used only for conversion.
    """

    def __init__(self, conv: lq.layers.QuantConv2D, parts: int):
        super().__init__(name=conv.name, dtype=conv.dtype)
        self._conv = conv
        self.sizes = [len(chunk) for chunk in np.array_split(np.arange(conv.filters), parts)]
        self.convs = [
            _quiet_quant_conv(**{**_conv_kwargs(conv), "filters": n, "name": f"part{i}"})
            for i, n in enumerate(self.sizes)
        ]

    def build(self, input_shape: tf.TensorShape) -> None:
        start = 0
        for part, n in zip(self.convs, self.sizes):
            part.build(input_shape)
            part.kernel.assign(self._conv.kernel[..., start : start + n])
            if self._conv.use_bias:
                part.bias.assign(self._conv.bias[start : start + n])
            start += n
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.concat([part(inputs) for part in self.convs], axis=-1)


def rewrite_lce_pitfalls(
    model: tf.keras.Model, lce_target: str = "arm", *, fold_limit: int | None = None
) -> tuple[tf.keras.Model, dict[str, str]]:
    """Rebuild `model` with each pitfall layer rewritten; returns it and a note per rewritten layer.

    `fold_limit`: float32 operand values TensorFlow folds (None: `FOLD_LIMIT_VALUES`); a
    smaller one splits smaller convs.

    Layers in a subclassed model (no graph to rebuild) stay as they are; the report
    refuses a file that still holds a wrong conv (`wrong_zero_padded_bconvs`).
    """
    makers: dict[int, Callable[[tf.keras.layers.Layer], tf.keras.layers.Layer]] = {}
    notes: dict[str, str] = {}
    for layer in leaf_layers(model):
        why = zero_padding_pitfall(layer, lce_target)
        if why:
            makers[id(layer)] = _ZeroPaddingAsOnePadding
            notes[layer.name] = f"{why}: converted with one padding minus the padding's constant share (same outputs)"
            continue
        parts = split_parts(layer, fold_limit) if fold_limit_pitfall(layer, fold_limit) else None
        if parts is not None:
            makers[id(layer)] = lambda conv, parts=parts: _SplitBinaryConv(conv, parts)
            notes[layer.name] = (
                f"split into {parts} binary convs over its filters, each under TensorFlow's constant-folding "
                "limit, outputs concatenated (same outputs)"
            )
    targets = [layer for layer in leaf_layers(model) if id(layer) in makers]
    rewritten, left = replace_layers(model, targets, lambda layer: makers[id(layer)](layer))
    for layer in left:  # in a subclassed model; `wrong_zero_padded_bconvs` checks the file
        notes.pop(layer.name, None)
    return rewritten, notes

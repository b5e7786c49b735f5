"""Which layers are binary, and rewrites of Keras layers for conversion.

A quantiser binarises when Larq marks it 1-bit (`quantizer_precision`,
`is_binary_precision`) and it is a sign LCE lowers (`is_binarizing`).

LCE lowers binary convolutions to ``LceBconv2d`` (1 bit per weight) but keeps binary
dense layers as float ``FULLY_CONNECTED`` (32 bits per weight). `rewrite_binary_dense`
computes each binary `QuantDense` as the equivalent 1x1 binary `QuantConv2D` on a
(1, 1, C) tensor, same weights; with ±1 inputs and weights every partial sum is an exact
integer, so the rewrite changes no output bit. `replace_layers` rebuilds a model with
some layers swapped (also used by `bnn_keras.export.pitfalls`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import larq as lq
import numpy as np
import tensorflow as tf

__all__ = [
    "binary_input",
    "binary_kernel",
    "has_kernel",
    "is_binarizing",
    "is_binary_precision",
    "kernel_quantizer",
    "leaf_layers",
    "quantizer_precision",
    "replace_layers",
    "rewrite_binary_dense",
]

_SIGN_QUANTIZERS = (lq.quantizers.SteSign, lq.quantizers.ApproxSign, lq.quantizers.SwishSign)
# Larq 0.14 leaves its sign functions unmarked (no `larq.utils.set_precision`); each is
# the forward pass of a class above (precision 1).
_SIGN_FUNCTIONS = (lq.quantizers.ste_sign, lq.quantizers.approx_sign, lq.quantizers.swish_sign)
# Larq quantisers of precision 1 whose output is 0/1.
_HEAVISIDE_QUANTIZERS = (lq.quantizers.SteHeaviside, lq.quantizers.DoReFa)


def _resolve(quantizer: Any) -> Any:
    """A quantiser object or function from an object, a function, a name or a config; None if unknown."""
    if isinstance(quantizer, (str, dict)):
        try:
            return lq.quantizers.get(quantizer)
        except ValueError:
            return None
    return quantizer


def quantizer_precision(quantizer: Any) -> int | None:
    """The bits of a quantiser's output as Larq marks them, None when unmarked.

    Larq's metadata: the ``precision`` of a quantiser class (`SteSign`: 1, `SteTern`: 2,
    ``NoOp(precision=...)``) or of a function decorated with `larq.utils.set_precision`;
    Larq's own unmarked sign functions (`ste_sign`, `approx_sign`, `swish_sign`) count 1.

    ```python
    quantizer_precision("ste_sign"), quantizer_precision(lq.quantizers.ste_sign), quantizer_precision(None)
    # (1, 1, None)
    ```
    """
    quantizer = _resolve(quantizer)
    precision = getattr(quantizer, "precision", None)
    if precision is None and any(quantizer is f for f in _SIGN_FUNCTIONS):
        return 1
    return precision if isinstance(precision, int) else None


def is_binary_precision(quantizer: Any) -> bool:
    """Larq's test of a binary quantiser: precision 1 and not a `NoOp` (whose values stay float)."""
    return quantizer_precision(quantizer) == 1 and not isinstance(_resolve(quantizer), lq.quantizers.NoOp)


def _probes_as_sign(quantizer: Any, kernel: bool) -> bool:
    """Whether a 1-bit quantiser Larq does not know maps values to ±1 (kernels: ±scale) by their sign."""
    x = tf.constant([[-2.0], [-0.5], [0.5], [2.0]])
    try:
        y = np.asarray(quantizer(x), dtype=np.float64)
    except Exception:  # not callable on a plain tensor: not a quantiser we can read
        return False
    if y.shape != (4, 1) or not np.array_equal(np.sign(y), np.sign(x.numpy())):
        return False
    magnitudes = np.abs(y)
    return bool(np.all(magnitudes == magnitudes[0]) and (kernel or magnitudes[0, 0] == 1.0))


def is_binarizing(quantizer: Any, *, kernel: bool = False) -> bool:
    """Whether a quantiser (object, function or name) binarises with a sign LCE can lower.

    It must be binary by Larq's metadata (`is_binary_precision`: precision 1, no `NoOp`),
    and a sign: `SteSign` and its subclasses (bnn_keras' `VanillaSteSign`,
    `ClippedSteSign`, `SwitchableSteSign`), `ApproxSign`, `SwishSign`, their functions
    (``lq.quantizers.ste_sign``), for kernels also `MagnitudeAwareSign` (sign times a
    per-channel scale, folded into LCE's multiplier). `SteHeaviside` and `DoReFa` (0/1)
    do not count. A 1-bit quantiser Larq does not know (a function marked with
    `larq.utils.set_precision(1)`) counts when it maps [-2, -0.5, 0.5, 2] to ±1 (kernels:
    ±c) by sign.

    ```python
    is_binarizing("ste_sign"), is_binarizing(lq.quantizers.ste_sign), is_binarizing("ste_heaviside")
    # (True, True, False)
    ```
    """
    quantizer = _resolve(quantizer)
    if quantizer is None or not is_binary_precision(quantizer):
        return False
    if isinstance(quantizer, _SIGN_QUANTIZERS) or any(quantizer is f for f in _SIGN_FUNCTIONS):
        return True
    if isinstance(quantizer, lq.quantizers.MagnitudeAwareSign):
        return kernel
    if isinstance(quantizer, _HEAVISIDE_QUANTIZERS):
        return False
    return _probes_as_sign(quantizer, kernel)


def kernel_quantizer(layer: tf.keras.layers.Layer) -> Any:
    """The quantiser of `layer`'s kernel (or depthwise kernel), None when it has none."""
    for attribute in ("kernel_quantizer", "depthwise_quantizer"):
        if hasattr(layer, attribute):
            return getattr(layer, attribute)
    return None


def binary_input(layer: tf.keras.layers.Layer) -> bool:
    """Whether `layer` binarises its input with a sign LCE can lower."""
    return is_binarizing(getattr(layer, "input_quantizer", None))


def binary_kernel(layer: tf.keras.layers.Layer) -> bool:
    """Whether `layer` binarises its kernel with a sign LCE can lower."""
    return is_binarizing(kernel_quantizer(layer), kernel=True)


def has_kernel(layer: tf.keras.layers.Layer) -> bool:
    """Whether `layer` holds a kernel or a depthwise kernel."""
    return any(getattr(layer, a, None) is not None for a in ("kernel", "depthwise_kernel"))


def leaf_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Layers of `model` in order, nested models flattened, input layers dropped."""
    found: list[tf.keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(leaf_layers(layer))
        elif not isinstance(layer, tf.keras.layers.InputLayer):
            found.append(layer)
    return found


class _BinaryDenseAsConv(tf.keras.layers.Layer):
    """A binary `QuantDense` computed as a 1x1 binary `QuantConv2D` on a (1, 1, C) tensor.

    Shares the dense layer's quantiser objects and copies its kernel (C, U) -> (1, 1, C, U)
    and bias. Keeps the dense layer's name, so flatbuffer tensors still name that layer.
    Used only for conversion, never saved.
    """

    def __init__(self, dense: lq.layers.QuantDense):
        super().__init__(name=dense.name, dtype=dense.dtype)
        self.units = int(dense.units)
        self._dense = dense
        # Larq logs "starved weights" for a binary kernel without constraint: irrelevant here.
        larq_log = logging.getLogger("larq.layers_base")
        level = larq_log.level
        larq_log.setLevel(logging.ERROR)
        try:
            self.conv = lq.layers.QuantConv2D(
                self.units,
                1,
                input_quantizer=dense.input_quantizer,
                kernel_quantizer=dense.kernel_quantizer,
                use_bias=dense.use_bias,
                activation=dense.activation,
                name="conv1x1",
            )
        finally:
            larq_log.setLevel(level)

    def build(self, input_shape: tf.TensorShape) -> None:
        channels = int(input_shape[-1])
        self.conv.build(tf.TensorShape([None, 1, 1, channels]))
        self.conv.kernel.assign(tf.reshape(self._dense.kernel, (1, 1, channels, self.units)))
        if self._dense.use_bias:
            self.conv.bias.assign(self._dense.bias)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        outputs = self.conv(tf.reshape(inputs, (-1, 1, 1, inputs.shape[-1])))
        return tf.reshape(outputs, (-1, self.units))


def _dense_rewrite_blocker(layer: tf.keras.layers.Layer) -> str | None:
    """Why a binary QuantDense cannot be rewritten, or None when it can."""
    try:
        shape = layer.input_shape
    except (AttributeError, RuntimeError):
        return "its input shape is unknown"
    if isinstance(shape, list):
        return "it is called on several inputs"
    if len(shape) != 2 or shape[-1] is None:
        return f"only rank-2 inputs with known width are rewritten, its input is {tuple(shape)}"
    return None


def _binary_dense_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """The `QuantDense` layers of `model` (nested models too) with binary input and kernel."""
    return [
        layer
        for layer in leaf_layers(model)
        if isinstance(layer, lq.layers.QuantDense) and binary_input(layer) and binary_kernel(layer)
    ]


def replace_layers(
    model: tf.keras.Model,
    targets: Sequence[tf.keras.layers.Layer],
    replacement: Callable[[tf.keras.layers.Layer], tf.keras.layers.Layer],
) -> tuple[tf.keras.Model, list[tf.keras.layers.Layer]]:
    """Rebuild `model` with each of its leaf layers in `targets` swapped for `replacement(layer)`.

    Other layers are reused (shared weights); nested functional and Sequential models
    holding a target are rebuilt recursively. A subclassed model has no graph of layers
    to rebuild: its targets stay as they are. Returns the new model and those targets.

    ```python
    new_model, left = replace_layers(model, [model.get_layer("conv")], make_replacement)
    ```
    """
    wanted = {id(layer) for layer in targets}
    left: list[tf.keras.layers.Layer] = []

    def holds_target(m: tf.keras.Model) -> bool:
        return any(id(layer) in wanted for layer in leaf_layers(m))

    def clone(m: tf.keras.Model) -> tf.keras.Model:
        def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
            if isinstance(layer, tf.keras.Model):
                return clone(layer) if holds_target(layer) else layer
            return replacement(layer) if id(layer) in wanted else layer

        try:
            return tf.keras.models.clone_model(m, clone_function=clone_layer)
        except ValueError:  # a subclassed model: no graph of layers to rebuild
            left.extend(layer for layer in leaf_layers(m) if id(layer) in wanted)
            return m

    if not wanted:
        return model, []
    return clone(model), left


def rewrite_binary_dense(model: tf.keras.Model) -> tuple[tf.keras.Model, list[str], dict[str, str]]:
    """Rebuild `model` with every binary `QuantDense` as an equivalent 1x1 binary conv.

    Other layers are reused (shared weights), nested functional and Sequential models
    are rebuilt recursively. Returns the new model, the names of the rewritten layers,
    and for binary dense layers left alone, why.

    ```python
    rewritten, names, skipped = rewrite_binary_dense(model)
    np.testing.assert_array_equal(rewritten(x), model(x))   # exact: ±1 sums are integers
    ```
    """
    dense = _binary_dense_layers(model)
    skipped = {layer.name: blocker for layer in dense if (blocker := _dense_rewrite_blocker(layer))}
    targets = [layer for layer in dense if layer.name not in skipped]
    rewritten_model, left = replace_layers(model, targets, _BinaryDenseAsConv)
    for layer in left:
        skipped[layer.name] = "the model is subclassed, so its graph cannot be rebuilt"
    left_ids = {id(layer) for layer in left}
    return rewritten_model, [layer.name for layer in targets if id(layer) not in left_ids], skipped

"""Which layers are binary, and the rewrite of binary dense layers as 1x1 binary convolutions.

LCE lowers binary convolutions to ``LceBconv2d`` (1 bit per weight) but keeps binary
dense layers as float ``FULLY_CONNECTED`` (32 bits per weight). `rewrite_binary_dense`
computes each binary `QuantDense` as the equivalent 1x1 binary `QuantConv2D` on a
(1, 1, C) tensor, same weights; with ±1 inputs and weights every partial sum is an exact
integer, so the rewrite changes no output bit.
"""

from __future__ import annotations

import logging
from typing import Any

import larq as lq
import tensorflow as tf

__all__ = [
    "binary_input",
    "binary_kernel",
    "has_kernel",
    "is_binarizing",
    "kernel_quantizer",
    "leaf_layers",
    "rewrite_binary_dense",
]

_SIGN_QUANTIZERS = (lq.quantizers.SteSign, lq.quantizers.ApproxSign, lq.quantizers.SwishSign)
# MagnitudeAwareSign is sign(w) times a per-channel scale, which LCE folds into its multiplier.
_SIGN_KERNEL_QUANTIZERS = (*_SIGN_QUANTIZERS, lq.quantizers.MagnitudeAwareSign)


def is_binarizing(quantizer: Any, *, kernel: bool = False) -> bool:
    """Whether a Larq quantiser (object or name) binarises with a sign LCE can lower.

    Sign-type quantisers count: `SteSign` and its subclasses (bnn_keras'
    `VanillaSteSign`, `ClippedSteSign`, `SwitchableSteSign`), `ApproxSign`, `SwishSign`,
    and for kernels `MagnitudeAwareSign`. `SteHeaviside` (0/1) and `NoOp` do not.

    ```python
    is_binarizing("ste_sign"), is_binarizing("switchable_ste_sign"), is_binarizing(None)
    # (True, True, False)
    ```
    """
    if quantizer is None:
        return False
    if isinstance(quantizer, (str, dict)):
        try:
            quantizer = lq.quantizers.get(quantizer)
        except ValueError:
            return False
    return isinstance(quantizer, _SIGN_KERNEL_QUANTIZERS if kernel else _SIGN_QUANTIZERS)


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
    targets = _binary_dense_layers(model)
    rewritten: list[str] = []
    skipped: dict[str, str] = {}

    def clone(m: tf.keras.Model) -> tf.keras.Model:
        def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
            if isinstance(layer, tf.keras.Model):
                return clone(layer) if _binary_dense_layers(layer) else layer
            if layer in targets:
                blocker = _dense_rewrite_blocker(layer)
                if blocker is None:
                    rewritten.append(layer.name)
                    return _BinaryDenseAsConv(layer)
                skipped[layer.name] = blocker
            return layer

        try:
            return tf.keras.models.clone_model(m, clone_function=clone_layer)
        except ValueError:  # a subclassed model: no graph of layers to rebuild
            for layer in _binary_dense_layers(m):
                rewritten[:] = [name for name in rewritten if name != layer.name]
                skipped[layer.name] = "the model is subclassed, so its graph cannot be rebuilt"
            return m

    if not targets:
        return model, [], {}
    return clone(model), rewritten, skipped

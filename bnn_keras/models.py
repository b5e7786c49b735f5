r"""The study's networks, in a float, a BinaryConnect and a BinaryNet variant (and ReActNet's middle step).

- `mlp`: the MNIST MLP, 3 hidden layers x 2048 units; each hidden layer is
  dense (no bias) -> BN -> ReLU, the output layer dense -> BN (no activation).
- `vgg10`: the CIFAR-10 "VGG-10",
  128C3-128C3-MP2-256C3-256C3-MP2-512C3-512C3-MP2-FC1024-FC1024-FC10; 3x3 convolutions,
  stride 1, SAME padding, no bias; the 2x2 max-pool sits right *after* its convolution
  (conv -> pool -> BN -> activation, the study's reordering; ``block_order="conventional"``
  gives conv -> BN -> activation -> pool, same parameters); BN after every layer,
  the last one included.
- `resnet18`: the CIFAR-style ResNet-18 the study binarised (its Table 5): a 3x3 stem
  conv (64) and four stages of two basic blocks (64-128-256-512, stride 2 first in stages
  2-4), each conv3x3 -> BN -> act -> conv3x3 -> BN plus a real-valued shortcut (identity,
  or 1x1 conv -> BN where the shape changes), the activation after the sum; global
  average pool -> dense -> BN.

Variants (`VARIANTS`):

- ``"float"``: Larq layers without quantisers or constraints, i.e. plain Dense/Conv2D with
  the same weights as the binary variants (so `copy_weights` maps them 1:1);
- ``"binaryconnect"``: binary weights, real (ReLU) activations — what the study trained;
- ``"binarynet"``: binary weights *and* activations on every layer, first and last
  included (what Larq Compute Engine accelerates; ResNet-18's 1x1 shortcuts stay real).
  The BN output of a layer is binarised by the next layer's input quantiser, so there is
  no ReLU; the network's input is binarised too unless ``binarize_input=False``.
- ``"binary-activations"``: BinaryNet's structure and binary activations (the same input
  quantisers, no ReLU) with real-valued weights (no kernel quantiser, no weight clip):
  the middle step of ReActNet's two-step training (float -> binary activations ->
  binary weights too), its weights handed on by `copy_weights`.

Every binary layer gets `SwitchableSteSign` quantisers and a `SwitchableWeightClip`
kernel constraint, so any clipping schedule (`bnn_keras.callbacks.ClippingSchedule`,
`bnn_keras.set_clipping`) applies to it. With ``weight_binarisation="stochastic"`` (or
``activation_binarisation``) the kernel (input) quantisers are `StochasticSteSign`
instead: BinaryConnect's stochastic binarisation while training, the sign at inference,
the same switchable gradient. Kernels are Glorot-uniform initialised.

```python
from bnn_keras import models
model = models.mlp((28, 28, 1), 10)                         # the study's 3x2048 MLP
net = models.vgg10((32, 32, 3), 10, variant="binarynet")   # for Larq Compute Engine
res = models.resnet18((32, 32, 3), 10, width_multiplier=0.25)
```
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import larq as lq
import tensorflow as tf

from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import StochasticSteSign, SwitchableSteSign

__all__ = [
    "BINARISATIONS",
    "BLOCK_ORDERS",
    "NAMES",
    "VARIANTS",
    "WEIGHT_CLIPS",
    "copy_weights",
    "get",
    "mlp",
    "resnet18",
    "vgg10",
]

VARIANTS: tuple[str, ...] = ("float", "binaryconnect", "binarynet", "binary-activations")
"""Model variants: real-valued, binary weights only, binary weights and activations, binary activations only."""

BINARISATIONS: tuple[str, ...] = ("deterministic", "stochastic")
"""How binary weights or activations are drawn while training: the sign, or BinaryConnect's stochastic sign."""

WEIGHT_CLIPS: tuple[str | None, ...] = ("unit", "glorot", None)
"""Weight-clip ranges: [-clip_value, clip_value], BinaryConnect's per-layer [-H, H], none."""

BLOCK_ORDERS: tuple[str, ...] = ("paper", "conventional")
"""VGG-10 conv-block orders: conv -> pool -> BN -> act (the study's), conv -> BN -> act -> pool."""


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")


def _check_binarisation(name: str, value: str) -> None:
    if value not in BINARISATIONS:
        raise ValueError(f"{name} must be 'deterministic' or 'stochastic', got {value!r}")


def _check_weight_clip(weight_clip: str | None) -> None:
    if weight_clip not in WEIGHT_CLIPS:
        raise ValueError(
            f"unknown weight_clip {weight_clip!r}: expected 'unit', 'glorot' or None"
        )


def _rules() -> Any:
    """`bnn_keras.recipe`, whose FIELDS and MODEL_FLAGS the builders check their arguments with."""
    from bnn_keras import recipe  # recipe imports this module: read its rules at call time

    return recipe


def _check_bn(bn_momentum: float, bn_epsilon: float, num_classes: int) -> None:
    rules = _rules()
    if not rules.FIELDS["bn_momentum"].accepts(bn_momentum):
        raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum!r}")
    rules.FIELDS["bn_epsilon"].check("bn_epsilon", bn_epsilon)
    rules.Rule("int", 1).check("num_classes", num_classes)


# Bytes per parameter while training: float32 weights, their gradients and two optimiser
# moments (Adam's, the study's optimiser).
TRAINING_BYTES_PER_PARAMETER = 4 * 4


def _physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(parameters: int, what: str) -> None:
    """Refuse, before allocating anything, a model whose training state exceeds physical memory."""
    memory = _physical_memory()
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    if memory is not None and needed > memory:
        raise ValueError(
            f"{what} make a model of {_approx(parameters)} parameters, which needs about {_bytes(needed)} to train "
            f"({TRAINING_BYTES_PER_PARAMETER} bytes each: float32 weights, gradients and two optimiser moments), "
            f"more than this machine's {_bytes(memory)} of memory"
        )


def _approx(count: int) -> str:
    """An integer of any size to three significant digits (floats overflow past 1e308)."""
    digits = str(count)
    return digits if len(digits) <= 6 else f"{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"


def _bytes(count: int) -> str:
    for unit, power in (("EB", 18), ("PB", 15), ("TB", 12), ("GB", 9), ("MB", 6)):
        if 10**power <= count < 10**21:
            return f"{count / 10**power:.3g} {unit}"
    return f"{_approx(count)} bytes"


def _product(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


class _Binariser:
    """The quantiser / constraint arguments of the Larq layers of one model, layer by layer."""

    def __init__(
        self,
        variant: str,
        clipped: bool,
        weight_clip: str | None,
        clip_value: float,
        binarize_input: bool,
        weight_binarisation: str = "deterministic",
        activation_binarisation: str = "deterministic",
    ):
        _check_variant(variant)
        _check_weight_clip(weight_clip)
        _check_binarisation("weight_binarisation", weight_binarisation)
        _check_binarisation("activation_binarisation", activation_binarisation)
        self.variant = variant
        self.clipped = bool(clipped)
        self.weight_clip = weight_clip
        self.clip_value = float(clip_value)
        self.binarize_input = bool(binarize_input)
        self.weight_binarisation = weight_binarisation
        self.activation_binarisation = activation_binarisation

    @property
    def binary_weights(self) -> bool:
        """Whether kernels are binarised (BinaryConnect, BinaryNet)."""
        return self.variant in ("binaryconnect", "binarynet")

    @property
    def binary_activations(self) -> bool:
        """Whether activations are binarised by the next layer's input quantiser (so no ReLU)."""
        return self.variant in ("binarynet", "binary-activations")

    def input_binarised(self, first: bool) -> bool:
        """Whether the layer's input is binarised (binary activations; the first layer optionally)."""
        return self.binary_activations and (self.binarize_input or not first)

    def _quantizer(self, binarisation: str, kernel: bool = False) -> SwitchableSteSign:
        if binarisation != "stochastic":
            return SwitchableSteSign(self.clipped, self.clip_value)
        # A kernel clipped to BinaryConnect's [-H, H] draws in units of H, as BinaryConnect does.
        scale = "glorot" if kernel and self.weight_clip == "glorot" else 1.0
        return StochasticSteSign(self.clipped, self.clip_value, scale=scale)

    def layer_kwargs(self, first: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"use_bias": False, "kernel_initializer": "glorot_uniform"}
        if self.input_binarised(first):
            kwargs["input_quantizer"] = self._quantizer(self.activation_binarisation)
        if not self.binary_weights:
            return kwargs
        kwargs["kernel_quantizer"] = self._quantizer(self.weight_binarisation, kernel=True)
        if self.weight_clip is not None:
            kwargs["kernel_constraint"] = SwitchableWeightClip(
                clip_value=self.clip_value,
                enabled=self.clipped,
                glorot_range=self.weight_clip == "glorot",
            )
        return kwargs


def mlp_parameters(input_shape: Sequence[int], num_classes: int, hidden_units: Sequence[int]) -> int:
    """The number of weights (kernels and BN's four vectors) of `mlp`, without building it."""
    widths = [_product(input_shape), *map(int, hidden_units), int(num_classes)]
    return sum(n_in * n_out + 4 * n_out for n_in, n_out in zip(widths, widths[1:]))


def _batch_norm(name: str, momentum: float, epsilon: float, synchronized: bool) -> tf.keras.layers.Layer:
    return tf.keras.layers.BatchNormalization(
        momentum=momentum, epsilon=epsilon, synchronized=bool(synchronized), name=name
    )


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden_units: Sequence[int] = (2048, 2048, 2048),
    variant: str = "binaryconnect",
    bn_momentum: float = 0.85,
    bn_epsilon: float = 1e-4,
    clipped: bool = False,
    weight_clip: str | None = "unit",
    clip_value: float = 1.0,
    binarize_input: bool = True,
    synchronized_bn: bool = False,
    weight_binarisation: str = "deterministic",
    activation_binarisation: str = "deterministic",
    name: str | None = None,
) -> tf.keras.Model:
    """The study's MNIST MLP: hidden dense (no bias) -> BN -> ReLU, output dense -> BN.

    Args:
        input_shape: shape of one example, e.g. (28, 28, 1); it is flattened.
        num_classes: units of the output layer.
        hidden_units: units of each hidden layer (the study: 3 x 2048).
        variant: "float", "binaryconnect" (default), "binarynet" (no ReLU: the next
            layer binarises the BN output) or "binary-activations" (binarynet's
            activations, real-valued weights without weight clip).
        bn_momentum, bn_epsilon: of every BatchNormalization (the study: 0.85, 1e-4).
        clipped: start in the clipped phase (clipped STE and weight clipping on);
            a `ClippingSchedule` can flip it later either way.
        weight_clip: "unit" ([-clip_value, clip_value]), "glorot" (BinaryConnect's
            per-layer [-H, H]) or None (no weight-clip constraint at all).
        clip_value: STE clip and weight-clip range.
        binarize_input: BinaryNet (and binary-activations) only: binarise the network's
            input (the first layer is then fully binary, as Larq Compute Engine needs);
            False keeps it real.
        synchronized_bn: BatchNormalization computes its batch statistics over all
            replicas of a `tf.distribute` strategy (for runs on more than one replica).
        weight_binarisation: "deterministic" (default: the sign, `SwitchableSteSign`) or
            "stochastic" (`StochasticSteSign`: +1 with probability clip((w + 1) / 2, 0, 1)
            while training, the sign at inference) for the binary kernels.
        activation_binarisation: the same choice for the input quantisers (binary
            activations).

    Layers are named ``dense_1, bn_1, relu_1, ..., dense_out, bn_out``. A model whose
    training state (`TRAINING_BYTES_PER_PARAMETER` per parameter) would not fit in this
    machine's physical memory is refused with ValueError before anything is allocated.

    ```python
    model = mlp((28, 28, 1), 10, hidden_units=(256, 256), variant="binarynet")
    ```
    """
    _check_bn(bn_momentum, bn_epsilon, num_classes)
    binariser = _Binariser(
        variant, clipped, weight_clip, clip_value, binarize_input, weight_binarisation, activation_binarisation
    )
    rule = _rules().MODEL_FLAGS["hidden_units"]
    if isinstance(hidden_units, (str, bytes)) or not hasattr(hidden_units, "__iter__"):
        integers = rule.expected.replace("an integer", "integers")
        raise ValueError(f"hidden_units must be a sequence of {integers}, got {hidden_units!r}")
    units = list(hidden_units)
    for width in units:
        rule.check("each of hidden_units", width)
    units = [int(u) for u in units]
    _check_fits(mlp_parameters(input_shape, num_classes, units), f"hidden_units {units}")

    inputs = tf.keras.Input(shape=tuple(input_shape), name="image")
    x = tf.keras.layers.Flatten(name="flatten")(inputs)
    for i, width in enumerate(units, start=1):
        x = lq.layers.QuantDense(width, name=f"dense_{i}", **binariser.layer_kwargs(i == 1))(x)
        x = _batch_norm(f"bn_{i}", bn_momentum, bn_epsilon, synchronized_bn)(x)
        if not binariser.binary_activations:
            x = tf.keras.layers.Activation("relu", name=f"relu_{i}")(x)
    x = lq.layers.QuantDense(
        int(num_classes), name="dense_out", **binariser.layer_kwargs(not units)
    )(x)
    outputs = _batch_norm("bn_out", bn_momentum, bn_epsilon, synchronized_bn)(x)
    return tf.keras.Model(inputs, outputs, name=name or f"mlp_{variant}")


VGG10_CONVOLUTIONS: tuple[tuple[int, bool], ...] = (
    (128, False), (128, True), (256, False), (256, True), (512, False), (512, True),
)
"""(filters, followed by a 2x2 max-pool) of VGG-10's six convolutions."""

VGG10_DENSE: tuple[int, ...] = (1024, 1024)
"""Units of VGG-10's hidden dense layers."""


def vgg10(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width_multiplier: float = 1.0,
    block_order: str = "paper",
    variant: str = "binaryconnect",
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-4,
    clipped: bool = False,
    weight_clip: str | None = "unit",
    clip_value: float = 1.0,
    binarize_input: bool = True,
    synchronized_bn: bool = False,
    weight_binarisation: str = "deterministic",
    activation_binarisation: str = "deterministic",
    name: str | None = None,
) -> tf.keras.Model:
    """The study's CIFAR-10 VGG-10 with the pool right after its convolution.

    128C3-128C3-MP2-256C3-256C3-MP2-512C3-512C3-MP2-FC1024-FC1024-FC10 (every width but
    the output's times `width_multiplier`, at least 1); each conv block is
    conv (3x3, stride 1, SAME, no bias) -> [2x2 max-pool] -> BN -> ReLU, each dense
    block dense (no bias) -> BN -> ReLU, the output dense -> BN. A convolution whose
    input is binarised (BinaryNet) pads with +1 (`pad_values=1.0`): Larq Compute
    Engine's binary convolution needs that for SAME padding.

    ``block_order="conventional"`` moves each pool after the activation (conv -> BN ->
    ReLU -> pool; BinaryNet: conv -> BN -> pool); the parameters are the same (BN normalises the same channels), the
    outputs are not (BN's statistics are taken before the max instead of after it).

    Arguments (`variant`, `weight_binarisation`, `activation_binarisation`, ...) as in
    `mlp` (so is the memory check); layers are named ``conv_1, pool_2, bn_1, relu_1, ...,
    dense_1, ..., dense_out, bn_out``.

    ```python
    model = vgg10((32, 32, 3), 10, width_multiplier=0.25, variant="binarynet")
    ```
    """
    _check_bn(bn_momentum, bn_epsilon, num_classes)
    binariser = _Binariser(
        variant, clipped, weight_clip, clip_value, binarize_input, weight_binarisation, activation_binarisation
    )
    _rules().MODEL_FLAGS["width_multiplier"].check("width_multiplier", width_multiplier)
    _rules().MODEL_FLAGS["block_order"].check("block_order", block_order)
    parameters = vgg10_parameters(input_shape, num_classes, width_multiplier)
    _check_fits(parameters, f"width_multiplier {width_multiplier:g} and input shape {tuple(input_shape)}")

    def width(units: int) -> int:
        return _vgg10_width(units, width_multiplier)

    def activation(x: tf.Tensor, i: str) -> tf.Tensor:
        return x if binariser.binary_activations else tf.keras.layers.Activation("relu", name=f"relu_{i}")(x)

    inputs = tf.keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for i, (filters, pool) in enumerate(VGG10_CONVOLUTIONS, start=1):
        x = lq.layers.QuantConv2D(
            width(filters),
            3,
            strides=1,
            padding="same",
            pad_values=1.0 if binariser.input_binarised(i == 1) else 0.0,
            name=f"conv_{i}",
            **binariser.layer_kwargs(i == 1),
        )(x)
        if pool and block_order == "paper":
            x = tf.keras.layers.MaxPool2D(2, strides=2, name=f"pool_{i}")(x)
        x = _batch_norm(f"bn_{i}", bn_momentum, bn_epsilon, synchronized_bn)(x)
        x = activation(x, str(i))
        if pool and block_order == "conventional":
            x = tf.keras.layers.MaxPool2D(2, strides=2, name=f"pool_{i}")(x)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(VGG10_DENSE, start=1):
        x = lq.layers.QuantDense(width(units), name=f"dense_{i}", **binariser.layer_kwargs(False))(x)
        x = _batch_norm(f"bn_dense_{i}", bn_momentum, bn_epsilon, synchronized_bn)(x)
        x = activation(x, f"dense_{i}")
    x = lq.layers.QuantDense(int(num_classes), name="dense_out", **binariser.layer_kwargs(False))(x)
    outputs = _batch_norm("bn_out", bn_momentum, bn_epsilon, synchronized_bn)(x)
    return tf.keras.Model(inputs, outputs, name=name or f"vgg10_{variant}")


def _vgg10_width(units: int, width_multiplier: float) -> int:
    scaled = units * width_multiplier
    if not math.isfinite(scaled):  # a huge multiplier: exact enough for the memory check to refuse it
        return units * int(width_multiplier)
    return max(1, int(round(scaled)))


def vgg10_parameters(input_shape: Sequence[int], num_classes: int, width_multiplier: float = 1.0) -> int:
    """The number of weights (kernels and BN's four vectors) of `vgg10`, without building it."""
    if len(input_shape) != 3:
        raise ValueError(f"vgg10 needs an input shape (height, width, channels), got {tuple(input_shape)}")
    height, width, channels = (int(d) for d in input_shape)
    if min(height, width) < 8:
        raise ValueError(
            f"vgg10 needs images of at least 8x8 (it pools 2x2 three times), got input shape {tuple(input_shape)}"
        )
    total = 0
    for filters, pool in VGG10_CONVOLUTIONS:
        filters = _vgg10_width(filters, width_multiplier)
        total += 9 * channels * filters + 4 * filters
        channels = filters
        if pool:
            height, width = height // 2, width // 2
    widths = [height * width * channels, *(_vgg10_width(u, width_multiplier) for u in VGG10_DENSE), int(num_classes)]
    return total + sum(n_in * n_out + 4 * n_out for n_in, n_out in zip(widths, widths[1:]))


RESNET18_STEM: int = 64
"""Filters of ResNet-18's 3x3 stem convolution."""

RESNET18_STAGES: tuple[tuple[int, int], ...] = ((64, 1), (128, 2), (256, 2), (512, 2))
"""(filters, stride of the first block) of ResNet-18's four stages of two basic blocks."""


def resnet18(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width_multiplier: float = 1.0,
    variant: str = "binaryconnect",
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-4,
    clipped: bool = False,
    weight_clip: str | None = "unit",
    clip_value: float = 1.0,
    binarize_input: bool = True,
    synchronized_bn: bool = False,
    weight_binarisation: str = "deterministic",
    activation_binarisation: str = "deterministic",
    name: str | None = None,
) -> tf.keras.Model:
    """The CIFAR-style ResNet-18 the study binarised (Alizadeh et al., 2019, Table 5).

    A 3x3 stem conv (64, stride 1) -> BN -> act, then four stages of two basic blocks,
    64-128-256-512 filters (every width times `width_multiplier`, at least 1), stride 2
    in the first block of stages 2-4. A basic block is conv3x3 -> BN -> act -> conv3x3
    -> BN, plus the shortcut, then act; the shortcut is the identity, or a 1x1 conv
    (stride of the block, no bias) -> BN where the shape changes. Then global average
    pool -> dense (no bias) -> BN, as VGG-10's output layer. Convolutions are SAME, no
    bias; a binarised input pads with +1 (`pad_values=1.0`), as in `vgg10`.

    Binary, as in `vgg10`'s first and last layers: the stem, all 16 block convolutions
    and the dense classifier (in BinaryNet the stem's input is binarised unless
    ``binarize_input=False``). Real-valued: the three 1x1 shortcut convolutions (plain
    `Conv2D`, no quantiser, no weight clip), the residual sums and every BN. BinaryNet
    has no ReLU: the next binary layer binarises the real-valued sum.

    Arguments (`variant`, `weight_binarisation`, `activation_binarisation`, ...) as in
    `mlp` (so is the memory check); layers are named ``stem_conv,
    stem_bn, stem_relu, block{stage}_{block}_conv_1, ..._bn_1, ..._relu_1, ..._conv_2,
    ..._bn_2, [..._shortcut_conv, ..._shortcut_bn,] ..._add, ..._relu, ..., pool,
    dense_out, bn_out``.

    ```python
    model = resnet18((32, 32, 3), 10, width_multiplier=0.125, variant="binarynet")
    ```
    """
    _check_bn(bn_momentum, bn_epsilon, num_classes)
    binariser = _Binariser(
        variant, clipped, weight_clip, clip_value, binarize_input, weight_binarisation, activation_binarisation
    )
    _rules().MODEL_FLAGS["width_multiplier"].check("width_multiplier", width_multiplier)
    parameters = resnet18_parameters(input_shape, num_classes, width_multiplier)
    _check_fits(parameters, f"width_multiplier {width_multiplier:g} and input shape {tuple(input_shape)}")

    def batch_norm(x: tf.Tensor, name: str) -> tf.Tensor:
        return _batch_norm(name, bn_momentum, bn_epsilon, synchronized_bn)(x)

    def activation(x: tf.Tensor, name: str) -> tf.Tensor:
        return x if binariser.binary_activations else tf.keras.layers.Activation("relu", name=name)(x)

    def binary_conv(x: tf.Tensor, filters: int, strides: int, name: str, first: bool = False) -> tf.Tensor:
        return lq.layers.QuantConv2D(
            filters,
            3,
            strides=strides,
            padding="same",
            pad_values=1.0 if binariser.input_binarised(first) else 0.0,
            name=name,
            **binariser.layer_kwargs(first),
        )(x)

    inputs = tf.keras.Input(shape=tuple(input_shape), name="image")
    channels = _vgg10_width(RESNET18_STEM, width_multiplier)
    x = activation(batch_norm(binary_conv(inputs, channels, 1, "stem_conv", first=True), "stem_bn"), "stem_relu")
    for stage, (filters, stride) in enumerate(RESNET18_STAGES, start=1):
        filters = _vgg10_width(filters, width_multiplier)
        for block, strides in ((1, stride), (2, 1)):
            label = f"block{stage}_{block}"
            y = binary_conv(x, filters, strides, f"{label}_conv_1")
            y = activation(batch_norm(y, f"{label}_bn_1"), f"{label}_relu_1")
            y = batch_norm(binary_conv(y, filters, 1, f"{label}_conv_2"), f"{label}_bn_2")
            shortcut = x
            if strides != 1 or channels != filters:  # a real-valued projection: only the 3x3 convolutions are binary
                shortcut = tf.keras.layers.Conv2D(
                    filters, 1, strides=strides, use_bias=False, kernel_initializer="glorot_uniform",
                    name=f"{label}_shortcut_conv",
                )(x)
                shortcut = batch_norm(shortcut, f"{label}_shortcut_bn")
            x = activation(tf.keras.layers.Add(name=f"{label}_add")([y, shortcut]), f"{label}_relu")
            channels = filters
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = lq.layers.QuantDense(int(num_classes), name="dense_out", **binariser.layer_kwargs(False))(x)
    outputs = _batch_norm("bn_out", bn_momentum, bn_epsilon, synchronized_bn)(x)
    return tf.keras.Model(inputs, outputs, name=name or f"resnet18_{variant}")


def resnet18_parameters(input_shape: Sequence[int], num_classes: int, width_multiplier: float = 1.0) -> int:
    """The number of weights (kernels and BN's four vectors) of `resnet18`, without building it."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet18 needs an input shape (height, width, channels), got {tuple(input_shape)}")
    channels = int(input_shape[-1])
    stem = _vgg10_width(RESNET18_STEM, width_multiplier)
    total = 9 * channels * stem + 4 * stem
    channels = stem
    for filters, stride in RESNET18_STAGES:
        filters = _vgg10_width(filters, width_multiplier)
        for strides in (stride, 1):
            total += 9 * channels * filters + 9 * filters * filters + 2 * 4 * filters
            if strides != 1 or channels != filters:
                total += channels * filters + 4 * filters
            channels = filters
    return total + channels * int(num_classes) + 4 * int(num_classes)


_REGISTRY: dict[str, Callable[..., tf.keras.Model]] = {"mlp": mlp, "resnet18": resnet18, "vgg10": vgg10}

NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))
"""The model names `get` knows."""


def get(name: str) -> Callable[..., tf.keras.Model]:
    """The model builder called `name` ("mlp", "resnet18" or "vgg10").

    ```python
    model = get("mlp")((28, 28, 1), 10, hidden_units=(512, 512, 512))
    ```
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(NAMES)}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------- two-stage


def _weighted_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Dense/conv and BN layers in model order, looking into nested models."""
    found: list[tf.keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(_weighted_layers(layer))
        elif isinstance(layer, (tf.keras.layers.Dense, tf.keras.layers.Conv2D, tf.keras.layers.BatchNormalization)):
            found.append(layer)
    return found


def _kind(layer: tf.keras.layers.Layer) -> str:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
        return "batch-norm"
    return "conv" if isinstance(layer, tf.keras.layers.Conv2D) else "dense"


def _describe(layer: tf.keras.layers.Layer) -> str:
    if _kind(layer) == "batch-norm":
        return f"{layer.name!r} ({type(layer).__name__}, {layer.moving_mean.shape[0]} channels)"
    bias = "with bias" if getattr(layer, "bias", None) is not None else "no bias"
    return f"{layer.name!r} ({type(layer).__name__}, kernel {tuple(layer.kernel.shape)}, {bias})"


def _bn_variables(layer: tf.keras.layers.BatchNormalization) -> list[tf.Variable | None]:
    return [layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance]


def copy_weights(source: tf.keras.Model, target: tf.keras.Model) -> int:
    """Copy kernels, biases and BN parameters and statistics from `source` into `target`.

    The two-stage schedule's hand-over: a trained float model (``variant="float"``) into
    the binary model of the same architecture. Layers are matched by position among the
    dense, convolution and BatchNormalization layers of each model; quantiser and clip
    flags of the target are left as they are. Returns the number of layers copied.

    Raises ValueError, in one line, at the first pair that differs in kind or shape.

    ```python
    float_model = mlp((28, 28, 1), 10, variant="float")
    # ... float_model.fit(...)
    binary_model = mlp((28, 28, 1), 10, variant="binaryconnect", clipped=True)
    copy_weights(float_model, binary_model)
    ```
    """
    sources, targets = _weighted_layers(source), _weighted_layers(target)
    if len(sources) != len(targets):
        raise ValueError(
            f"copy_weights: {source.name!r} has {len(sources)} dense/conv/BN layers but "
            f"{target.name!r} has {len(targets)}"
        )
    for index, (src, dst) in enumerate(zip(sources, targets)):
        if _kind(src) != _kind(dst):
            raise ValueError(
                f"copy_weights: layer {index} is {_describe(src)} in the source but "
                f"{_describe(dst)} in the target"
            )
        if _kind(src) == "batch-norm":
            pairs = list(zip(_bn_variables(src), _bn_variables(dst)))
            if any((s is None) != (d is None) for s, d in pairs):
                raise ValueError(
                    f"copy_weights: layer {index}: batch-norm {src.name!r} and {dst.name!r} "
                    "differ in center/scale"
                )
        else:
            src_bias, dst_bias = getattr(src, "bias", None), getattr(dst, "bias", None)
            if (src_bias is None) != (dst_bias is None):
                raise ValueError(
                    f"copy_weights: layer {index} is {_describe(src)} in the source but "
                    f"{_describe(dst)} in the target"
                )
            pairs = [(src.kernel, dst.kernel), (src_bias, dst_bias)]
        for s, d in pairs:
            if s is None:
                continue
            if s.shape != d.shape:
                raise ValueError(
                    f"copy_weights: layer {index} is {_describe(src)} in the source but "
                    f"{_describe(dst)} in the target"
                )
            d.assign(s)
    return len(sources)

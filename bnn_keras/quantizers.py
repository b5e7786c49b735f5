r"""The study's straight-through-estimator (STE) sign quantisers, as Larq quantisers.

Forward, all three binarise with Larq's sign (sign(0) = +1), the pattern Larq Compute
Engine lowers to binary ops:

$$q(x) = \begin{cases} -1 & x < 0 \\ +1 & x \geq 0 \end{cases}$$

Backward they differ:

- `VanillaSteSign`: identity, $\partial C/\partial x = \partial C/\partial q$ (Bengio 2013);
- `ClippedSteSign`: hard-tanh gradient, $\partial C/\partial x = \partial C/\partial q \cdot
  1_{|x| \leq c}$ (the study's "gradient clipping");
- `SwitchableSteSign`: either, chosen at run time by a non-trainable variable so a schedule
  can switch inside one compiled `fit` without retracing.

Each is registered with Keras and with Larq's string aliases, so
`lq.layers.QuantDense(..., kernel_quantizer="clipped_ste_sign")` works.
"""

from __future__ import annotations

from typing import Any

import larq as lq
import tensorflow as tf
from larq import utils as lq_utils

from bnn_keras._switch import Switchable

__all__ = ["ClippedSteSign", "SwitchableMagnitudeAwareSign", "SwitchableSteSign", "VanillaSteSign", "get"]

_PACKAGE = "bnn_keras"


def _register(alias: str):
    """Register a quantiser for Keras serialisation and under Larq-style string names."""

    def decorate(cls):
        cls = tf.keras.utils.register_keras_serializable(package=_PACKAGE)(cls)
        cls = lq_utils.register_keras_custom_object(cls)
        return lq_utils.register_alias(alias)(cls)

    return decorate


@_register("vanilla_ste_sign")
class VanillaSteSign(lq.quantizers.SteSign):
    r"""Sign with the vanilla (identity) straight-through gradient.

    $q(x) = \mathrm{sign}(x)$ with sign(0) = +1; $\partial q / \partial x = 1$ everywhere.

    ```python
    q = VanillaSteSign()
    q(tf.constant([-2.0, 0.0, 0.5]))  # [-1., 1., 1.], gradient [1., 1., 1.]
    ```
    """

    def __init__(self, **kwargs: Any):
        kwargs.pop("clip_value", None)
        super().__init__(clip_value=None, **kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("clip_value", None)
        return config


@_register("clipped_ste_sign")
class ClippedSteSign(lq.quantizers.SteSign):
    r"""Sign with the clipped (hard-tanh) straight-through gradient.

    $q(x) = \mathrm{sign}(x)$; $\partial q / \partial x = 1_{|x| \leq c}$ with
    c = `clip_value` (gradient kept at exactly |x| = c).

    ```python
    q = ClippedSteSign(clip_value=1.0)
    q(tf.constant([-2.0, 0.0, 1.0]))  # [-1., 1., 1.], gradient [0., 1., 1.]
    ```
    """

    def __init__(self, clip_value: float = 1.0, **kwargs: Any):
        if clip_value is None or not clip_value > 0:
            raise ValueError(f"clip_value must be a positive number, got {clip_value!r}")
        super().__init__(clip_value=float(clip_value), **kwargs)


class _SwitchableSign(Switchable):
    """A Larq sign quantiser's clip value and the run-time flag that turns its clipping on."""

    _switch_name = "clipped"

    def __init__(self, clipped: bool = False, clip_value: float = 1.0, **kwargs: Any):
        if clip_value is None or not clip_value > 0:
            raise ValueError(f"clip_value must be a positive number, got {clip_value!r}")
        super().__init__(clip_value=float(clip_value), **kwargs)
        self._init_switch(bool(clipped))

    def _switched_sign(self, inputs: tf.Tensor) -> tf.Tensor:
        # An infinite clip value is the vanilla STE: |x| <= inf everywhere.
        clip = tf.where(self._switch_on(), self.clip_value, float("inf"))
        return lq.quantizers.ste_sign(inputs, clip_value=clip)

    @property
    def non_trainable_weights(self) -> list[tf.Variable]:
        # Larq's quantiser base hides all its variables; the flag must be saved.
        return [self._switch]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "clipped": self.clipping_enabled}


@_register("switchable_ste_sign")
class SwitchableSteSign(_SwitchableSign, lq.quantizers.SteSign):
    r"""Sign whose STE switches between vanilla and clipped at run time.

    $\partial q / \partial x = 1$ while `clipped` is off and $1_{|x| \leq c}$ while it is
    on. The flag is a non-trainable variable (a weight of the layer that owns the
    quantiser), so `bnn_keras.set_clipping(model, True)` or
    `bnn_keras.callbacks.ClippingSchedule` flip it inside a compiled `fit` without
    retracing, and it is saved by `model.save` (.keras, .h5, SavedModel),
    `save_weights` and `tf.train.Checkpoint`.

    ```python
    q = SwitchableSteSign()          # vanilla phase
    q.set_clipping_enabled(True)     # clipped phase from the next step on
    ```
    """

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        # Skip SteSign.call (it would quantise again); Larq's base adds flip-ratio metrics.
        return super(lq.quantizers.SteSign, self).call(self._switched_sign(inputs))


@_register("switchable_magnitude_aware_sign")
class SwitchableMagnitudeAwareSign(_SwitchableSign, lq.quantizers.MagnitudeAwareSign):
    r"""Bi-Real Net's magnitude-aware sign whose STE switches between vanilla and clipped.

    $q(x) = \mathrm{sign}(x) \cdot \overline{|x|}$ (the mean over every axis but the
    last, outside the gradient), as `lq.quantizers.MagnitudeAwareSign`; the gradient
    switches as `SwitchableSteSign`'s does. `bnn_keras.make_switchable` puts it in place
    of ``"magnitude_aware_sign"``.

    ```python
    q = SwitchableMagnitudeAwareSign(clipped=True, clip_value=1.0)
    ```
    """

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        scale = tf.stop_gradient(tf.reduce_mean(tf.abs(inputs), axis=list(range(len(inputs.shape) - 1))))
        # Skip MagnitudeAwareSign.call (it would quantise again); Larq's base: metrics only.
        return super(lq.quantizers.MagnitudeAwareSign, self).call(scale * self._switched_sign(inputs))


def get(identifier: Any) -> Any:
    """Resolve a quantiser name, config or object, as Larq does (`lq.quantizers.get`)."""
    return lq.quantizers.get(identifier)

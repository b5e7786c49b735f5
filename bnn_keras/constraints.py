r"""Weight clipping that can be switched on and off during training.

"Weight clipping" in the study: after each optimiser update the latent weight is clipped,
$w_r \leftarrow \mathrm{clip}(w_r, -c, c)$, with c = 1, or BinaryConnect's per-layer
Glorot range $c = H = \sqrt{1.5 / (\mathrm{fan\_in} + \mathrm{fan\_out})}$ (fans include
the receptive field).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import larq as lq
import tensorflow as tf
from larq import utils as lq_utils

from bnn_keras._switch import Switchable

__all__ = ["SwitchableWeightClip", "glorot_limit"]


def glorot_limit(shape: Sequence[int]) -> float:
    """BinaryConnect's per-layer range H = sqrt(1.5 / (fan_in + fan_out)).

    For a kernel of shape (*receptive_field, in, out): fan_in = prod(rf) * in and
    fan_out = prod(rf) * out (Keras' and Theano's convention).

    ```python
    glorot_limit((784, 2048))  # 0.02285...
    ```
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"glorot_limit needs a kernel shape of rank >= 2, got {shape}")
    receptive_field = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
    return math.sqrt(1.5 / (fan_in + fan_out))


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
@lq_utils.register_alias("switchable_weight_clip")
@lq_utils.register_keras_custom_object
class SwitchableWeightClip(Switchable, tf.keras.layers.Layer, tf.keras.constraints.Constraint):
    r"""Weight clipping to [-c, c] that a schedule turns on and off at run time.

    With `enabled` off the constraint is the identity; on, it is Larq's
    `WeightClip(c)`, with c = `clip_value`, or c = H per layer when `glorot_range=True`.
    It is a Keras *Layer* only so that its on/off variable is tracked as a weight of the
    layer it constrains and saved with it (.keras, .h5, SavedModel, `save_weights`,
    `tf.train.Checkpoint`); use it as a constraint:

    ```python
    layer = lq.layers.QuantDense(
        256, kernel_quantizer="switchable_ste_sign",
        kernel_constraint=SwitchableWeightClip(clip_value=1.0))
    bnn_keras.set_clipping(model, True)   # clipping on from the next update
    ```
    """

    _switch_name = "clip_enabled"

    def __init__(
        self,
        clip_value: float = 1.0,
        enabled: bool = False,
        glorot_range: bool = False,
        **kwargs: Any,
    ):
        if clip_value is None or not clip_value > 0:
            raise ValueError(f"clip_value must be a positive number, got {clip_value!r}")
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.clip_value = float(clip_value)
        self.glorot_range = bool(glorot_range)
        self._init_switch(bool(enabled))

    def limit(self, shape: Sequence[int]) -> float:
        """The clip range c for a kernel of this shape."""
        return glorot_limit(shape) if self.glorot_range else self.clip_value

    def __call__(self, w: tf.Tensor) -> tf.Tensor:
        # Called by the optimiser, not in a model graph: skip Layer.__call__'s machinery.
        return self.call(w)

    def call(self, w: tf.Tensor) -> tf.Tensor:
        # An infinite range is the identity, so both phases run the same single op.
        limit = tf.where(self._switch_on(), self.limit(w.shape), float("inf"))
        return lq.constraints.WeightClip(clip_value=limit)(w)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "clip_value": self.clip_value,
            "enabled": self.clipping_enabled,
            "glorot_range": self.glorot_range,
        }

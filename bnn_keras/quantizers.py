r"""The study's straight-through-estimator (STE) sign quantisers, as Larq quantisers.

Forward, all three binarise with Larq's sign (sign(0) = +1), the pattern Larq Compute
Engine lowers to binary ops:

$$q(x) = \begin{cases} -1 & x < 0 \\ +1 & x \geq 0 \end{cases}$$

Backward they differ:

- `VanillaSteSign`: identity, $\partial C/\partial x = \partial C/\partial q$ (Bengio 2013);
- `ClippedSteSign`: hard-tanh gradient, $\partial C/\partial x = \partial C/\partial q \cdot
  1_{|x| \leq c}$ (the study's "gradient clipping");
- `SwitchableSteSign`: either, chosen at run time by a non-trainable variable so a schedule
  can switch inside one compiled `fit` without retracing;
- `StochasticSteSign`: `SwitchableSteSign`'s gradient, but while training the forward
  pass draws +1 with probability hard_sigmoid(x) (BinaryConnect's stochastic
  binarisation); at inference it is the sign above.

Each is registered with Keras and with Larq's string aliases, so
`lq.layers.QuantDense(..., kernel_quantizer="clipped_ste_sign")` works.
"""

from __future__ import annotations

import random
from typing import Any

import larq as lq
import tensorflow as tf
from larq import utils as lq_utils

from bnn_keras._switch import Switchable

__all__ = [
    "ClippedSteSign",
    "StochasticSteSign",
    "SwitchableMagnitudeAwareSign",
    "SwitchableSteSign",
    "VanillaSteSign",
    "get",
]

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


@_register("stochastic_ste_sign")
class StochasticSteSign(SwitchableSteSign):
    r"""BinaryConnect's stochastic sign while training, the deterministic sign otherwise.

    Training (``training=True``, as `model.fit` passes it to every layer):

    $$q(x) = \begin{cases} +1 & \text{with probability } p = \sigma(x) =
    \mathrm{clip}\left(\tfrac{x + 1}{2}, 0, 1\right) \\ -1 & \text{with probability } 1 - p
    \end{cases}$$

    so $E[q(x)] = 2\sigma(x) - 1$ (Courbariaux et al., 2015). Inference (``training``
    None or False: `predict`, `evaluate`, export): $q(x) = \mathrm{sign}(x)$ with
    sign(0) = +1, exactly as `SwitchableSteSign`, so Larq Compute Engine still lowers it
    to binary ops. Backward, in both: `SwitchableSteSign`'s straight-through gradient,
    $1$ while `clipped` is off and $1_{|x| \leq c}$ while it is on.

    `scale` s measures x in units of s: $p = \mathrm{clip}((x / s + 1) / 2, 0, 1)$.
    ``"glorot"`` takes BinaryConnect's per-layer range $H = \sqrt{1.5 / (fan_{in} +
    fan_{out})}$ of the kernel it binarises, as BinaryConnect's own code draws with
    hard_sigmoid(W / H) for weights clipped to [-H, H] (`SwitchableWeightClip` with
    ``glorot_range``): a latent weight at the clip is then binarised deterministically.
    With the default s = 1 and Glorot-initialised kernels (|w| of a few hundredths) the
    draw is close to a coin flip until the weights grow.

    The draws are stateless: uniform noise seeded by ``(seed, n)``, where n counts this
    quantiser's training calls in a non-trainable variable saved with the model's
    weights, so a resumed run replays the draws it would have made. Without `seed`, one
    is drawn from Python's `random` (which `tf.keras.utils.set_random_seed` seeds). XLA
    (``jit_compile=True``) draws other noise than TensorFlow's kernels from the same seed,
    equally reproducible; under `tf.distribute` every replica draws the same.

    ```python
    q = StochasticSteSign(seed=0)
    x = tf.constant([-1.0, -0.5, 0.0, 0.5, 1.0])
    q(x)                 # [-1., -1., 1., 1., 1.]: the sign
    q(x, training=True)  # e.g. [-1., -1., 1., 1., 1.] or [-1., 1., -1., -1., 1.]; E = [-1, -.5, 0, .5, 1]
    ```
    """

    def __init__(
        self,
        clipped: bool = False,
        clip_value: float = 1.0,
        seed: int | None = None,
        scale: float | str = 1.0,
        **kwargs: Any,
    ):
        if scale != "glorot" and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"scale must be a number > 0 or 'glorot', got {scale!r}")
        if seed is None:
            seed = random.randrange(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
        super().__init__(clipped=clipped, clip_value=clip_value, **kwargs)
        self.seed, self.scale = seed, scale if scale == "glorot" else float(scale)
        self._scale = 1.0 if scale == "glorot" else float(scale)  # glorot: H, known at build
        # ONLY_FIRST_REPLICA: one count under tf.distribute, so every replica draws the same weights.
        self._draws = self.add_weight(
            name=f"{self.name}_draws",
            shape=(),
            dtype=tf.int64,
            initializer="zeros",
            trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def build(self, input_shape: Any) -> None:
        if self.scale == "glorot":
            from bnn_keras.constraints import glorot_limit

            self._scale = glorot_limit(tuple(input_shape))
        super().build(input_shape)

    @property
    def draws_variable(self) -> tf.Variable:
        """The non-trainable int64 variable counting the training calls (the draws' seed)."""
        return self._draws

    @property
    def non_trainable_weights(self) -> list[tf.Variable]:
        # The draw count is saved with the flag, so a resumed run continues the same draws.
        return [*super().non_trainable_weights, self._draws]

    def _stochastic_sign(self, inputs: tf.Tensor) -> tf.Tensor:
        count = self._draws.assign_add(1)
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(count, tf.int64)])
        noise = tf.random.stateless_uniform(tf.shape(inputs), seed=seed, dtype=inputs.dtype)
        probability = tf.clip_by_value((inputs / self._scale + 1.0) / 2.0, 0.0, 1.0)
        return tf.where(noise < probability, tf.ones_like(inputs), -tf.ones_like(inputs))

    def call(self, inputs: tf.Tensor, training: bool | tf.Tensor | None = None) -> tf.Tensor:
        deterministic = self._switched_sign(inputs)

        def stochastic() -> tf.Tensor:
            # The value of the draw, the gradient of the switchable STE.
            return deterministic + tf.stop_gradient(self._stochastic_sign(inputs) - deterministic)

        if training is None:
            training = False
        static = training if isinstance(training, bool) else tf.get_static_value(training)
        if static is not None:  # a Python (or constant) flag: no random op in an inference graph
            outputs = stochastic() if bool(static) else deterministic
        else:
            outputs = tf.cond(tf.cast(training, tf.bool), stochastic, lambda: deterministic)
        # Skip SwitchableSteSign.call (it would quantise again); Larq's base adds flip-ratio metrics.
        return super(lq.quantizers.SteSign, self).call(outputs)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed, "scale": self.scale}


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

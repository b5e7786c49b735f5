r"""Learning rates that change once per epoch, and reading or scaling any optimiser's rate.

- `ExponentialDecayPerEpoch`, `PiecewiseConstantPerEpoch`: learning rates that change once
  per epoch, with a run-time `scale` variable that `scale_learning_rate` multiplies (no
  retracing) and that checkpoints save.
- `current_learning_rate(optimizer)`, `scale_learning_rate(optimizer, factor)`: the rate the
  next step will use, and dropping it in place, looking through wrappers
  (`LayerwiseLrScaling`, Larq's `CaseOptimizer`/Bop, `LossScaleOptimizer`).

```python
lr = ExponentialDecayPerEpoch(1e-3, 3e-6, epochs=250, steps_per_epoch=540)
opt = tf.keras.optimizers.Adam(lr)
scale_learning_rate(opt, 0.1)  # 1e-4 from the next step on
```
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import larq as lq
import numpy as np
import tensorflow as tf
from larq import utils as lq_utils

__all__ = [
    "AnyOptimizer",
    "ExponentialDecayPerEpoch",
    "PiecewiseConstantPerEpoch",
    "current_learning_rate",
    "scale_learning_rate",
]

AnyOptimizer = Union[tf.keras.optimizers.Optimizer, tf.keras.optimizers.legacy.Optimizer]


# --------------------------------------------------------------------------- schedules


def _rule(field: str) -> Any:
    """The `bnn_keras.recipe` rule of `field`: rates follow lr_start's, counts of steps epochs'."""
    from bnn_keras.recipe import FIELDS  # recipe imports this module (through optimizers): read at call time

    return FIELDS[field]


class _PerEpochSchedule(tf.keras.optimizers.schedules.LearningRateSchedule, tf.Module):
    """A learning rate that depends on the epoch only, times a run-time `scale` variable.

    A `tf.Module` so that the optimiser holding it tracks `scale` in its checkpoints.
    """

    def __init__(self, steps_per_epoch: int, scale: float = 1.0, name: str | None = None):
        super().__init__(name=name)
        _rule("epochs").check("steps_per_epoch", steps_per_epoch)
        _rule("lr_start").check("scale", scale)
        self.steps_per_epoch = int(steps_per_epoch)
        with tf.init_scope():  # a schedule built inside a tf.function still owns its variable
            self.scale = tf.Variable(float(scale), trainable=False, dtype=tf.float32, name="scale")

    def epoch(self, step: tf.Tensor | int) -> tf.Tensor:
        """The epoch (float64, whole) that optimiser step `step` (int or float) belongs to."""
        return tf.floor(tf.cast(step, tf.float64) / self.steps_per_epoch)

    def _unscaled(self, step: tf.Tensor | int) -> tf.Tensor:
        """The rate at `step` before `scale`, as float64."""
        raise NotImplementedError

    def __call__(self, step: tf.Tensor | int) -> tf.Tensor:
        with tf.name_scope(self.name):
            value = self._unscaled(step) * tf.cast(self.scale, tf.float64)
            return tf.cast(value, tf.float32)

    def get_config(self) -> dict[str, Any]:
        # The root of the {**super().get_config(), ...} chain: Keras' base one raises.
        # `scale` is state, but saving it keeps a dropped LR in a .keras / .h5 model too.
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "scale": float(tf.keras.backend.get_value(self.scale)),
            "name": self.name,
        }


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
@lq_utils.register_keras_custom_object
class ExponentialDecayPerEpoch(_PerEpochSchedule):
    r"""The study's schedule: constant within an epoch, geometric from `start` to `end`.

    $\eta(e) = \mathrm{start} \cdot (\mathrm{end}/\mathrm{start})^{\min(e,\,E-1)/(E-1)}$
    for epoch $e = \lfloor \mathrm{step} / \mathrm{steps\_per\_epoch} \rfloor$ and
    $E$ = `epochs`: epoch 0 uses `start`, epoch E-1 (and any later one) uses `end`; each
    epoch multiplies the previous rate by $(\mathrm{end}/\mathrm{start})^{1/(E-1)}$.
    With `epochs=1` the rate stays `start`. The output is multiplied by `scale`. Computed
    by Keras' `ExponentialDecay(staircase=True)`, the step held at epoch E-1's first.

    ```python
    lr = ExponentialDecayPerEpoch(1e-3, 3e-6, epochs=250, steps_per_epoch=540)  # MNIST MLP
    lr(0), lr(539), lr(540), lr(249 * 540)  # 1e-3, 1e-3, 9.77e-4, 3e-6
    ```
    """

    def __init__(
        self,
        start: float,
        end: float,
        epochs: int,
        steps_per_epoch: int,
        scale: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(steps_per_epoch, scale=scale, name=name)
        _rule("lr_start").check("start", start)
        _rule("lr_start").check("end", end)
        _rule("epochs").check("epochs", epochs)
        self.start, self.end, self.epochs = float(start), float(end), int(epochs)
        rate = (self.end / self.start) ** (1 / (self.epochs - 1)) if self.epochs > 1 else 1.0
        # float64 start and rate: Keras computes in the start's dtype (float32 would round).
        self._decay = tf.keras.optimizers.schedules.ExponentialDecay(
            np.float64(self.start), self.steps_per_epoch, np.float64(rate), staircase=True
        )

    def _unscaled(self, step: tf.Tensor | int) -> tf.Tensor:
        last_epoch_start = (self.epochs - 1) * self.steps_per_epoch  # `end` from here on
        return self._decay(tf.minimum(tf.cast(step, tf.float64), float(last_epoch_start)))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "start": self.start,
            "end": self.end,
            "epochs": self.epochs,
        }


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
@lq_utils.register_keras_custom_object
class PiecewiseConstantPerEpoch(_PerEpochSchedule):
    """`values[i]` from epoch `boundaries_epochs[i-1]` on (`values[0]` before the first).

    A boundary is the first epoch of the next value: epoch e uses `values[k]` where k is
    the number of boundaries <= e. The output is multiplied by `scale`.

    ```python
    lr = PiecewiseConstantPerEpoch([100, 150], [1e-3, 1e-4, 1e-5], steps_per_epoch=500)
    lr(99 * 500), lr(100 * 500), lr(150 * 500)  # 1e-3, 1e-4, 1e-5
    ```
    """

    def __init__(
        self,
        boundaries_epochs: Sequence[int],
        values: Sequence[float],
        steps_per_epoch: int,
        scale: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(steps_per_epoch, scale=scale, name=name)
        boundaries = tuple(int(b) for b in boundaries_epochs)
        if list(boundaries) != list(boundaries_epochs):
            raise ValueError(f"boundaries_epochs must be integers, got {list(boundaries_epochs)}")
        increasing = all(a < b for a, b in zip(boundaries, boundaries[1:]))
        if not increasing or any(b < 0 for b in boundaries):
            raise ValueError(
                f"boundaries_epochs must be increasing and >= 0, got {list(boundaries)}"
            )
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"values needs len(boundaries_epochs) + 1 = {len(boundaries) + 1} entries, "
                f"got {len(values)}"
            )
        for index, value in enumerate(values):
            _rule("lr_start").check(f"values[{index}]", value)
        self.boundaries_epochs = boundaries
        self.values = tuple(float(v) for v in values)

    def _unscaled(self, step: tf.Tensor | int) -> tf.Tensor:
        # Not Keras' PiecewiseConstantDecay: it gives a boundary step the earlier value.
        epoch = self.epoch(step)
        boundaries = tf.constant(
            self.boundaries_epochs, tf.float64, shape=[len(self.boundaries_epochs)]
        )
        index = tf.reduce_sum(tf.cast(epoch >= boundaries, tf.int32))
        return tf.gather(tf.constant(self.values, tf.float64), index)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "boundaries_epochs": list(self.boundaries_epochs),
            "values": list(self.values),
        }


# --------------------------------------------------------------------------- LR helpers


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The optimisers that own a learning rate, looking through wrappers (deduplicated)."""
    if hasattr(optimizer, "inner_optimizer"):  # LayerwiseLrScaling, LossScaleOptimizer
        return _inner_optimizers(optimizer.inner_optimizer)
    if isinstance(optimizer, lq.optimizers.CaseOptimizer):
        # The latent (default) optimiser first: it is "the" LR of a Bop setup.
        ordered = ([optimizer.default] if optimizer.default is not None else []) + [
            o for o in optimizer.optimizers if o is not optimizer.default
        ]
        owners = [owner for o in ordered for owner in _inner_optimizers(o)]
        return list({id(o): o for o in owners}.values())
    if isinstance(optimizer, tf.keras.optimizers.Optimizer):
        return [optimizer]
    if isinstance(optimizer, tf.keras.optimizers.legacy.Optimizer):
        return [optimizer] if hasattr(optimizer, "learning_rate") else []  # Bop has none
    raise TypeError(f"expected a Keras optimizer, got {type(optimizer).__name__}")


def _learning_rate_of(optimizer: AnyOptimizer) -> Any:
    """The float/variable or schedule an optimiser was given as its learning rate."""
    if isinstance(optimizer, tf.keras.optimizers.Optimizer):
        # The public `learning_rate` is the previous step's value when it is a schedule.
        return optimizer._learning_rate
    return optimizer.learning_rate  # legacy: the raw hyperparameter


def _first_owner(optimizer: Any) -> AnyOptimizer:
    owners = _inner_optimizers(optimizer)
    if not owners:
        raise TypeError(f"{type(optimizer).__name__} has no learning rate")
    return owners[0]


def current_learning_rate(optimizer: Any) -> float:
    """The learning rate `optimizer` will use for its next step (at its `iterations`).

    Works for a float LR, any `LearningRateSchedule`, `LayerwiseLrScaling` and Larq's
    `CaseOptimizer`/Bop (the latent optimiser's LR: Bop itself has none).

    ```python
    opt = tf.keras.optimizers.Adam(ExponentialDecayPerEpoch(1e-3, 1e-5, 3, 10))
    current_learning_rate(opt)  # 1e-3
    ```
    """
    owner = _first_owner(optimizer)
    lr = _learning_rate_of(owner)
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(owner.iterations)
    elif callable(lr) and not isinstance(lr, tf.Variable):
        lr = lr()
    return float(tf.keras.backend.get_value(lr))


def scale_learning_rate(optimizer: Any, factor: float) -> float:
    """Multiply `optimizer`'s learning rate by `factor` in place; return the new rate.

    A constant LR variable is reassigned; one of this module's schedules gets its `scale`
    variable multiplied (compiled `fit` steps pick it up without retracing); wrappers are
    looked through (every inner optimiser with an LR is scaled, a shared schedule once).
    Any other schedule raises TypeError.

    ```python
    opt = tf.keras.optimizers.Adam(1e-3)
    scale_learning_rate(opt, 0.1)  # 1e-4
    ```
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    owners = _inner_optimizers(optimizer)
    if not owners:
        raise TypeError(f"{type(optimizer).__name__} has no learning rate to scale")
    scaled: set[int] = set()
    for owner in owners:
        lr = _learning_rate_of(owner)
        if isinstance(lr, _PerEpochSchedule):
            if id(lr) not in scaled:
                lr.scale.assign(lr.scale * factor)
                scaled.add(id(lr))
        elif isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule) or (
            callable(lr) and not isinstance(lr, tf.Variable)
        ):
            raise TypeError(
                f"cannot scale a {type(lr).__name__} learning rate in place: use "
                "ExponentialDecayPerEpoch, PiecewiseConstantPerEpoch or a float"
            )
        else:
            owner.learning_rate = current_learning_rate(owner) * factor
    return current_learning_rate(optimizer)

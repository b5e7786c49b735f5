r"""The study's optimisers, per-epoch learning-rate schedules and BinaryConnect's LR scaling.

- `get(name, learning_rate, **hyperparameters)`: one of the seven optimisers of the study's
  Table 2 (SGD, Momentum, Nesterov, AdaGrad, AdaDelta, RMSProp, Adam) as a Keras optimiser,
  or Larq's latent-free `Bop` for the binary kernels inside Larq's `CaseOptimizer`
  (`BopCaseOptimizer`).
- `ExponentialDecayPerEpoch`, `PiecewiseConstantPerEpoch`: learning rates that change once
  per epoch, with a run-time `scale` variable that `scale_learning_rate` multiplies (no
  retracing) and that checkpoints save.
- `LayerwiseLrScaling`: BinaryConnect's Glorot trick, a per-variable LR multiplier
  $m = 1/H$, $H = \sqrt{1.5 / (\mathrm{fan\_in} + \mathrm{fan\_out})}$, applied to the
  gradient (the study's TF code) or to the optimiser's update (BinaryConnect).

```python
import bnn_keras.optimizers as bko

lr = bko.ExponentialDecayPerEpoch(1e-3, 3e-6, epochs=250, steps_per_epoch=540)
model.compile(optimizer=bko.get("adam", learning_rate=lr), loss="squared_hinge")
```
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import larq as lq
import tensorflow as tf
from larq import utils as lq_utils

from bnn_keras.constraints import glorot_limit

__all__ = [
    "NAMES",
    "BopCaseOptimizer",
    "ExponentialDecayPerEpoch",
    "LayerwiseLrScaling",
    "PiecewiseConstantPerEpoch",
    "current_learning_rate",
    "get",
    "scale_learning_rate",
]

_PACKAGE = "bnn_keras"

LearningRate = Union[float, tf.keras.optimizers.schedules.LearningRateSchedule]
AnyOptimizer = Union[tf.keras.optimizers.Optimizer, tf.keras.optimizers.legacy.Optimizer]


def _register(cls):
    """Register a class for Keras serialisation (as "bnn_keras>Name") and with Larq."""
    cls = tf.keras.utils.register_keras_serializable(package=_PACKAGE)(cls)
    return lq_utils.register_keras_custom_object(cls)


# --------------------------------------------------------------------------- get()


@dataclass(frozen=True)
class _Entry:
    """How to build one named optimiser: a Keras class (or factory) and the study's defaults.

    `legacy` is the `tf.keras.optimizers.legacy` twin, needed where Larq's `CaseOptimizer`
    wants one (as Bop's latent optimiser).
    """

    build: Callable[..., AnyOptimizer]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    legacy: Callable[..., tf.keras.optimizers.legacy.Optimizer] | None = None


@_register
class BopCaseOptimizer(lq.optimizers.CaseOptimizer):
    """Larq's `CaseOptimizer`: `Bop` on binary variables, a latent optimiser on the rest.

    Binary variables are those Larq marks `precision == 1` (`Bop.is_binary_variable`), e.g.
    a `QuantDense` kernel with `kernel_quantizer="ste_sign"`. Two Larq 0.14 pitfalls are
    fixed here: Larq's config stores the variable -> optimiser mapping by process-local
    variable ids, so a reloaded optimiser silently trains nothing (this one re-derives it
    from the predicate); and Larq's `iterations` stays 0 (this one is the latent
    optimiser's step count). Both optimisers must be legacy Keras optimisers.

    ```python
    opt = BopCaseOptimizer(
        lq.optimizers.Bop(threshold=1e-8, gamma=1e-4),
        tf.keras.optimizers.legacy.Adam(1e-3),
    )  # what get("bop", learning_rate=1e-3) builds
    ```
    """

    def __init__(
        self,
        bop: lq.optimizers.Bop,
        latent_optimizer: tf.keras.optimizers.legacy.Optimizer,
        name: str = "BopCaseOptimizer",
    ):
        super().__init__(
            (lq.optimizers.Bop.is_binary_variable, bop),
            default_optimizer=latent_optimizer,
            name=name,
        )
        self._iterations = latent_optimizer.iterations

    @property
    def bop(self) -> lq.optimizers.Bop:
        """The optimiser of the binary variables."""
        return self.optimizers[0]

    def get_config(self) -> dict[str, Any]:
        larq_keys = ("optimizer_configs", "default_config", "var_opt_mapping")
        base = {k: v for k, v in super().get_config().items() if k not in larq_keys}
        return {
            **base,
            "bop": tf.keras.optimizers.serialize(self.bop),
            "latent_optimizer": tf.keras.optimizers.serialize(self.default),
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None
    ) -> "BopCaseOptimizer":
        config = dict(config)
        bop, latent = (
            tf.keras.optimizers.deserialize(
                config.pop(key), custom_objects=custom_objects, use_legacy_optimizer=True
            )
            for key in ("bop", "latent_optimizer")
        )
        return cls(bop, latent, **config)


def _build_bop(
    learning_rate: LearningRate | None = None,
    latent_optimizer: str | tf.keras.optimizers.legacy.Optimizer = "adam",
    latent_hyperparameters: Mapping[str, Any] | None = None,
    threshold: float | None = None,
    gamma: float | None = None,
) -> BopCaseOptimizer:
    """Larq's Bop on binary variables, the latent optimiser on all the others."""
    if isinstance(latent_optimizer, str):
        latent = _build(latent_optimizer, learning_rate, latent_hyperparameters or {}, legacy=True)
    elif isinstance(latent_optimizer, tf.keras.optimizers.legacy.Optimizer):
        if learning_rate is not None or latent_hyperparameters:
            raise ValueError(
                "get('bop'): learning_rate and latent_hyperparameters configure a latent "
                "optimiser given by name; set them on the latent_optimizer instance instead"
            )
        latent = latent_optimizer
    else:
        raise TypeError(
            "get('bop'): latent_optimizer must be a name or a "
            "tf.keras.optimizers.legacy.Optimizer (Larq's CaseOptimizer needs a legacy "
            f"one), got {type(latent_optimizer).__name__}"
        )
    bop_hyperparameters = {"threshold": threshold, "gamma": gamma}
    bop = lq.optimizers.Bop(**{k: v for k, v in bop_hyperparameters.items() if v is not None})
    return BopCaseOptimizer(bop, latent)


_ADAM_STUDY = {"beta_1": 0.9, "beta_2": 0.999}
_OPT, _LEGACY = tf.keras.optimizers, tf.keras.optimizers.legacy

# One line per optimiser.
_REGISTRY: dict[str, _Entry] = {
    "sgd": _Entry(_OPT.SGD, {}, _LEGACY.SGD),
    "momentum": _Entry(_OPT.SGD, {"momentum": 0.9}, _LEGACY.SGD),
    "nesterov": _Entry(_OPT.SGD, {"momentum": 0.9, "nesterov": True}, _LEGACY.SGD),
    "adagrad": _Entry(_OPT.Adagrad, {}, _LEGACY.Adagrad),
    "adadelta": _Entry(_OPT.Adadelta, {}, _LEGACY.Adadelta),
    "rmsprop": _Entry(_OPT.RMSprop, {}, _LEGACY.RMSprop),
    "adam": _Entry(_OPT.Adam, _ADAM_STUDY, _LEGACY.Adam),
    "bop": _Entry(_build_bop),
}

NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))
"""The names `get` knows, sorted."""


def _accepted_hyperparameters(build: Callable[..., Any]) -> set[str]:
    parameters = inspect.signature(build).parameters.values()
    return {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _build(
    name: str,
    learning_rate: LearningRate | None,
    hyperparameters: Mapping[str, Any],
    legacy: bool = False,
) -> AnyOptimizer:
    if not isinstance(name, str):
        raise TypeError(f"optimiser name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimiser {name!r}: expected one of {', '.join(NAMES)}")
    entry = _REGISTRY[key]
    build = entry.build
    if legacy:
        if entry.legacy is None:
            raise ValueError(f"{key!r} cannot be a latent optimiser: it has no legacy Keras twin")
        build = entry.legacy
    accepted = _accepted_hyperparameters(build) - {"self", "learning_rate"}
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for optimiser {key!r}: "
            f"expected some of {', '.join(sorted(accepted))}"
        )
    kwargs = {**entry.defaults, **hyperparameters}
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    return build(**kwargs)


def get(
    name: str, learning_rate: LearningRate | None = None, **hyperparameters: Any
) -> AnyOptimizer:
    """Build the optimiser called `name` (case-insensitive; one of `NAMES`).

    `learning_rate` is a float or a `LearningRateSchedule`; None keeps Keras' default for
    that optimiser. "momentum" and "nesterov" are SGD with momentum 0.9 (plus Nesterov);
    "adam" uses the study's beta_1 = 0.9, beta_2 = 0.999. Other hyperparameters are the
    Keras constructor's keyword arguments; an unknown one raises ValueError.

    "bop" returns a `BopCaseOptimizer` (a Larq `CaseOptimizer`) training variables marked
    binary (`var.precision == 1`, e.g. a `QuantDense` kernel with
    `kernel_quantizer="ste_sign"`) with `Bop(threshold, gamma)` (Larq's defaults when
    None) and every other variable (BN, biases, real-valued layers) with the latent
    optimiser: a name (default "adam", built with `learning_rate` and
    `latent_hyperparameters`) or a `tf.keras.optimizers.legacy.Optimizer`. These are
    legacy (OptimizerV2) Keras optimisers, as Larq 0.14 requires; the other names give
    the current `tf.keras.optimizers` classes.

    ```python
    opt = get("adam", learning_rate=1e-3)                  # beta_1 0.9, beta_2 0.999
    opt = get("Momentum", learning_rate=0.1, momentum=0.5)
    opt = get("bop", learning_rate=1e-3, threshold=1e-6, gamma=1e-3)
    get("adamw")  # ValueError: unknown optimiser 'adamw': expected one of adadelta, ...
    ```
    """
    _check_hyperparameter_types(name, hyperparameters)
    return _build(name, learning_rate, hyperparameters)


def _check_hyperparameter_types(name: str, hyperparameters: Mapping[str, Any]) -> None:
    """Compare each hyperparameter's type with its default's: a string where a number
    belongs would otherwise fail only at the first training step."""
    if not hyperparameters:
        return
    config = _build(name, None, {}).get_config()  # also rejects unknown names
    defaults = dict(config)
    for nested in config.values():  # a wrapper's inner optimisers (Bop's CaseOptimizer)
        if isinstance(nested, Mapping) and isinstance(nested.get("config"), Mapping):
            defaults = {**nested["config"], **defaults}
    for key, value in hyperparameters.items():
        if key not in defaults:
            continue
        default = defaults[key]
        is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if isinstance(default, bool) and not isinstance(value, bool):
            expected = "true or false"
        elif is_number(default) and not (is_number(value) and math.isfinite(value)):
            expected = "a finite number"
        elif default is None and isinstance(value, str):
            expected = "a number"
        else:
            continue
        raise ValueError(
            f"hyperparameter {key} of optimiser {name.lower()!r} must be {expected} "
            f"(default {default!r}), got {value!r}"
        )


# --------------------------------------------------------------------------- schedules


class _PerEpochSchedule(tf.keras.optimizers.schedules.LearningRateSchedule, tf.Module):
    """A learning rate that depends on the epoch only, times a run-time `scale` variable.

    A `tf.Module` so that the optimiser holding it tracks `scale` in its checkpoints.
    """

    def __init__(self, steps_per_epoch: int, scale: float = 1.0, name: str | None = None):
        super().__init__(name=name)
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
        self.steps_per_epoch = int(steps_per_epoch)
        with tf.init_scope():  # a schedule built inside a tf.function still owns its variable
            self.scale = tf.Variable(float(scale), trainable=False, dtype=tf.float32, name="scale")

    def epoch(self, step: tf.Tensor | int) -> tf.Tensor:
        """The epoch (float64, whole) that optimiser step `step` (int or float) belongs to."""
        return tf.floor(tf.cast(step, tf.float64) / self.steps_per_epoch)

    def _unscaled(self, epoch: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def __call__(self, step: tf.Tensor | int) -> tf.Tensor:
        with tf.name_scope(self.name):
            value = self._unscaled(self.epoch(step)) * tf.cast(self.scale, tf.float64)
            return tf.cast(value, tf.float32)

    def get_config(self) -> dict[str, Any]:
        # The root of the {**super().get_config(), ...} chain: Keras' base one raises.
        # `scale` is state, but saving it keeps a dropped LR in a .keras / .h5 model too.
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "scale": float(tf.keras.backend.get_value(self.scale)),
            "name": self.name,
        }


@_register
class ExponentialDecayPerEpoch(_PerEpochSchedule):
    r"""The study's schedule: constant within an epoch, geometric from `start` to `end`.

    $\eta(e) = \mathrm{start} \cdot (\mathrm{end}/\mathrm{start})^{\min(e,\,E-1)/(E-1)}$
    for epoch $e = \lfloor \mathrm{step} / \mathrm{steps\_per\_epoch} \rfloor$ and
    $E$ = `epochs`: epoch 0 uses `start`, epoch E-1 (and any later one) uses `end`; each
    epoch multiplies the previous rate by $(\mathrm{end}/\mathrm{start})^{1/(E-1)}$.
    With `epochs=1` the rate stays `start`. The output is multiplied by `scale`.

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
        if not (start > 0 and end > 0):
            raise ValueError(f"start and end must be > 0, got start={start!r}, end={end!r}")
        if int(epochs) != epochs or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.start, self.end, self.epochs = float(start), float(end), int(epochs)

    def _unscaled(self, epoch: tf.Tensor) -> tf.Tensor:
        last = self.epochs - 1
        exponent = tf.minimum(epoch, float(last)) / float(max(last, 1))
        return self.start * tf.pow(tf.constant(self.end / self.start, tf.float64), exponent)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "start": self.start,
            "end": self.end,
            "epochs": self.epochs,
        }


@_register
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
        self.boundaries_epochs = boundaries
        self.values = tuple(float(v) for v in values)

    def _unscaled(self, epoch: tf.Tensor) -> tf.Tensor:
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
    opt = get("adam", learning_rate=ExponentialDecayPerEpoch(1e-3, 1e-5, 3, 10))
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
    opt = get("adam", learning_rate=1e-3)
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


# --------------------------------------------------------------------------- layer-wise LR

Multipliers = Union[None, Mapping[str, float], Callable[[tf.Variable], float]]
_MODES = ("gradient", "update")


def _latent(variable: tf.Variable) -> tf.Variable:
    """The float variable an optimiser really updates (Larq wraps binary kernels)."""
    return getattr(variable, "latent_variable", variable)


@contextlib.contextmanager
def _constraints_detached(variables: Sequence[tf.Variable]) -> Iterator[None]:
    """Hide the variables' constraints so the inner optimiser's step is the raw one.

    Python-level, so it only matters while the step is traced (or run eagerly). Plain
    (resource) variables only: not tested under a multi-device distribution strategy.
    """
    saved = [(_latent(v), _latent(v).constraint) for v in variables]
    try:
        for latent, _ in saved:
            latent._constraint = None
        yield
    finally:
        for latent, constraint in saved:
            latent._constraint = constraint


def _scale_gradient(gradient: Any, multiplier: float) -> Any:
    if gradient is None or multiplier == 1.0:
        return gradient
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * multiplier
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient * multiplier


@_register
class LayerwiseLrScaling(tf.keras.optimizers.Optimizer):
    r"""Wrap a Keras optimiser to scale each variable's learning rate by its own multiplier.

    BinaryConnect's Glorot trick: each kernel's LR is multiplied by $m = 1/H$ with
    $H = \sqrt{1.5 / (\mathrm{fan\_in} + \mathrm{fan\_out})}$ (`glorot_limit`).

    `multipliers`:
    - None (default): 1/glorot_limit(var.shape) for variables of rank >= 2 (kernels,
      including Larq's latent binary kernels and any real-valued kernel), 1.0 otherwise
      (biases, BN);
    - a dict of regular expressions -> multiplier, matched with `re.search` against
      `var.name` (e.g. "dense_1/kernel:0"); the first matching key, in dict order, wins;
      unmatched variables keep 1.0. `{"kernel": 10.0}` hits every kernel;
    - a callable `var -> float`. It is called once per variable, at the first step; to
      serialise, the resolved values are stored as exact-name patterns.

    `mode`:
    - "gradient": the gradient is multiplied by m before the inner optimiser (the study's
      TensorFlow code). Under SGD that is m times the step; under Adam it nearly cancels
      ($\hat m / \sqrt{\hat v}$ is scale-free, only epsilon differs).
    - "update" (default): the inner optimiser's step is multiplied by m (BinaryConnect):
      $w \leftarrow c(w_0 + m\,(u(w_0) - w_0))$, where u is the inner optimiser's step with
      the variable's constraint c held back, then c is applied once to the scaled result.
      With weight clipping as the constraint this is BinaryConnect's
      `clip(w + m * update)`; clipping before scaling would, for m < 1, stop short of the
      bound.

    Everything else (slots, iterations, learning rate and its schedule, checkpoints) is the
    inner optimiser's; this wrapper only keeps the multipliers. It works in a compiled
    `fit`: the multipliers are Python floats fixed when the step is traced.

    ```python
    opt = LayerwiseLrScaling(tf.keras.optimizers.Adam(1e-3))       # BinaryConnect
    opt = LayerwiseLrScaling(get("sgd", 0.1), mode="gradient")     # the study's code
    opt = LayerwiseLrScaling(get("adam"), multipliers={"dense_2/kernel": 2.0})
    model.compile(optimizer=opt, loss="squared_hinge")
    ```
    """

    def __init__(
        self,
        optimizer: tf.keras.optimizers.Optimizer,
        multipliers: Multipliers = None,
        mode: str = "update",
        name: str = "LayerwiseLrScaling",
        **kwargs: Any,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        if not isinstance(optimizer, tf.keras.optimizers.Optimizer):
            raise TypeError(
                "LayerwiseLrScaling wraps a tf.keras.optimizers.Optimizer (not a legacy "
                f"one), got {type(optimizer).__name__}"
            )
        if not (multipliers is None or isinstance(multipliers, Mapping) or callable(multipliers)):
            raise TypeError(
                "multipliers must be None, a dict {name regex: float} or a callable, "
                f"got {type(multipliers).__name__}"
            )
        super().__init__(name=name, **kwargs)
        unsupported = {
            "weight_decay": self.weight_decay not in (None, 0),
            "clipnorm": self.clipnorm is not None,
            "clipvalue": self.clipvalue is not None,
            "global_clipnorm": self.global_clipnorm is not None,
            "use_ema": bool(self.use_ema),
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise ValueError(f"set {names} on the inner optimiser, not on LayerwiseLrScaling")
        self.inner_optimizer = optimizer  # tracked: checkpoints hold the inner state
        # Also saved as our own "_iterations": SavedModel revives every optimiser as a
        # RestoredOptimizer that wants one.
        self._iterations = optimizer.iterations
        self.mode = mode
        self._multipliers = self._no_dependency(
            dict(multipliers) if isinstance(multipliers, Mapping) else multipliers
        )
        # var key -> (var name, multiplier), resolved once per variable.
        self._resolved: dict[int, tuple[str, float]] = self._no_dependency({})

    # The wrapper has no state of its own: delegate it to the inner optimiser.
    def _create_iteration_variable(self) -> None:
        pass

    @property
    def iterations(self) -> tf.Variable:
        return self.inner_optimizer.iterations

    @iterations.setter
    def iterations(self, variable: tf.Variable) -> None:
        self.inner_optimizer.iterations = variable

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def variables(self) -> list[tf.Variable]:
        return self.inner_optimizer.variables

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        self.inner_optimizer.build(var_list)

    def set_weights(self, weights: Sequence[Any]) -> None:
        self.inner_optimizer.set_weights(weights)

    def update_step(self, gradient: tf.Tensor, variable: tf.Variable) -> None:
        raise NotImplementedError("LayerwiseLrScaling updates through its inner optimiser")

    def finalize_variable_values(self, var_list: Sequence[tf.Variable]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def multiplier(self, variable: tf.Variable) -> float:
        """The LR multiplier of `variable` (resolved once, then cached)."""
        key = self._var_key(variable)
        if key not in self._resolved:
            self._resolved[key] = (variable.name, self._resolve(variable))
        return self._resolved[key][1]

    def _resolve(self, variable: tf.Variable) -> float:
        spec = self._multipliers
        if spec is None:
            value = 1.0 / glorot_limit(variable.shape) if variable.shape.rank >= 2 else 1.0
        elif isinstance(spec, Mapping):
            value = next((m for p, m in spec.items() if re.search(p, variable.name)), 1.0)
        else:
            value = spec(variable)
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"multiplier of {variable.name} must be finite and >= 0, got {value}")
        return value

    def apply_gradients(
        self,
        grads_and_vars: Sequence[tuple[Any, tf.Variable]],
        name: str | None = None,
        skip_gradients_aggregation: bool = False,
        **kwargs: Any,
    ) -> tf.Variable:
        """Apply the inner optimiser, with each variable's step scaled by its multiplier."""
        grads_and_vars = list(grads_and_vars)
        multipliers = [self.multiplier(v) for _, v in grads_and_vars]
        inner_kwargs = {"name": name, "skip_gradients_aggregation": skip_gradients_aggregation}
        if self.mode == "gradient":
            scaled = [(_scale_gradient(g, m), v) for (g, v), m in zip(grads_and_vars, multipliers)]
            return self.inner_optimizer.apply_gradients(scaled, **inner_kwargs, **kwargs)

        to_scale = [
            (_latent(v), m)
            for (g, v), m in zip(grads_and_vars, multipliers)
            if g is not None and m != 1.0
        ]
        before = [tf.identity(latent.read_value()) for latent, _ in to_scale]
        with _constraints_detached([latent for latent, _ in to_scale]):
            iteration = self.inner_optimizer.apply_gradients(
                grads_and_vars, **inner_kwargs, **kwargs
            )
        for (latent, m), old in zip(to_scale, before):
            value = old + tf.cast(m, latent.dtype) * (latent.read_value() - old)
            if latent.constraint is not None:
                value = latent.constraint(value)
            latent.assign(value)
        return iteration

    def _serialisable_multipliers(self) -> dict[str, float] | None:
        spec = self._multipliers
        if spec is None or isinstance(spec, Mapping):
            return None if spec is None else dict(spec)
        if not self._resolved:
            raise ValueError(
                "LayerwiseLrScaling with callable multipliers can be serialised only after "
                "its first step; pass a dict to serialise it before"
            )
        return {f"^{re.escape(n)}$": m for n, m in self._resolved.values()}

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "optimizer": tf.keras.optimizers.serialize(self.inner_optimizer),
            "multipliers": self._serialisable_multipliers(),
            "mode": self.mode,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None
    ) -> "LayerwiseLrScaling":
        config = dict(config)
        optimizer = config.pop("optimizer")
        if not isinstance(optimizer, tf.keras.optimizers.Optimizer):
            optimizer = tf.keras.optimizers.deserialize(
                optimizer, custom_objects=custom_objects, use_legacy_optimizer=False
            )
        return cls(optimizer, **config)

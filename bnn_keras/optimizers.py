r"""The study's optimisers by name: `get`, its registry, and Larq's Bop inside a CaseOptimizer.

- `get(name, learning_rate, **hyperparameters)`: one of the seven optimisers of the study's
  Table 2 (SGD, Momentum, Nesterov, AdaGrad, AdaDelta, RMSProp, Adam) as a Keras optimiser,
  or Larq's latent-free `Bop` for the binary kernels inside Larq's `CaseOptimizer`
  (`BopCaseOptimizer`).
- Also importable from here: the per-epoch schedules and the LR read/scale helpers
  (`bnn_keras.lr_schedules`) and BinaryConnect's `LayerwiseLrScaling`
  (`bnn_keras.layerwise`), with `glorot_limit`.

```python
import bnn_keras.optimizers as bko

lr = bko.ExponentialDecayPerEpoch(1e-3, 3e-6, epochs=250, steps_per_epoch=540)
model.compile(optimizer=bko.get("adam", learning_rate=lr), loss="squared_hinge")
```
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import larq as lq
import numpy as np
import tensorflow as tf
from larq import utils as lq_utils

from bnn_keras.constraints import glorot_limit  # noqa: F401  (imported from here too)
from bnn_keras.layerwise import LayerwiseLrScaling
from bnn_keras.lr_schedules import (
    AnyOptimizer,
    ExponentialDecayPerEpoch,
    PiecewiseConstantPerEpoch,
    current_learning_rate,
    scale_learning_rate,
)

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

LearningRate = Union[float, tf.keras.optimizers.schedules.LearningRateSchedule]


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


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
@lq_utils.register_keras_custom_object
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
    named = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named - {"self", "learning_rate", "name"}  # `name` only renames the Keras object


def _is_schedule(learning_rate: Any) -> bool:
    """A learning rate Keras evaluates itself: a schedule, a variable or tensor, a callable."""
    return isinstance(learning_rate, (tf.Variable, tf.Tensor)) or callable(learning_rate)


def _check_values(key: str, learning_rate: LearningRate | None, hyperparameters: Mapping[str, Any]) -> None:
    """The field rules of `bnn_keras.recipe` for the learning rate and each ranged hyperparameter."""
    from bnn_keras.recipe import FIELDS, HYPERPARAMETERS  # recipe imports this module: read at call time

    rule = FIELDS["lr_start"]
    if learning_rate is not None and not _is_schedule(learning_rate) and not rule.accepts(learning_rate):
        raise ValueError(f"learning_rate must be {rule.expected} or a LearningRateSchedule, got {learning_rate!r}")
    for name, value in hyperparameters.items():
        if name in HYPERPARAMETERS:
            HYPERPARAMETERS[name].check(f"hyperparameter {name} of optimiser {key!r}", value)


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
    accepted = _accepted_hyperparameters(build)
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for optimiser {key!r}: "
            f"expected some of {', '.join(sorted(accepted))}"
        )
    _check_values(key, learning_rate, hyperparameters)
    kwargs = {**entry.defaults, **hyperparameters}
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    return build(**kwargs)


def get(
    name: str, /, learning_rate: LearningRate | None = None, **hyperparameters: Any
) -> AnyOptimizer:
    """Build the optimiser called `name` (case-insensitive; one of `NAMES`).

    `learning_rate` is a float or a `LearningRateSchedule`; None keeps Keras' default for
    that optimiser. "momentum" and "nesterov" are SGD with momentum 0.9 (plus Nesterov);
    "adam" uses the study's beta_1 = 0.9, beta_2 = 0.999. Other hyperparameters are the
    Keras constructor's keyword arguments; an unknown one, or a value outside its range in
    `bnn_keras.recipe.HYPERPARAMETERS` (a learning rate must be a finite number > 0 or a
    schedule), raises ValueError.

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
    get("adam", beta_1=-5)  # ValueError: hyperparameter beta_1 of optimiser 'adam' must be a number in [0, 1), got -5
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
    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))

    for key, value in hyperparameters.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if isinstance(default, bool) and not isinstance(value, (bool, np.bool_)):
            expected = "true or false"
        elif is_number(default) and not (is_number(value) and (isinstance(value, int) or math.isfinite(value))):
            expected = "a finite number"
        elif default is None and isinstance(value, str):
            expected = "a number"
        else:
            continue
        raise ValueError(
            f"hyperparameter {key} of optimiser {name.lower()!r} must be {expected} "
            f"(default {default!r}), got {value!r}"
        )

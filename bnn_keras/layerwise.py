r"""BinaryConnect's layer-wise learning-rate scaling, as a wrapper around a Keras optimiser.

`LayerwiseLrScaling` multiplies each variable's learning rate by its own $m$, by default
BinaryConnect's Glorot trick $m = 1/H$, $H = \sqrt{1.5 / (\mathrm{fan\_in} + \mathrm{fan\_out})}$,
applied to the gradient (the study's TF code) or to the optimiser's update (BinaryConnect).

```python
opt = LayerwiseLrScaling(tf.keras.optimizers.Adam(1e-3))  # clip(w + m * Adam's step)
model.compile(optimizer=opt, loss="squared_hinge")
```
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import tensorflow as tf
from larq import utils as lq_utils

from bnn_keras.constraints import glorot_limit

__all__ = ["LayerwiseLrScaling", "Multipliers"]

Multipliers = Union[None, Mapping[str, float], Callable[[tf.Variable], float]]
_MODES = ("gradient", "update")


def _latent(variable: tf.Variable) -> tf.Variable:
    """The float variable an optimiser really updates (Larq wraps binary kernels)."""
    return getattr(variable, "latent_variable", variable)


# id(per-replica variable) -> [its constraint, replicas holding it back]. MirroredStrategy
# traces each replica's step in its own thread, and those threads take turns at every sync.
_held_back: dict[int, list[Any]] = {}
_held_back_lock = threading.Lock()


def _per_replica(variable: tf.Variable) -> tuple[tf.Variable, ...]:
    """The variables that really hold `variable`'s value: one per replica when mirrored."""
    return tuple(tf.distribute.get_strategy().experimental_local_results(variable))


@contextlib.contextmanager
def _constraints_detached(variables: Sequence[tf.Variable]) -> Iterator[list[Any]]:
    """Hide the variables' constraints so the inner optimiser's step is the raw one.

    Yields the constraints, one per variable. A mirrored variable's constraint is that of
    its per-replica variables (each replica clips its own), so those are hidden; with one
    thread per replica, they are put back when the last replica leaves, and a replica
    that enters after another has hidden them is still given the real ones. Python-level,
    so it only matters while the step is traced (or run eagerly).
    """
    parts = [part for v in variables for part in _per_replica(v)]
    with _held_back_lock:
        for part in parts:
            held = _held_back.setdefault(id(part), [part.constraint, 0])
            held[1] += 1
            part._constraint = None
        constraints = [_held_back[id(_per_replica(v)[0])][0] for v in variables]
    try:
        yield constraints
    finally:
        with _held_back_lock:
            for part in parts:
                held = _held_back[id(part)]
                held[1] -= 1
                if held[1] == 0:
                    del _held_back[id(part)]
                    part._constraint = held[0]


def _scale_gradient(gradient: Any, multiplier: float) -> Any:
    if gradient is None or multiplier == 1.0:
        return gradient
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * multiplier
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient * multiplier


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
@lq_utils.register_keras_custom_object
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
    `fit`: the multipliers are Python floats fixed when the step is traced. Under
    `MirroredStrategy` each replica scales and constrains its own copy, as one device would.

    ```python
    opt = LayerwiseLrScaling(tf.keras.optimizers.Adam(1e-3))       # BinaryConnect
    opt = LayerwiseLrScaling(tf.keras.optimizers.SGD(0.1), mode="gradient")  # study's code
    opt = LayerwiseLrScaling(tf.keras.optimizers.Adam(), multipliers={"dense_2/kernel": 2.0})
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
        with _constraints_detached([latent for latent, _ in to_scale]) as constraints:
            iteration = self.inner_optimizer.apply_gradients(
                grads_and_vars, **inner_kwargs, **kwargs
            )
        for (latent, m), old, constraint in zip(to_scale, before, constraints):
            value = old + tf.cast(m, latent.dtype) * (latent.read_value() - old)
            if constraint is not None:
                value = constraint(value)
            latent.assign(value)  # in a replica, its own copy (as Keras applies constraints)
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

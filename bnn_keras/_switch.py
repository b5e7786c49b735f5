"""One on/off flag per Keras object, held in a non-trainable variable so it flips at run time.

The flag lives in a variable (not a Python attribute) so that flipping it changes what an
already-traced `train_function` computes without retracing, and so that it is saved by
every Keras format and by `tf.train.Checkpoint`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["Switchable", "find_switchables", "set_clipping"]


class Switchable:
    """Mixin for the Keras layers that carry a clipping flag (quantisers, weight clips).

    Call `_init_switch(value)` from `__init__` after `super().__init__`.
    """

    _switch_name = "clipping"

    def _init_switch(self, value: bool) -> None:
        # ONLY_FIRST_REPLICA keeps the flag one logical value under tf.distribute.
        self._switch = self.add_weight(
            name=f"{self.name}_{self._switch_name}",
            shape=(),
            dtype=tf.float32,
            initializer=tf.keras.initializers.Constant(1.0 if value else 0.0),
            trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    @property
    def switch_variable(self) -> tf.Variable:
        """The non-trainable float variable holding the flag (1.0 = clipping on)."""
        return self._switch

    def _switch_on(self) -> tf.Tensor:
        """The flag as a boolean tensor, for use inside traced code."""
        return tf.convert_to_tensor(self._switch) > 0.5

    @property
    def clipping_enabled(self) -> bool:
        """Whether clipping is on now (reads the variable)."""
        return bool(self._switch.numpy() > 0.5)

    def set_clipping_enabled(self, value: bool) -> bool:
        """Turn clipping on or off; returns True when the state changed."""
        _check_flag("value", value)
        changed = self.clipping_enabled != bool(value)
        self._switch.assign(1.0 if value else 0.0)
        return changed


def _check_flag(name: str, value: object) -> None:
    # bool("yes") and bool("false") are both True: only a real boolean says which phase.
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def find_switchables(model: tf.Module) -> list[Switchable]:
    """Every switchable quantiser and weight clip reachable from `model` (nested models too)."""
    found: dict[int, Switchable] = {}
    for module in [model, *model.submodules]:
        if isinstance(module, Switchable):
            found.setdefault(id(module), module)
    return list(found.values())


def set_clipping(model: tf.Module, clipped: bool) -> int:
    """Flip every switchable quantiser and weight clip in `model` to the clipped phase or back.

    ```python
    n = bnn_keras.set_clipping(model, True)   # clipped STE + weight clipping from now on
    ```

    Returns how many objects changed state (0 if all were already in that phase).
    """
    _check_flag("clipped", clipped)
    return sum(int(s.set_clipping_enabled(clipped)) for s in find_switchables(model))

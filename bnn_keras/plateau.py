"""The last mile: where validation accuracy plateaus, and what a run does there.

The study's claim: binary networks keep improving long after their curves flatten, and
early stopping there costs accuracy. To put a number on it, every run records its
*plateau epoch*: the first epoch ``p`` after which validation accuracy does not beat the
best so far (up to ``p``) by more than ``margin`` within the next ``window`` epochs:

    p = min { p : val[q] <= max(val[0..p]) + margin  for every q in p+1 .. p+window }

Looking back at a finished run, a window cut by the run's end is judged on the epochs
left (so the last epoch is a plateau at the latest); during a run a plateau is known at
epoch ``p + window``, once the whole window has passed (`plateau_epoch(..., complete=True)`).
`PlateauAction` acts then: ``"stop"`` ends training (early stopping), ``"reduce_lr"``
multiplies the learning rate by ``lr_factor`` (``ReduceLROnPlateau``-style, once),
``"none"`` only logs ``plateau_reached`` (1.0 from the epoch it is known).

```python
plateau_epoch([0.5, 0.7, 0.71, 0.705, 0.712], window=2, margin=0.005)   # 2
PlateauAction("stop", window=10, margin=0.002)   # a callback for model.fit
```
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import tensorflow as tf

from bnn_keras import lr_schedules
from bnn_keras.recipe import PLATEAU_ACTIONS as ACTIONS

__all__ = ["ACTIONS", "PlateauAction", "default_window", "plateau_epoch"]


def default_window(epochs: int) -> int:
    """The plateau window when a recipe gives none: a tenth of the epoch budget, at least 2."""
    return max(2, math.ceil(epochs / 10))


def plateau_epoch(values: Sequence[float], window: int, margin: float, *, complete: bool = False) -> int | None:
    """The 0-based plateau epoch of `values` (validation accuracy per epoch), or None.

    `complete`: count only plateaus whose whole window has been seen (what is known
    during training); otherwise the epochs left judge a window cut by the end.
    """
    if window < 1 or not margin >= 0:
        raise ValueError(f"window must be an integer >= 1 and margin a number >= 0, got {window!r} and {margin!r}")
    best = -math.inf
    for p, value in enumerate(values):
        best = max(best, float(value))
        ahead = values[p + 1 : p + 1 + window]
        if complete and len(ahead) < window:
            return None
        if all(float(v) <= best + margin for v in ahead):
            return p
    return None


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
class PlateauAction(tf.keras.callbacks.Callback):
    """At the plateau of `monitor` (known `window` epochs after it): stop, lower the LR once, or only log it.

    Logs per epoch ``plateau_reached`` (0.0, then 1.0 from the epoch the plateau is known).
    `history` gives the monitor's values of epochs finished before this fit (a resumed
    run, or the stage's earlier epochs), so a resumed run acts exactly when an
    uninterrupted one would, and not twice.

    ```python
    model.fit(x, y, validation_split=0.1, epochs=100,
              callbacks=[PlateauAction("reduce_lr", window=10, margin=0.002, lr_factor=0.1)])
    ```
    """

    def __init__(
        self,
        action: str = "none",
        window: int = 10,
        margin: float = 0.002,
        lr_factor: float = 0.1,
        monitor: str = "val_accuracy",
        history: Sequence[float] = (),
        verbose: int = 0,
    ):
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"unknown plateau action {action!r}: expected one of {', '.join(map(repr, ACTIONS))}")
        if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        if not (isinstance(lr_factor, (int, float)) and math.isfinite(lr_factor) and lr_factor > 0):
            raise ValueError(f"lr_factor must be a finite number > 0, got {lr_factor!r}")
        self.action, self.window, self.margin, self.lr_factor = action, window, float(margin), float(lr_factor)
        self.monitor, self.verbose = monitor, verbose
        self.values = [float(v) for v in history]
        self.plateau = plateau_epoch(self.values, window, self.margin, complete=True)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        if self.monitor not in logs:
            raise ValueError(f"PlateauAction monitors {self.monitor!r} but the epoch logs only have {sorted(logs)}")
        self.values.append(float(logs[self.monitor]))
        if self.plateau is None:
            self.plateau = plateau_epoch(self.values, self.window, self.margin, complete=True)
            if self.plateau is not None:
                self._act()
        logs["plateau_reached"] = float(self.plateau is not None)

    def _act(self) -> None:
        done = ""
        if self.action == "stop":
            self.model.stop_training = True
            done = ": stopping (early stopping at the plateau)"
        elif self.action == "reduce_lr":
            lr = lr_schedules.scale_learning_rate(self.model.optimizer, self.lr_factor)
            done = f": learning rate x{self.lr_factor:g} -> {lr:.3g}"
        if self.verbose:
            print(
                f"\nPlateauAction: {self.monitor} plateaued at epoch {self.plateau + 1} "
                f"(no gain > {self.margin:g} within {self.window} epochs){done}",
                flush=True,
            )

    def get_config(self) -> dict[str, Any]:
        return {
            "action": self.action, "window": self.window, "margin": self.margin, "lr_factor": self.lr_factor,
            "monitor": self.monitor, "history": list(self.values), "verbose": self.verbose,
        }

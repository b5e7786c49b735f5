"""Keras callbacks for the study's training protocol.

- `ClippingSchedule`: vanilla STE without weight clipping first, then clipped STE with
  weight clipping, a lower learning rate and a lower BN momentum (the study's rules 3 and 5).
- `BestValidation`: the study's reporting protocol without early stopping: keep the
  weights and test metrics of the best validation epoch, never stop training.
- `EpochClock`, `StopOnNonFinite`, `HistoryRows`: the training loop's bookkeeping (epoch
  wall time, stop at the first non-finite loss, one row per epoch handed to a writer).
- `TensorBoardLog`: each epoch's logs, and how many binary weights flipped sign, as
  TensorBoard event files (with TensorFlow's own file writer).

Both write what they did into the epoch logs, so `History`, `CSVLogger` and TensorBoard
see it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from bnn_keras import optimizers as bk_optimizers
from bnn_keras._switch import find_switchables
from bnn_keras.recipe import FIELDS, Rule

__all__ = [
    "BestValidation",
    "ClippingSchedule",
    "EpochClock",
    "HistoryRows",
    "StopOnNonFinite",
    "TensorBoardLog",
    "TrainingDivergedError",
]


def _improvement_op(monitor: str, mode: str):
    """Return `better(current, best, min_delta)` and the starting best for `monitor` in `mode`.

    "auto" follows Keras' `EarlyStopping`: maximise a monitor ending in acc, accuracy or
    auc, minimise any other.
    """
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if tf.keras.callbacks.EarlyStopping(monitor=monitor, mode=mode).monitor_op == np.greater:
        return (lambda current, best, delta: current > best + delta), -math.inf
    return (lambda current, best, delta: current < best - delta), math.inf


def _batch_norm_layers(model: tf.keras.Model) -> list[tf.keras.layers.BatchNormalization]:
    return [m for m in model.submodules if isinstance(m, tf.keras.layers.BatchNormalization)]


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
class ClippingSchedule(tf.keras.callbacks.Callback):
    """Switch a model from the vanilla phase to the clipped phase during `fit`.

    Phase 0 (vanilla): every `SwitchableSteSign` uses the identity STE and every
    `SwitchableWeightClip` is off. Phase 1 (clipped): clipped STE and weight clipping on.
    The switch happens at the start of epoch `switch_epoch` (0 = clipped from the start),
    or after `patience` epochs in which `monitor` did not improve by `min_delta`. At the
    switch the learning rate is multiplied by `lr_factor` and, if `bn_momentum` is given,
    every BatchNormalization momentum is set to it.

    ```python
    model.fit(x, y, epochs=100, validation_split=0.1, callbacks=[
        ClippingSchedule(patience=10, lr_factor=0.1, bn_momentum=0.8)])
    ```

    Logs per epoch: `clipping_phase` (0/1, the phase the epoch trained in), `lr` and
    `bn_momentum`. The phase is read back from the model's switch variables when `fit`
    starts at an epoch > 0, so a run resumed by `tf.keras.callbacks.BackupAndRestore`
    continues in the phase it had reached.
    """

    def __init__(
        self,
        switch_epoch: int | None = None,
        monitor: str = "val_accuracy",
        patience: int | None = None,
        mode: str = "auto",
        min_delta: float = 0.0,
        lr_factor: float = 1.0,
        bn_momentum: float | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        if switch_epoch is None and patience is None:
            raise ValueError("ClippingSchedule needs switch_epoch or patience, got neither")
        for field, value in (("switch_epoch", switch_epoch), ("patience", patience)):
            if value is not None:  # the recipe's rule, None aside (one of the two may be None, not both)
                dataclasses.replace(FIELDS[field], optional=False).check(field, value)
        if not FIELDS["lr_factor"].accepts(lr_factor):
            raise ValueError(f"lr_factor must be > 0 and finite, got {lr_factor!r}")
        if not FIELDS["switch_bn_momentum"].accepts(bn_momentum):
            raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum!r}")
        Rule("number", 0).check("min_delta", min_delta)
        self.switch_epoch = None if switch_epoch is None else int(switch_epoch)
        self.monitor = monitor
        self.patience = None if patience is None else int(patience)
        self.mode = mode
        self.min_delta = float(min_delta)
        self.lr_factor = float(lr_factor)
        self.bn_momentum = None if bn_momentum is None else float(bn_momentum)
        self.verbose = verbose
        self._better, self._best = _improvement_op(monitor, mode)
        self._wait = 0
        self.phase = 0
        self.switched_at_epoch: int | None = None
        self._first_epoch = True
        self._replayed = False

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not find_switchables(self.model):
            raise ValueError(
                "ClippingSchedule expected a model with switchable quantisers or weight "
                "clips (SwitchableSteSign / SwitchableWeightClip), got one with none"
            )
        self._first_epoch = True
        if not self._replayed:
            self._wait = 0
            _, self._best = _improvement_op(self.monitor, self.mode)
        self._replayed = False

    def replay(self, history: Sequence[Mapping[str, float]], epochs: int | None = None) -> None:
        """Rebuild the plateau counter and switch epoch from the logs of finished epochs.

        For a resumed run: call it before `fit` with the epoch logs written so far (in
        order) and the run's epoch count, and the run switches exactly when an
        uninterrupted one would have (a plateau at the end of the last epoch switches nothing).
        """
        self._wait, self.switched_at_epoch = 0, None
        _, self._best = _improvement_op(self.monitor, self.mode)
        for epoch, logs in enumerate(history):
            if logs.get("clipping_phase", 0.0) >= 0.5:
                if self.switched_at_epoch is None:
                    self.switched_at_epoch = epoch
                continue
            current = logs.get(self.monitor)
            if self.patience is None or current is None:
                continue
            if self._better(float(current), self._best, self.min_delta):
                self._best, self._wait = float(current), 0
            else:
                self._wait += 1
        more_to_come = epochs is None or len(history) < epochs
        if self.switched_at_epoch is None and self.patience is not None and self._wait >= self.patience and more_to_come:
            self.switched_at_epoch = len(history)  # decided at the end of the last finished epoch
        self._replayed = True

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._first_epoch:
            self._first_epoch = False
            if epoch == 0:
                self._set_phase(0)
            else:  # resumed: the model's switch variables hold the phase reached
                self.phase = int(any(s.clipping_enabled for s in find_switchables(self.model)))
                if self.phase and self.bn_momentum is not None:
                    self._set_bn_momentum(self.bn_momentum)
        if self.phase == 0 and self.switch_epoch is not None and epoch >= self.switch_epoch:
            self.switch(epoch)
        # What this epoch trains with (a plateau switch at its end must not show here).
        self._epoch_lr = bk_optimizers.current_learning_rate(self.model.optimizer)
        bns = _batch_norm_layers(self.model)
        self._epoch_bn_momentum = float(bns[0].momentum) if bns else float("nan")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["clipping_phase"] = float(self.phase)
            logs["lr"] = self._epoch_lr
            logs["bn_momentum"] = self._epoch_bn_momentum
        if self.phase == 1 or self.patience is None:
            return
        current = (logs or {}).get(self.monitor)
        if current is None:
            raise ValueError(
                f"ClippingSchedule monitors {self.monitor!r} but the epoch logs only have "
                f"{sorted(logs or {})}; pass validation data or another monitor"
            )
        if self._better(float(current), self._best, self.min_delta):
            self._best, self._wait = float(current), 0
            return
        self._wait += 1
        last = self.params.get("epochs") if self.params else None
        if self._wait >= self.patience and (last is None or epoch + 1 < last):  # none after the last epoch
            self.switch(epoch + 1)

    def switch(self, epoch: int) -> None:
        """Enter the clipped phase now (effective from `epoch`)."""
        self._set_phase(1)
        self.switched_at_epoch = epoch
        new_lr = None
        if self.lr_factor != 1.0:
            new_lr = bk_optimizers.scale_learning_rate(self.model.optimizer, self.lr_factor)
        if self.bn_momentum is not None:
            self._set_bn_momentum(self.bn_momentum)
        if self.verbose:
            lr_text = f", learning rate x{self.lr_factor:g} -> {new_lr:.3g}" if new_lr else ""
            bn_text = f", BN momentum -> {self.bn_momentum}" if self.bn_momentum is not None else ""
            print(f"\nClippingSchedule: clipped phase from epoch {epoch + 1}{lr_text}{bn_text}")

    def _set_phase(self, phase: int) -> None:
        self.phase = phase
        for switchable in find_switchables(self.model):
            switchable.set_clipping_enabled(bool(phase))

    def _set_bn_momentum(self, momentum: float) -> None:
        # BN momentum is a Python float baked into the traced graph: retrace once.
        changed = False
        for layer in _batch_norm_layers(self.model):
            changed |= layer.momentum != momentum
            layer.momentum = momentum
        if changed:
            self.model.train_function = None
            self.model.make_train_function(force=True)

    def get_config(self) -> dict[str, Any]:
        return {
            "switch_epoch": self.switch_epoch,
            "monitor": self.monitor,
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "lr_factor": self.lr_factor,
            "bn_momentum": self.bn_momentum,
            "verbose": self.verbose,
        }


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
class BestValidation(tf.keras.callbacks.Callback):
    """Track the best validation epoch without ever stopping training (the study's protocol).

    Keeps a copy of the weights at the best `monitor` value, the epoch (0-based) and the
    logs of that epoch, including test metrics when `test_data` is given (evaluated every
    epoch and logged as `test_<metric>`). Report `best_logs["test_accuracy"]`: the test
    accuracy at the epoch of best validation accuracy.

    ```python
    best = BestValidation(test_data=(x_test, y_test))
    model.fit(x, y, validation_split=0.1, epochs=250, callbacks=[best])
    best.restore()   # the best-validation weights
    print(best.best_epoch, best.best_logs["test_accuracy"])
    ```
    """

    def __init__(
        self,
        monitor: str = "val_accuracy",
        mode: str = "auto",
        test_data: Any = None,
        restore_best_weights: bool = False,
    ):
        super().__init__()
        self.monitor = monitor
        self.mode = mode
        self.test_data = test_data
        self.restore_best_weights = restore_best_weights
        self._better, self.best = _improvement_op(monitor, mode)
        self.best_epoch: int | None = None
        self.best_logs: dict[str, float] = {}
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        if self.test_data is not None:
            results = self._evaluate_test()
            logs.update({f"test_{name}": value for name, value in results.items()})
        current = logs.get(self.monitor)
        if current is None:
            raise ValueError(
                f"BestValidation monitors {self.monitor!r} but the epoch logs only have "
                f"{sorted(logs)}; pass validation data or another monitor"
            )
        if self.best_epoch is None or self._better(float(current), self.best, 0.0):
            self.best = float(current)
            self.best_epoch = epoch
            self.best_logs = {k: float(v) for k, v in logs.items() if np.isscalar(v)}
            self.best_weights = self.model.get_weights()
        logs["best_epoch"] = float(self.best_epoch)

    def _evaluate_test(self) -> dict[str, float]:
        data = self.test_data
        if isinstance(data, tuple):
            results = self.model.evaluate(*data, verbose=0, return_dict=True)
        else:
            results = self.model.evaluate(data, verbose=0, return_dict=True)
        return {name: float(value) for name, value in results.items()}

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.restore_best_weights:
            self.restore()

    def restore(self) -> None:
        """Put the weights of the best validation epoch back into the model."""
        if self.best_weights is None:
            raise ValueError("BestValidation has no best weights yet: no epoch has finished")
        self.model.set_weights(self.best_weights)

    def get_config(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "restore_best_weights": self.restore_best_weights,
        }


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint and best model are kept."""


class EpochClock(tf.keras.callbacks.Callback):
    """Log `epoch_time_s`: wall seconds of the epoch's training and validation.

    Put it first in the callback list, so later callbacks' work (a test evaluation) is not counted.
    """

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["epoch_time_s"] = time.perf_counter() - self._started


class StopOnNonFinite(tf.keras.callbacks.Callback):
    """Raise `TrainingDivergedError` after the first batch hook whose loss is NaN or infinite.

    Not Keras' `TerminateOnNaN`: that lets the epoch end, so end-of-epoch callbacks would
    back up or keep the broken weights. The loss Keras logs is the epoch's running mean,
    so once one batch's loss is non-finite every later one in the epoch is too: with
    ``steps_per_execution`` > 1 the batch hooks run once per execution block (one
    device-to-host read per block, not per step) and the message names the block's
    batches. `epoch_offset` and `steps` only word the message.
    """

    def __init__(self, epoch_offset: int = 0, steps: int | None = None):
        super().__init__()
        self.epoch_offset, self.steps = epoch_offset, steps
        self._epoch = 0
        self._done = 0  # batches of this epoch checked so far

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch, self._done = epoch, 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        first, self._done = self._done + 1, batch + 1  # Keras passes the block's last batch
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            of = f" of {self.steps}" if self.steps else ""
            where = f"batch {batch + 1}" if first >= batch + 1 else f"batches {first}-{batch + 1}"
            raise TrainingDivergedError(
                f"the training loss became {float(loss)} in epoch {self.epoch_offset + self._epoch + 1}, {where}{of}"
            )

    def get_config(self) -> dict[str, Any]:
        return {"epoch_offset": self.epoch_offset, "steps": self.steps}


class HistoryRows(tf.keras.callbacks.Callback):
    """Append one row per epoch (its logs plus LR, BN momentum, clipping phase, stage) to `rows`.

    Not Keras' `CSVLogger`: a resumed run must rewrite the history without the rows of
    the epoch it redoes, and write JSON as well; `write(rows)` is called after each row.
    Put it after the callbacks whose logs it should see (test metrics, best epoch). `lr`
    is the rate used *during* the epoch, read when the epoch starts.
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        stage: str = "train",
        epoch_offset: int = 0,
        write: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        super().__init__()
        self.rows, self.stage, self.epoch_offset, self.write = rows, stage, epoch_offset, write
        self._lr = float("nan")

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._lr = bk_optimizers.current_learning_rate(self.model.optimizer)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        bns = _batch_norm_layers(self.model)
        # ClippingSchedule, when present, has logged what the epoch trained with; keep it.
        logs.setdefault("lr", self._lr)
        logs.setdefault("bn_momentum", float(bns[0].momentum) if bns else float("nan"))
        logs.setdefault("clipping_phase", float(any(s.clipping_enabled for s in find_switchables(self.model))))
        row: dict[str, Any] = {"epoch": self.epoch_offset + epoch, "stage": self.stage, "stage_epoch": epoch}
        row.update({k: float(v) for k, v in logs.items() if np.isscalar(v)})
        self.rows.append(row)
        if self.write is not None:
            self.write(self.rows)


def _binary_kernels(model: tf.keras.Model) -> dict[str, tf.Variable]:
    """The latent kernel of every layer with a kernel quantiser (Larq's binary layers), by layer name."""
    found: dict[str, tf.Variable] = {}
    for layer in [model, *model.submodules]:
        kernel = getattr(layer, "kernel", None)
        if getattr(layer, "kernel_quantizer", None) is not None and kernel is not None:
            found.setdefault(layer.name, getattr(kernel, "latent_variable", kernel))
    return found


def _positive(kernel: tf.Variable) -> np.ndarray:
    """Where the binary weight is +1: Larq's sign maps 0 to +1."""
    return kernel.numpy() >= 0


def _metadata(plugin: str, data_class: str) -> Any:
    """What TensorBoard's `plugin` ("scalars", "histograms") reads, as its own summary functions write it."""
    return tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name=plugin), data_class=data_class
    )


def _histogram(values: np.ndarray, bins: int = 30) -> np.ndarray:
    """TensorBoard's histogram tensor: one row (left edge, right edge, count) per bucket."""
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low == high:  # one value: one unit-wide range around it
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
class TensorBoardLog(tf.keras.callbacks.Callback):
    """Write each epoch's logs to TensorBoard event files in `log_dir`, at step `epoch_offset + epoch`.

    Scalars, every epoch: each number of the epoch logs under its own name (``loss``,
    ``accuracy``, ``val_accuracy``, ``test_accuracy``, ``lr``, ``bn_momentum``,
    ``clipping_phase``, ...), plus ``flipped_share``: the share of all binary weights
    whose sign flipped during the epoch, exactly, from the sign of each latent kernel at
    the epoch's begin and end (Larq's sign: 0 is +1). A binary layer is one with a
    `kernel_quantizer`; a model without one (a float twin) logs no flipped share. With
    `histograms`, per binary layer as well: the histogram of its latent kernel at the
    epoch's end (``latent_weights/<layer>``) and its own share (``flipped_share/<layer>``).
    With `dead_zone` (a `bnn_keras.dead_zone.DeadZoneMonitor` placed before it), each of
    the epoch's per-layer shares as the scalar ``dead_zone/<metric>/<layer>`` (its
    aggregate columns, ``dead_zone_beyond`` etc., are scalars of the logs already).

    Put it after the callbacks whose logs it should show (`ClippingSchedule`,
    `BestValidation`, `DeadZoneMonitor`, `HistoryRows`). `epoch_offset` shifts the step, so the stages of
    one run line up on one axis. Written with `tf.summary.write` alone (no `tensorboard`
    package needed to write; viewing needs it), flushed after each epoch. A resumed run
    writes the epochs it redoes again: TensorBoard shows the last values written.

    ```python
    model.fit(x, y, validation_split=0.1, epochs=10, callbacks=[
        ClippingSchedule(switch_epoch=5, lr_factor=0.1),
        TensorBoardLog("runs/x/tensorboard/train", histograms=True)])
    # tensorboard --logdir runs/x/tensorboard
    ```
    """

    def __init__(
        self, log_dir: str | os.PathLike, histograms: bool = False, epoch_offset: int = 0, dead_zone: Any = None
    ):
        super().__init__()
        Rule("bool").check("histograms", histograms)
        Rule("int", 0).check("epoch_offset", epoch_offset)
        self.log_dir, self.histograms, self.epoch_offset = os.fspath(log_dir), histograms, int(epoch_offset)
        self.dead_zone = dead_zone
        self._writer: Any = None
        self._positive: dict[str, np.ndarray] = {}  # each binary layer's signs when the epoch began

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._positive = {name: _positive(kernel) for name, kernel in _binary_kernels(self.model).items()}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        scalars = {name: float(value) for name, value in (logs or {}).items() if np.isscalar(value)}
        measured = self.dead_zone.per_layer[-1] if self.dead_zone is not None and self.dead_zone.per_layer else {}
        for layer, shares in measured.items():
            scalars.update({f"dead_zone/{metric}/{layer}": float(value) for metric, value in shares.items()})
        kernels = _binary_kernels(self.model)
        began, self._positive = self._positive, {}
        flipped = {
            name: (int(np.count_nonzero(_positive(kernels[name]) != before)), before.size)
            for name, before in began.items()
            if name in kernels
        }
        if flipped:
            scalars["flipped_share"] = sum(n for n, _ in flipped.values()) / sum(m for _, m in flipped.values())
        if self.histograms:
            scalars.update({f"flipped_share/{name}": n / m for name, (n, m) in flipped.items()})
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        step = self.epoch_offset + epoch
        scalar = _metadata("scalars", "DATA_CLASS_SCALAR")
        with self._writer.as_default():
            for tag, value in scalars.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=scalar)
            if self.histograms:
                histogram = _metadata("histograms", "DATA_CLASS_TENSOR")
                for name, kernel in kernels.items():
                    tf.summary.write(f"latent_weights/{name}", _histogram(kernel.numpy()), step=step, metadata=histogram)
        self._writer.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def get_config(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir, "histograms": self.histograms, "epoch_offset": self.epoch_offset}

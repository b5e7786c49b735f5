"""One training run of the study's protocol: a `Recipe` (plain data) in, results out.

`run(recipe)` goes data -> model -> optimiser -> callbacks -> `model.fit` -> files:

- data: `bnn_keras.data.load` (the last 10% of the training set for validation);
- model: `bnn_keras.models` (``mlp`` / ``vgg10``, float / binaryconnect / binarynet);
- optimiser: `bnn_keras.optimizers.get` with a learning rate that decays exponentially
  once per epoch from ``lr_start`` to ``lr_end`` (the study's schedule);
- callbacks: `ClippingSchedule` for ``vanilla-then-clipped`` and `BestValidation`, which
  never stops training and keeps the best-validation epoch (the study's rule 2);
- output (in ``recipe.output_dir``): ``history.csv`` and ``history.json`` (one row per
  epoch, rewritten after every epoch), ``best_model.keras`` (the weights of the best
  validation epoch, no optimiser), ``summary.json`` and ``curves.png``.

Long runs (see docs/long_runs.md):

- resume: a run stopped at any moment (even by SIGKILL) and started again with the same
  recipe and output folder continues after its last finished epoch, with the same
  schedule phase, learning rate, BN momentum, best epoch, history and data order; with
  the same seed its results equal an uninterrupted run's. While it runs the folder also
  holds ``run.json`` (the recipe) and ``backup/`` (a `tf.keras.callbacks.BackupAndRestore`
  checkpoint per stage); both go once ``summary.json`` is written. Another recipe
  pointed at a used folder raises `RunConflictError` unless ``overwrite=True``;
- a NaN or infinite loss raises `TrainingDivergedError` naming the epoch and batch, and
  keeps the last good checkpoint and the best model;
- ``seed`` seeds everything and ``deterministic`` (default) turns on TensorFlow's op
  determinism, so two runs with one seed on one machine have identical histories;
- ``strategy`` ("default", "mirrored", "multi-worker", "tpu"; `bnn_keras.distribute`):
  ``batch_size`` is per replica, the learning rate is scaled by the replica count
  (linear rule), BatchNormalization is synchronised across replicas, and only the chief
  writes the output folder.

Clipping schedules (``Recipe.schedule``, `SCHEDULES`):

- ``"clipped"``: clipping on from the first step (the study's end-to-end baseline);
  ``Recipe.clipping`` picks what is on: "both", "gradients" (clipped STE only),
  "weights" (weight clipping only) or "none" (the study's Table 3);
- ``"vanilla"``: vanilla STE and no weight clipping throughout;
- ``"vanilla-then-clipped"``: vanilla first, then clipped STE and weight clipping from
  ``switch_epoch`` on, or after ``patience`` epochs without a better validation
  accuracy; at the switch the LR is multiplied by ``lr_factor`` and the BN momentum
  set to ``switch_bn_momentum`` (the study's rules 3 and 5);
- ``"two-stage"``: train the float twin for ``pretrain_epochs``, copy its weights into
  the binary model (`bnn_keras.models.copy_weights`), fine-tune that for ``epochs``
  with clipping on (the study's Table 5). The fine-tune stage starts at
  ``lr_start * lr_factor`` and uses ``switch_bn_momentum`` if given.

```python
from bnn_keras import training
recipe = training.RECIPES["mnist_mlp"].replace(
    epochs=5, model_kwargs={"hidden_units": (256, 256, 256)}, output_dir="runs/demo")
result = training.run(recipe)
result["test_accuracy_at_best"], result["best_epoch"]
```
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import inspect
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from bnn_keras import callbacks as bk_callbacks
from bnn_keras import data as bk_data
from bnn_keras import distribute as bk_distribute
from bnn_keras import models as bk_models
from bnn_keras import optimizers as bk_optimizers
from bnn_keras._switch import find_switchables
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import SwitchableSteSign

__all__ = [
    "CLIPPINGS",
    "LOSSES",
    "LR_SCHEDULES",
    "LR_SCALINGS",
    "RECIPES",
    "Recipe",
    "RunConflictError",
    "SCHEDULES",
    "TrainingDivergedError",
    "get_recipe",
    "run",
    "set_clipping_parts",
    "write_json",
    "write_text",
]

SCHEDULES: tuple[str, ...] = ("clipped", "vanilla", "vanilla-then-clipped", "two-stage")
"""Clipping schedules: clipped throughout, never, switched on mid-run, or after float pretraining."""

CLIPPINGS: tuple[str, ...] = ("both", "gradients", "weights", "none")
"""What the clipped phase turns on: clipped STE and weight clipping, one of them, or nothing."""

LOSSES: tuple[str, ...] = ("squared_hinge", "crossentropy")
"""Losses: squared hinge on +-1 targets (the study) or softmax cross-entropy."""

LR_SCHEDULES: tuple[str, ...] = ("exponential", "constant")
"""Learning-rate schedules: per-epoch exponential decay lr_start -> lr_end, or constant."""

LR_SCALINGS: tuple[str | None, ...] = (None, "update", "gradient")
"""BinaryConnect's Glorot per-layer LR scaling: off, on the update, or on the gradient."""

# Builder arguments that run() sets itself (from recipe fields or the strategy); the
# others come from model_kwargs.
_MODEL_ARGUMENTS = ("input_shape", "num_classes", "variant", "bn_momentum", "bn_epsilon", "clipped", "synchronized_bn")


class RunConflictError(ValueError):
    """The output folder holds a run of other (or unknown) settings; `run(overwrite=True)` replaces it."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint and best model are kept."""


def _fail(field: str, expected: str, value: Any) -> None:
    raise ValueError(f"{field} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _choice(field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        names = ", ".join("None" if c is None else repr(c) for c in choices)
        raise ValueError(f"unknown {field} {value!r}: expected one of {names}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of one training run, as plain data (validated on creation).

    Defaults are the study's MNIST MLP settings on the embedded Fashion-MNIST subset.
    `replace` returns a validated copy with some fields changed.

    ```python
    recipe = Recipe(epochs=3, model_kwargs={"hidden_units": (128, 128)}, output_dir="runs/x")
    recipe.replace(schedule="vanilla-then-clipped", switch_epoch=2, lr_factor=0.1)
    Recipe(epochs=-1)  # ValueError: epochs must be an integer >= 1, got -1
    ```
    """

    name: str = "custom"
    # data
    dataset: str = "embedded"
    data_dir: str | None = None
    raw_dir: str | None = None
    limit: int | None = None
    validation_fraction: float = 0.1
    # model
    model: str = "mlp"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    variant: str = "binaryconnect"
    bn_momentum: float = 0.85
    bn_epsilon: float = 1e-4
    loss: str = "squared_hinge"
    # optimiser
    optimizer: str = "adam"
    optimizer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lr_start: float = 1e-3
    lr_end: float | None = 3e-6
    lr_schedule: str = "exponential"
    lr_scaling: str | None = None
    epochs: int = 250
    batch_size: int = 100
    # clipping schedule
    schedule: str = "clipped"
    clipping: str = "both"
    switch_epoch: int | None = None
    patience: int | None = None
    lr_factor: float = 1.0
    switch_bn_momentum: float | None = None
    pretrain_epochs: int = 0
    # run
    seed: int = 0
    deterministic: bool = True
    strategy: str = "default"
    output_dir: str | None = None
    verbose: int = 2

    def __post_init__(self) -> None:
        for field in ("name", "dataset", "model", "variant", "optimizer"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                _fail(field, "a non-empty string", getattr(self, field))
        for field in ("data_dir", "raw_dir", "output_dir"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                _fail(field, "a path or None", value)
            if value is not None:
                object.__setattr__(self, field, os.fspath(value))
        if self.limit is not None and not (_is_int(self.limit) and self.limit >= 1):
            _fail("limit", "an integer >= 1 or None", self.limit)
        if not (_is_number(self.validation_fraction) and 0 < self.validation_fraction < 1):
            _fail("validation_fraction", "a number in (0, 1)", self.validation_fraction)

        builder = bk_models.get(self.model)
        _choice("variant", self.variant, bk_models.VARIANTS)
        if not isinstance(self.model_kwargs, Mapping):
            _fail("model_kwargs", "a mapping", self.model_kwargs)
        accepted = set(inspect.signature(builder).parameters) - set(_MODEL_ARGUMENTS)
        unknown = sorted(set(self.model_kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"model_kwargs {', '.join(unknown)} not accepted by model {self.model!r}: "
                f"expected some of {', '.join(sorted(accepted))}"
            )
        object.__setattr__(
            self,
            "model_kwargs",
            {k: tuple(v) if isinstance(v, list) else v for k, v in self.model_kwargs.items()},
        )
        for field in ("bn_momentum",) + (("switch_bn_momentum",) if self.switch_bn_momentum is not None else ()):
            value = getattr(self, field)
            if not (_is_number(value) and 0 <= value < 1):
                _fail(field, "a number in [0, 1)", value)
        if not (_is_number(self.bn_epsilon) and self.bn_epsilon > 0):
            _fail("bn_epsilon", "a number > 0", self.bn_epsilon)
        _choice("loss", self.loss, LOSSES)

        _choice("optimizer", self.optimizer.lower(), bk_optimizers.NAMES)
        if not isinstance(self.optimizer_kwargs, Mapping):
            _fail("optimizer_kwargs", "a mapping", self.optimizer_kwargs)
        object.__setattr__(self, "optimizer_kwargs", dict(self.optimizer_kwargs))
        if not (_is_number(self.lr_start) and math.isfinite(self.lr_start) and self.lr_start > 0):
            _fail("lr_start", "a number > 0", self.lr_start)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.lr_schedule == "exponential" and not (
            _is_number(self.lr_end) and math.isfinite(self.lr_end) and self.lr_end > 0
        ):
            _fail("lr_end", "a number > 0 for the exponential schedule", self.lr_end)
        _choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        if self.lr_scaling is not None and self.optimizer.lower() == "bop":
            raise ValueError("lr_scaling does not apply to 'bop': it has no learning rate for binary kernels")
        if not (_is_int(self.epochs) and self.epochs >= 1):
            _fail("epochs", "an integer >= 1", self.epochs)
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            _fail("batch_size", "an integer >= 1", self.batch_size)

        _choice("schedule", self.schedule, SCHEDULES)
        _choice("clipping", self.clipping, CLIPPINGS)
        if self.switch_epoch is not None and not (_is_int(self.switch_epoch) and self.switch_epoch >= 0):
            _fail("switch_epoch", "an integer >= 0 or None", self.switch_epoch)
        if self.patience is not None and not (_is_int(self.patience) and self.patience >= 1):
            _fail("patience", "an integer >= 1 or None", self.patience)
        if not (_is_number(self.lr_factor) and math.isfinite(self.lr_factor) and self.lr_factor > 0):
            _fail("lr_factor", "a number > 0", self.lr_factor)
        if not (_is_int(self.pretrain_epochs) and self.pretrain_epochs >= 0):
            _fail("pretrain_epochs", "an integer >= 0", self.pretrain_epochs)
        if self.variant == "float" and self.schedule != "vanilla":
            raise ValueError(
                f"variant 'float' has no binary layers to clip: schedule must be 'vanilla', "
                f"got {self.schedule!r}"
            )
        if self.schedule == "vanilla-then-clipped":
            if self.switch_epoch is None and self.patience is None:
                raise ValueError("schedule 'vanilla-then-clipped' needs switch_epoch or patience, got neither")
            if self.switch_epoch is not None and self.switch_epoch >= self.epochs:
                raise ValueError(
                    f"switch_epoch must be < epochs ({self.epochs}) to switch at all, got {self.switch_epoch}"
                )
        if self.schedule == "two-stage" and self.pretrain_epochs < 1:
            _fail("pretrain_epochs", "an integer >= 1 for schedule 'two-stage'", self.pretrain_epochs)
        if self.clipping != "both" and self.schedule not in ("clipped", "two-stage"):
            raise ValueError(
                f"clipping {self.clipping!r} needs schedule 'clipped' or 'two-stage' "
                f"(it sets the clipped phase's parts), got schedule {self.schedule!r}"
            )
        if not (_is_int(self.seed) and self.seed >= 0):
            _fail("seed", "an integer >= 0", self.seed)
        if not isinstance(self.deterministic, bool):
            _fail("deterministic", "True or False", self.deterministic)
        _choice("strategy", self.strategy, bk_distribute.STRATEGIES)
        if self.verbose not in (0, 1, 2):
            _fail("verbose", "0, 1 or 2", self.verbose)

    def replace(self, **changes: Any) -> "Recipe":
        """A validated copy with `changes` applied (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def override(
        self,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> "Recipe":
        """Like `replace`, but `model_kwargs` / `optimizer_kwargs` are merged into the current ones.

        A change of ``model`` drops the current model_kwargs (they belong to the old model).

        ```python
        RECIPES["mnist_mlp"].override(epochs=5, model_kwargs={"weight_clip": "glorot"})
        ```
        """
        current = {} if changes.get("model", self.model) != self.model else dict(self.model_kwargs)
        return self.replace(
            model_kwargs={**current, **(model_kwargs or {})},
            optimizer_kwargs={**self.optimizer_kwargs, **(optimizer_kwargs or {})},
            **changes,
        )

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-ready plain data."""
        out = dataclasses.asdict(self)
        out["model_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs.items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Recipe":
        """Inverse of `to_dict` (unknown keys raise ValueError)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {', '.join(unknown)}")
        return cls(**values)

    @property
    def out(self) -> Path:
        """Where `run` writes: `output_dir`, or ``runs/<name>``."""
        return Path(self.output_dir if self.output_dir is not None else os.path.join("runs", self.name))


RECIPES: dict[str, Recipe] = {
    # The study's MNIST MLP; on the embedded Fashion-MNIST subset unless --dataset says otherwise.
    "mnist_mlp": Recipe(
        name="mnist_mlp",
        dataset="embedded",
        model="mlp",
        model_kwargs={"hidden_units": (2048, 2048, 2048)},
        variant="binaryconnect",
        bn_momentum=0.85,
        loss="squared_hinge",
        optimizer="adam",
        lr_start=1e-3,
        lr_end=3e-6,
        epochs=250,
        batch_size=100,
        schedule="clipped",
    ),
    # The study's CIFAR-10 VGG-10 (per-image standardised, not the GCN+ZCA set it used).
    "cifar10_vgg10": Recipe(
        name="cifar10_vgg10",
        dataset="cifar10",
        model="vgg10",
        model_kwargs={"width_multiplier": 1.0},
        variant="binaryconnect",
        bn_momentum=0.9,
        loss="squared_hinge",
        optimizer="adam",
        lr_start=3e-3,
        lr_end=2e-6,
        epochs=500,
        batch_size=50,
        schedule="clipped",
    ),
}
"""The study's experiments by name (``bnn-keras train NAME``); `recipes/*.py` are thin scripts over these."""


def get_recipe(name: str) -> Recipe:
    """The recipe called `name` (a key of `RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (UTF-8) atomically: a temporary file renamed into place."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)

    _atomic_write(path, write)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write `value` as indented JSON, atomically (non-finite floats become null)."""
    write_text(Path(path), json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n")


def _history_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_history(out: Path, rows: list[dict[str, Any]]) -> None:
    write_json(out / "history.json", rows)
    write_text(out / "history.csv", _history_csv(_jsonable(rows)))


def _save_model(model: tf.keras.Model, weights: list[np.ndarray], path: Path) -> None:
    """Save `model`'s architecture with `weights`, without optimiser state, atomically.

    The copy has plain (unsynchronised) BatchNormalization and is built in a helper
    thread: strategy scopes are thread-local, so under a multi-worker strategy only the
    chief builds and saves it, without collective ops the other workers would have to join.
    """

    def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            config["synchronized"] = False
        return layer.__class__.from_config(config)

    def save() -> None:
        uncompiled = tf.keras.models.clone_model(model, clone_function=clone_layer)
        uncompiled.set_weights(weights)
        _atomic_write(path, lambda tmp: uncompiled.save(tmp))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(save).result()


class _EpochClock(tf.keras.callbacks.Callback):
    """Log `epoch_time_s`: wall seconds of the epoch's training and validation (first in the list,
    so the per-epoch test evaluation is not counted)."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["epoch_time_s"] = time.perf_counter() - self._started


class _StopOnNonFinite(tf.keras.callbacks.Callback):
    """Raise `TrainingDivergedError` after the first batch whose loss is NaN or infinite.

    Raising (rather than Keras' `TerminateOnNaN`, which lets the epoch end) keeps the
    epoch's end-of-epoch callbacks from backing up or keeping the broken weights.
    """

    def __init__(self, epoch_offset: int, steps: int):
        super().__init__()
        self.epoch_offset, self.steps = epoch_offset, steps
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDivergedError(
                f"the training loss became {float(loss)} in epoch {self.epoch_offset + self._epoch + 1}, "
                f"batch {batch + 1} of {self.steps}"
            )


class _HistoryWriter(tf.keras.callbacks.Callback):
    """Append each epoch's logs (plus LR, BN momentum, clipping phase, stage) to the history files.

    Runs after the other callbacks so it sees their logs (test metrics, best epoch). `lr`
    is the rate used *during* the epoch, read when the epoch starts. With `out` None
    (a multi-worker run's non-chief worker) the rows are only kept in memory.
    """

    def __init__(self, rows: list[dict[str, Any]], out: Path | None, stage: str, epoch_offset: int):
        super().__init__()
        self.rows, self.out, self.stage, self.epoch_offset = rows, out, stage, epoch_offset
        self._lr = float("nan")

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._lr = bk_optimizers.current_learning_rate(self.model.optimizer)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        bns = [m for m in self.model.submodules if isinstance(m, tf.keras.layers.BatchNormalization)]
        # ClippingSchedule, when present, has logged what the epoch trained with; keep it.
        logs.setdefault("lr", self._lr)
        logs.setdefault("bn_momentum", float(bns[0].momentum) if bns else float("nan"))
        logs.setdefault("clipping_phase", float(any(s.clipping_enabled for s in find_switchables(self.model))))
        row: dict[str, Any] = {"epoch": self.epoch_offset + epoch, "stage": self.stage, "stage_epoch": epoch}
        row.update({k: float(v) for k, v in logs.items() if np.isscalar(v)})
        self.rows.append(row)
        if self.out is not None:
            _write_history(self.out, self.rows)


class _BestKeeper(bk_callbacks.BestValidation):
    """`BestValidation` that survives a restart: its state is rebuilt from the finished
    epochs' history rows (`resume`), and each new best's weights are saved to a pending
    file named after the epoch, which `_promote_best` turns into ``best_model.keras``
    once that epoch's backup is written (so it never holds an epoch a restart redoes).
    With `out` None nothing is saved.
    """

    def __init__(self, test_data: Any, out: Path | None):
        super().__init__(test_data=test_data)
        self.out = out

    def resume(self, rows: list[Mapping[str, Any]]) -> None:
        """Take the best of `rows` (this stage's finished epochs, in order) as the best so far."""
        for epoch, row in enumerate(rows):
            current = row.get(self.monitor)
            if current is not None and (self.best_epoch is None or self._better(float(current), self.best, 0.0)):
                self.best, self.best_epoch, self.best_logs = float(current), epoch, dict(row)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if self.out is not None and self.best_epoch == epoch:
            _save_model(self.model, self.best_weights, _pending_best_path(self.out, epoch))


class _PromoteBest(tf.keras.callbacks.Callback):
    """After the epoch's backup (it comes after BackupAndRestore): its pending best model becomes best_model.keras."""

    def __init__(self, out: Path):
        super().__init__()
        self.out = out

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        _promote_best(self.out, epoch + 1)


# --------------------------------------------------------------------------- output folder

_BACKUP = "backup"
_RUN_FILE = "run.json"
_STAGE_FILE = "stage.json"
_RESULTS = ("summary.json", "history.json", "history.csv", "best_model.keras", "curves.png")
_COSMETIC_FIELDS = ("name", "output_dir", "verbose")
_PENDING_BEST = re.compile(r"\.pending-best_model-epoch(\d+)\.keras")
# What _atomic_write and plots leave behind when killed mid-write: ".<stem>-<random>.<suffix>".
_TEMPORARY = re.compile(
    r"\.(?:history|summary|best_model|run|stage|curves|\.pending-best_model-epoch\d+)-\w+\.(?:json|csv|keras|png)"
)


def _pending_best_path(out: Path, epoch: int) -> Path:
    return out / f".pending-best_model-epoch{epoch}.keras"


def _promote_best(out: Path, finished: int) -> None:
    """Make the newest pending best model of the first `finished` epochs best_model.keras; drop the rest."""
    pending = {}
    for path in out.iterdir():
        match = _PENDING_BEST.fullmatch(path.name)
        if match:
            pending[int(match.group(1))] = path
    done = [epoch for epoch in pending if epoch < finished]
    if done:
        os.replace(pending.pop(max(done)), out / "best_model.keras")
    for path in pending.values():  # older bests, or bests of an epoch that did not finish
        path.unlink(missing_ok=True)


def _remove_temporaries(out: Path) -> None:
    for path in out.iterdir():
        if _TEMPORARY.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _remove_state(out: Path) -> None:
    """Remove what only an unfinished run needs: run.json, stage.json, backups, pending files."""
    (out / _RUN_FILE).unlink(missing_ok=True)
    (out / _STAGE_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / _BACKUP, ignore_errors=True)
    _promote_best(out, 0)
    _remove_temporaries(out)


def _remove_empty_backup(out: Path, remove_out: bool) -> None:
    """Remove ``out/backup`` (and `out` if `remove_out`) as far as empty: a worker's BackupAndRestore leftovers."""
    backup = out / _BACKUP
    if backup.is_dir():
        for path, _, _ in sorted(os.walk(backup), key=lambda entry: -len(entry[0])):
            with contextlib.suppress(OSError):
                os.rmdir(path)
    if remove_out:
        with contextlib.suppress(OSError):
            out.rmdir()


def _settings(recipe_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: the recipe without name, folder and verbosity."""
    plain = json.loads(json.dumps(_jsonable(dict(recipe_dict))))
    return {k: v for k, v in plain.items() if k not in _COSMETIC_FIELDS}


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot read {os.fspath(path)!r} ({type(error).__name__}: {' '.join(str(error).split())}): "
            "pass --overwrite (overwrite=True) to start afresh"
        ) from None


def _recorded_recipe(out: Path) -> dict[str, Any] | None:
    """The settings of the run in `out`: run.json's recipe, else summary.json's; None if neither."""
    for name in (_RUN_FILE, "summary.json"):
        if (out / name).exists():
            content = _read_json(out / name)
            recorded = content.get("recipe") if isinstance(content, Mapping) else None
            if isinstance(recorded, Mapping):
                try:  # fills in fields an older version did not record
                    return Recipe.from_dict(recorded).to_dict()
                except (TypeError, ValueError):
                    return dict(recorded)
    return None


def _output_state(out: Path, recipe: Recipe, overwrite: bool) -> str:
    """What `run` finds in `out`: "fresh", "overwrite", "resume" or "finished" (reads only).

    Raises RunConflictError when `out` holds a run of other settings and not `overwrite`.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {os.fspath(out)!r} is a file: expected a folder or a path that does not exist yet")
    found = [name for name in (_RUN_FILE, *_RESULTS, _STAGE_FILE, _BACKUP) if (out / name).exists()]
    if not found:
        return "fresh"
    if overwrite:
        return "overwrite"
    advice = "pass --overwrite (overwrite=True) to replace it, or choose another output folder"
    recorded = _recorded_recipe(out)
    if recorded is None:
        raise RunConflictError(
            f"output folder {os.fspath(out)!r} holds {found[0]} of an earlier run but not its settings "
            f"({_RUN_FILE}): {advice}"
        )
    then, now = _settings(recorded), _settings(recipe.to_dict())
    if then != now:
        differ = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        shown = "; ".join(f"{k} {then.get(k)!r} there, {now.get(k)!r} now" for k in differ[:3])
        more = f"; {len(differ) - 3} more" if len(differ) > 3 else ""
        raise RunConflictError(
            f"output folder {os.fspath(out)!r} holds a run with other settings ({shown}{more}): {advice}"
        )
    return "finished" if (out / "summary.json").exists() else "resume"


def _finished_epochs(backup: Path) -> int:
    """How many epochs the BackupAndRestore checkpoint in `backup` has finished (0 if none)."""
    latest = tf.train.latest_checkpoint(os.fspath(backup / "chief"))
    if latest is None:
        return 0
    try:
        epoch = tf.train.load_checkpoint(latest).get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")
    except (tf.errors.OpError, ValueError, KeyError) as error:
        raise ValueError(
            f"cannot read the backup {latest!r} ({type(error).__name__}): pass --overwrite (overwrite=True) to start afresh"
        ) from None
    return int(epoch) + 1


def _restore_backup(model: tf.keras.Model, backup: Path) -> None:
    """Load the model weights of the checkpoint in `backup` (a stage that finished every epoch)."""
    latest = tf.train.latest_checkpoint(os.fspath(backup / "chief"))
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()


def _skip_shuffles(dataset: tf.data.Dataset, count: int) -> None:
    """Create and drop `count` iterators of `dataset`.

    A seeded ``shuffle(reshuffle_each_iteration=True)`` draws the next epoch's order
    whenever an iterator is created, starting over in a new process; `fit` creates one
    iterator before its first epoch and one per epoch. Skipping the iterators an
    uninterrupted run would have made gives a resumed run the same orders.
    """
    for _ in range(max(count, 0)):
        iter(dataset)


def _shard_by_data(splits: bk_data.DatasetSplits) -> bk_data.DatasetSplits:
    """Multi-worker: each worker reads the whole, identically shuffled set and keeps its part of every global batch."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataclasses.replace(
        splits,
        train=splits.train.with_options(options),
        validation=splits.validation.with_options(options),
        test=splits.test.with_options(options),
    )


@contextlib.contextmanager
def _op_determinism(enabled: bool):
    """TensorFlow's op determinism on inside the block (off again after, if it was off)."""
    from tensorflow.python.framework import config as tf_config  # the only getter and switch-off

    switch = enabled and not tf_config.is_op_determinism_enabled()
    if switch:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if switch:
            tf_config.disable_op_determinism()


def _best_row(rows: list[Mapping[str, Any]], monitor: str = "val_accuracy") -> tuple[int, Mapping[str, Any]]:
    """The first row with the highest `monitor` (BestValidation's choice)."""
    index = max(range(len(rows)), key=lambda i: (rows[i][monitor], -i))
    return index, rows[index]


# --------------------------------------------------------------------------- run


def set_clipping_parts(model: tf.keras.Model, clipping: str) -> None:
    """Set each switchable of `model` for a clipped phase with `clipping` parts on.

    "gradients": every `SwitchableSteSign` clipped, every `SwitchableWeightClip` off;
    "weights": the reverse; "both" / "none": all on / all off.
    """
    _choice("clipping", clipping, CLIPPINGS)
    for switchable in find_switchables(model):
        if isinstance(switchable, SwitchableSteSign):
            switchable.set_clipping_enabled(clipping in ("gradients", "both"))
        elif isinstance(switchable, SwitchableWeightClip):
            switchable.set_clipping_enabled(clipping in ("weights", "both"))


def _build_model(
    recipe: Recipe, splits: bk_data.DatasetSplits, variant: str, bn_momentum: float, synchronized_bn: bool
) -> tf.keras.Model:
    return bk_models.get(recipe.model)(
        splits.input_shape,
        splits.num_classes,
        variant=variant,
        bn_momentum=bn_momentum,
        bn_epsilon=recipe.bn_epsilon,
        synchronized_bn=synchronized_bn,
        **recipe.model_kwargs,
    )


def _compile(model: tf.keras.Model, recipe: Recipe, epochs: int, steps_per_epoch: int, lr_scale: float) -> None:
    if recipe.lr_schedule == "exponential":
        learning_rate: Any = bk_optimizers.ExponentialDecayPerEpoch(
            recipe.lr_start * lr_scale, recipe.lr_end * lr_scale, epochs, steps_per_epoch
        )
    else:
        learning_rate = recipe.lr_start * lr_scale
    optimizer = bk_optimizers.get(recipe.optimizer, learning_rate=learning_rate, **recipe.optimizer_kwargs)
    if recipe.lr_scaling is not None:
        optimizer = bk_optimizers.LayerwiseLrScaling(optimizer, mode=recipe.lr_scaling)
    if recipe.loss == "squared_hinge":
        # argmax of +-1 targets is the class, so categorical accuracy is right for them.
        loss: Any = tf.keras.losses.SquaredHinge()
        accuracy: Any = tf.keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])


def _fit(
    model: tf.keras.Model,
    recipe: Recipe,
    splits: bk_data.DatasetSplits,
    epochs: int,
    callbacks: list[tf.keras.callbacks.Callback],
) -> None:
    model.fit(
        splits.train,
        validation_data=splits.validation,
        epochs=epochs,
        callbacks=callbacks,
        verbose=recipe.verbose,
    )


def _check_folders(recipe: Recipe) -> None:
    for field, what in (("data_dir", "a TFDS data folder"), ("raw_dir", "a folder of original dataset files")):
        path = getattr(recipe, field)
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{field} {path!r} is a file: expected {what}")


def _param_counts(model: tf.keras.Model) -> dict[str, int]:
    count = lambda weights: int(sum(np.prod(w.shape) for w in weights))  # noqa: E731
    return {"trainable": count(model.trainable_weights), "non_trainable": count(model.non_trainable_weights)}


def run(recipe: Recipe, *, overwrite: bool = False) -> dict[str, Any]:
    """Train `recipe` to the end (no early stopping) and write its results; return the summary.

    Returns the dict written to ``summary.json`` plus ``history`` (the per-epoch rows)
    and ``output_dir``. The reported numbers are those of the binary stage for
    "two-stage" (its ``best_epoch`` counts fine-tune epochs).

    If the output folder holds an unfinished run of the same recipe (``name``,
    ``output_dir`` and ``verbose`` aside), it continues after that run's last finished
    epoch; if it holds the finished run, its summary is returned without training.
    `overwrite` replaces whatever run the folder holds.

    Raises:
        bnn_keras.data.DataUnavailableError: the dataset is not available offline
            (raised before anything is written).
        RunConflictError: the output folder holds a run of other settings (before
            anything is written).
        TrainingDivergedError: the loss became NaN or infinite; the last good backup
            and the best model so far stay in the output folder.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"run expects a Recipe, got {type(recipe).__name__}")
    started = time.perf_counter()
    _check_folders(recipe)
    chief = recipe.strategy != "multi-worker" or bk_distribute.is_chief()
    out = recipe.out
    if chief:
        state = _output_state(out, recipe, overwrite)
    else:  # never writes `out`; on a shared folder it resumes from the chief's backup
        state = "finished" if (out / "summary.json").exists() else "worker"
    if state == "finished":
        return _finished(recipe, out, chief)
    # Before any TensorFlow op: a multi-worker strategy must set up its collectives first.
    try:
        strategy = bk_distribute.get_strategy(recipe.strategy)
    except Exception as error:  # the TPU resolver raises several kinds when there is none
        if recipe.strategy != "tpu":
            raise
        raise ValueError(
            f"strategy 'tpu' expects a TPU it can connect to, got none ({type(error).__name__}: "
            f"{' '.join(str(error).split())})"
        ) from None
    with _op_determinism(recipe.deterministic):
        return _train(recipe, strategy, chief, state, started)


def _finished(recipe: Recipe, out: Path, chief: bool) -> dict[str, Any]:
    summary = _read_json(out / "summary.json")
    rows = _read_json(out / "history.json") if (out / "history.json").exists() else []
    if chief:
        _remove_state(out)  # left behind if the finishing run was stopped after its summary
    if recipe.verbose:
        print(
            f"bnn-keras: {out} holds this run, finished: nothing to train "
            "(--overwrite / overwrite=True trains it again)",
            flush=True,
        )
    return {**summary, "history": rows, "output_dir": os.fspath(out)}


def _train(
    recipe: Recipe, strategy: tf.distribute.Strategy, chief: bool, state: str, started: float
) -> dict[str, Any]:
    # Before the data pipelines: their shuffle seeds combine it with the recipe's seed.
    tf.keras.utils.set_random_seed(recipe.seed)
    plan = bk_distribute.scaling_plan(strategy, recipe.batch_size, recipe.lr_start)
    splits = bk_data.load(
        recipe.dataset,
        data_dir=recipe.data_dir,
        raw_dir=recipe.raw_dir,
        batch_size=plan.global_batch,
        validation_fraction=recipe.validation_fraction,
        seed=recipe.seed,
        targets="hinge" if recipe.loss == "squared_hinge" else "sparse",
        limit=recipe.limit,
    )
    if splits.validation_size < 1:
        raise ValueError(f"validation set is empty: {splits.train_size} training examples, limit {recipe.limit}")
    if recipe.strategy == "multi-worker":
        splits = _shard_by_data(splits)
    steps_per_epoch = math.ceil(splits.train_size / plan.global_batch)
    synchronized_bn = plan.replicas > 1
    two_stage = recipe.schedule == "two-stage"
    # Build and compile before writing anything: a bad model or optimiser setting fails here.
    with strategy.scope():
        first = _build_model(recipe, splits, "float" if two_stage else recipe.variant, recipe.bn_momentum, synchronized_bn)
        _compile(first, recipe, recipe.pretrain_epochs if two_stage else recipe.epochs, steps_per_epoch, plan.replicas)

    out = recipe.out
    backup = out / _BACKUP
    out_existed = out.exists()
    if chief:
        if state == "overwrite":
            _remove_state(out)
            for name in _RESULTS:
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(out)
    # Finished epochs per the backups; history rows past them belong to an epoch being redone.
    final_stage = "finetune" if two_stage else "train"
    finished = _finished_epochs(backup / final_stage)
    pretrain_finished = 0
    if two_stage:
        pretrain_finished = recipe.pretrain_epochs if finished else _finished_epochs(backup / "pretrain")
    done = pretrain_finished + finished
    rows: list[dict[str, Any]] = []
    if done:
        recorded = _read_json(out / "history.json") if (out / "history.json").exists() else []
        if not isinstance(recorded, list) or len(recorded) < done:
            raise ValueError(
                f"{os.fspath(out / 'history.json')!r} holds {len(recorded) if isinstance(recorded, list) else 'no'} "
                f"rows, the backup {done} finished epochs: pass --overwrite (overwrite=True) to start afresh"
            )
        rows = [dict(row) for row in recorded[:done]]
    if chief:
        run_info = {"recipe": recipe.to_dict(), "resumed_at_epochs": []}
        if state == "resume" and (out / _RUN_FILE).exists():
            run_info["resumed_at_epochs"] = list(_read_json(out / _RUN_FILE).get("resumed_at_epochs", []))
        if done:
            run_info["resumed_at_epochs"].append(done)
        write_json(out / _RUN_FILE, run_info)
        _promote_best(out, finished)
        if state == "resume":
            _write_history(out, rows)
        resumed_at = run_info["resumed_at_epochs"]
    else:
        resumed_at = [done] if done else []
    total_epochs = recipe.epochs + (recipe.pretrain_epochs if two_stage else 0)
    if recipe.verbose:
        print(
            f"bnn-keras: {recipe.name}: {recipe.variant} {recipe.model} on {splits.name} "
            f"({splits.train_size} train / {splits.validation_size} val / {splits.test_size} test), "
            f"schedule {recipe.schedule}, {recipe.epochs} epochs -> {out}",
            flush=True,
        )
        print(f"bnn-keras: {plan.describe()}", flush=True)
        if done:
            print(f"bnn-keras: resuming after epoch {done} of {total_epochs} (backup in {backup})", flush=True)

    made = 0  # iterators of splits.train created in this process (see _skip_shuffles)

    def fit_stage(
        model: tf.keras.Model, stage: str, epochs: int, stage_finished: int, offset: int,
        made_before: int, schedule: list[tf.keras.callbacks.Callback], best: _BestKeeper,
    ) -> bool:
        """Fit one stage from its first unfinished epoch; False if it had finished every epoch."""
        nonlocal made
        if stage_finished >= epochs:
            return False
        _skip_shuffles(splits.train, made_before + stage_finished - made)
        callbacks = [
            _EpochClock(),
            _StopOnNonFinite(offset, steps_per_epoch),
            *schedule,
            best,
            _HistoryWriter(rows, out if chief else None, stage, offset),
            tf.keras.callbacks.BackupAndRestore(os.fspath(backup / stage), delete_checkpoint=False),
        ]
        if chief and best.out is not None:
            callbacks.append(_PromoteBest(out))
        try:
            _fit(model, recipe, splits, epochs, callbacks)
        except TrainingDivergedError as error:
            kept = (
                f"{out} keeps the backup of the {len(rows)} finished epoch(s)" if rows else "no epoch had finished"
            )
            if (out / "best_model.keras").exists():
                kept += " and the best model so far (best_model.keras)"
            raise TrainingDivergedError(
                f"{error}: training stopped; {kept}. Lower the learning rate and start afresh with --overwrite"
            ) from None
        made = made_before + epochs + 1
        return True

    extra: dict[str, Any] = {}
    if two_stage:
        finetune_momentum = recipe.bn_momentum if recipe.switch_bn_momentum is None else recipe.switch_bn_momentum
        with strategy.scope():
            model = _build_model(recipe, splits, recipe.variant, finetune_momentum, synchronized_bn)
            set_clipping_parts(model, recipe.clipping)
            _compile(model, recipe, recipe.epochs, steps_per_epoch, recipe.lr_factor * plan.replicas)
        if not finished:  # pretrain (or finish pretraining), then hand over to the binary model
            float_model = first
            pretrain_best = _BestKeeper(splits.test, None)
            pretrain_best.resume(rows)
            if not fit_stage(float_model, "pretrain", recipe.pretrain_epochs, pretrain_finished, 0, 0, [], pretrain_best):
                _restore_backup(float_model, backup / "pretrain")
            with strategy.scope():
                bk_models.copy_weights(float_model, model)
            binarised = model.evaluate(splits.validation, verbose=0, return_dict=True)
            binarised_test = model.evaluate(splits.test, verbose=0, return_dict=True)
            best_epoch, best_row = _best_row(rows[: recipe.pretrain_epochs])
            stage_info = {
                "pretrain_best_val_accuracy": best_row["val_accuracy"],
                "pretrain_best_epoch": best_epoch,
                "pretrain_test_accuracy_at_best": best_row.get("test_accuracy"),
                "binarised_val_accuracy": binarised["accuracy"],
                "binarised_test_accuracy": binarised_test["accuracy"],
            }
            if chief:  # the fine-tune stage's weights live in its backup from its first epoch on
                write_json(out / _STAGE_FILE, stage_info)
            del float_model
        else:
            stage_info = _read_json(out / _STAGE_FILE)
        extra.update(stage_info, stage_boundary_epoch=recipe.pretrain_epochs)
        stage, offset, made_before = "finetune", recipe.pretrain_epochs, recipe.pretrain_epochs + 1
        schedule_callbacks: list[tf.keras.callbacks.Callback] = []
    else:
        model = first
        set_clipping_parts(model, recipe.clipping if recipe.schedule == "clipped" else "none")
        stage, offset, made_before = "train", 0, 0
        schedule_callbacks = []
        if recipe.schedule == "vanilla-then-clipped":
            schedule = bk_callbacks.ClippingSchedule(
                switch_epoch=recipe.switch_epoch,
                patience=recipe.patience,
                lr_factor=recipe.lr_factor,
                bn_momentum=recipe.switch_bn_momentum,
                verbose=int(recipe.verbose > 0),
            )
            schedule.replay(rows)  # plateau counter and switch epoch of the finished epochs
            schedule_callbacks.append(schedule)
    del first

    best = _BestKeeper(splits.test, out if chief else None)
    best.resume(rows[offset:])
    fit_stage(model, stage, recipe.epochs, finished, offset, made_before, schedule_callbacks, best)
    last = rows[-1]
    switched = schedule_callbacks[0].switched_at_epoch if schedule_callbacks else None

    summary: dict[str, Any] = {
        "name": recipe.name,
        "best_val_accuracy": best.best,
        "best_epoch": best.best_epoch,
        "best_epoch_1based": best.best_epoch + 1,
        "test_accuracy_at_best": best.best_logs.get("test_accuracy"),
        "test_error_at_best": 1.0 - best.best_logs["test_accuracy"],
        "final_val_accuracy": last.get("val_accuracy"),
        "final_test_accuracy": last.get("test_accuracy"),
        "epochs": recipe.epochs,
        "total_epochs": len(rows),
        "switched_at_epoch": switched,
        **extra,
        "train_size": splits.train_size,
        "validation_size": splits.validation_size,
        "test_size": splits.test_size,
        "params": _param_counts(model),
        "distribution": {**dataclasses.asdict(plan), "description": plan.describe()},
        "resumed_at_epochs": resumed_at,
        "wall_time_s": time.perf_counter() - started,
        "recipe": recipe.to_dict(),
    }
    if not chief:
        _remove_empty_backup(out, remove_out=not out_existed)
        return {**summary, "history": rows, "output_dir": os.fspath(out)}

    from bnn_keras import plots  # matplotlib only when a run finishes

    marks = {}
    if switched is not None:
        marks[f"clipping on from epoch {switched + 1}"] = switched
    if "stage_boundary_epoch" in extra:
        marks[f"binarised after epoch {extra['stage_boundary_epoch']}"] = extra["stage_boundary_epoch"]
    plots.plot_history(rows, out / "curves.png", title=f"{recipe.name}: {recipe.variant} {recipe.model}, {recipe.schedule}", marks=marks)
    write_json(out / "summary.json", summary)  # its presence marks a finished run
    _remove_state(out)
    if recipe.verbose:
        print(
            f"bnn-keras: best val accuracy {best.best:.4f} at epoch {best.best_epoch + 1}, "
            f"test accuracy there {summary['test_accuracy_at_best']:.4f} "
            f"(final {summary['final_test_accuracy']:.4f}); wrote {out}",
            flush=True,
        )
    return {**summary, "history": rows, "output_dir": os.fspath(out)}

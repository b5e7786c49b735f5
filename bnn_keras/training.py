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

import csv
import dataclasses
import inspect
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from bnn_keras import callbacks as bk_callbacks
from bnn_keras import data as bk_data
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
    "SCHEDULES",
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

# Recipe fields the model builders take directly; everything else goes via model_kwargs.
_MODEL_ARGUMENTS = ("input_shape", "num_classes", "variant", "bn_momentum", "bn_epsilon", "clipped")


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


def _save_model(model: tf.keras.Model, path: Path) -> None:
    """Save `model`'s architecture and weights, without optimiser state, atomically."""
    uncompiled = tf.keras.models.clone_model(model)
    uncompiled.set_weights(model.get_weights())
    _atomic_write(path, lambda tmp: uncompiled.save(tmp))


class _EpochClock(tf.keras.callbacks.Callback):
    """Log `epoch_time_s`: wall seconds of the epoch's training and validation (first in the list,
    so the per-epoch test evaluation is not counted)."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["epoch_time_s"] = time.perf_counter() - self._started


class _HistoryWriter(tf.keras.callbacks.Callback):
    """Append each epoch's logs (plus LR, BN momentum, clipping phase, stage) to the history files.

    Runs after the other callbacks so it sees their logs (test metrics, best epoch). `lr`
    is the rate used *during* the epoch, read when the epoch starts.
    """

    def __init__(self, rows: list[dict[str, Any]], out: Path, stage: str, epoch_offset: int):
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
        write_json(self.out / "history.json", self.rows)
        write_text(self.out / "history.csv", _history_csv(_jsonable(self.rows)))


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


def _build_model(recipe: Recipe, splits: bk_data.DatasetSplits, variant: str, bn_momentum: float) -> tf.keras.Model:
    return bk_models.get(recipe.model)(
        splits.input_shape,
        splits.num_classes,
        variant=variant,
        bn_momentum=bn_momentum,
        bn_epsilon=recipe.bn_epsilon,
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


def _param_counts(model: tf.keras.Model) -> dict[str, int]:
    count = lambda weights: int(sum(np.prod(w.shape) for w in weights))  # noqa: E731
    return {"trainable": count(model.trainable_weights), "non_trainable": count(model.non_trainable_weights)}


def run(recipe: Recipe) -> dict[str, Any]:
    """Train `recipe` to the end (no early stopping) and write its results; return the summary.

    Returns the dict written to ``summary.json`` plus ``history`` (the per-epoch rows)
    and ``output_dir``. The reported numbers are those of the binary stage for
    "two-stage" (its ``best_epoch`` counts fine-tune epochs).

    Raises:
        bnn_keras.data.DataUnavailableError: the dataset is not available offline
            (raised before anything is written).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"run expects a Recipe, got {type(recipe).__name__}")
    started = time.perf_counter()
    splits = bk_data.load(
        recipe.dataset,
        data_dir=recipe.data_dir,
        raw_dir=recipe.raw_dir,
        batch_size=recipe.batch_size,
        validation_fraction=recipe.validation_fraction,
        seed=recipe.seed,
        targets="hinge" if recipe.loss == "squared_hinge" else "sparse",
        limit=recipe.limit,
    )
    if splits.validation_size < 1:
        raise ValueError(f"validation set is empty: {splits.train_size} training examples, limit {recipe.limit}")
    steps_per_epoch = math.ceil(splits.train_size / recipe.batch_size)
    tf.keras.utils.set_random_seed(recipe.seed)
    two_stage = recipe.schedule == "two-stage"
    # Build and compile before writing anything: a bad model or optimiser setting fails here.
    first = _build_model(recipe, splits, "float" if two_stage else recipe.variant, recipe.bn_momentum)
    _compile(first, recipe, recipe.pretrain_epochs if two_stage else recipe.epochs, steps_per_epoch, 1.0)

    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("history.json", "history.csv", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    if recipe.verbose:
        print(
            f"bnn-keras: {recipe.name}: {recipe.variant} {recipe.model} on {splits.name} "
            f"({splits.train_size} train / {splits.validation_size} val / {splits.test_size} test), "
            f"schedule {recipe.schedule}, {recipe.epochs} epochs -> {out}",
            flush=True,
        )
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    if two_stage:
        float_model = first
        pretrain_best = bk_callbacks.BestValidation(test_data=splits.test)
        _fit(
            float_model, recipe, splits, recipe.pretrain_epochs,
            [_EpochClock(), pretrain_best, _HistoryWriter(rows, out, "pretrain", 0)],
        )
        finetune_momentum = recipe.bn_momentum if recipe.switch_bn_momentum is None else recipe.switch_bn_momentum
        model = _build_model(recipe, splits, recipe.variant, finetune_momentum)
        bk_models.copy_weights(float_model, model)
        set_clipping_parts(model, recipe.clipping)
        _compile(model, recipe, recipe.epochs, steps_per_epoch, recipe.lr_factor)
        binarised = model.evaluate(splits.validation, verbose=0, return_dict=True)
        binarised_test = model.evaluate(splits.test, verbose=0, return_dict=True)
        extra.update(
            pretrain_best_val_accuracy=pretrain_best.best,
            pretrain_best_epoch=pretrain_best.best_epoch,
            pretrain_test_accuracy_at_best=pretrain_best.best_logs.get("test_accuracy"),
            binarised_val_accuracy=binarised["accuracy"],
            binarised_test_accuracy=binarised_test["accuracy"],
            stage_boundary_epoch=recipe.pretrain_epochs,
        )
        del float_model
        stage, offset = "finetune", recipe.pretrain_epochs
        schedule_callbacks: list[tf.keras.callbacks.Callback] = []
    else:
        model = first
        set_clipping_parts(model, recipe.clipping if recipe.schedule == "clipped" else "none")
        stage, offset = "train", 0
        schedule_callbacks = []
        if recipe.schedule == "vanilla-then-clipped":
            schedule_callbacks.append(
                bk_callbacks.ClippingSchedule(
                    switch_epoch=recipe.switch_epoch,
                    patience=recipe.patience,
                    lr_factor=recipe.lr_factor,
                    bn_momentum=recipe.switch_bn_momentum,
                    verbose=int(recipe.verbose > 0),
                )
            )

    best = bk_callbacks.BestValidation(test_data=splits.test)
    _fit(
        model, recipe, splits, recipe.epochs,
        [_EpochClock(), *schedule_callbacks, best, _HistoryWriter(rows, out, stage, offset)],
    )
    last = rows[-1]
    switched = schedule_callbacks[0].switched_at_epoch if schedule_callbacks else None
    best.restore()
    _save_model(model, out / "best_model.keras")

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
        "wall_time_s": time.perf_counter() - started,
        "recipe": recipe.to_dict(),
    }
    from bnn_keras import plots  # matplotlib only when a run finishes

    marks = {}
    if switched is not None:
        marks[f"clipping on from epoch {switched + 1}"] = switched
    if "stage_boundary_epoch" in extra:
        marks[f"binarised after epoch {extra['stage_boundary_epoch']}"] = extra["stage_boundary_epoch"]
    plots.plot_history(rows, out / "curves.png", title=f"{recipe.name}: {recipe.variant} {recipe.model}, {recipe.schedule}", marks=marks)
    write_json(out / "summary.json", summary)  # last: its presence marks a finished run
    if recipe.verbose:
        print(
            f"bnn-keras: best val accuracy {best.best:.4f} at epoch {best.best_epoch + 1}, "
            f"test accuracy there {summary['test_accuracy_at_best']:.4f} "
            f"(final {summary['final_test_accuracy']:.4f}); wrote {out}",
            flush=True,
        )
    return {**summary, "history": rows, "output_dir": os.fspath(out)}

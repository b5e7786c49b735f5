"""A training run's settings as plain data: the `Recipe`, its field rules, and the study's recipes.

`FIELDS` holds one `Rule` per checked setting (type, range, choices). `Recipe` validates
itself with it, and the command line builds its argparse types and choices from it, so a
new value is added in one place (`bnn_keras.cli`). `MODEL_FLAGS` does the same for the
builder arguments the command line exposes, and `HYPERPARAMETERS` for the optimiser
hyperparameters; the model builders, `optimizers.get`, the per-epoch schedules and
`ClippingSchedule` check their arguments with these same rules.

```python
from bnn_keras.recipe import RECIPES, Recipe
recipe = RECIPES["mnist_mlp"].override(epochs=5, model_kwargs={"hidden_units": (256, 256)})
Recipe(epochs=-1)   # ValueError: epochs must be an integer >= 1, got -1
```
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bnn_keras import distribute as bk_distribute
from bnn_keras import models as bk_models
from bnn_keras import optimizers as bk_optimizers

__all__ = [
    "BINARISATIONS",
    "CLIPPINGS",
    "FIELDS",
    "HYPERPARAMETERS",
    "INT64_MAX",
    "JIT_MODES",
    "LOSSES",
    "LR_SCALINGS",
    "LR_SCHEDULES",
    "MODEL_FLAGS",
    "PLATEAU_ACTIONS",
    "RECIPES",
    "Recipe",
    "Rule",
    "SCHEDULES",
    "SEED_MAX",
    "STAGED_SCHEDULES",
    "TENSORBOARD_LEVELS",
    "get_recipe",
]

SCHEDULES: tuple[str, ...] = ("clipped", "vanilla", "vanilla-then-clipped", "two-stage", "three-step")
"""Clipping schedules: clipped throughout, never, switched on mid-run, after float pretraining, or after
float pretraining and a stage of binary activations with real weights (ReActNet's steps)."""

STAGED_SCHEDULES: tuple[str, ...] = ("two-stage", "three-step")
"""The schedules that train the float twin first and hand its weights on, stage by stage."""

BINARISATIONS: tuple[str, ...] = bk_models.BINARISATIONS
"""How weights or activations are binarised in training: sign, or BinaryConnect's hard-sigmoid draw."""

CLIPPINGS: tuple[str, ...] = ("both", "gradients", "weights", "none")
"""What the clipped phase turns on: clipped STE and weight clipping, one of them, or nothing."""

LOSSES: tuple[str, ...] = ("squared_hinge", "crossentropy")
"""Losses: squared hinge on +-1 targets (the study) or softmax cross-entropy."""

LR_SCHEDULES: tuple[str, ...] = ("exponential", "constant")
"""Learning-rate schedules: per-epoch exponential decay lr_start -> lr_end, or constant."""

JIT_MODES: tuple[str, ...] = ("auto", "on", "off")
"""XLA compilation of the train step: chosen for the model and device (`bnn_keras.speed`), always, never."""

LR_SCALINGS: tuple[str | None, ...] = (None, "update", "gradient")
"""BinaryConnect's Glorot per-layer LR scaling: off, on the update, or on the gradient."""

PLATEAU_ACTIONS: tuple[str, ...] = ("none", "reduce_lr", "stop")
"""What a run does at its validation plateau (`bnn_keras.plateau`): nothing (only recorded), lower the LR once, stop."""

TENSORBOARD_LEVELS: tuple[str | None, ...] = (None, "scalars", "histograms")
"""TensorBoard logs (`bnn_keras.callbacks.TensorBoardLog`): none, per-epoch scalars, or scalars and histograms."""

# Builder arguments that training.run sets itself (from recipe fields or the strategy);
# the others come from model_kwargs.
MODEL_ARGUMENTS = (
    "input_shape",
    "num_classes",
    "variant",
    "bn_momentum",
    "bn_epsilon",
    "clipped",
    "synchronized_bn",
    "weight_binarisation",
    "activation_binarisation",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _float(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer past float's range: as far out of any range as infinity
        return math.inf


INT64_MAX = 2**63 - 1
"""The largest integer TensorFlow holds (int64): an "int" rule's default `largest`."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one setting accepts: a kind, an optional range, optional choices, and None or not.

    `check` raises the library's one-line ValueError; `accepts` says whether it would not;
    `parse` is the matching argparse type. An "int" rule also refuses integers above
    `largest` (TensorFlow's int64 unless the setting has its own limit), naming that limit
    only when a value passes it.
    """

    kind: str  # "int", "number", "choice", "text", "path", "bool", "auto-int" ("auto" or an int)
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes `low`
    high_open: bool = False
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    optional: bool = False  # None is accepted
    largest: int = INT64_MAX  # "int" only: the largest value TensorFlow accepts for it

    @property
    def options(self) -> tuple[Any, ...]:
        return self.choices() if callable(self.choices) else tuple(self.choices or ())

    @property
    def expected(self) -> str:
        """The accepted values in words, as error messages say them."""
        return self._words(None)

    def _words(self, value: Any) -> str:
        """`expected`, plus the `largest` limit when `value` passes it."""
        kinds = {"int": "an integer", "number": "a number", "text": "a non-empty string", "path": "a path",
                 "bool": "True or False", "auto-int": "'auto' or an integer"}
        words = kinds.get(self.kind, "")
        bound = (lambda b: f"{int(b)}") if self.kind in ("int", "auto-int") else (lambda b: f"{b:g}")
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            words += f" in {left}{bound(self.low)}, {bound(self.high)}{right}"
        elif self.low is not None:
            words += f" {'>' if self.low_open else '>='} {bound(self.low)}"
        if self.kind == "int" and _is_int(value) and value > self.largest:
            words += f" and at most {self.largest}"
        return words + (" or None" if self.optional else "")

    def _in_range(self, value: float) -> bool:
        if self.kind == "number" and not math.isfinite(value):
            return False
        if self.kind in ("int", "auto-int") and value > self.largest:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def accepts(self, value: Any) -> bool:
        """Whether `check` lets `value` through."""
        if value is None and self.optional:
            return True
        if self.kind == "choice":
            return value in self.options
        return {
            "int": lambda v: _is_int(v) and self._in_range(v),
            "auto-int": lambda v: v == "auto" or (_is_int(v) and self._in_range(v)),
            "number": lambda v: _is_number(v) and self._in_range(_float(v)),
            "text": lambda v: isinstance(v, str) and bool(v),
            "path": lambda v: isinstance(v, (str, os.PathLike)),
            "bool": lambda v: isinstance(v, bool),
        }[self.kind](value)

    def check(self, field: str, value: Any) -> None:
        """Raise ValueError (one line: field, expected, given) unless `value` is accepted."""
        if self.accepts(value):
            return
        if self.kind == "choice":
            names = ", ".join("None" if c is None else repr(c) for c in self.options)
            raise ValueError(f"unknown {field} {value!r}: expected one of {names}")
        raise ValueError(f"{field} must be {self._words(value)}, got {value!r}")

    def parse(self, text: str) -> Any:
        """Command-line text to a value (an argparse ``type``); ArgumentTypeError when not accepted."""
        import argparse

        expected = self.expected.replace(" or None", "")
        if self.kind == "auto-int" and text == "auto":
            return text
        try:
            value = {"int": int, "auto-int": int, "number": float}[self.kind](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not self._in_range(value):
            raise argparse.ArgumentTypeError(f"expected {self._words(value).replace(' or None', '')}, got {text}")
        return value


SEED_MAX = 2**32 - 1
"""The largest seed: `tf.keras.utils.set_random_seed` (NumPy's generator) takes 0 .. 2**32 - 1."""

_NAME = Rule("text")
_PATH = Rule("path", optional=True)
_MOMENTUM = Rule("number", 0, 1, high_open=True)
_POSITIVE = Rule("number", 0, low_open=True)

FIELDS: dict[str, Rule] = {
    "name": _NAME,
    "dataset": _NAME,
    "data_dir": _PATH,
    "raw_dir": _PATH,
    "limit": Rule("int", 1, optional=True),
    "validation_fraction": Rule("number", 0, 1, low_open=True, high_open=True),
    "model": Rule("choice", choices=lambda: bk_models.NAMES),
    "variant": Rule("choice", choices=bk_models.VARIANTS),
    "bn_momentum": _MOMENTUM,
    "bn_epsilon": _POSITIVE,
    "loss": Rule("choice", choices=LOSSES),
    "optimizer": Rule("choice", choices=lambda: bk_optimizers.NAMES),
    "lr_start": _POSITIVE,
    "lr_end": Rule("number", 0, low_open=True, optional=True),
    "lr_schedule": Rule("choice", choices=LR_SCHEDULES),
    "lr_scaling": Rule("choice", choices=LR_SCALINGS),
    "epochs": Rule("int", 1),
    "batch_size": Rule("int", 1),
    "schedule": Rule("choice", choices=SCHEDULES),
    "clipping": Rule("choice", choices=CLIPPINGS),
    "switch_epoch": Rule("int", 0, optional=True),
    "patience": Rule("int", 1, optional=True),
    "lr_factor": _POSITIVE,
    "switch_bn_momentum": Rule("number", 0, 1, high_open=True, optional=True),
    "pretrain_epochs": Rule("int", 0),
    "activation_epochs": Rule("int", 0),
    "weight_binarisation": Rule("choice", choices=BINARISATIONS),
    "activation_binarisation": Rule("choice", choices=BINARISATIONS),
    "distill": Rule("number", 0, low_open=True, optional=True),
    "distill_weight": Rule("number", 0, 1, low_open=True),
    "weight_decay": Rule("number", 0),
    "finetune_weight_decay": Rule("number", 0, optional=True),
    "dead_zone": Rule("bool"),
    "plateau_action": Rule("choice", choices=PLATEAU_ACTIONS),
    "plateau_window": Rule("int", 1, optional=True),
    "plateau_margin": Rule("number", 0, 1),
    "plateau_lr_factor": _POSITIVE,
    "seed": Rule("int", 0, largest=SEED_MAX),
    "deterministic": Rule("bool"),
    "strategy": Rule("choice", choices=bk_distribute.STRATEGIES),
    "verbose": Rule("choice", choices=(0, 1, 2)),
    "jit": Rule("choice", choices=JIT_MODES),
    "steps_per_execution": Rule("auto-int", 1),
    "output_dir": _PATH,
    "tensorboard": Rule("choice", choices=TENSORBOARD_LEVELS),
    "model_file": _PATH,
    "model_sha256": Rule("text", optional=True),
}
"""The rule of every checked `Recipe` field (the command line's types and choices come from here)."""

MODEL_FLAGS: dict[str, Rule] = {
    "hidden_units": Rule("int", 1),
    "width_multiplier": _POSITIVE,
    "weight_clip": Rule("choice", choices=bk_models.WEIGHT_CLIPS),
    "block_order": Rule("choice", choices=bk_models.BLOCK_ORDERS),
}
"""Rules of the model-builder arguments the command line sets (they go into ``model_kwargs``)."""

_FRACTION = Rule("number", 0, 1, high_open=True)
_CLIP = Rule("number", 0, low_open=True, optional=True)

HYPERPARAMETERS: dict[str, Rule] = {
    "beta_1": _FRACTION,
    "beta_2": _FRACTION,
    "rho": _FRACTION,
    "momentum": Rule("number", 0, 1),
    "epsilon": _POSITIVE,
    "initial_accumulator_value": Rule("number", 0),
    "clipnorm": _CLIP,
    "clipvalue": _CLIP,
    "global_clipnorm": _CLIP,
    "weight_decay": Rule("number", 0, optional=True),
    "ema_momentum": Rule("number", 0, 1),
    "ema_overwrite_frequency": Rule("int", 1, optional=True),
    "threshold": Rule("number", 0),  # Bop: |EMA of the gradient| needed to flip a weight
    "gamma": Rule("number", 0, 1, low_open=True),  # Bop: the EMA's rate
}
"""Ranges of the optimiser hyperparameters (``optimizer_kwargs``, ``--opt``) that `optimizers.get` checks."""

# optimizer_kwargs keys that are not hyperparameters, and what sets them instead.
_NOT_HYPERPARAMETERS = {
    "learning_rate": "the learning rate is lr_start, lr_end and lr_schedule (--lr, --lr-end, --lr-schedule)",
    "name": "it would only rename the Keras object; the optimiser is chosen by optimizer (--optimizer)",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of one training run, as plain data (validated on creation; hashable).

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
    model_file: str | None = None  # train this saved Larq model (made switchable) instead of building `model`
    model_sha256: str | None = None  # of the model file or given model (`training.run` fills it in)
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
    activation_epochs: int = 0  # three-step: epochs of binary activations with real weights
    # binarisation and what grew out of the study (`bnn_keras.distill`, `bnn_keras.dead_zone`)
    weight_binarisation: str = "deterministic"  # or "stochastic" (BinaryConnect's hard-sigmoid draw)
    activation_binarisation: str = "deterministic"
    distill: float | None = None  # staged schedules: temperature of the KL loss to the float twin
    distill_weight: float = 1.0  # share of the distillation term (the label loss has 1 - it)
    weight_decay: float = 0.0  # decoupled weight decay of the first stage (every stage if single-stage)
    finetune_weight_decay: float | None = None  # staged schedules: of the binary stage (None: weight_decay)
    dead_zone: bool = True  # per-epoch dead-zone shares in the history (binary layers only)
    # the last mile (`bnn_keras.plateau`): the plateau epoch is recorded in every summary
    plateau_action: str = "none"  # at the plateau: "none", "reduce_lr" (x plateau_lr_factor, once), "stop"
    plateau_window: int | None = None  # epochs without a gain > plateau_margin; None: a tenth of epochs, >= 2
    plateau_margin: float = 0.002  # validation accuracy (0.2 points)
    plateau_lr_factor: float = 0.1
    # run
    seed: int = 0  # 0 .. SEED_MAX
    deterministic: bool = True
    strategy: str = "default"
    # speed (`bnn_keras.speed`): "auto" picks what this model and device run fastest
    jit: str = "auto"  # XLA: "auto", "on", "off"
    steps_per_execution: int | str = "auto"  # train steps per call into TensorFlow: "auto" or N >= 1
    output_dir: str | None = None
    tensorboard: str | None = None  # logs in <output folder>/tensorboard/: None, "scalars" or "histograms"
    verbose: int = 2

    def __post_init__(self) -> None:
        for field in ("name", "dataset", "model", "variant", "optimizer"):  # strings first: lower() below
            _NAME.check(field, getattr(self, field))
        for field in ("data_dir", "raw_dir", "output_dir", "model_file"):
            FIELDS[field].check(field, getattr(self, field))
            if getattr(self, field) is not None:
                object.__setattr__(self, field, os.fspath(getattr(self, field)))
        for field, rule in FIELDS.items():
            value = self.optimizer.lower() if field == "optimizer" else getattr(self, field)
            if field == "model":
                bk_models.get(value)  # its own message lists the models
            elif field != "lr_end":
                rule.check(field, value)
        self._check_model_kwargs()
        object.__setattr__(self, "optimizer_kwargs", _mapping("optimizer_kwargs", self.optimizer_kwargs))
        for key in self.optimizer_kwargs:  # the rest is checked by optimizers.get, which knows each optimiser's
            if key in _NOT_HYPERPARAMETERS:
                raise ValueError(f"optimizer_kwargs (--opt) cannot set {key}: {_NOT_HYPERPARAMETERS[key]}")
        self._check_combinations()

    def _check_model_kwargs(self) -> None:
        kwargs = _mapping("model_kwargs", self.model_kwargs)
        accepted = set(inspect.signature(bk_models.get(self.model)).parameters) - set(MODEL_ARGUMENTS)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"model_kwargs {', '.join(unknown)} not accepted by model {self.model!r}: "
                f"expected some of {', '.join(sorted(accepted))}"
            )
        object.__setattr__(self, "model_kwargs", {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})

    def _check_combinations(self) -> None:
        """The rules that tie fields together."""
        if self.lr_schedule == "exponential" and self.lr_end is None:
            raise ValueError("lr_end must be a number > 0 for the exponential schedule, got None")
        if self.lr_end is not None:
            FIELDS["lr_end"].check("lr_end", self.lr_end)
        if self.lr_scaling is not None and self.optimizer.lower() == "bop":
            raise ValueError("lr_scaling does not apply to 'bop': it has no learning rate for binary kernels")
        if self.variant == "float" and self.schedule != "vanilla":
            raise ValueError(
                f"variant 'float' has no binary layers to clip: schedule must be 'vanilla', got {self.schedule!r}"
            )
        if self.schedule == "vanilla-then-clipped":
            if self.switch_epoch is None and self.patience is None:
                raise ValueError("schedule 'vanilla-then-clipped' needs switch_epoch or patience, got neither")
            if self.switch_epoch is not None and self.switch_epoch >= self.epochs:
                raise ValueError(
                    f"switch_epoch must be < epochs ({self.epochs}) to switch at all, got {self.switch_epoch}"
                )
        if self.model_file is not None or self.model_sha256 is not None:
            if self.model_file == "":
                raise ValueError("model_file (--model-file) is an empty path: expected a saved Keras model")
            if self.schedule in STAGED_SCHEDULES:
                raise ValueError(
                    f"schedule {self.schedule!r} needs the float twin bnn_keras builds for its own models; "
                    "a model file has none: use 'clipped', 'vanilla' or 'vanilla-then-clipped'"
                )
            if self.model_kwargs:
                raise ValueError(
                    f"model_kwargs {', '.join(sorted(self.model_kwargs))} set bnn_keras' own builders, "
                    "not a model file: the file's model is trained as it is (model_kwargs={})"
                )
        if self.schedule in STAGED_SCHEDULES and self.pretrain_epochs < 1:
            raise ValueError(
                f"pretrain_epochs must be an integer >= 1 for schedule {self.schedule!r}, got {self.pretrain_epochs!r}"
            )
        self._check_stages()
        if self.clipping != "both" and self.schedule not in ("clipped", *STAGED_SCHEDULES):
            raise ValueError(
                f"clipping {self.clipping!r} needs schedule 'clipped', 'two-stage' or 'three-step' "
                f"(it sets the clipped phase's parts), got schedule {self.schedule!r}"
            )

    def _check_stages(self) -> None:
        """The settings of the staged schedules, binarisation and weight decay."""
        staged = self.schedule in STAGED_SCHEDULES
        if self.schedule == "three-step":
            if self.activation_epochs < 1:
                raise ValueError(
                    f"activation_epochs must be an integer >= 1 for schedule 'three-step', got {self.activation_epochs!r}"
                )
            if self.variant != "binarynet":
                raise ValueError(
                    "schedule 'three-step' binarises the activations, then the weights: variant must be "
                    f"'binarynet', got {self.variant!r}"
                )
        elif self.activation_epochs:
            raise ValueError(
                f"activation_epochs is for schedule 'three-step', got {self.activation_epochs} with {self.schedule!r}"
            )
        if not staged:
            for field in ("distill", "finetune_weight_decay"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{field} needs a float stage before the binary one: schedule 'two-stage' or "
                        f"'three-step', got {self.schedule!r}"
                    )
        if self.distill is None and self.distill_weight != 1.0:
            raise ValueError(f"distill_weight mixes the distillation loss in: it needs distill, got {self.distill_weight}")
        stochastic = [f for f in ("weight_binarisation", "activation_binarisation") if getattr(self, f) == "stochastic"]
        if stochastic and (self.model_file is not None or self.model_sha256 is not None):
            raise ValueError(
                f"{stochastic[0]} 'stochastic' sets the quantisers of bnn_keras' own builders; a model file "
                "keeps its own: expected 'deterministic'"
            )
        if "weight_decay" in self.optimizer_kwargs and (self.weight_decay or self.finetune_weight_decay is not None):
            raise ValueError(
                "weight decay is set twice: by optimizer_kwargs (--opt weight_decay) and by weight_decay / "
                "finetune_weight_decay (--weight-decay, --finetune-weight-decay): expected one of them"
            )
        if self.optimizer.lower() == "bop" and (self.weight_decay or self.finetune_weight_decay):
            raise ValueError("weight_decay does not apply to 'bop': its binary kernels have no latent weights to decay")

    def stage_weight_decay(self, stage: str) -> float:
        """The decoupled weight decay of `stage` ("train", "pretrain", "activations", "finetune")."""
        if stage == "finetune" and self.finetune_weight_decay is not None:
            return float(self.finetune_weight_decay)
        return float(self.weight_decay)

    def __hash__(self) -> int:  # the kwargs are dicts: hash the recipe's JSON form instead
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

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

        A change of ``model``, or a ``model_file``, drops the current model_kwargs (they
        belong to the old model's builder).

        ```python
        RECIPES["mnist_mlp"].override(epochs=5, model_kwargs={"weight_clip": "glorot"})
        ```
        """
        new_model = changes.get("model", self.model) != self.model or changes.get("model_file") is not None
        current = {} if new_model else dict(self.model_kwargs)
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


def _mapping(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be a mapping, got {value!r}")
    return dict(value)


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

# The CIFAR-10 ResNet-18 of the study's Table 5, trained as cifar10_vgg10 is (the study gives
# no separate ResNet settings): Adam, per-epoch decay 3e-3 -> 2e-6, batch 50, BN momentum 0.9,
# squared hinge, 500 epochs, clipped STE and weight clipping from the first step.
RECIPES["cifar10_resnet18"] = RECIPES["cifar10_vgg10"].replace(name="cifar10_resnet18", model="resnet18")


def get_recipe(name: str) -> Recipe:
    """The recipe called `name` (a key of `RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]

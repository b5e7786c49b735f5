"""The study's ablation grid: seeds x cells of its Tables 2-5, one `training.run` per run.

`run_study(out, base, tables=..., seeds=...)` trains every cell of the chosen tables for
every seed into ``OUT/<table>/<cell>/seed<k>/`` and writes

- ``OUT/tables.md``: the tables in the paper's form (test error at the best-validation
  epoch, mean +- std over seeds, and the mean best-validation epoch, next to the paper's
  numbers), rewritten after every run so partial results are readable;
- ``OUT/<table>.png``: validation accuracy per epoch of each cell (mean +- std).

It is resumable: a run whose ``summary.json`` exists is read back instead of trained
again (and refused, in one line, if it was trained with different settings). Identical
runs shared by two tables (the base settings appear in several) are trained once and
copied.

Tables (`TABLES`):

- ``optimizers`` (Table 2): SGD, Momentum, Nesterov, AdaGrad, AdaDelta, RMSProp, Adam, plus
  Larq's Bop (not in the study), each with its own start LR (`OPTIMIZER_LR`, or your own
  through `optimizers_table`), the base's end/start ratio kept;
- ``clipping`` (Table 3): none / weights only (vanilla STE + weight clipping) /
  gradients only (clipped STE, no weight clipping) / both, from the first step;
- ``bn_momentum`` (Table 4): 0.8 / 0.85 / 0.9 / 0.99;
- ``schedules`` (Table 5): end-to-end (clipped), two-stage (float pretraining for the
  first half of the epochs, binary fine-tuning for the second) and vanilla-then-clipped
  (switch at half the epochs), all with the same epoch budget.

Beyond the study (the practice that grew out of it):

- ``stochastic``: deterministic vs stochastic binarisation (BinaryConnect's hard-sigmoid
  draw in training, the sign at inference), BinaryConnect and BinaryNet;
- ``distillation``: two-stage and three-step (float -> binary activations -> binary),
  BinaryNet, each with and without distillation from the float twin; epochs to best
  validation and test error there;
- ``weight_decay``: decoupled weight decay 0 / 5e-6 / 5e-5 in the float and in the
  binary stage of two-stage;
- ``dead_zone``: the share of latent weights at or beyond the clip value, and of flipped
  signs, per epoch under vanilla, clipped and vanilla-then-clipped, with SGD and Adam
  (``<table>_<column>.png`` curves beside the accuracy curves).

```python
from bnn_keras import study
results = study.run_study("runs/study", study.quick(), tables=["clipping"], seeds=2)
print(open("runs/study/tables.md").read())
```

Executors (`EXECUTORS`): ``"local"`` trains the runs one after another in this process;
``"ray"`` trains each run as one Ray task (``pip install "bnn-keras[ray]"``), on a
local Ray instance or on the cluster at ``ray_address``, so the cells train in parallel.
Only plain data travels (the recipe's `Recipe.to_dict` out, the summary back); every
node reads and writes the run folders itself, so ``out`` must be a folder every node sees
at the same path. A task whose worker dies is retried (``max_retries``) and the retry
resumes from the run's backup; a run that raises (bad data, a diverged loss) is recorded
as failed, with its reason, in ``tables.md`` while the other runs finish. The tables are
the same as the local executor's: they are built in grid order, whatever order the runs
finish in.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from bnn_keras import dead_zone, files, run_folder, study_ray, training
from bnn_keras import grid as grid_mod
from bnn_keras.recipe import RECIPES, Recipe, Rule

__all__ = [
    "EXECUTORS",
    "OPTIMIZER_LR",
    "RAY_INSTALL",
    "QUICK_SEEDS",
    "TABLES",
    "Table",
    "DEFAULT_TABLES",
    "GRID_KEY",
    "cell_recipes",
    "grid_table",
    "optimizers_table",
    "quick",
    "render_tables",
    "run_study",
]

OPTIMIZER_LR: dict[str, float] = {
    "sgd": 10.0,
    "momentum": 1.0,
    "nesterov": 1.0,
    "adagrad": 1.0,
    "adadelta": 10.0,
    "rmsprop": 1e-2,
    "adam": 1e-2,
    "bop": 1e-3,  # the latent (BN) optimiser's; Bop's own threshold and gamma keep Larq's defaults
}
"""Start learning rate per optimiser in the optimisers table (the study tuned each one).

Picked by a sweep over powers of ten on the ``--quick`` budget (2x128 MLP, 3 epochs, LR
decaying 10x): BatchNorm after every binary layer makes the latent-weight gradients small
(about 1/sqrt(fan_in)), so the non-adaptive optimisers need large rates. Longer runs
usually want smaller ones: pass your own with `optimizers_table(lrs)`.
"""

Overrides = Callable[[Recipe], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Table:
    """One of the study's tables: its cells as recipe overrides, and the paper's numbers."""

    key: str
    title: str
    cells: Mapping[str, Overrides]
    paper: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    layout: str = "columns"  # "columns": a column per cell (Tables 2-4); "rows": Table 5; "grid": a row per cell; "last_mile"
    axes: tuple[grid_mod.Axis, ...] = ()  # a grid's swept settings (the "grid" layout's columns)
    claim: str = ""  # the study's claim the table tests, printed under its title
    early: Callable[[Recipe], int] | None = None  # a 1-based early epoch whose test error is shown too
    quick_epochs: int | None = None  # epochs of this table's runs in a --quick study (default: the base's)
    curves: tuple[str, ...] = ("val_accuracy",)  # history columns drawn per epoch: <table>.png, <table>_<column>.png


def _optimizer_cell(name: str, lr: float) -> Overrides:
    def overrides(base: Recipe) -> dict[str, Any]:
        ratio = (base.lr_end / base.lr_start) if base.lr_end else None
        return {"optimizer": name, "lr_start": lr, "lr_end": None if ratio is None else lr * ratio}

    return overrides


def _halves(base: Recipe) -> tuple[int, int]:
    """(first, second) half of the base's epoch budget, each at least 1."""
    first = max(1, base.epochs // 2)
    return first, max(1, base.epochs - first)


_PAPER_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam")


def optimizers_table(lrs: Mapping[str, float] | None = None) -> Table:
    """Table 2 with the start learning rate of each optimiser from `lrs` (default `OPTIMIZER_LR`).

    Each cell keeps the base recipe's end/start LR ratio. `lrs` may name a subset of the
    optimisers to run only those.

    ```python
    table = optimizers_table({"sgd": 1.0, "adam": 1e-3})
    run_study("runs/opt", base, tables=[table], seeds=3)
    ```
    """
    lrs = dict(OPTIMIZER_LR if lrs is None else lrs)
    unknown = sorted(set(lrs) - set(OPTIMIZER_LR))
    if unknown:
        raise ValueError(f"unknown optimiser(s) {', '.join(unknown)}: expected some of {', '.join(OPTIMIZER_LR)}")
    return Table(
        key="optimizers",
        title="Table 2: optimisers",
        cells={name: _optimizer_cell(name, lrs[name]) for name in OPTIMIZER_LR if name in lrs},
        paper={
            "MNIST": dict(zip(_PAPER_OPTIMIZERS, ("4.48", "1.87", "1.86", "1.28", "1.22", "1.21", "1.19"))),
            "CIFAR-10": dict(zip(_PAPER_OPTIMIZERS, ("17.98", "12.41", "12.42", "10.87", "10.34", "10.33", "10.30"))),
        },
    )


def grid_table(
    key: str,
    title: str,
    axes: Sequence[str | tuple[str, Sequence[Any]]] | Mapping[str, Sequence[Any]],
    *,
    fixed: Mapping[str, Any] | None = None,
    derive: Callable[[Recipe, Mapping[str, Any]], Mapping[str, Any]] | None = None,
    short_names: bool = False,
    layout: str = "grid",
    **options: Any,
) -> Table:
    """A table whose cells are every combination of `axes` (`bnn_keras.grid`), each set on the base.

    `fixed` settings go into every cell, `derive(base, cell's values)` adds settings that
    follow from them (a learning rate per optimiser); `options` are `Table` fields
    (``paper``, ``claim``, ``early``, ``quick_epochs``).

    ```python
    table = grid_table("betas", "Adam's betas", ["opt.beta_2=0.9,0.99,0.999"], fixed={"optimizer": "adam"})
    run_study("runs/betas", base, tables=[table], seeds=3)
    ```
    """
    parsed = tuple(grid_mod.parse(axes))
    cells = grid_mod.cells(parsed, fixed=fixed, derive=derive, short_names=short_names)
    return Table(key=key, title=title, cells=cells, layout=layout, axes=parsed, **options)


def _lr_of(optimizer: str, base: Recipe) -> dict[str, Any]:
    """`optimizer`'s start LR from `OPTIMIZER_LR`, with the base's end/start ratio."""
    lr = OPTIMIZER_LR[optimizer]
    return {"lr_start": lr, "lr_end": None if base.lr_end is None else lr * base.lr_end / base.lr_start}


def _sgd_batch_lr(base: Recipe, cell: Mapping[str, Any]) -> dict[str, Any]:
    """SGD's LR scaled with the square root of batch / 100 (the variance of the gradient noise kept)."""
    lr = _lr_of("sgd", base)
    factor = math.sqrt(cell["batch_size"] / 100)
    return {k: None if v is None else v * factor for k, v in lr.items()}


def _early_epoch(base: Recipe) -> int:
    """The early epoch of the SGD-batch and momentum tables: a tenth of the budget (1-based), at least 1."""
    return max(1, math.ceil(base.epochs / 10))


def _pooling_model(base: Recipe, cell: Mapping[str, Any]) -> dict[str, Any]:
    """VGG-10 at the base's width (a 1/16-width one on an MLP base)."""
    width = base.model_kwargs.get("width_multiplier", 1.0) if base.model == "vgg10" else 0.0625
    return {"model": "vgg10", "model.width_multiplier": width}


def _staged_epochs(base: Recipe, schedule: str) -> dict[str, Any]:
    """The base's epoch budget split over the stages: half float; the rest binary (three-step: half of it activations)."""
    first, rest = _halves(base)
    if schedule == "two-stage":
        return {"schedule": schedule, "pretrain_epochs": first, "epochs": rest}
    activations = max(1, rest // 2)
    return {"schedule": schedule, "pretrain_epochs": first, "activation_epochs": activations, "epochs": max(1, rest - activations)}


DISTILL_TEMPERATURE = 1.0
"""The distillation table's temperature: ReActNet's distributional loss is the KL at T = 1."""


def _distillation_cell(schedule: str, distill: bool) -> Overrides:
    def overrides(base: Recipe) -> dict[str, Any]:
        return {**_staged_epochs(base, schedule), "variant": "binarynet", "clipping": "both",
                "distill": DISTILL_TEMPERATURE if distill else None}

    return overrides


def _stochastic_cell(base: Recipe, cell: Mapping[str, Any]) -> dict[str, Any]:
    """BinaryNet's stochastic cell draws its activations' signs too."""
    binarynet = cell["variant"] == "binarynet"
    return {"activation_binarisation": cell["weight_binarisation"] if binarynet else "deterministic"}


def _dead_zone_cell(base: Recipe, cell: Mapping[str, Any]) -> dict[str, Any]:
    """The optimiser's LR; vanilla-then-clipped switches at half the budget."""
    switch = {"switch_epoch": max(1, base.epochs // 2), "patience": None} if cell["schedule"] == "vanilla-then-clipped" else {}
    return {**_lr_of(cell["optimizer"], base), **switch, "clipping": "both", "dead_zone": True}


TABLES: dict[str, Table] = {
    "optimizers": optimizers_table(),
    "clipping": grid_table(
        "clipping",
        "Table 3: clipping (from the first step)",
        ["clipping=none,weights,gradients,both"],
        fixed={"schedule": "clipped"},
        short_names=True,
        layout="columns",
        paper={
            "MNIST": {"none": "1.28", "weights": "1.22", "gradients": "1.17", "both": "1.18"},
            "CIFAR-10": {"none": "10.79", "weights": "10.73", "gradients": "10.53", "both": "10.38"},
        },
    ),
    "bn_momentum": grid_table(
        "bn_momentum",
        "Table 4: batch-norm momentum",
        ["bn_momentum=0.8,0.85,0.9,0.99"],
        short_names=True,
        layout="columns",
        paper={
            "MNIST": {"0.8": "1.21", "0.85": "1.19", "0.9": "1.22", "0.99": "1.23"},
            "CIFAR-10": {"0.8": "10.31", "0.85": "10.35", "0.9": "10.53", "0.99": "10.61"},
        },
    ),
    "schedules": Table(
        key="schedules",
        title="Table 5: end-to-end vs two-stage vs vanilla-then-clipped (same epoch budget)",
        cells={
            "end-to-end": lambda base: {"schedule": "clipped", "clipping": "both"},
            "two-stage": lambda base: {
                "schedule": "two-stage",
                "clipping": "both",
                "pretrain_epochs": _halves(base)[0],
                "epochs": _halves(base)[1],
            },
            "vanilla-then-clipped": lambda base: {
                "schedule": "vanilla-then-clipped",
                "clipping": "both",
                "switch_epoch": base.epochs // 2,
                "patience": None,
            },
        },
        paper={
            "VGG-10 CIFAR-10": {
                "end-to-end": "89.76% (391) / 89.18%",
                "two-stage": "90.16% (24) / 89.32%",
            },
            "ResNet-18 CIFAR-10": {
                "end-to-end": "94.40% (457) / 91.16%",
                "two-stage": "93.60% (17) / 91.18%",
            },
        },
        layout="rows",
    ),
    "sgd_batch": grid_table(
        "sgd_batch",
        "SGD batch size (LR x sqrt(batch / 100))",
        ["batch_size=50,100,500,1000"],
        fixed={"optimizer": "sgd"},
        derive=_sgd_batch_lr,
        early=_early_epoch,
        claim="reducing SGD's stochasticity by a larger batch improves performance initially "
        "but still fails to reach the best accuracy",
    ),
    "momentum": grid_table(
        "momentum",
        "Momentum rate",
        ["optimizer=momentum,nesterov", "opt.momentum=0.5,0.9,0.99"],
        derive=lambda base, cell: _lr_of(cell["optimizer"], base),
        early=_early_epoch,
        claim="a higher momentum trains faster but ends worse",
    ),
    "adam_betas": grid_table(
        "adam_betas",
        "Adam's betas",
        ["opt.beta_1=0.5,0.9", "opt.beta_2=0.9,0.99,0.999"],
        fixed={"optimizer": "adam"},
        derive=lambda base, cell: {} if base.optimizer == "adam" else _lr_of("adam", base),
        claim="beta_2 matters (0.999 best), beta_1 barely",
    ),
    "pooling": grid_table(
        "pooling",
        "VGG-10 block order: conv -> pool -> BN -> act (paper) vs conv -> BN -> act -> pool",
        ["model.block_order=paper,conventional", "variant=binaryconnect,binarynet"],
        derive=_pooling_model,
        claim="pooling right after the convolution; without that reordering, significant accuracy loss",
    ),
    "lr_scaling": grid_table(
        "lr_scaling",
        "Glorot learning-rate scaling",
        ["optimizer=sgd,adam", "lr_scaling=none,update", "variant=binaryconnect,binarynet"],
        derive=lambda base, cell: _lr_of(cell["optimizer"], base),
        claim="BinaryConnect's Glorot LR scaling helps SGD only",
    ),
    "last_mile": grid_table(
        "last_mile",
        "The last mile: keep going, lower the LR at the plateau, or stop there",
        ["plateau_action=none,reduce_lr,stop"],
        short_names=True,
        layout="last_mile",
        quick_epochs=12,
        claim="binary models keep improving long after the curves flatten; lowering the LR there "
        "does not help; do not early-stop",
    ),
    "stochastic": grid_table(
        "stochastic",
        "Stochastic binarisation (+1 with probability hard_sigmoid(w)) vs the sign; inference is the sign",
        ["weight_binarisation=deterministic,stochastic", "variant=binaryconnect,binarynet"],
        fixed={"model.weight_clip": "glorot"},  # BinaryConnect's [-H, H], in whose units it draws
        derive=_stochastic_cell,
        paper={
            "BinaryConnect MNIST (MLP 3x1024)": {"deterministic": "1.29", "stochastic": "1.18"},
            "BinaryConnect CIFAR-10 (VGG-like)": {"deterministic": "9.90", "stochastic": "8.27"},
        },
        claim="stochastic binarisation regularises: BinaryConnect's stochastic networks end with a lower "
        "test error than its deterministic ones (Courbariaux et al. 2015)",
    ),
    "distillation": Table(
        key="distillation",
        title=f"Distillation from the float twin (KL at T = {DISTILL_TEMPERATURE:g}) in the staged schedules, BinaryNet, "
        "same epoch budget",
        cells={
            "two-stage": _distillation_cell("two-stage", False),
            "two-stage + distillation": _distillation_cell("two-stage", True),
            "three-step": _distillation_cell("three-step", False),
            "three-step + distillation": _distillation_cell("three-step", True),
        },
        paper={
            "ImageNet top-1, their own ResNet-like BNNs": {
                "three-step + distillation": "ReActNet-A 69.4 (Liu et al. 2020); 70.5 with the 2021 paper's recipe",
                "two-stage + distillation": "Real-to-Binary 65.4 (staged, distilled at every stage; Martinez et al. 2020)",
            },
        },
        layout="rows",
        claim="a binary network learns more from the real-valued network's output distribution than from the "
        "labels alone, and binarising activations before weights eases the hand-over (ReActNet, Real-to-Binary)",
    ),
    "weight_decay": grid_table(
        "weight_decay",
        "Decoupled weight decay per stage (two-stage: float pretraining, binary fine-tuning)",
        ["weight_decay=0,5e-6,5e-5", "finetune_weight_decay=0,5e-6,5e-5"],
        derive=lambda base, cell: _staged_epochs(base, "two-stage"),
        paper={"Liu et al. 2021 (ImageNet, ReActNet-A)": {"best": "5e-6 in step 1, 0 in step 2"}},
        claim="weight decay trades stability against dependence on the initialisation: a little in the first "
        "stage, none once binary (Liu et al., ICML 2021)",
    ),
    "dead_zone": grid_table(
        "dead_zone",
        "The dead zone: latent weights at or beyond the clip value, over training",
        ["schedule=vanilla,clipped,vanilla-then-clipped", "optimizer=sgd,adam"],
        derive=_dead_zone_cell,
        layout="dead_zone",
        early=_early_epoch,
        curves=("val_accuracy", "dead_zone_saturated", "dead_zone_beyond", "dead_zone_flipped"),
        claim="clipping slows early training (the study); Adam's second moment revives weights the clipped STE "
        "no longer moves (Liu et al., ICML 2021)",
    ),
}
"""The study's ablation tables by key (``bnn-keras study --tables KEY ...``)."""

DEFAULT_TABLES: tuple[str, ...] = ("optimizers", "clipping", "bn_momentum", "schedules")
"""The tables a study runs when none are named: the paper's Tables 2-5."""

GRID_KEY = "grid"
"""The table (and folder) of a study's own ``--grid``."""

QUICK_SEEDS = 2
MAX_SEEDS = 1000
"""The most seeds per cell a study takes (every seed is a run of every cell)."""
"""Seeds of a ``--quick`` study."""


def quick(recipe: Recipe | None = None) -> Recipe:
    """A study base small enough for a 2-core CPU in minutes: embedded data, tiny net, 3 epochs.

    ```python
    quick(RECIPES["mnist_mlp"])  # 2 x 128-unit MLP, 3 epochs, LR 1e-3 -> 1e-4
    ```
    """
    recipe = recipe if recipe is not None else RECIPES["mnist_mlp"]
    size = {"hidden_units": (128, 128)} if recipe.model == "mlp" else {"width_multiplier": 0.0625}
    return recipe.replace(
        name=f"{recipe.name}-quick",
        dataset="embedded",
        data_dir=None,
        raw_dir=None,
        model_kwargs={**recipe.model_kwargs, **size},
        epochs=3,
        lr_end=recipe.lr_start / 10,
        verbose=0,
    )


def _resolve(tables: Iterable[str | Table]) -> dict[str, Table]:
    """Table keys (of `TABLES`) or `Table` objects, as key -> Table, in order."""
    resolved: dict[str, Table] = {}
    for table in tables:
        if isinstance(table, Table):
            resolved[table.key] = table
        elif table in TABLES:
            resolved[table] = TABLES[table]
        else:
            raise ValueError(f"unknown study table {table!r}: expected one of {', '.join(TABLES)}")
    return resolved


def cell_recipes(
    out: str | os.PathLike, base: Recipe, tables: Iterable[str | Table], seeds: Sequence[int], *, quick: bool = False
) -> list[tuple[str, str, int, Recipe]]:
    """Every (table, cell, seed, recipe) of the grid, with its output folder set.

    `quick`: a table with its own ``quick_epochs`` trains that many epochs. A cell whose
    settings the recipe refuses raises ValueError naming the cell, before anything trains.
    """
    grid = []
    for key, table in _resolve(tables).items():
        table_base = base.replace(epochs=table.quick_epochs) if quick and table.quick_epochs else base
        for cell, overrides in table.cells.items():
            for seed in seeds:
                try:
                    recipe = table_base.replace(
                        **{
                            **overrides(table_base),
                            "name": f"{key}/{cell}/seed{seed}",
                            "seed": int(seed),
                            "output_dir": os.fspath(Path(out) / key / cell / f"seed{seed}"),
                        }
                    )
                except ValueError as error:
                    raise ValueError(f"study table {key!r}, cell {cell!r}: {error}") from None
                grid.append((key, cell, int(seed), recipe))
    return grid


_SUMMARY_KEYS = ("recipe", "test_error_at_best", "test_accuracy_at_best", "best_val_accuracy", "best_epoch_1based")
"""What the study reads from a cell's summary.json."""


def _read_summary(recipe: Recipe) -> dict[str, Any] | None:
    path = recipe.out / "summary.json"
    if not path.exists():
        return None
    summary = files.read_json(path, "use another output folder or delete it")
    missing = None
    if isinstance(summary, Mapping):
        numbers = _SUMMARY_KEYS[1:]
        missing = [k for k in _SUMMARY_KEYS[:1] if k not in summary]
        missing += [k for k in numbers if isinstance(summary.get(k), bool) or not isinstance(summary.get(k), (int, float))]
    if missing != []:
        found = f"a JSON {type(summary).__name__}" if missing is None else f"no valid {', '.join(missing)}"
        raise ValueError(f"{path} is not a run summary (expected an object with a recipe and numbers {', '.join(_SUMMARY_KEYS[1:])}; found {found}): "
                         "delete that cell's folder to train it again")
    recorded = summary["recipe"]
    if not isinstance(recorded, Mapping) or not run_folder.same_settings(recorded, recipe):
        raise ValueError(
            f"{path} was trained with other settings than this study asks for: "
            "use another output folder or delete it"
        )
    return summary


def _read_history(recipe: Recipe) -> list[dict[str, Any]]:
    path = recipe.out / "history.json"
    return files.read_json(path, "use another output folder or delete it") if path.exists() else []


EXECUTORS = ("local", "ray")
"""Where a study's runs train: one after another in this process, or as Ray tasks in parallel."""

RAY_INSTALL = study_ray.RAY_INSTALL
"""The command that installs what the ``ray`` executor needs."""

Train = study_ray.Train

_CPUS = Rule("number", 0, low_open=True)
_GPUS = Rule("number", 0)
_RETRIES = Rule("int", 0)


def run_study(
    out: str | os.PathLike,
    base: Recipe,
    *,
    tables: Iterable[str | Table] | None = None,
    seeds: int | Sequence[int] = 3,
    verbose: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    gpus_per_run: float | None = None,
    cpus_per_run: float | None = None,
    max_retries: int = 3,
    train: Train | None = None,
    grid: Iterable[str | tuple[str, Sequence[Any]]] | Mapping[str, Sequence[Any]] | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Train (or read back) every cell x seed of `tables` and write ``tables.md`` and figures.

    ```python
    run_study("runs/betas", quick(), grid={"opt.beta_2": [0.9, 0.999], "batch_size": [50, 100]}, seeds=2)
    run_study("runs/betas", quick(), grid=["opt.beta_2=0.9,0.999"], seeds=2)   # the CLI's form
    ```

    Args:
        out: the study folder. With executor "ray" every node must see it at the same path
            (a shared filesystem); a relative path is taken from this process's folder.
        base: the settings every cell starts from (each cell overrides a few).
        tables: keys of `TABLES` (default: `DEFAULT_TABLES`, the paper's Tables 2-5, or
            none when `grid` is given) or your own `Table` objects.
        seeds: a count (seeds 0..n-1) or the seeds themselves.
        verbose: 1 prints one line per finished run and a final count; the runs' own
            verbosity is ``base.verbose`` (with "ray", a started Ray forwards the runs'
            lines when it is above 0).
        executor: "local" (one run after another here; a failing run stops the study) or
            "ray" (each run one Ray task; a failing run is recorded as failed).
        ray_address: "ray" only: join the Ray cluster there (``HOST:6379``, or "auto")
            instead of starting a local Ray instance; None with Ray already initialised in
            this process uses that one.
        gpus_per_run, cpus_per_run: "ray" only: what each run asks Ray for (default 0 GPUs,
            1 CPU; a fraction of a GPU shares one). A run with GPUs gets a fresh worker
            process, so that TensorFlow sees the GPU Ray gave it.
        max_retries: "ray" only: how often a run whose worker died (a killed process, a lost
            node) starts again; it resumes after its last finished epoch.
        train: what trains one run (default `training.run`); with "ray" it travels to the
            workers, so it must pickle.
        grid: settings to sweep (`bnn_keras.grid`: ``KEY=V1,V2`` texts or KEY -> values):
            every combination is a cell of table ``"grid"`` (``OUT/grid/KEY=V,.../seedK``),
            after `tables` (which then default to none).
        quick: the study is a ``--quick`` one: tables with their own ``quick_epochs`` use them.

    Returns:
        ``{"tables": {key: {cell: [summary per seed]}}, "trained": n, "skipped": n,
        "copied": n, "failed": n, "failures": {run name: reason}, "markdown": str}``.
    """
    if os.fspath(out) == "":
        raise ValueError('the study folder (--out) is an empty path: expected a folder name ("" would mean the current folder)')
    _check_executor(executor, ray_address, gpus_per_run, cpus_per_run, max_retries)
    out = Path(os.path.abspath(out) if executor == "ray" else out)
    chosen = _resolve(DEFAULT_TABLES if tables is None and grid is None else tables or [])
    if grid is not None:
        axes = list(grid.items()) if isinstance(grid, Mapping) else list(grid)
        if not axes:
            raise ValueError("grid names no setting: expected KEY=V1,V2,... (e.g. opt.beta_2=0.9,0.999)")
        chosen[GRID_KEY] = grid_table(GRID_KEY, "Grid: " + " x ".join(a.key for a in grid_mod.parse(axes)), axes)
    if isinstance(seeds, int) and not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"seeds must be a count in [1, {MAX_SEEDS}] (runs per cell), got {seeds}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must name at least one seed")
    if len(seed_list) > MAX_SEEDS:
        raise ValueError(f"seeds must name at most {MAX_SEEDS} seeds (runs per cell), got {len(seed_list)}")
    runs = cell_recipes(out, base, chosen.values(), seed_list, quick=quick)  # validates every cell before training any
    with files.own_folder(out):  # one study per folder: a second one is refused before anything is written
        study = _Grid(out, runs, chosen, base, seed_list, verbose)  # reads back (and checks) finished runs
        if executor == "local":
            study.train_here(train)
        else:
            resources = {"num_cpus": 1 if cpus_per_run is None else cpus_per_run, "num_gpus": gpus_per_run or 0}
            with study_ray.session(ray_address, log_to_driver=base.verbose > 0) as (ray, started):
                study_ray.train_on_ray(study, ray, started, resources, max_retries, train)
        return study.finish()


def _check_executor(
    executor: str, ray_address: str | None, gpus_per_run: float | None, cpus_per_run: float | None, max_retries: int
) -> None:
    """One line for an unknown executor, a Ray option without executor "ray", a bad number, or no Ray."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}: expected one of {', '.join(map(repr, EXECUTORS))}")
    options = {"ray_address": ray_address, "gpus_per_run": gpus_per_run, "cpus_per_run": cpus_per_run}
    given = [name for name, value in options.items() if value is not None]
    if executor == "local" and given:
        flags = ", ".join(f"{name} (--{name.replace('_', '-')})" for name in given)
        verb = "is" if len(given) == 1 else "are"
        raise ValueError(f"{flags} {verb} for executor 'ray' only: expected executor 'ray', got {executor!r}")
    if executor == "local":
        return
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise ValueError(f"ray_address must be a Ray cluster address (HOST:PORT or 'auto'), got {ray_address!r}")
    if cpus_per_run is not None:
        _CPUS.check("cpus_per_run", cpus_per_run)
    if gpus_per_run is not None:
        _GPUS.check("gpus_per_run", gpus_per_run)
        if gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
            raise ValueError(f"gpus_per_run must be a fraction of one GPU or a whole number, got {gpus_per_run!r}")
    _RETRIES.check("max_retries", max_retries)
    study_ray.import_ray(local=ray_address is None)  # before anything is read or written: no Ray ends the study at once


@dataclasses.dataclass
class _Entry:
    """One (table, cell, seed) run of the grid and what became of it."""

    index: int
    key: str
    cell: str
    seed: int
    recipe: Recipe
    action: str  # "skipped" (finished before), "copied" (the same settings as entry `source`), "trained"
    source: int | None = None
    summary: dict[str, Any] | None = None
    failure: str | None = None
    seconds: float | None = None
    rows: list[dict[str, Any]] | None = None  # its history, read once (an early column, the dead-zone table)


class _Grid:
    """A study's runs in grid order, their progress lines, and ``tables.md`` rewritten as they finish."""

    def __init__(
        self, out: Path, grid: list[tuple[str, str, int, Recipe]], chosen: Mapping[str, Table],
        base: Recipe, seeds: list[int], verbose: int,
    ) -> None:
        self.out, self.chosen, self.base, self.seeds, self.verbose = out, chosen, base, seeds, verbose
        self.entries: list[_Entry] = []
        sources: dict[str, int] = {}  # settings -> the first entry with them
        for index, (key, cell, seed, recipe) in enumerate(grid):
            settings = json.dumps(run_folder.settings(recipe.to_dict()), sort_keys=True)
            summary = _read_summary(recipe)
            action = "skipped" if summary is not None else "copied" if settings in sources else "trained"
            source = sources[settings] if action == "copied" else None
            self.entries.append(_Entry(index, key, cell, seed, recipe, action, source, summary))
            sources.setdefault(settings, index)
        self.counts = {"trained": 0, "skipped": 0, "copied": 0, "failed": 0}
        self.reported = 0
        self.markdown = self.render()

    def train_here(self, train: Train | None) -> None:
        """The local executor: every run in grid order, in this process; a failing run raises."""
        for entry in self.entries:
            if entry.action == "trained":
                started = time.perf_counter()
                summary = dict((train if train is not None else training.run)(entry.recipe))
                summary.pop("history", None)
                entry.summary, entry.seconds = summary, time.perf_counter() - started
            elif entry.action == "copied":
                self.copy(entry)
            self.report(entry)

    def copy(self, entry: _Entry) -> None:
        """A run with the settings of an earlier one: copy that one's folder (or its failure)."""
        source = self.entries[entry.source]
        if source.summary is None:
            entry.failure = source.failure
            return
        shutil.copytree(source.recipe.out, entry.recipe.out, dirs_exist_ok=True)
        summary = files.read_json(entry.recipe.out / "summary.json")
        summary["recipe"] = entry.recipe.to_dict()
        files.write_json(entry.recipe.out / "summary.json", summary)
        entry.summary = summary

    def report(self, entry: _Entry) -> None:
        """A run is done: count it, print its line, rewrite tables.md."""
        self.reported += 1
        self.counts["failed" if entry.failure is not None else entry.action] += 1
        if self.verbose:
            print(self._line(entry), flush=True)
        self.markdown = self.render()
        files.write_text(self.out / "tables.md", self.markdown)

    def _line(self, entry: _Entry) -> str:
        head = f"study [{self.reported}/{len(self.entries)}] {entry.key}/{entry.cell}/seed{entry.seed}"
        if entry.failure is not None:
            return f"{head}: failed: {entry.failure}"
        summary = entry.summary
        epochs = summary.get("total_epochs", entry.recipe.epochs)
        took = f" in {entry.seconds:.1f} s" if entry.seconds is not None else ""
        return (
            f"{head}: {entry.action}, test error {100 * summary['test_error_at_best']:.2f}% at best-val epoch "
            f"{summary['best_epoch_1based']}, {epochs} epoch{'s' if epochs != 1 else ''}{took}"
        )

    def results(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """The finished runs' summaries by table and cell, in grid order (whatever order they finished in)."""
        results: dict[str, dict[str, list[dict[str, Any]]]] = {key: {} for key in self.chosen}
        for entry in self.entries:
            if entry.summary is not None:
                summary = entry.summary
                table = self.chosen[entry.key]
                if table.early is not None or table.layout == "dead_zone":  # these read the run's history, once
                    if entry.rows is None:
                        entry.rows = _read_history(entry.recipe)
                    summary = {**summary, "test_accuracy_by_epoch": [row.get("test_accuracy") for row in entry.rows]}
                    if table.layout == "dead_zone":
                        summary["dead_zone_by_epoch"] = [{k: row.get(k) for k in DEAD_ZONE_COLUMNS} for row in entry.rows]
                results[entry.key].setdefault(entry.cell, []).append(summary)
        return results

    def failures(self) -> dict[str, str]:
        return {e.recipe.name: e.failure for e in self.entries if e.failure is not None}

    def render(self) -> str:
        return render_tables(self.results(), self.base, self.seeds, self.chosen, failures=self.failures())

    def finish(self) -> dict[str, Any]:
        """The figures (from the runs' history files), the final count line, the result."""
        from bnn_keras import plots

        for key, table in self.chosen.items():
            histories = [(e.cell, e.rows if e.rows is not None else _read_history(e.recipe))
                         for e in self.entries if e.key == key and e.summary is not None]
            if not histories:  # every run of the table failed: nothing to draw
                continue
            for column in table.curves:
                curves: dict[str, list[list[float]]] = {}
                for cell, rows in histories:
                    curves.setdefault(cell, []).append([np.nan if r.get(column) is None else r[column] for r in rows])
                plots.plot_curves(
                    curves,
                    self.out / _curve_file(key, column),
                    ylabel=_CURVE_LABELS.get(column, column),
                    title=f"{table.title} ({len(self.seeds)} seed{'s' if len(self.seeds) > 1 else ''})",
                )
        counts = self.counts
        if self.verbose:
            failed = f", {counts['failed']} failed (reasons in tables.md)" if counts["failed"] else ""
            print(
                f"study: {counts['trained']} trained, {counts['skipped']} already done, "
                f"{counts['copied']} copied{failed}; wrote {self.out / 'tables.md'}",
                flush=True,
            )
        return {"tables": self.results(), **counts, "failures": self.failures(), "markdown": self.markdown}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _error_cell(summaries: Sequence[Mapping[str, Any]]) -> str:
    mean, std = _mean_std([100 * s["test_error_at_best"] for s in summaries])
    return f"{mean:.2f} ± {std:.2f}%" if len(summaries) > 1 else f"{mean:.2f}%"


def _describe(base: Recipe) -> str:
    size = ", ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in base.model_kwargs.items())
    limit = f", first {base.limit} examples" if base.limit else ""
    return (
        f"{base.variant} {base.model} ({size}) on {base.dataset}{limit}; {base.optimizer} "
        f"{base.lr_start:g}" + (f" -> {base.lr_end:g}" if base.lr_schedule == "exponential" else "")
        + f", {base.epochs} epochs, batch {base.batch_size}, BN momentum {base.bn_momentum}, "
        f"{base.loss}, schedule {base.schedule}"
    )


def render_tables(
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    base: Recipe,
    seeds: Sequence[int],
    tables: Mapping[str, Table] | None = None,
    *,
    failures: Mapping[str, str] | None = None,
) -> str:
    """The study's tables as Markdown: mean +- std test error and mean best-val epoch per cell.

    `tables` gives the `Table` of each key of `results` (default: `TABLES`). `failures`
    (run name ``table/cell/seedK`` -> one-line reason) are listed after the tables; a cell
    whose every run failed reads "failed".
    """
    tables = TABLES if tables is None else tables
    failures = {} if failures is None else failures
    failed_cells = {name.rpartition("/seed")[0] for name in failures}
    lines = [
        "# Binary-network optimisation study: results",
        "",
        f"Base settings: {_describe(base)}. Seeds: {', '.join(map(str, seeds))}.",
        "",
        "Test error is measured at the epoch of best validation accuracy (no early stopping),",
        "mean ± sample standard deviation over seeds. Paper rows: Alizadeh et al. (ICLR 2019),",
        "mean of 5 runs at full size (MNIST MLP 3x2048, 250 epochs; CIFAR-10 VGG-10, 500 epochs).",
    ]
    for key, cells in results.items():
        table = tables[key]
        names = list(table.cells)
        lines += ["", f"## {table.title}", ""]
        if table.claim:
            lines += [f"The study's claim: {table.claim}.", ""]
        if table.layout == "grid":
            lines += _grid_rows(key, table, cells, base, failed_cells)
        elif table.layout == "dead_zone":
            lines += _dead_zone_rows(key, table, cells, base, failed_cells)
        elif table.layout == "last_mile":
            lines += _last_mile_rows(key, table, cells, failed_cells)
        elif table.layout == "columns":
            lines.append("| | " + " | ".join(names) + " |")
            lines.append("|---" * (len(names) + 1) + "|")
            lines.append(
                f"| test error, this study (n={max((len(v) for v in cells.values()), default=0)}) | "
                + " | ".join(_error_cell(cells[n]) if n in cells else _missing(key, n, failed_cells) for n in names)
                + " |"
            )
            lines.append(
                "| best-val epoch (mean) | "
                + " | ".join(
                    f"{np.mean([s['best_epoch_1based'] for s in cells[n]]):.1f}" if n in cells else _missing(key, n, failed_cells)
                    for n in names
                )
                + " |"
            )
            for dataset, values in table.paper.items():
                lines.append(
                    f"| paper, {dataset} | " + " | ".join(f"{values[n]}%" if n in values else "—" for n in names) + " |"
                )
        else:
            lines.append("| schedule | best val acc (epoch) | test acc | test error | paper: best val acc (epoch) / test acc |")
            lines.append("|---|---|---|---|---|")
            for name in names:
                runs = cells.get(name, [])
                paper = "; ".join(f"{d}: {v[name]}" for d, v in table.paper.items() if name in v) or "—"
                if not runs:
                    missing = _missing(key, name, failed_cells)
                    lines.append(f"| {name} | {missing} | {missing} | {missing} | {paper} |")
                    continue
                val, _ = _mean_std([100 * s["best_val_accuracy"] for s in runs])
                test, _ = _mean_std([100 * s["test_accuracy_at_best"] for s in runs])
                epoch = np.mean([s["best_epoch_1based"] for s in runs])
                lines.append(f"| {name} | {val:.2f}% ({epoch:.1f}) | {test:.2f}% | {_error_cell(runs)} | {paper} |")
            lines += [
                "",
                "Two-stage: the best-val epoch counts fine-tuning epochs after binarisation.",
            ]
    if failures:
        lines += ["", f"## Failed runs ({len(failures)})", "", "Not in the tables above; the same study again trains them again.", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in failures.items()]
    return "\n".join(lines) + "\n"


def _mean_cell(runs: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None], fmt: str) -> str:
    values = [value(s) for s in runs]
    if not runs or any(v is None for v in values):
        return "—"
    return format(float(np.mean(values)), fmt)


def _early_error(summary: Mapping[str, Any], epoch: int) -> float | None:
    tests = summary.get("test_accuracy_by_epoch") or []
    return None if len(tests) < epoch or tests[epoch - 1] is None else 100 * (1 - tests[epoch - 1])


def _grid_rows(
    key: str, table: Table, cells: Mapping[str, Sequence[Mapping[str, Any]]], base: Recipe, failed_cells: set[str]
) -> list[str]:
    """A row per combination: its values, test error at best (mean ± std), best val accuracy, epochs."""
    early = table.early(base) if table.early is not None else None
    heads = [axis.key for axis in table.axes] + ["test error", "best val acc", "best-val epoch", "plateau epoch"]
    if early is not None:
        heads.append(f"test error at epoch {early}")
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for name, values, runs in _grid_cells(table, cells):
        if not runs:
            lines.append(_missing_row(key, name, values, len(heads), failed_cells))
            continue
        row = [
            *values,
            _error_cell(runs),
            _mean_cell(runs, lambda s: 100 * s["best_val_accuracy"], ".2f") + "%",
            _mean_cell(runs, lambda s: s["best_epoch_1based"], ".1f"),
            _mean_cell(runs, lambda s: (s.get("plateau") or {}).get("epoch_1based"), ".1f"),
        ]
        if early is not None:
            row.append(_mean_cell(runs, lambda s: _early_error(s, early), ".2f") + "%")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"n = {max((len(v) for v in cells.values()), default=0)} seeds per row; epochs are 1-based means."]
    return lines + _paper_lines(table)


def _paper_lines(table: Table) -> list[str]:
    """The papers' numbers of a table without a column per cell, one line per source."""
    def shown(value: str) -> str:
        try:
            float(value)
        except ValueError:
            return value
        return f"{value}%"

    return [""] + [
        f"Paper, {source}: " + "; ".join(f"{name} {shown(value)}" for name, value in values.items()) + "."
        for source, values in table.paper.items()
    ] if table.paper else []


DEAD_ZONE_COLUMNS: tuple[str, ...] = tuple(dead_zone.COLUMNS)
"""The history's dead-zone columns (`bnn_keras.dead_zone`) the dead-zone table reads."""

_CURVE_LABELS = {
    "val_accuracy": "validation accuracy",
    "dead_zone_saturated": "share of binary weights held at the clip value",
    "dead_zone_beyond": "share of binary weights beyond the clip value",
    "dead_zone_flipped": "share of binary weights whose sign flipped in the epoch",
}


def _curve_file(key: str, column: str) -> str:
    """``<table>.png`` for validation accuracy, else ``<table>_<column>.png`` (the table's name not repeated)."""
    return f"{key}.png" if column == "val_accuracy" else f"{key}_{column.removeprefix(key + '_')}.png"


def _dead_zone_rows(
    key: str, table: Table, cells: Mapping[str, Sequence[Mapping[str, Any]]], base: Recipe, failed_cells: set[str]
) -> list[str]:
    """Per cell: errors (early and at best), and the dead zone at the first, the early and the last epoch."""
    early = table.early(base) if table.early is not None else 1
    heads = [axis.key for axis in table.axes] + [
        "test error", f"test error at epoch {early}",
        "at clip: epoch 1 / {0} / last".format(early), "beyond clip: epoch 1 / {0} / last".format(early),
        "flipped in the last epoch",
    ]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]

    def at(column: str, epoch: int | None) -> Callable[[Mapping[str, Any]], float | None]:
        def value(summary: Mapping[str, Any]) -> float | None:
            rows = summary.get("dead_zone_by_epoch") or []
            if not rows or (epoch is not None and len(rows) < epoch):
                return None
            found = rows[-1 if epoch is None else epoch - 1].get(column)
            return None if found is None else 100 * found

        return value

    def three(runs: Sequence[Mapping[str, Any]], column: str) -> str:
        return " / ".join(_mean_cell(runs, at(column, e), ".2f") for e in (1, early, None)) + "%"

    for name, values, runs in _grid_cells(table, cells):
        if not runs:
            lines.append(_missing_row(key, name, values, len(heads), failed_cells))
            continue
        lines.append("| " + " | ".join([
            *values,
            _error_cell(runs),
            _mean_cell(runs, lambda s: _early_error(s, early), ".2f") + "%",
            three(runs, "dead_zone_saturated"),
            three(runs, "dead_zone_beyond"),
            _mean_cell(runs, at("dead_zone_flipped", None), ".2f") + "%",
        ]) + " |")
    lines += [
        "",
        "At clip: latent weights held at the clip value by weight clipping (only a large step moves them back); "
        "beyond clip: |w| > clip, where the clipped STE passes no gradient (possible without weight clipping). "
        "Shares of all binary weights, measured at the end of each epoch (`bnn_keras.dead_zone`); curves in "
        + ", ".join(_curve_file(key, column) for column in table.curves if column != "val_accuracy") + ".",
    ]
    return lines


def _last_mile_rows(key: str, table: Table, cells: Mapping[str, Sequence[Mapping[str, Any]]], failed_cells: set[str]) -> list[str]:
    """Plateau vs best epoch per action, and what stopping at the plateau costs."""
    lines = [
        "| at the plateau | epochs trained | plateau epoch | best-val epoch | test error at plateau | "
        "test error at best (reported) | val gain after plateau |",
        "|---|---|---|---|---|---|---|",
    ]

    def plateau(name: str, percent: Callable[[float], float] = lambda v: v) -> Callable[[Mapping[str, Any]], Any]:
        """A number of the summary's ``plateau`` (None when it has none), through `percent`."""

        def value(summary: Mapping[str, Any]) -> float | None:
            found = (summary.get("plateau") or {}).get(name)
            return None if found is None else percent(found)

        return value

    for name in table.cells:
        runs = cells.get(name, [])
        if not runs:
            lines.append(f"| {name} |" + f" {_missing(key, name, failed_cells)} |" * 6)
            continue
        lines.append(
            f"| {name} | {_mean_cell(runs, lambda s: s.get('total_epochs'), '.1f')} | "
            f"{_mean_cell(runs, plateau('epoch_1based'), '.1f')} | {_mean_cell(runs, lambda s: s['best_epoch_1based'], '.1f')} | "
            f"{_mean_cell(runs, plateau('test_accuracy', lambda v: 100 * (1 - v)), '.2f')}% | "
            f"{_error_cell(runs)} | {_mean_cell(runs, plateau('val_gain_to_best', lambda v: 100 * v), '.2f')} points |"
        )
    if cells.get("none") and cells.get("stop"):
        cost = np.mean([100 * s["test_error_at_best"] for s in cells["stop"]]) - np.mean(
            [100 * s["test_error_at_best"] for s in cells["none"]]
        )
        lines += ["", f"Cost of stopping at the plateau: {cost:+.2f} points of test error (stop minus keep going)."]
    lines += [
        "",
        "Plateau epoch: the first epoch after which validation accuracy does not beat the best so far by "
        "more than the margin within the window (`bnn_keras.plateau`); the stopping run stops once the window has passed.",
    ]
    return lines


def _grid_cells(
    table: Table, cells: Mapping[str, Sequence[Mapping[str, Any]]]
) -> Iterable[tuple[str, tuple[str, ...], Sequence[Mapping[str, Any]]]]:
    """Each cell of a grid table in order: its name, its axis values as text, its finished runs."""
    texts = itertools.product(*(axis.texts for axis in table.axes))
    return ((name, values, cells.get(name, [])) for name, values in zip(table.cells, texts))


def _missing_row(key: str, cell: str, values: Sequence[str], width: int, failed_cells: set[str]) -> str:
    """A grid row of a cell without finished runs: its values, then "failed" or dashes."""
    return "| " + " | ".join([*values] + [_missing(key, cell, failed_cells)] * (width - len(values))) + " |"


def _missing(key: str, cell: str, failed_cells: set[str]) -> str:
    """What a table shows for a cell without finished runs: "failed" if its runs failed, else a dash."""
    return "failed" if f"{key}/{cell}" in failed_cells else "—"

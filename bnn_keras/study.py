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

```python
from bnn_keras import study
results = study.run_study("runs/study", study.quick(), tables=["clipping"], seeds=2)
print(open("runs/study/tables.md").read())
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from bnn_keras import files, run_folder, training
from bnn_keras.recipe import RECIPES, Recipe

__all__ = [
    "OPTIMIZER_LR",
    "QUICK_SEEDS",
    "TABLES",
    "Table",
    "cell_recipes",
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
    layout: str = "columns"  # "columns": one column per cell (Tables 2-4); "rows": Table 5


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


TABLES: dict[str, Table] = {
    "optimizers": optimizers_table(),
    "clipping": Table(
        key="clipping",
        title="Table 3: clipping (from the first step)",
        cells={
            part: (lambda part: lambda base: {"schedule": "clipped", "clipping": part})(part)
            for part in ("none", "weights", "gradients", "both")
        },
        paper={
            "MNIST": {"none": "1.28", "weights": "1.22", "gradients": "1.17", "both": "1.18"},
            "CIFAR-10": {"none": "10.79", "weights": "10.73", "gradients": "10.53", "both": "10.38"},
        },
    ),
    "bn_momentum": Table(
        key="bn_momentum",
        title="Table 4: batch-norm momentum",
        cells={
            m: (lambda m: lambda base: {"bn_momentum": float(m)})(m)
            for m in ("0.8", "0.85", "0.9", "0.99")
        },
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
}
"""The study's ablation tables by key (``bnn-keras study --tables KEY ...``)."""

QUICK_SEEDS = 2
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
    out: str | os.PathLike, base: Recipe, tables: Iterable[str | Table], seeds: Sequence[int]
) -> list[tuple[str, str, int, Recipe]]:
    """Every (table, cell, seed, recipe) of the grid, with its output folder set."""
    grid = []
    for key, table in _resolve(tables).items():
        for cell, overrides in table.cells.items():
            for seed in seeds:
                recipe = base.replace(
                    **{
                        **overrides(base),
                        "name": f"{key}/{cell}/seed{seed}",
                        "seed": int(seed),
                        "output_dir": os.fspath(Path(out) / key / cell / f"seed{seed}"),
                    }
                )
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


def run_study(
    out: str | os.PathLike,
    base: Recipe,
    *,
    tables: Iterable[str | Table] | None = None,
    seeds: int | Sequence[int] = 3,
    verbose: int = 1,
) -> dict[str, Any]:
    """Train (or read back) every cell x seed of `tables` and write ``tables.md`` and figures.

    Args:
        out: the study folder.
        base: the settings every cell starts from (each cell overrides a few).
        tables: keys of `TABLES` (default: all) or your own `Table` objects.
        seeds: a count (seeds 0..n-1) or the seeds themselves.
        verbose: 1 prints one line per run; the runs' own verbosity is ``base.verbose``.

    Returns:
        ``{"tables": {key: {cell: [summary per seed]}}, "trained": n, "skipped": n,
        "copied": n, "markdown": str}``.
    """
    if os.fspath(out) == "":
        raise ValueError('the study folder (--out) is an empty path: expected a folder name ("" would mean the current folder)')
    out = Path(out)
    chosen = _resolve(TABLES if tables is None else tables)
    keys = list(chosen)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must name at least one seed")
    grid = cell_recipes(out, base, chosen.values(), seed_list)  # validates every cell before training any
    with files.own_folder(out):  # one study per folder: a second one is refused before anything is written
        return _run_grid(out, grid, keys, chosen, base, seed_list, verbose)


def _run_grid(
    out: Path,
    grid: list[tuple[str, str, int, Recipe]],
    keys: list[str],
    chosen: Mapping[str, Table],
    base: Recipe,
    seed_list: list[int],
    verbose: int,
) -> dict[str, Any]:
    """Train or read back every cell of `grid` (the folder is owned), then write tables and figures."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {k: {} for k in keys}
    curves: dict[str, dict[str, list[list[float]]]] = {k: {} for k in keys}
    done: dict[str, Path] = {}
    counts = {"trained": 0, "skipped": 0, "copied": 0}
    markdown = render_tables(results, base, seed_list, chosen)
    for index, (key, cell, seed, recipe) in enumerate(grid, start=1):
        settings = json.dumps(run_folder.settings(recipe.to_dict()), sort_keys=True)
        summary = _read_summary(recipe)
        if summary is not None:
            action = "skipped"
        elif settings in done:
            shutil.copytree(done[settings], recipe.out, dirs_exist_ok=True)
            summary = files.read_json(recipe.out / "summary.json")
            summary["recipe"] = recipe.to_dict()
            files.write_json(recipe.out / "summary.json", summary)
            action = "copied"
        else:
            summary = training.run(recipe)
            summary.pop("history", None)
            action = "trained"
        counts[action] += 1
        done.setdefault(settings, recipe.out)
        results[key].setdefault(cell, []).append(summary)
        curves[key].setdefault(cell, []).append(
            [row.get("val_accuracy") for row in _read_history(recipe)]
        )
        if verbose:
            print(
                f"study [{index}/{len(grid)}] {key}/{cell}/seed{seed}: {action}, test error "
                f"{100 * summary['test_error_at_best']:.2f}% at best-val epoch {summary['best_epoch_1based']}",
                flush=True,
            )
        markdown = render_tables(results, base, seed_list, chosen)
        files.write_text(out / "tables.md", markdown)

    from bnn_keras import plots

    for key in keys:
        plots.plot_curves(
            {cell: [[np.nan if v is None else v for v in run] for run in runs] for cell, runs in curves[key].items()},
            out / f"{key}.png",
            ylabel="validation accuracy",
            title=f"{chosen[key].title} ({len(seed_list)} seed{'s' if len(seed_list) > 1 else ''})",
        )
    if verbose:
        print(
            f"study: {counts['trained']} trained, {counts['skipped']} already done, "
            f"{counts['copied']} copied; wrote {out / 'tables.md'}",
            flush=True,
        )
    return {"tables": results, **counts, "markdown": markdown}


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
) -> str:
    """The study's tables as Markdown: mean +- std test error and mean best-val epoch per cell.

    `tables` gives the `Table` of each key of `results` (default: `TABLES`).
    """
    tables = TABLES if tables is None else tables
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
        if table.layout == "columns":
            lines.append("| | " + " | ".join(names) + " |")
            lines.append("|---" * (len(names) + 1) + "|")
            lines.append(
                f"| test error, this study (n={max((len(v) for v in cells.values()), default=0)}) | "
                + " | ".join(_error_cell(cells[n]) if n in cells else "—" for n in names)
                + " |"
            )
            lines.append(
                "| best-val epoch (mean) | "
                + " | ".join(
                    f"{np.mean([s['best_epoch_1based'] for s in cells[n]]):.1f}" if n in cells else "—"
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
                    lines.append(f"| {name} | — | — | — | {paper} |")
                    continue
                val, _ = _mean_std([100 * s["best_val_accuracy"] for s in runs])
                test, _ = _mean_std([100 * s["test_accuracy_at_best"] for s in runs])
                epoch = np.mean([s["best_epoch_1based"] for s in runs])
                lines.append(f"| {name} | {val:.2f}% ({epoch:.1f}) | {test:.2f}% | {_error_cell(runs)} | {paper} |")
            lines += [
                "",
                "Two-stage: the best-val epoch counts fine-tuning epochs after binarisation.",
            ]
    return "\n".join(lines) + "\n"

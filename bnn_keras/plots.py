"""Training curves as PNG files, drawn with matplotlib's Agg canvas (no display needed).

- `plot_history`: one run's train / validation / test accuracy and loss per epoch, with
  events (the clipping switch, the two-stage binarisation) marked;
- `plot_curves`: one metric of several runs (e.g. a study table's cells, mean +- std over
  seeds) on one axis.

The figures are drawn on `matplotlib.figure.Figure` with an Agg canvas, so importing
this module never changes the process's matplotlib backend. Epochs are shown 1-based,
as Keras prints them.

```python
from bnn_keras import plots
plots.plot_history(rows, "runs/x/curves.png", marks={"clipping on from epoch 51": 50})
```
"""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnn_keras import files

__all__ = ["plot_curves", "plot_history"]

_SPLITS = (("", "train"), ("val_", "validation"), ("test_", "test"))


def _save(figure: Figure, path: str | os.PathLike) -> None:
    """Save a figure as PNG atomically (`bnn_keras.files.write_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    files.write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    values = [row.get(key) for row in rows]
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _style_epoch_axis(ax: Any, ylabel: str) -> None:
    """Integer epochs on x, a label on y, a light grid and a small legend."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_history(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    marks: Mapping[str, int] | None = None,
) -> None:
    """Plot accuracy and loss (train, validation, test) of one run's history rows.

    Args:
        rows: one dict per epoch with ``epoch`` (0-based) and any of ``accuracy``,
            ``val_accuracy``, ``test_accuracy``, ``loss``, ``val_loss``, ``test_loss``.
        path: the PNG file to write.
        title: figure title.
        marks: label -> 0-based epoch from which something holds (a switch): drawn as a
            dashed line between that epoch and the one before.
    """
    epochs = _column(rows, "epoch") + 1
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for prefix, label in _SPLITS:
            values = _column(rows, prefix + metric)
            if np.isfinite(values).any():
                ax.plot(epochs, values, marker="." if len(rows) < 30 else None, label=label)
        for i, (label, epoch) in enumerate((marks or {}).items()):
            ax.axvline(epoch + 0.5, color=f"C{3 + i}", linestyle="--", label=label)
        _style_epoch_axis(ax, metric)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: str | os.PathLike,
    *,
    ylabel: str = "validation accuracy",
    title: str | None = None,
) -> None:
    """Plot the mean (line) and standard deviation (band) over runs of each named curve.

    Args:
        curves: label -> list of runs, each a per-epoch sequence of values (runs may
            differ in length; the mean at an epoch uses the runs that reached it).
        path: the PNG file to write.
    """
    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    for label, runs in curves.items():
        runs = [np.asarray(r, dtype=float) for r in runs if len(r)]
        if not runs:
            continue
        length = max(len(r) for r in runs)
        table = np.full((len(runs), length), np.nan)
        for i, r in enumerate(runs):
            table[i, : len(r)] = r
        epochs = np.arange(1, length + 1)
        with warnings.catch_warnings():  # epochs no run reached: "mean of empty slice"
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(table, axis=0), np.nanstd(table, axis=0)
        (line,) = ax.plot(epochs, mean, marker="." if length < 30 else None, label=label)
        if len(runs) > 1:
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    _style_epoch_axis(ax, ylabel)
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize="medium")
    figure.tight_layout()
    _save(figure, path)


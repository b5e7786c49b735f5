"""Shared command line and report writing of the benchmarks/study_*.py scripts.

Each benchmark runs a few cells of the study's protocol on full Fashion-MNIST (Debian's
``dataset-fashion-mnist`` files by default) with a 3x512 MLP, a fixed epoch budget and
3 seeds, through `bnn_keras.study.run_study` (so a re-run resumes), then prints a
Markdown table and writes it under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
try:
    import bnn_keras  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without the package installed
    sys.path.insert(0, str(ROOT))

import tensorflow as tf  # noqa: E402

from bnn_keras import data, training  # noqa: E402
from bnn_keras.training import Recipe  # noqa: E402


def parser(name: str, description: str, epochs: int = 20) -> argparse.ArgumentParser:
    """The flags every benchmark takes; `name` names its output folder and results file."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="fashion_mnist", help="dataset (default: fashion_mnist)")
    p.add_argument("--raw-dir", default=data.DEBIAN_FASHION_MNIST, help="original IDX files (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="TFDS folder the raw files are prepared into once (default: TFDS' own)")
    p.add_argument("--epochs", type=int, default=epochs, help="epoch budget of every run (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N training and test examples only (smoke runs)")
    p.add_argument("--hidden-units", type=int, nargs="+", default=[512, 512, 512], help="MLP widths (default: 512 512 512)")
    p.add_argument("--batch-size", type=int, default=100, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's first-epoch LR (default: the study's %(default)s)")
    p.add_argument("--lr-end", type=float, default=3e-6, help="last-epoch LR (default: the study's %(default)s)")
    p.add_argument("--out", default=f"runs/benchmarks/{name}", help="training runs folder (default: %(default)s)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / f"{name}.md"), help="Markdown report (default: %(default)s)")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=0, help="Keras output per run (default: 0)")
    return p


def base_recipe(args: argparse.Namespace, name: str) -> Recipe:
    """The study's MNIST MLP recipe resized to the benchmark's data, widths and budget."""
    return training.RECIPES["mnist_mlp"].override(
        name=name,
        dataset=args.dataset,
        raw_dir=args.raw_dir,
        data_dir=args.data_dir,
        limit=args.limit,
        model_kwargs={"hidden_units": tuple(args.hidden_units)},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr_start=args.lr,
        lr_end=args.lr_end,
        verbose=args.verbose,
    )


def describe_base(base: Recipe, seeds: int) -> str:
    units = "x".join(map(str, base.model_kwargs["hidden_units"]))
    limit = f" (first {base.limit} train/test examples)" if base.limit else ""
    return (
        f"{base.dataset}{limit}, {base.variant} MLP {units}, {base.optimizer} {base.lr_start:g} -> "
        f"{base.lr_end:g} (per-epoch exponential decay), {base.epochs} epochs, batch {base.batch_size}, "
        f"BN momentum {base.bn_momentum}, {base.loss}, {seeds} seed(s)"
    )


def report(name: str, title: str, args: argparse.Namespace, base: Recipe, body: str, started: float) -> str:
    """Print the Markdown report and write it to ``args.results``; return it."""
    command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{name}.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}"
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Reproduce: `{command}`",
            "",
            f"Settings: {describe_base(base, args.seeds)}.",
            f"Machine: {machine}; wall time {(time.perf_counter() - started) / 60:.1f} min "
            "(runs already finished in the output folder are read back, not timed).",
            "",
            body.rstrip(),
            "",
        ]
    )
    print(text)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    training.write_text(path, text)
    return text


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    import numpy as np

    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else 0.0)


def pm(values: Sequence[float], digits: int = 2, unit: str = "%") -> str:
    """'mean ± std' (just the mean for one value)."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}" if len(values) > 1 else f"{mean:.{digits}f}{unit}"


def history(recipe: Recipe) -> list[dict[str, Any]]:
    import json

    with open(recipe.out / "history.json", encoding="utf-8") as file:
        return json.load(file)

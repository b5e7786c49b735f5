"""Benchmark: the study's claims without a table of their own, on full Fashion-MNIST.

Runs the tables sgd_batch, momentum, adam_betas and lr_scaling on a 3x256 MLP for
``--epochs`` epochs, pooling on a VGG-10 of width ``--vgg-width`` for ``--vgg-epochs``
epochs, and last_mile on the MLP for ``--last-mile-epochs`` epochs (it needs a plateau),
through `bnn_keras.study.run_study` (a re-run resumes), then writes their tables.

    python benchmarks/study_new_tables.py                       # 1 seed: about an hour on 2 cores
    python benchmarks/study_new_tables.py --epochs 2 --vgg-epochs 1 --last-mile-epochs 4 --limit 2000   # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from study_common import base_recipe, parser, report

from bnn_keras import study

NAME = "study_new_tables"
MLP_TABLES = ("sgd_batch", "momentum", "adam_betas", "lr_scaling")


def _tables_md(out: Path) -> str:
    """tables.md from its first table on (the header describes one base; ours has three)."""
    text = (out / "tables.md").read_text(encoding="utf-8")
    return text[text.index("\n## ") + 1 :]


def main() -> None:
    p: argparse.ArgumentParser = parser(NAME, __doc__.splitlines()[0], epochs=10)
    p.set_defaults(hidden_units=[256, 256, 256], seeds=1, lr_end=1e-4)
    p.add_argument("--vgg-width", type=float, default=0.125, help="pooling: VGG-10 width multiplier (default: %(default)s)")
    p.add_argument("--vgg-epochs", type=int, default=3, help="pooling: epochs (default: %(default)s)")
    p.add_argument("--last-mile-epochs", type=int, default=30, help="last_mile: epochs (default: %(default)s)")
    args = p.parse_args()
    started = time.perf_counter()
    base = base_recipe(args, NAME)
    out = Path(args.out)
    sections = []
    parts = [
        ("mlp", base, MLP_TABLES),
        ("vgg", base.override(model="vgg10", model_kwargs={"width_multiplier": args.vgg_width}, epochs=args.vgg_epochs,
                              bn_momentum=0.9), ("pooling",)),
        ("last_mile", base.replace(epochs=args.last_mile_epochs), ("last_mile",)),
    ]
    for folder, part_base, tables in parts:
        part_started = time.perf_counter()
        study.run_study(out / folder, part_base, tables=list(tables), seeds=args.seeds, verbose=1)
        minutes = (time.perf_counter() - part_started) / 60
        sections.append(f"### {', '.join(tables)}: {study._describe(part_base)}; {minutes:.1f} min\n\n{_tables_md(out / folder)}")
    report(NAME, "The study's claims without a table of their own (full Fashion-MNIST)", args, base, "\n".join(sections), started)


if __name__ == "__main__":
    main()

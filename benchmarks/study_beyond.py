"""Benchmark: the practice that grew out of the study, on full Fashion-MNIST.

Runs the tables stochastic, distillation, weight_decay and dead_zone (`bnn_keras.study`)
on a 3x256 MLP for ``--epochs`` epochs (the staged schedules split that budget between
their stages), through `bnn_keras.study.run_study` (a re-run resumes), then writes their
tables; the curves (``<table>.png``, ``dead_zone_*.png``) stay in the output folder.

    python benchmarks/study_beyond.py --epochs 6               # 1 seed: 28 min on 2 cores (the README's run)
    python benchmarks/study_beyond.py --epochs 2 --limit 2000  # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from study_common import base_recipe, parser, report

from bnn_keras import study

NAME = "study_beyond"
TABLES = ("stochastic", "distillation", "weight_decay", "dead_zone")


def main() -> None:
    p: argparse.ArgumentParser = parser(NAME, __doc__.splitlines()[0], epochs=10)
    p.set_defaults(hidden_units=[256, 256, 256], seeds=1, lr_end=1e-4)
    args = p.parse_args()
    started = time.perf_counter()
    base = base_recipe(args, NAME)
    out = Path(args.out)
    study.run_study(out, base, tables=list(TABLES), seeds=args.seeds, verbose=1)
    text = (out / "tables.md").read_text(encoding="utf-8")
    minutes = (time.perf_counter() - started) / 60
    body = f"Tables {', '.join(TABLES)}; {minutes:.1f} min.\n\n" + text[text.index("\n## ") + 1 :]
    report(NAME, "Beyond the study: stochastic signs, distillation, weight decay per stage, the dead zone (full Fashion-MNIST)",
           args, base, body, started)


if __name__ == "__main__":
    main()

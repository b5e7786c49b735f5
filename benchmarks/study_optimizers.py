"""Benchmark: the study's Table 2 (optimisers) on full Fashion-MNIST with a 3x512 MLP.

Every optimiser trains the same binary MLP for the same epoch budget and seeds; the table
reports the test error at the best-validation epoch (mean ± std) and that epoch.

    python benchmarks/study_optimizers.py                      # 8 optimisers x 3 seeds x 20 epochs
    python benchmarks/study_optimizers.py --epochs 1 --seeds 1 --limit 2000   # smoke run
    python benchmarks/study_optimizers.py --lrs sgd=1 adam=1e-3  # only these, at these rates
"""

from __future__ import annotations

import time

from study_common import base_recipe, parser, report

from bnn_keras import study

NAME = "study_optimizers"


def _lr(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    return name, float(value)


def main() -> None:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument(
        "--lrs", nargs="+", type=_lr, default=None, metavar="NAME=LR",
        help=f"optimisers to run and their start LRs (default: all, {study.OPTIMIZER_LR})",
    )
    args = p.parse_args()
    started = time.perf_counter()
    base = base_recipe(args, NAME)
    table = study.optimizers_table(dict(args.lrs) if args.lrs else None)
    result = study.run_study(args.out, base, tables=[table], seeds=args.seeds, verbose=1)
    body = result["markdown"].split("## ", 1)[1]  # the table, without run_study's preamble
    lrs = ", ".join(f"{name} {overrides(base)['lr_start']:g}" for name, overrides in table.cells.items())
    report(
        NAME,
        "Optimisers (the study's Table 2) on Fashion-MNIST",
        args,
        base,
        f"Start learning rates: {lrs} (each decays by the same factor as Adam's).\n\n## " + body,
        started,
    )


if __name__ == "__main__":
    main()

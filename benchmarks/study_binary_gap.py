"""Benchmark: the accuracy gap between the float MLP and its binary variants (same budget).

Float, BinaryConnect (binary weights) trained end to end or two-stage (float first half,
binary fine-tuning second half, the study's Table 5), and BinaryNet (binary weights and
activations, with a binarised or a real-valued input).

    python benchmarks/study_binary_gap.py                       # 5 models x 3 seeds x 20 epochs
    python benchmarks/study_binary_gap.py --epochs 2 --seeds 1 --limit 2000     # smoke run
"""

from __future__ import annotations

import time

import numpy as np
from study_common import base_recipe, parser, pm, report

from bnn_keras import study

NAME = "study_binary_gap"


def _halves(base):
    first = max(1, base.epochs // 2)
    return {"pretrain_epochs": first, "epochs": max(1, base.epochs - first)}


TABLE = study.Table(
    key="binary_gap",
    title="Float vs binary",
    cells={
        "float": lambda base: {"variant": "float", "schedule": "vanilla"},
        "binaryconnect": lambda base: {"variant": "binaryconnect", "schedule": "clipped"},
        "binaryconnect-two-stage": lambda base: {"variant": "binaryconnect", "schedule": "two-stage", **_halves(base)},
        "binarynet": lambda base: {"variant": "binarynet", "schedule": "clipped"},
        "binarynet-real-input": lambda base: {
            "variant": "binarynet", "schedule": "clipped",
            "model_kwargs": {**base.model_kwargs, "binarize_input": False},
        },
    },
)


def main() -> None:
    args = parser(NAME, __doc__.splitlines()[0]).parse_args()
    if args.epochs < 2:
        raise SystemExit("study_binary_gap: --epochs must be >= 2 (two-stage needs one epoch per stage)")
    started = time.perf_counter()
    base = base_recipe(args, NAME)
    result = study.run_study(args.out, base, tables=[TABLE], seeds=args.seeds, verbose=1)
    cells = result["tables"][TABLE.key]
    float_acc = np.mean([100 * s["test_accuracy_at_best"] for s in cells["float"]])
    lines = [
        "| model | test acc at best val | gap to float (pp) | best val epoch | params (trainable) |",
        "|---|---|---|---|---|",
    ]
    for cell, summaries in cells.items():
        accs = [100 * s["test_accuracy_at_best"] for s in summaries]
        epoch = np.mean([s["best_epoch_1based"] for s in summaries])
        lines.append(
            f"| {cell} | {pm(accs)} | {np.mean(accs) - float_acc:+.2f} | {epoch:.1f} | "
            f"{summaries[0]['params']['trainable']:,} |"
        )
    body = (
        "Models: float = real-valued MLP; binaryconnect = binary weights, real activations, clipped STE "
        "and weight clipping from the start; binaryconnect-two-stage = float for the first half of the budget, "
        "then binary; binarynet = binary weights and activations (input binarised too); "
        "binarynet-real-input = the same with a real-valued first-layer input.\n\n"
        "Two-stage: float for the first half of the budget, then the binary model fine-tuned with "
        "clipping for the second; its best-val epoch counts fine-tuning epochs.\n\n" + "\n".join(lines)
    )
    report(NAME, "Float vs binary accuracy gap on Fashion-MNIST", args, base, body, started)


if __name__ == "__main__":
    main()

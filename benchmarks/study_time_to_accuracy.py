"""Benchmark: how fast each clipping schedule reaches a validation accuracy (the study's rule 3).

Vanilla STE without weight clipping should train about as fast as the float twin and
faster than clipped STE with weight clipping early on; switching clipping on half-way
should keep the speed and the final accuracy. Reports, per schedule, the epochs and the
seconds (training + validation) until the validation accuracy first reaches each
threshold, and the test accuracy at the best-validation epoch.

    python benchmarks/study_time_to_accuracy.py                 # 4 schedules x 3 seeds x 20 epochs
    python benchmarks/study_time_to_accuracy.py --epochs 1 --seeds 1 --limit 2000   # smoke run
"""

from __future__ import annotations

import time

import numpy as np
from study_common import base_recipe, history, parser, pm, report

from bnn_keras import study

NAME = "study_time_to_accuracy"

TABLE = study.Table(
    key="time_to_accuracy",
    title="Time to accuracy per clipping schedule",
    cells={
        "float": lambda base: {"variant": "float", "schedule": "vanilla"},
        "vanilla": lambda base: {"schedule": "vanilla"},
        "clipped": lambda base: {"schedule": "clipped"},
        "vanilla-then-clipped": lambda base: {
            "schedule": "vanilla-then-clipped", "switch_epoch": base.epochs // 2,
        },
        # The study's rule 3 proper: vanilla at a 10x larger LR, clipping on and LR x0.1 at
        # the switch; and clipped from the start at that LR, which the study says stalls.
        "vanilla-then-clipped-lr10": lambda base: {
            "schedule": "vanilla-then-clipped", "switch_epoch": base.epochs // 2,
            "lr_start": 10 * base.lr_start, "lr_end": 10 * base.lr_end, "lr_factor": 0.1,
        },
        "clipped-lr10": lambda base: {
            "schedule": "clipped", "lr_start": 10 * base.lr_start, "lr_end": 10 * base.lr_end,
        },
        # Same total budget: half float pretraining, half binary fine-tuning (clipped STE).
        "two-stage": lambda base: {
            "schedule": "two-stage", "pretrain_epochs": max(1, base.epochs // 2),
            "epochs": max(1, base.epochs - base.epochs // 2),
        },
    },
)

TARGETS = {"vanilla-then-clipped": 1 / 2, "vanilla-then-clipped-lr10": 1 / 2, "two-stage": 1 / 5}


def _binary_rows(rows: list[dict]) -> list[dict]:
    """The rows of the binary model (two-stage: fine-tuning only), epochs renumbered from 0."""
    binary = [r for r in rows if r.get("stage") != "pretrain"]
    return [{**r, "epoch": i} for i, r in enumerate(binary)]


def _versus_clipped(grid, summaries: dict, seeds: int) -> list[str]:
    """Per seed: epochs for each schedule to reach the best val accuracy `clipped` reached.

    `summaries` maps each cell to its runs' summaries in seed order (from `run_study`)."""
    by_cell = {cell: {seed: r for _, c, seed, r in grid if c == cell} for cell in TABLE.cells}
    lines = ["| schedule | epochs to clipped's best val (mean) | ratio to clipped's best epoch (target) "
             "| seconds to it | test acc at best minus clipped's (points) |", "|---|---|---|---|---|"]
    for cell, target in TARGETS.items():
        epochs, ratios, seconds, gaps, missed = [], [], [], [], 0
        for seed in range(seeds):
            clipped_rows = history(by_cell["clipped"][seed])
            goal = max(r["val_accuracy"] for r in clipped_rows)
            clipped_best = 1 + max(range(len(clipped_rows)), key=lambda i: clipped_rows[i]["val_accuracy"])
            rows = history(by_cell[cell][seed])
            reached = _first_reach(_binary_rows(rows), goal)
            gaps.append(100 * (summaries[cell][seed]["test_accuracy_at_best"]
                               - summaries["clipped"][seed]["test_accuracy_at_best"]))
            if reached is None:
                missed += 1
                continue
            pretrain_seconds = sum(r.get("epoch_time_s") or 0.0 for r in rows if r.get("stage") == "pretrain")
            epochs.append(reached[0])
            ratios.append(reached[0] / clipped_best)
            seconds.append(reached[1] + pretrain_seconds)
        n = f" ({seeds - missed}/{seeds} seeds reached it)" if missed else ""
        lines.append(
            f"| {cell} | {np.mean(epochs):.1f}{n} | {np.mean(ratios):.2f} (<= {target:.2f}) | "
            f"{np.mean(seconds):.0f} | {pm(gaps, unit='')} |" if epochs else
            f"| {cell} | not reached in any seed | — | — | {pm(gaps, unit='')} |"
        )
    return lines


def _first_reach(rows: list[dict], threshold: float) -> tuple[int, float] | None:
    """(1-based epoch, cumulative seconds) when val_accuracy first reaches `threshold`."""
    seconds = 0.0
    for row in rows:
        seconds += row.get("epoch_time_s") or 0.0
        if (row.get("val_accuracy") or 0.0) >= threshold:
            return row["epoch"] + 1, seconds
    return None


def main() -> None:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.80, 0.85, 0.88],
                   help="validation accuracies to time (default: 0.80 0.85 0.88)")
    args = p.parse_args()
    started = time.perf_counter()
    base = base_recipe(args, NAME)
    result = study.run_study(args.out, base, tables=[TABLE], seeds=args.seeds, verbose=1)
    grid = study.cell_recipes(args.out, base, [TABLE], list(range(args.seeds)))

    header = ["schedule"] + [f"epochs to {t:.0%} val" for t in args.thresholds] + [
        f"seconds to {t:.0%} val" for t in args.thresholds
    ] + ["best val acc (epoch)", "test acc at best"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for cell in TABLE.cells:
        recipes = [r for _, c, _, r in grid if c == cell]
        histories = [_binary_rows(history(r)) for r in recipes]
        summaries = result["tables"][TABLE.key][cell]
        epochs, seconds = [], []
        for t in args.thresholds:
            reached = [x for x in (_first_reach(h, t) for h in histories) if x is not None]
            n = f" ({len(reached)}/{len(histories)})" if len(reached) < len(histories) else ""
            epochs.append(f"{np.mean([e for e, _ in reached]):.1f}{n}" if reached else "not reached")
            seconds.append(f"{np.mean([s for _, s in reached]):.0f}{n}" if reached else "—")
        best = f"{pm([100 * s['best_val_accuracy'] for s in summaries])} ({np.mean([s['best_epoch_1based'] for s in summaries]):.1f})"
        test = pm([100 * s["test_accuracy_at_best"] for s in summaries])
        lines.append("| " + " | ".join([cell, *epochs, *seconds, best, test]) + " |")
    body = (
        "Schedules: float = the real-valued twin; vanilla = binary weights with the identity STE and no "
        "weight clipping; clipped = clipped STE and weight clipping from the first step; "
        "vanilla-then-clipped = vanilla, switched to clipped at half the budget; '-lr10' = the same "
        "schedule at 10 times the learning rate, divided by 10 at the switch (the study's advice), "
        "and clipped at that rate throughout; two-stage = the float "
        "twin for half the budget, then the binary model fine-tuned with clipping for the other half "
        "(its epochs and accuracies count fine-tuning only; its seconds include the float pretraining).\n\n"
        "Against clipped (issue targets: vanilla-then-clipped reaches clipped's best validation accuracy "
        "in <= 1/2 of the epochs clipped needed, two-stage in <= 1/5, each with test accuracy at most "
        "0.3 points below clipped's):\n\n" + "\n".join(_versus_clipped(grid, result["tables"][TABLE.key], args.seeds)) + "\n\n"
        "Per schedule:\n\n"
        "Epochs and seconds are means over the seeds that reached the threshold (k/n when not all did); "
        "seconds count training and validation, not the per-epoch test evaluation.\n\n" + "\n".join(lines)
    )
    report(NAME, "Time to accuracy: vanilla vs clipped STE (the study's rule 3) on Fashion-MNIST", args, base, body, started)


if __name__ == "__main__":
    main()

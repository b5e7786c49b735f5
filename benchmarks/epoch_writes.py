"""What the writes at each epoch's end cost: the resume backup in the background against waiting for it.

The quick start's run (`mnist_mlp`, binarynet, embedded data) is trained with the
per-epoch backup written as bnn_keras writes it (in the background, while the next epoch
trains: `run_folder.Backup`) and with each backup waited for, as Keras' BackupAndRestore
does ("wait"), interleaved wait / background / wait / background ... For epochs 1 to N-2
it measures the wall time from one epoch's start to the next's, and subtracts the
epoch's own training + validation (`epoch_time_s`): what is left is the epoch's end
(test evaluation, best-model save, backup, history). It checks that both ways give the
same history.

    python benchmarks/epoch_writes.py                     # 8 epochs, 3 rounds
    python benchmarks/epoch_writes.py --epochs 6 --rounds 1 --out /tmp/epoch_writes.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bnn_keras import callbacks as bk_callbacks  # noqa: E402
from bnn_keras import run_folder, training  # noqa: E402

RESULT = Path(__file__).parent / "results" / "epoch_writes.md"


def _timed_run(recipe: training.Recipe, wait: bool) -> tuple[list[float], list[dict[str, Any]], bool]:
    """(epoch start times, history rows, whether the backup ran in the background)."""
    starts: list[float] = []
    background: list[bool] = []
    original_begin, original_backup = bk_callbacks.EpochClock.on_epoch_begin, run_folder.Backup._backup

    def on_epoch_begin(self, epoch, logs=None):
        starts.append(time.perf_counter())
        original_begin(self, epoch, logs)

    def _backup(self, epoch, batch=0):
        original_backup(self, epoch, batch)
        background.append(self.background)
        if wait:
            self.wait()

    bk_callbacks.EpochClock.on_epoch_begin, run_folder.Backup._backup = on_epoch_begin, _backup
    try:
        result = training.run(recipe, overwrite=True)
    finally:
        bk_callbacks.EpochClock.on_epoch_begin, run_folder.Backup._backup = original_begin, original_backup
    return starts, result["history"], all(background) and not wait


def _epoch_end_costs(starts: list[float], rows: list[dict[str, Any]]) -> list[float]:
    """For epochs 1 .. N-2: (next epoch's start - this one's) - its train + validation time."""
    return [starts[e + 1] - starts[e] - rows[e]["epoch_time_s"] for e in range(1, len(starts) - 1)]


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    def strip(rows):
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in rows]

    return strip(a) == strip(b)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="epoch_writes-"))
    base = dataclasses.replace(training.get_recipe("mnist_mlp"), variant="binarynet", epochs=args.epochs, verbose=0)
    costs: dict[str, list[float]] = {"wait": [], "background": []}
    epochs: dict[str, list[float]] = {"wait": [], "background": []}
    histories: dict[str, list[list[dict[str, Any]]]] = {"wait": [], "background": []}
    in_background = []
    for round_ in range(args.rounds):
        for mode in ("wait", "background"):
            recipe = dataclasses.replace(base, output_dir=str(work / f"{mode}{round_}"))
            starts, rows, background = _timed_run(recipe, wait=mode == "wait")
            if mode == "background":
                in_background.append(background)
            costs[mode] += _epoch_end_costs(starts, rows)
            epochs[mode] += [row["epoch_time_s"] for row in rows[1:-1]]
            histories[mode].append(rows)
            print(f"round {round_} {mode:10s}: epoch end {statistics.median(_epoch_end_costs(starts, rows)):.3f} s "
                  f"(median of {len(starts) - 2}), train+val {statistics.median(r['epoch_time_s'] for r in rows[1:-1]):.3f} s",
                  flush=True)
    same = all(_same(histories["wait"][0], rows) for rows in histories["wait"] + histories["background"])
    wait_end, bg_end = statistics.median(costs["wait"]), statistics.median(costs["background"])
    lines = [
        "# Cost of an epoch's end: background backup against waiting for it",
        "",
        f"`python benchmarks/epoch_writes.py --epochs {args.epochs} --rounds {args.rounds}`: the quick start's run "
        "(mnist_mlp binarynet, embedded data), interleaved; medians over epochs 1 to N-2 of every round.",
        "",
        "| backup | epoch end (s) | train + validation (s) | epoch, start to start (s) |",
        "|---|---:|---:|---:|",
    ]
    for mode, end in (("wait", wait_end), ("background", bg_end)):
        train = statistics.median(epochs[mode])
        lines.append(f"| {mode} | {end:.3f} | {train:.3f} | {end + train:.3f} |")
    lines += [
        "",
        f"Saved per epoch by the background backup: {wait_end - bg_end:.3f} s. "
        f"Backups written in the background: {all(in_background)}. "
        f"Same history (every row but epoch_time_s) in all {2 * args.rounds} runs: {same}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if not same or not all(in_background):
        raise SystemExit("epoch_writes: the background runs differ from the waited ones, or did not run in the background")


if __name__ == "__main__":
    main()

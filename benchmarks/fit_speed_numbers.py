"""Does "auto" (XLA) change what a run reaches? The quick start's network, several seeds, speed off vs auto.

XLA changes float rounding; in a binary network a rounding difference can flip a sign,
and the run then follows another path, as another seed would. This compares the
distributions: the quick start's recipe (3x2048 BinaryNet MLP on the embedded set) for
`--seeds` seeds and `--epochs` epochs, with ``jit="off", steps_per_execution=1`` and
with "auto", and reports best validation accuracy, test accuracy at it, and epoch time.

    python benchmarks/fit_speed_numbers.py --seeds 3 --epochs 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bnn_keras import training  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "fit_speed_numbers.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fit_speed_numbers_"))
    base = training.RECIPES["mnist_mlp"].replace(variant="binarynet", epochs=args.epochs, verbose=0)
    settings = {"off": dict(jit="off", steps_per_execution=1), "auto": {}}
    results: dict[str, list[dict]] = {name: [] for name in settings}
    started = time.perf_counter()
    for seed in range(args.seeds):
        for name, speed in settings.items():
            recipe = base.replace(seed=seed, output_dir=os.fspath(work / f"{name}{seed}"), **speed)
            summary = training.run(recipe)
            results[name].append(summary)
            print(f"seed {seed} {name}: best val {summary['best_val_accuracy']:.4f}, "
                  f"test at best {summary['test_accuracy_at_best']:.4f}", flush=True)

    def pm(values):
        mean = statistics.mean(values) * 100
        std = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
        return f"{mean:.2f} ± {std:.2f}%"

    lines = ["| speed | best val acc | test acc at best | final test acc | epoch s (median, after the first) |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        epoch_s = statistics.median(r["epoch_time_s"] for s in runs for r in s["history"][1:])
        lines.append(f"| {name} | {pm([s['best_val_accuracy'] for s in runs])} | "
                     f"{pm([s['test_accuracy_at_best'] for s in runs])} | {pm([s['final_test_accuracy'] for s in runs])} | "
                     f"{epoch_s:.2f} |")
    table = "\n".join(lines)
    header = (f"`python benchmarks/fit_speed_numbers.py --seeds {args.seeds} --epochs {args.epochs}`: the quick start's "
              f"3x2048 BinaryNet MLP, embedded set, seeds 0-{args.seeds - 1}, mean ± std; "
              f"{time.perf_counter() - started:.0f} s in all, {os.cpu_count()} CPU cores.")
    args.out.write_text(f"# Speed settings and the numbers a run reaches\n\n{header}\n\n{table}\n")
    print(f"\n{header}\n\n{table}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

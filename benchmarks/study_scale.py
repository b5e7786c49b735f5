"""Benchmark: one quick-size study table trained sequentially vs as Ray tasks, and Ray's cost per task.

    pip install -e ".[ray]"
    python benchmarks/study_scale.py                         # the clipping table, 2 seeds, --quick size
    python benchmarks/study_scale.py --table bn_momentum --seeds 3 --noop-runs 80

Measures, on this machine: the wall time of the table with ``--executor local`` and with
``--executor ray`` on a local Ray instance (one CPU per run, so as many runs at once as
cores), that both wrote the same tables, the time to start Ray, the round trip of an empty
Ray task, and the study's own cost per run on Ray (a grid of runs that only write their
summary, Ray minus local). Writes benchmarks/results/study_scale.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's node address: loopback (read on import)

from bnn_keras import files, study  # noqa: E402
from bnn_keras.recipe import Recipe  # noqa: E402

NAME = "study_scale"
RESULTS = Path(__file__).resolve().parent / "results" / f"{NAME}.md"


def _noop_train(recipe: Recipe) -> dict:
    """A run that trains nothing: its summary and one history row, as a finished run writes them."""
    summary = {"best_val_accuracy": 0.5, "best_epoch": 0, "best_epoch_1based": 1, "test_accuracy_at_best": 0.5,
               "test_error_at_best": 0.5, "total_epochs": 1, "recipe": recipe.to_dict()}
    recipe.out.mkdir(parents=True, exist_ok=True)
    files.write_json(recipe.out / "history.json", [{"epoch": 0, "val_accuracy": 0.5}])
    files.write_json(recipe.out / "summary.json", summary)
    return summary


def _empty() -> None:
    return None


def _timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def _run_seconds(result: dict) -> list[float]:
    """Each trained run's own time (training.run's wall_time_s, from its summary)."""
    return [s["wall_time_s"] for cells in result["tables"].values() for runs in cells.values() for s in runs if "wall_time_s" in s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=list(study.TABLES), default="clipping", help="the table to train (default: clipping)")
    parser.add_argument("--seeds", type=int, default=study.QUICK_SEEDS, help=f"seeds per cell (default {study.QUICK_SEEDS})")
    parser.add_argument("--noop-runs", type=int, default=40, help="runs of the no-training grid that measures the study's cost per run")
    parser.add_argument("--out", default="runs/benchmarks/study_scale", help="scratch folder (emptied first)")
    parser.add_argument("--results", default=str(RESULTS), help=f"the Markdown file to write (default {RESULTS.relative_to(RESULTS.parents[2])})")
    args = parser.parse_args()
    import ray

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    base = study.quick()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]  # other work on the machine slows both executors, not always alike

    local_s, local = _timed(study.run_study, out / "local", base, tables=[args.table], seeds=args.seeds, verbose=1)
    start_s, _ = _timed(ray.init, address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                        num_cpus=cores, log_to_driver=False, logging_level="warning")
    try:
        ray_s, on_ray = _timed(study.run_study, out / "ray", base, tables=[args.table], seeds=args.seeds,
                               verbose=1, executor="ray")
        again_s, _ = _timed(study.run_study, out / "ray-again", base, tables=[args.table], seeds=args.seeds,
                            verbose=0, executor="ray")  # the same table once more: Ray's workers already hold TensorFlow
        # one cell, a seed per run: cells of equal settings would be copied, not trained
        grid = study.Table(key="noop", title="no training", cells={"c": lambda base: {}})
        seeds = list(range(args.noop_runs))
        noop_local_s, _ = _timed(study.run_study, out / "noop-local", base, tables=[grid], seeds=seeds, verbose=0, train=_noop_train)
        study.run_study(out / "noop-warm-up", base, tables=[grid], seeds=[0], verbose=0, executor="ray", train=_noop_train)
        noop_ray_s, _ = _timed(study.run_study, out / "noop-ray", base, tables=[grid], seeds=seeds, verbose=0,
                               executor="ray", train=_noop_train)
        # last: workers without the study's environment variables are another pool, and Ray
        # stops idle workers of the first one to make room for them
        empty = ray.remote(_empty)
        ray.get(empty.remote())
        trips = [_timed(ray.get, empty.remote())[0] for _ in range(50)]
        bulk_s, _ = _timed(ray.get, [empty.remote() for _ in range(200)])
    finally:
        ray.shutdown()

    same = on_ray["markdown"] == local["markdown"]
    runs = len(_run_seconds(local))
    per_run_local = statistics.mean(_run_seconds(local))
    per_run_ray = statistics.mean(_run_seconds(on_ray))
    command = " ".join(["python", "benchmarks/study_scale.py", *sys.argv[1:]])
    lines = [
        "# The study on Ray: one table sequentially and as Ray tasks",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Machine: {platform.machine()}, {cores} CPUs, no GPU, Ray {ray.__version__}. Table `{args.table}` at the "
        f"`--quick` size ({base.model_kwargs['hidden_units']} MLP, {base.epochs} epochs, embedded data), "
        f"{args.seeds} seeds: {runs} runs. Ray: a local instance, one CPU per run, so {cores} runs at a time. "
        f"Load average when it started: {load:.1f} ({'other work shared the cores' if load > 0.5 else 'an idle machine'}).",
        "",
        "| | wall time | speed-up | mean time of one run |",
        "|---|---:|---:|---:|",
        f"| `--executor local` (one run after another) | {local_s:.1f} s | 1.00x | {per_run_local:.1f} s |",
        f"| `--executor ray`, fresh workers (each imports TensorFlow first) | {ray_s:.1f} s | {local_s / ray_s:.2f}x | {per_run_ray:.1f} s |",
        f"| `--executor ray`, the same table again (warm workers) | {again_s:.1f} s | {local_s / again_s:.2f}x | |",
        "",
        f"Tables identical (local vs Ray): {'yes' if same else 'NO'}.",
        "",
        "| Ray's own cost | |",
        "|---|---:|",
        f"| start a local Ray instance (`ray.init`) | {start_s:.1f} s |",
        f"| round trip of an empty task (median of 50, one at a time) | {1000 * statistics.median(trips):.1f} ms |",
        f"| empty tasks in bulk (200 at once) | {1000 * bulk_s / 200:.2f} ms per task |",
        f"| the study's cost per run on Ray, warm workers ({args.noop_runs} runs that train nothing: Ray "
        f"{noop_ray_s:.2f} s, local {noop_local_s:.2f} s) | {1000 * (noop_ray_s - noop_local_s) / args.noop_runs:.1f} ms per run |",
        "",
        f"Two cores bound the gain: a sequential run's TensorFlow already uses both cores for part of each step, "
        f"so {cores} runs at once share them, each taking longer ({per_run_ray:.1f} s vs {per_run_local:.1f} s); "
        "fresh Ray workers also import TensorFlow once each. On a cluster each run gets its own CPUs or GPU and the "
        "table's wall time approaches that of its longest run.",
    ]
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

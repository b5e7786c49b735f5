"""larq-zoo's architectures made switchable: what was switched, equal outputs, LCE ops, a two-epoch schedule.

For each architecture (built with ``weights=None`` at a small input size so it trains on
the embedded Fashion-MNIST subset): how many quantisers and weight clips
`bnn_keras.make_switchable` switched and left, the max |difference| of the copy's
outputs from the original's at inference and in training mode, whether the LCE files of
both have the same ops and constant bytes, and a two-epoch vanilla-then-clipped run
(`training.run(model=...)`, switch after epoch 1) with its validation accuracies and time.

larq-zoo is not a dependency (it pins protobuf < 3.21, which TensorFlow 2.21 cannot use):

    pip install --no-deps larq-zoo==2.4.0 zookeeper==1.4.0 && pip install typeguard click
    python benchmarks/own_models.py            # every architecture below
    python benchmarks/own_models.py --models BinaryResNetE18 --limit 1000

Prints a Markdown table and writes it to benchmarks/results/own_models.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bnn_keras  # noqa: E402,F401
from bnn_keras import training  # noqa: E402
from bnn_keras.switchable import NothingToSwitchError, make_switchable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import require_larq_zoo, run_table, zoo_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "own_models.md"
ARCHITECTURES = (
    "BinaryResNetE18", "BiRealNet", "QuickNetSmall", "BinaryDenseNet28", "RealToBinaryNet",
    "XNORNet", "DoReFaNet", "BinaryAlexNet",
)


def build(name: str, size: int) -> tf.keras.Model:
    """The zoo model at `size` x `size`, nested in a model that zero-pads the 28 x 28 images to it."""
    zoo = zoo_model(name, (size, size, 1), 10)
    inputs = tf.keras.Input((28, 28, 1))
    padded = tf.keras.layers.ZeroPadding2D((size - 28) // 2)(inputs)
    return tf.keras.Model(inputs, zoo(padded), name=name)


def lce_files(model: tf.keras.Model, copy: tf.keras.Model) -> tuple[str, str]:
    """Whether the two LCE files have the same ops and constant bytes; the ops' summary."""
    import larq_compute_engine as lce

    from bnn_keras.export.flatbuffer import constant_buffers, flatbuffer_ops

    a, b = lce.convert_keras_model(model), lce.convert_keras_model(copy)
    same = flatbuffer_ops(a) == flatbuffer_ops(b) and constant_buffers(a) == constant_buffers(b)
    binary = flatbuffer_ops(a).count("LceBconv2d")
    return ("same" if same else "DIFFERENT"), f"{binary} LceBconv2d, {len(a) / 1e6:.2f} / {len(b) / 1e6:.2f} MB"


def run_one(name: str, args: argparse.Namespace, out: Path) -> dict:
    model = build(name, args.size)
    row: dict = {"name": name, "params": model.count_params()}
    try:
        copy, report = make_switchable(model, report=True)
    except NothingToSwitchError as error:
        return {**row, "refused": str(error)}
    x = np.random.default_rng(0).standard_normal((8, 28, 28, 1)).astype(np.float32)
    row["diff_inference"] = float(np.max(np.abs(model(x, training=False).numpy() - copy(x, training=False).numpy())))
    row["diff_training"] = float(np.max(np.abs(model(x, training=True).numpy() - copy(x, training=True).numpy())))
    row["switched"] = f"{report.quantizers} quantisers, {report.weight_clips} clips"
    kinds = sorted({what.split(" has ")[0] for _, _, what in report.left})
    row["left"] = f"{len(report.left)} ({', '.join(kinds)})" if report.left else "0"
    if args.export:
        started = time.perf_counter()
        row["lce"], row["lce_ops"] = lce_files(model, copy)
        row["export_s"] = time.perf_counter() - started
    recipe = training.get_recipe("mnist_mlp").replace(
        model_kwargs={}, schedule="vanilla-then-clipped", switch_epoch=1, epochs=2, limit=args.limit,
        batch_size=args.batch_size, loss="crossentropy", verbose=0, output_dir=os.fspath(out / name),
    )
    started = time.perf_counter()
    result = training.run(recipe, model=model, overwrite=True)
    row["fit_s"] = time.perf_counter() - started
    row["phases"] = [r["clipping_phase"] for r in result["history"]]
    row["val_accuracy"] = [r["val_accuracy"] for r in result["history"]]
    return row


def table(rows: list[dict], args: argparse.Namespace, minutes: float) -> str:
    lines = [
        "# larq-zoo architectures made switchable",
        "",
        f"`python benchmarks/own_models.py{' --no-export' if not args.export else ''} --size {args.size} "
        f"--limit {args.limit}` on {platform.machine()} ({os.cpu_count()} cores), {minutes:.1f} min. "
        f"larq-zoo 2.4.0 (`--no-deps`), `weights=None`, input {args.size}x{args.size}x1 (the 28x28 images "
        "zero-padded, the zoo model nested in that model), 10 classes. "
        "Outputs: max |copy - original| on 8 N(0, 1) inputs. LCE: both files' ops and constant bytes "
        "compared (ops, original / copy size). Fit: `training.run(model=...)`, mnist_mlp recipe with "
        f"cross-entropy, vanilla for epoch 1, clipped from epoch 2, {args.limit} embedded examples "
        f"(10% validate), batch {args.batch_size}.",
        "",
        "| model | params | switched | left as they were | outputs (inference / training) | LCE files | fit 2 epochs | phases | val accuracy |",
        "|---|---:|---|---|---|---|---:|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['name']} | {r['params']:,} | refused: {r['refused']} | | | | | | |")
            continue
        lce = f"{r['lce']} ({r['lce_ops']})" if "lce" in r else "-"
        val = " -> ".join(f"{v:.3f}" for v in r["val_accuracy"])
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['switched']} | {r['left']} | "
            f"{r['diff_inference']:.1e} / {r['diff_training']:.1e} | {lce} | {r['fit_s']:.0f} s | "
            f"{r['phases']} | {val} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--size", type=int, default=32, help="the zoo model's input height and width, even and >= 28 (default 32; the 28 x 28 images are zero-padded to it)")
    parser.add_argument("--limit", type=int, default=2000, help="embedded examples used (default 2000)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip the LCE comparison")
    args = parser.parse_args(argv)
    if args.size < 28 or args.size % 2:
        parser.error(f"--size: expected an even number >= 28, got {args.size}")
    require_larq_zoo(parser)
    with tempfile.TemporaryDirectory() as folder:
        run_table(
            args.models, lambda name: run_one(name, args, Path(folder)),
            lambda rows, minutes: table(rows, args, minutes), RESULTS,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export benchmark on published BNN architectures: size vs ideal, binary ops, agreement, verdict, seconds.

Each larq-zoo architecture is built with ``weights=None`` at a small input (default
64 x 64 x 3, where the last stages run 3x3 convolutions on 2x2 maps: the zero-padding case
LCE computes wrongly, which bnn_keras rewrites), BatchNormalization gets random
trained-looking statistics (`bnn_keras.export.randomize_batch_norm`, seed 1), and it is
exported twice: by `larq_compute_engine.convert_keras_model` alone, checked by
`bnn_keras.export.check_flatbuffer`, and by `bnn_keras.export.convert` with its default
verification (value check, top-1). Inputs: seeded N(0, 1).

larq-zoo is not a dependency (it pins protobuf < 3.21, which TensorFlow 2.21 cannot use):

    pip install --no-deps larq-zoo==2.4.0 zookeeper==1.4.0 && pip install typeguard click
    python benchmarks/export_architectures.py
    python benchmarks/export_architectures.py --models BiRealNet --size 64 --num-inputs 50

Prints a Markdown table and writes it to benchmarks/results/export_architectures.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bnn_keras  # noqa: E402,F401
from bnn_keras import export  # noqa: E402
from bnn_keras.export.errors import one_line  # noqa: E402
from bnn_keras.export.pitfalls import rewrite_lce_pitfalls  # noqa: E402
from bnn_keras.export.verify import check_flatbuffer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import require_larq_zoo, run_table, zoo_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export_architectures.md"
ARCHITECTURES = (
    "BinaryResNetE18", "BiRealNet", "QuickNetSmall", "QuickNet", "BinaryDenseNet28", "MeliusNet22",
    "RealToBinaryNet", "XNORNet", "DoReFaNet", "BinaryAlexNet",
)


def build(name: str, size: int) -> tf.keras.Model:
    return export.randomize_batch_norm(zoo_model(name, (size, size, 3), 1000), seed=1)


def _failure(error: Exception) -> str:
    """A verification failure in a table cell: what failed and the first wrong layer."""
    import re

    text = one_line(error)
    what = text.split(" inputs: ", 1)[-1].split(" (", 1)[0]
    layer = re.search(r"first wrong layer '([^']+)'", text)
    return f"FAIL: {what}" + (f"; first wrong layer {layer.group(1)}" if layer else "")


def _verdict(check) -> tuple[str, dict | None]:
    """("pass" / "FAIL: ...", the verification dict of a pass)."""
    try:
        return "pass", check()
    except export.ExportVerificationError as error:
        return _failure(error), None


def run_one(name: str, args: argparse.Namespace) -> dict:
    import larq_compute_engine as lce

    model = build(name, args.size)
    x = np.random.default_rng(123).standard_normal((args.num_inputs, args.size, args.size, 3)).astype(np.float32)
    row: dict = {"name": name, "params": model.count_params()}
    row["rewrites"] = len(rewrite_lce_pitfalls(model, "arm")[1])  # zero-padded bconvs on maps smaller than the kernel
    started = time.perf_counter()
    plain = lce.convert_keras_model(model)
    row["plain_s"] = time.perf_counter() - started
    row["plain_bytes"] = len(plain)
    row["plain_verdict"], _ = _verdict(
        lambda: check_flatbuffer(model, plain, "lce", x, "random", min_top1=0.99, max_abs_diff=None)
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = export.convert(model, "lce", verify_inputs=x, num_verify=len(x))
            row["verdict"] = "pass"
        except export.ExportVerificationError as error:
            row["verdict"] = _failure(error)
            result = export.convert(model, "lce", verify=False)
        except export.ExportError as error:
            row["verdict"] = f"refused: {one_line(error)[:160]}"
            result = None
    row["seconds"] = time.perf_counter() - started
    if result is not None:
        report = result.report
        row.update(
            bytes=report.file_bytes, ideal=report.ideal_bytes, ratio=report.ratio_to_ideal,
            bconv=report.op_counts.get("LceBconv2d", 0), macs=report.binary_mac_share,
        )
        v = report.verification or {}
        row["top1"] = v.get("top1_agreement")
        row["wrong"] = max((c["wrong_inputs"] for c in v.get("class_values", {}).values()), default=None)
        row["classes"] = v.get("notes", [])
    return row


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def table(rows: list[dict], args: argparse.Namespace, minutes: float) -> str:
    lines = [
        "# Export of published BNN architectures (larq-zoo 2.4.0, `weights=None`)",
        "",
        f"`python benchmarks/export_architectures.py --size {args.size} --num-inputs {args.num_inputs}` on "
        f"{platform.machine()} ({os.cpu_count()} cores), {minutes:.1f} min. Input {args.size}x{args.size}x3, "
        f"1000 classes, random trained-looking BN statistics (seed 1), {args.num_inputs} seeded N(0, 1) inputs. "
        "'LCE alone': `larq_compute_engine.convert_keras_model`, then bnn_keras' check of that file. "
        "'bnn_keras': `bnn_keras.export.convert` (pitfall rewrites, default verification: max |diff| "
        "<= 1e-4 x the output's scale on >= 90% of inputs, top-1 >= 99%). Ideal = 1 bit per binary "
        "weight + 32 bits per other parameter. Seconds: conversion and verification together, "
        "on this CPU (LCE's x86 kernels are reference kernels).",
        "",
        "| model | params | LCE alone MB | LCE alone verdict | bnn_keras MB | ideal MB | file/ideal | LceBconv2d "
        "| binary MACs | top-1 | inputs off | zero-pad rewrites | bnn_keras verdict | s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        macs = "-" if r.get("macs") is None else f"{100 * r['macs']:.1f}%"
        top1 = "-" if r.get("top1") is None else f"{100 * r['top1']:.0f}%"
        wrong = "-" if r.get("wrong") is None else f"{100 * r['wrong']:.0f}%"
        lines.append(
            f"| {r['name']} | {r['params']:,} | {_mb(r['plain_bytes'])} | {r['plain_verdict']} | "
            f"{_mb(r.get('bytes'))} | {_mb(r.get('ideal'))} | {ratio} | {r.get('bconv', '-')} | {macs} | "
            f"{top1} | {wrong} | {r['rewrites']} | {r['verdict']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--num-inputs", type=int, default=100, help="verification inputs (default 100)")
    args = parser.parse_args(argv)
    require_larq_zoo(parser)
    run_table(args.models, lambda name: run_one(name, args), lambda rows, minutes: table(rows, args, minutes), RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

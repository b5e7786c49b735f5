"""Export benchmark: file sizes, ideal sizes, fidelity and latency of the study's models.

For the MLP and VGG-10 of `bnn_keras.models` in the float, BinaryConnect and BinaryNet
variants: the ``.keras`` file, the stock TFLite (float) flatbuffer, the LCE flatbuffer
without and with the binary-dense rewrite, the ideal size (1 bit per binary weight, 32 bits
per other parameter), top-1 agreement of the LCE file with Keras, and median latency per
image (batch 1, one thread) in LCE's interpreter (LCE file) and TFLite's (TFLite file).

Weights are untrained (Glorot); BatchNormalization gets random trained-looking statistics
(seed 1) so that no pre-sign value sits at exactly 0 (see `--init-bn`). Agreement uses
seeded N(0, 1) inputs, not real images.

    PYTHONPATH=. TF_USE_LEGACY_KERAS=1 python benchmarks/export.py
    PYTHONPATH=. TF_USE_LEGACY_KERAS=1 python benchmarks/export.py --models mlp --runs 20

Prints a Markdown table and writes it to benchmarks/results/export.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bnn_keras  # noqa: E402,F401
from bnn_keras import export, models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export.md"


def build(name: str, variant: str, args: argparse.Namespace) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    if name == "mlp":
        return models.mlp((28, 28, 1), 10, hidden_units=(args.mlp_hidden,) * 3, variant=variant)
    return models.vgg10((32, 32, 3), 10, width_multiplier=args.vgg_width, variant=variant)


def keras_size(model: tf.keras.Model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.stat().st_size


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def run_one(name: str, variant: str, args: argparse.Namespace) -> dict:
    model = build(name, variant, args)
    if not args.init_bn:
        export.randomize_batch_norm(model)
    shape = tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(123).standard_normal((args.num_inputs, *shape)).astype(np.float32)
    row = {"model": name, "variant": variant, "keras": keras_size(model)}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no binary op" for float / BinaryConnect is expected
        tflite = export.convert(model, "tflite", verify=False)
        plain = export.convert(model, "lce", rewrite_dense=False, verify=False)
        lce = export.convert(model, "lce", verify_inputs=x, num_verify=len(x), min_top1=0.0)
    report, v = lce.report, lce.report.verification
    row.update(
        tflite=tflite.report.file_bytes,
        lce_plain=plain.report.file_bytes,
        lce=report.file_bytes,
        ideal=report.ideal_bytes,
        ratio=report.ratio_to_ideal,
        bconv=report.op_counts.get("LceBconv2d", 0),
        binary_bits=sum(layer.binary_params for layer in report.layers),
        binary_macs=report.binary_mac_share,
        agreement=v["top1_agreement_strict"],
        agreement_ties=v["top1_agreement"],
        max_diff=v["max_abs_diff"],
        max_ref=v["max_abs_reference"],
    )
    one = x[:1]
    row["lce_ms"] = 1e3 * export.FlatbufferRunner(lce.flatbuffer, "lce").latency(one, runs=args.runs)
    row["tflite_ms"] = 1e3 * export.FlatbufferRunner(tflite.flatbuffer, "tflite").latency(one, runs=args.runs)
    row["seconds"] = time.perf_counter() - started
    print(f"  {name}/{variant}: {row['seconds']:.0f} s", flush=True)
    return row


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| model | variant | .keras MB | TFLite float MB | LCE no rewrite MB | LCE MB | ideal MB "
        "| LCE/ideal | 1-bit weights MB | LceBconv2d | binary MACs | top-1 agreement (ties) "
        "| max abs diff | LCE ms/img | TFLite ms/img |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {mb(r['keras'])} | {mb(r['tflite'])} | "
            f"{mb(r['lce_plain'])} | {mb(r['lce'])} | {mb(r['ideal'])} | {r['ratio']:.3f} | "
            f"{mb(r['binary_bits'] / 8)} | "
            f"{r['bconv']} | {100 * r['binary_macs']:.1f}% | {100 * r['agreement']:.1f}% "
            f"({100 * r['agreement_ties']:.1f}%) | {r['max_diff']:.2g} (of {r['max_ref']:.3g}) | "
            f"{r['lce_ms']:.2f} | {r['tflite_ms']:.2f} |"
        )
    mlp = f"MLP 784-{'-'.join([str(args.mlp_hidden)] * 3)}-10"
    vgg = f"VGG-10 width x{args.vgg_width:g}, input 32x32x3"
    bn = "BN at initialisation (mean 0, variance 1)" if args.init_bn else "random trained-looking BN statistics (seed 1)"
    cpu = platform.processor() or platform.machine()
    lines += [
        "",
        f"Models: {mlp}; {vgg}. Untrained Glorot weights, {bn}. Agreement: LCE file vs Keras, "
        f"top-1 on {args.num_inputs} seeded N(0, 1) random inputs (not real images); in brackets, "
        "counting Keras outputs tied for the top as agreement. Sizes in MB = 10^6 bytes; ideal = 1 bit "
        "per binary weight + 32 bits per other parameter (BN: 4 per channel), switch flags excluded; "
        "1-bit weights = the binary weights alone at 1 bit (a floor for the binary variants).",
        f"Latency: median of {args.runs} runs, batch 1, one thread, on this machine's x86 CPU "
        f"({cpu}, {os.cpu_count()} cores shared with other jobs): LCE file in LCE's interpreter, TFLite "
        "file in TFLite's (with its default XNNPACK delegate). LCE documents its x86 kernels as "
        "reference kernels (correct, not tuned); its published speed-ups (8.5-18.5x per binary conv) "
        "are for ARM, and these x86 figures neither confirm nor refute them.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "vgg10"], choices=["mlp", "vgg10"])
    parser.add_argument("--variants", nargs="+", default=list(models.VARIANTS), choices=list(models.VARIANTS))
    parser.add_argument("--mlp-hidden", type=int, default=2048)
    parser.add_argument("--vgg-width", type=float, default=1.0)
    parser.add_argument("--num-inputs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=30, help="latency runs per file (median)")
    parser.add_argument("--init-bn", action="store_true", help="keep BN at initialisation")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = [run_one(name, variant, args) for name in args.models for variant in args.variants]
    text = table(rows, args)
    command = "PYTHONPATH=. TF_USE_LEGACY_KERAS=1 python benchmarks/export.py " + " ".join(
        a for a in sys.argv[1:]
    )
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"`{command.strip()}`\n\n{text}\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

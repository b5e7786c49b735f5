"""LCE 0.16 and large binary convolutions with a scaled kernel: where they stay float, and the split.

LCE lowers a conv to ``LceBconv2d`` only when its binarised kernel is a constant. A scaled
sign (`MagnitudeAwareSign`) is folded by TensorFlow's constant-folding hook, which skips
ops whose operands exceed 2^30 bits (2^25 float32 values); `bnn_keras.export.pitfalls`
predicts that and splits such a conv along its filters. This measures, one single-conv
model per row (seeded Glorot weights, `lce.convert_keras_model` for "raw", bnn_keras'
`export.convert` for "bnn_keras"):

- the 6x6x256x4096 conv (37.7M weights, a VGG fc6 as a conv on a 6x6x256 map) with
  ``magnitude_aware_sign`` and with ``ste_sign`` kernels;
- the limit itself: 1x1 convs with 32 filters on 1,048,575 and 1,048,576 input channels
  (Mul operands: 2^25 and 2^25 + 32 values), and with one filter on 2^25 - 3 and 2^25 - 2
  channels (Mean operands: the weights and 3 axes, 2^25 and 2^25 + 1 values); one filter
  cannot be split, so bnn_keras reports why it stays float.

Per row: file size, ideal size (1 bit per kernel weight, 32 per bias), binary ops, what
`fold_limit_pitfall` predicts, and max |LCE - Keras| on 2 seeded N(0, 1) inputs. Each
model is 134-151 MB of float weights: expect minutes and a few GB of memory.

    PYTHONPATH=. TF_USE_LEGACY_KERAS=1 python benchmarks/lce_large_conv.py [--out FILE.md]

Prints a Markdown table (and writes it to FILE.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import larq as lq  # noqa: E402
import larq_compute_engine as lce  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from larq_compute_engine.tflite.python.interpreter import Interpreter  # noqa: E402

import bnn_keras  # noqa: E402,F401
from bnn_keras import export  # noqa: E402
from bnn_keras.export.flatbuffer import flatbuffer_ops  # noqa: E402
from bnn_keras.export.pitfalls import fold_limit_pitfall  # noqa: E402

CASES = [  # (name, input (H, W, C), kernel size, filters, kernel quantiser, converter)
    ("fc6 6x6x256x4096", (6, 6, 256), 6, 4096, "magnitude_aware_sign", "raw"),
    ("fc6 6x6x256x4096", (6, 6, 256), 6, 4096, "magnitude_aware_sign", "bnn_keras"),
    ("fc6 6x6x256x4096", (6, 6, 256), 6, 4096, "ste_sign", "raw"),
    ("1x1x1048575x32 (2^25)", (1, 1, 2**20 - 1), 1, 32, "magnitude_aware_sign", "raw"),
    ("1x1x1048576x32 (2^25+32)", (1, 1, 2**20), 1, 32, "magnitude_aware_sign", "raw"),
    ("1x1x33554429x1 (2^25)", (1, 1, 2**25 - 3), 1, 1, "magnitude_aware_sign", "raw"),
    ("1x1x33554430x1 (2^25+1)", (1, 1, 2**25 - 2), 1, 1, "magnitude_aware_sign", "bnn_keras"),
]


def build(shape: tuple[int, int, int], kernel: int, filters: int, quantizer: str) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input(shape)
    conv = lq.layers.QuantConv2D(
        filters, kernel, input_quantizer="ste_sign", kernel_quantizer=quantizer,
        kernel_constraint="weight_clip", name="conv",
    )
    return tf.keras.Model(inputs, conv(inputs), name="large_conv")


def run_case(name: str, shape, kernel: int, filters: int, quantizer: str, converter: str) -> dict:
    started = time.perf_counter()
    model = build(shape, kernel, filters, quantizer)
    layer = model.get_layer("conv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if converter == "raw":
            flatbuffer, note = lce.convert_keras_model(model), ""
        else:
            result = export.convert(model, "lce", verify=False)
            flatbuffer, note = result.flatbuffer, result.report.layers[0].note
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    diff = float(np.max(np.abs(Interpreter(flatbuffer, num_threads=1).predict(x) - model(x).numpy())))
    ops = flatbuffer_ops(flatbuffer)
    weights = int(np.prod(layer.kernel.shape))
    row = dict(
        name=name, quantizer=quantizer, converter=converter, weights=weights,
        file=len(flatbuffer), ideal=weights / 8 + 4 * filters,
        bconv=ops.count("LceBconv2d"), float_conv=ops.count("CONV_2D"),
        predicted="float" if fold_limit_pitfall(layer) else "binary", diff=diff,
        seconds=time.perf_counter() - started, note=note,
    )
    print(f"  {name} {quantizer} {converter}: {row['seconds']:.0f} s", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| conv | kernel quantiser | converter | weights | file MB | ideal MB | file/ideal "
        "| LceBconv2d | CONV_2D | fold_limit_pitfall | max abs diff | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['quantizer']} | {r['converter']} | {r['weights']:,} | {r['file'] / 1e6:.2f} "
            f"| {r['ideal'] / 1e6:.2f} | {r['file'] / r['ideal']:.2f} | {r['bconv']} | {r['float_conv']} "
            f"| {r['predicted']} | {r['diff']:.3g} | {r['seconds']:.0f} |"
        )
    lines += [""] + [f"- {r['name']}, {r['quantizer']}, bnn_keras: {r['note']}" for r in rows if r["note"]]
    lines += ["", f"TensorFlow {tf.__version__}, larq {lq.__version__}, LCE {lce.__version__}, {platform.machine()}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    rows = [run_case(*case) for case in CASES]
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

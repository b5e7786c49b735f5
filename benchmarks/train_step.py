"""Train-step cost of bnn_keras' switchable quantisers and weight clips versus Larq's own.

A BinaryNet-style MLP (binary inputs and weights in every hidden layer) is built twice:
with `SwitchableSteSign` + `SwitchableWeightClip` (in the clipped phase, so both compute
the same thing, and in the vanilla phase) and with Larq's `ste_sign` + `weight_clip`. The
compiled train steps are timed interleaved, A B A B ..., so machine noise hits both alike.

    python benchmarks/train_step.py            # 3x2048 MLP, batch 100, 60 steps each
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import bnn_keras  # noqa: E402
import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bnn_keras.constraints import SwitchableWeightClip  # noqa: E402
from bnn_keras.quantizers import SwitchableSteSign  # noqa: E402


def mlp(units: int, depth: int, switchable: bool) -> tf.keras.Model:
    """BinaryNet MLP: dense(no bias) -> BN, binarised by the next layer's input quantiser."""
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((784,))
    x = inp
    for i in range(depth + 1):
        binary = dict(
            input_quantizer=SwitchableSteSign() if switchable else "ste_sign",
            kernel_quantizer=SwitchableSteSign() if switchable else "ste_sign",
            kernel_constraint=SwitchableWeightClip() if switchable else "weight_clip",
        )
        if i == 0:
            binary.pop("input_quantizer")
        x = lq.layers.QuantDense(units if i < depth else 10, use_bias=False, **binary)(x)
        x = tf.keras.layers.BatchNormalization(momentum=0.85, epsilon=1e-4)(x)
    model = tf.keras.Model(inp, x)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=tf.keras.losses.SquaredHinge())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.RandomState(0)
    x = rng.randn(args.batch_size, 784).astype("float32")
    y = np.where(np.eye(10)[rng.randint(0, 10, args.batch_size)] > 0, 1.0, -1.0).astype("float32")
    data = tf.data.Dataset.from_tensors((x, y)).repeat()

    models = {
        "larq ste_sign + weight_clip": mlp(args.units, args.depth, switchable=False),
        "bnn_keras switchable, clipped phase": mlp(args.units, args.depth, switchable=True),
        "bnn_keras switchable, vanilla phase": mlp(args.units, args.depth, switchable=True),
    }
    bnn_keras.set_clipping(models["bnn_keras switchable, clipped phase"], True)
    steps = {}
    for name, model in models.items():
        fn, it = model.make_train_function(), iter(data)
        for _ in range(args.warmup):
            fn(it)["loss"].numpy()
        steps[name] = (fn, it, [])
    for _ in range(args.steps):
        for fn, it, times in steps.values():
            start = time.perf_counter()
            fn(it)["loss"].numpy()
            times.append(time.perf_counter() - start)

    baseline = statistics.median(steps["larq ste_sign + weight_clip"][2])
    print(f"BinaryNet MLP 784-{'-'.join([str(args.units)] * args.depth)}-10, batch {args.batch_size}, "
          f"Adam, {args.steps} interleaved steps each, {os.cpu_count()} CPU cores\n")
    print("| train step | median ms | ratio to Larq |")
    print("|---|---|---|")
    for name, (_, _, times) in steps.items():
        median = statistics.median(times)
        print(f"| {name} | {median * 1e3:.1f} | {median / baseline:.3f} |")


if __name__ == "__main__":
    main()

"""Where the 3x2048 MLP's XLA train step spends its time: its matmuls against its passes over the weights.

For bnn_keras' 3x2048 MLP (the quick start's network; binaryconnect and binarynet, batch
100, Adam, squared hinge, XLA on, as "auto" picks on a CPU; the network's starting phase) it times, each as one
XLA-compiled function, interleaved round after round so machine noise hits all alike:

- step: forward, backward, Adam's update and the weight clips (what ``fit`` runs per batch);
- gradients: forward and backward only (the gradients are returned, so XLA drops nothing);
- update: Adam's update and the weight clips alone, on fixed gradients;
- matmuls: the step's matmuls alone on float inputs of the same shapes (per dense layer
  x @ W forward, dY @ W^T and x^T @ dY backward; the first layer's dY @ W^T is not needed);
- pass: one element-wise pass over every dense kernel (read it, write it scaled): the cost
  of one of the update's passes at the memory bandwidth XLA reaches here.

It prints ms per call (median over rounds) and the matmul 2048x2048 float32 GFLOP/s of the
same run (`fit_speed.matmul_gflops`, before each round), and writes
benchmarks/results/step_split.md.

    python benchmarks/step_split.py              # about 1 min on 2 cores
    python benchmarks/step_split.py --rounds 9 --calls 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import bnn_keras  # noqa: E402, F401
from bnn_keras import models as bk_models  # noqa: E402
from bnn_keras import optimizers as bk_optimizers  # noqa: E402
from fit_speed import matmul_gflops  # noqa: E402  (the same reference as fit_speed's share)

RESULTS = Path(__file__).parent / "results" / "step_split.md"
BATCH = 100
SHAPE = (28, 28, 1)
CLASSES = 10
PARTS = ("step", "gradients", "update", "matmuls", "pass")


def parts(variant: str) -> dict[str, Callable[[], object]]:
    """The five XLA functions of `variant`'s 3x2048 MLP, each compiled and run once."""
    tf.keras.utils.set_random_seed(0)
    model = bk_models.get("mlp")(SHAPE, CLASSES, variant=variant)
    optimizer = bk_optimizers.get("adam", learning_rate=1e-3)
    loss_fn = tf.keras.losses.SquaredHinge()
    x = tf.random.normal((BATCH, *SHAPE))
    y = tf.one_hot(tf.random.uniform((BATCH,), 0, CLASSES, tf.int32), CLASSES) * 2.0 - 1.0
    weights = model.trainable_variables
    optimizer.build(weights)

    def gradients() -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, weights)

    def step() -> None:
        optimizer.apply_gradients(zip(gradients(), weights))

    fixed = [tf.random.normal(w.shape, stddev=1e-3) for w in weights]
    kernels = [layer.kernel for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]
    shapes = [tuple(k.shape) for k in kernels]
    floats = [(tf.random.normal((BATCH, n)), tf.random.normal((n, m)), tf.random.normal((BATCH, m))) for n, m in shapes]

    def matmuls() -> list[tf.Tensor]:
        out = []
        for number, (a, w, dy) in enumerate(floats):
            out += [a @ w, tf.transpose(a) @ dy]
            if number:
                out.append(dy @ tf.transpose(w))
        return out

    buffers = [tf.Variable(tf.zeros(s)) for s in shapes]

    def one_pass() -> None:
        for kernel, buffer in zip(kernels, buffers):
            buffer.assign(kernel * 1.0001)

    functions = {
        "step": tf.function(step, jit_compile=True),
        "gradients": tf.function(gradients, jit_compile=True),
        "update": tf.function(lambda: optimizer.apply_gradients(zip(fixed, weights)), jit_compile=True),
        "matmuls": tf.function(matmuls, jit_compile=True),
        "pass": tf.function(one_pass, jit_compile=True),
    }
    for fn in functions.values():
        fn()
    return functions


def time_part(fn: Callable[[], object], calls: int) -> float:
    """ms per call of `fn` over `calls` calls (eager TensorFlow on a CPU returns when a call is done)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=("binaryconnect", "binarynet"),
                        default=["binaryconnect", "binarynet"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--calls", type=int, default=15, help="calls of each function per round (default 15)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error(f"--rounds and --calls must be >= 1, got {args.rounds} and {args.calls}")
    started = time.perf_counter()
    rates = [matmul_gflops()]
    rows = []
    for variant in args.variants:
        functions = parts(variant)
        times: dict[str, list[float]] = {name: [] for name in PARTS}
        for _ in range(args.rounds):
            rates.append(matmul_gflops())
            for name in PARTS:
                times[name].append(time_part(functions[name], args.calls))
        ms = {name: statistics.median(values) for name, values in times.items()}
        rows.append(f"| {variant} | " + " | ".join(f"{ms[name]:.1f}" for name in PARTS)
                    + f" | {ms['update'] / ms['pass']:.1f} | {ms['step'] - ms['gradients'] - ms['update']:+.1f} |")
        print(rows[-1], flush=True)
    command = "`python benchmarks/step_split.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])) + "`"
    text = "\n".join([
        "# Where the 3x2048 MLP's XLA train step spends its time", "",
        f"Measured by {command} on {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, batch {BATCH}, Adam, "
        f"XLA; {args.rounds} interleaved round(s) of {args.calls} calls, median; matmul 2048x2048 float32: "
        f"{statistics.median(rates):.1f} GFLOP/s (median of {len(rates)}, {min(rates):.0f}-{max(rates):.0f}); "
        f"{time.perf_counter() - started:.0f} s in all.", "",
        "| variant | step ms | gradients ms | update ms | matmuls ms | pass ms | update / pass | step - gradients - update ms |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

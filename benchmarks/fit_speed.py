"""Training speed: a plain Larq model versus bnn_keras with its speed settings off and on "auto".

For each network (the MLPs 3x2048 and 3x256 on the embedded Fashion-MNIST subset,
VGG-10 at width 1 and 0.25 on random 32x32x3 images in CIFAR-10's file format) and each
of binaryconnect and binarynet, four ways to train it, interleaved, each round starting
one later (a b c d, b c d a, c d a b, ...), so machine noise and a setting's place in the
round hit all alike:

- (a) plain Larq: the same network written with Larq's ``"ste_sign"`` and
  ``"weight_clip"``, compiled with Keras' defaults, ``model.fit`` on NumPy arrays with
  validation data, as a user would write it;
- (b) `bnn_keras.training.run` with ``jit="off"``, ``steps_per_execution=1``;
- (c) `bnn_keras.training.run` with both on "auto" (the defaults);
- (d) `bnn_keras.training.run` with ``jit="on"`` (and the "auto" block): the evidence
  for the rule "auto" follows on this machine. For VGG-10 without op determinism
  (``deterministic=False``): XLA has no deterministic MaxPool gradient. For the MLPs
  "auto" chooses exactly (d)'s settings, so their gap is this machine's noise.

ms/step is an epoch's wall time (training and validation, as `EpochClock` measures it)
over its training steps, the median of the epochs after the first (the first traces and
compiles). Useful GFLOP/s is 6 x multiply-adds per example x batch / step time (forward
2, backward 4), against a 2048x2048 float32 matmul measured in the same run, before
each round of each network: "of matmul" is the median over rounds of (c)'s rate in a
round over the matmul rate measured just before it (this shared machine's speed drifts
within a run), with the range over rounds beside it. "input"
is the time to draw one epoch's batches from bnn_keras' pipeline alone over (c)'s epoch
time: the most its training can wait for data (prefetching overlaps it).

The cost of `bnn_keras.dead_zone.DeadZoneMonitor` (for the MLPs): each variant trained
with (c)'s settings by ``model.fit`` on NumPy arrays, with the monitor on a sampled batch
of 100 training images; its ``on_epoch_end`` is timed against the epoch (`EpochClock`,
which runs before it), median over the epochs after the first (which traces), and
reported as a share of the epoch; "once" is what ``on_train_begin`` and the first
epoch's tracing add to one ``fit``. The target: at most 2% of an epoch.

    python benchmarks/fit_speed.py                # everything (about 15 min on 2 cores)
    python benchmarks/fit_speed.py --models mlp256 --rounds 3
    python benchmarks/fit_speed.py --dead-zone-only   # only the monitor's cost (about 2 min)

Prints the tables and writes benchmarks/results/fit_speed.md (``--dead-zone-only`` only
replaces that file's dead-zone section).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
import tensorflow as tf  # noqa: E402

import bnn_keras  # noqa: E402, F401
from bnn_keras import callbacks as bk_callbacks  # noqa: E402
from bnn_keras import data as bk_data  # noqa: E402
from bnn_keras import models as bk_models  # noqa: E402
from bnn_keras import speed as bk_speed  # noqa: E402
from bnn_keras import training  # noqa: E402
from bnn_keras.dead_zone import DeadZoneMonitor  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "fit_speed.md"

# name: (recipe model, model_kwargs, dataset, limit, epochs)
NETWORKS: dict[str, tuple[str, dict[str, Any], str, int | None, int]] = {
    "mlp2048": ("mlp", {"hidden_units": (2048, 2048, 2048)}, "embedded", None, 3),
    "mlp256": ("mlp", {"hidden_units": (256, 256, 256)}, "embedded", None, 4),
    "vgg10_w1": ("vgg10", {"width_multiplier": 1.0}, "cifar10", 600, 3),
    "vgg10_w025": ("vgg10", {"width_multiplier": 0.25}, "cifar10", 2200, 3),
}
VARIANTS = ("binaryconnect", "binarynet")
BATCH = 100
DEAD_ZONE_NETWORKS = ("mlp2048", "mlp256")
DEAD_ZONE_EPOCHS = 4
DEAD_ZONE_SECTION = "## DeadZoneMonitor cost"


def matmul_gflops() -> float:
    """Best of 20 2048x2048 float32 matmuls, in GFLOP/s."""
    a = tf.random.normal([2048, 2048])
    b = tf.random.normal([2048, 2048])
    f = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    f().numpy()
    best = min(_timed(lambda: f().numpy()) for _ in range(20))
    return 2 * 2048**3 / best / 1e9


def of_matmul(flop_per_step: float, ms_per_step: list[float], matmul: list[float]) -> list[float]:
    """Each round's useful rate (`flop_per_step` at that round's ms/step) over the matmul GFLOP/s measured before it."""
    return [flop_per_step / (ms / 1e3) / 1e9 / rate for ms, rate in zip(ms_per_step, matmul, strict=True)]


def rotated(keys: str, number: int) -> str:
    """`keys` in round `number`'s order: each round starts one later, so no setting always runs first or last."""
    shift = number % len(keys)
    return keys[shift:] + keys[:shift]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def macs_per_example(model: tf.keras.Model) -> int:
    """Multiply-adds of one forward pass through the dense and convolution layers."""
    total = 0
    for layer in model.submodules:
        if isinstance(layer, tf.keras.layers.Conv2D):
            kernel = int(np.prod(layer.kernel.shape))
            total += kernel * int(np.prod(layer.output_shape[1:3]))
        elif isinstance(layer, tf.keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return total


def fake_cifar10(folder: Path, examples: int) -> None:
    """Random images and labels in CIFAR-10's binary format (speed does not depend on pixels)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-examples // 5)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, size=(per_file, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / name).write_bytes(records.tobytes())


def plain_larq(model: tf.keras.Model) -> tf.keras.Model:
    """`model` rebuilt with Larq's "ste_sign" and "weight_clip" in place of bnn_keras' switchables."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            name = value.get("class_name", "")
            if name.endswith("SwitchableSteSign"):
                return "ste_sign"
            if name.endswith("SwitchableWeightClip"):
                return "weight_clip"
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    config = plain(json.loads(model.to_json()))
    return tf.keras.models.model_from_json(json.dumps(config))


def epoch_ms_per_step(rows: list[dict[str, Any]], steps: int) -> float:
    return statistics.median(row["epoch_time_s"] for row in rows[1:]) * 1e3 / steps


def run_plain(recipe: training.Recipe, arrays: tuple[np.ndarray, ...], input_shape, classes: int) -> float:
    x_fit, y_fit, x_val, y_val = arrays
    tf.keras.utils.set_random_seed(0)
    built = bk_models.get(recipe.model)(input_shape, classes, variant=recipe.variant, bn_momentum=recipe.bn_momentum,
                                        bn_epsilon=recipe.bn_epsilon, **recipe.model_kwargs)
    model = plain_larq(built)
    model.compile(optimizer=tf.keras.optimizers.Adam(recipe.lr_start), loss=tf.keras.losses.SquaredHinge(),
                  metrics=["accuracy"])
    clock = bk_callbacks.EpochClock()
    rows: list[dict[str, Any]] = []
    record = tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: rows.append(dict(logs)))
    model.fit(x_fit, y_fit, batch_size=BATCH, epochs=recipe.epochs, validation_data=(x_val, y_val),
              callbacks=[clock, record], verbose=0)
    return epoch_ms_per_step(rows, -(-len(x_fit) // BATCH))


def run_bnn(recipe: training.Recipe, steps: int) -> tuple[float, dict[str, Any]]:
    result = training.run(recipe, overwrite=True)
    return epoch_ms_per_step(result["history"], steps), result["speed"]


def arrays_for(recipe: training.Recipe) -> tuple[tuple[np.ndarray, ...], tuple[int, ...], int]:
    """The standardised arrays bnn_keras trains on, read back from its pipelines (for the plain fit)."""
    splits = bk_data.load(recipe.dataset, data_dir=recipe.data_dir, raw_dir=recipe.raw_dir, batch_size=1000,
                          validation_fraction=recipe.validation_fraction, targets="hinge", limit=recipe.limit)
    parts = []
    for ds in (splits.train, splits.validation):
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
        parts += [np.concatenate(xs), np.concatenate(ys)]
    return tuple(parts), splits.input_shape, splits.num_classes


def input_seconds(recipe: training.Recipe) -> float:
    """Seconds to draw one epoch of training batches from bnn_keras' pipeline (cache warm)."""
    splits = bk_data.load(recipe.dataset, data_dir=recipe.data_dir, raw_dir=recipe.raw_dir, batch_size=BATCH,
                          validation_fraction=recipe.validation_fraction, targets="hinge", limit=recipe.limit)
    for _ in splits.train:  # fills the cache
        pass
    return min(_timed(lambda: [None for _ in splits.train]) for _ in range(3))


class _TimedDeadZone(DeadZoneMonitor):
    """`DeadZoneMonitor` that keeps the seconds of its `on_train_begin` and each `on_epoch_end`."""

    def __init__(self, sample: Any):
        super().__init__(sample)
        self.begin_s, self.epoch_s = 0.0, []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        super().on_train_begin(logs)
        self.begin_s = time.perf_counter() - started

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        self.epoch_s.append(time.perf_counter() - started)


def dead_zone_cost(recipe: training.Recipe) -> dict[str, float]:
    """One `fit` of `recipe`'s network on bnn_keras' pipeline with (c)'s speed settings and a timed
    `DeadZoneMonitor` (seconds)."""
    splits = bk_data.load(recipe.dataset, batch_size=BATCH, validation_fraction=recipe.validation_fraction,
                          targets="hinge", limit=recipe.limit)
    input_shape, classes = splits.input_shape, splits.num_classes
    sample = next(iter(splits.train))[0]
    tf.keras.utils.set_random_seed(0)
    model = bk_models.get(recipe.model)(input_shape, classes, variant=recipe.variant, bn_momentum=recipe.bn_momentum,
                                        bn_epsilon=recipe.bn_epsilon, **recipe.model_kwargs)
    plan = bk_speed.choose(model, steps_per_epoch=len(splits.train))
    model.compile(optimizer=tf.keras.optimizers.Adam(recipe.lr_start), loss=tf.keras.losses.SquaredHinge(),
                  metrics=["accuracy"], jit_compile=plan.jit_compile, steps_per_execution=plan.steps_per_execution)
    monitor = _TimedDeadZone(sample)
    clock = bk_callbacks.EpochClock()  # first: its epoch time ends before the monitor starts
    rows: list[dict[str, Any]] = []
    record = tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: rows.append(dict(logs)))
    model.fit(splits.train, epochs=DEAD_ZONE_EPOCHS, validation_data=splits.validation,
              callbacks=[clock, monitor, record], verbose=0)
    assert "dead_zone_flipped" in rows[-1], "the monitor logged nothing"
    per_epoch = statistics.median(monitor.epoch_s[1:])
    return {"epoch_s": statistics.median(row["epoch_time_s"] for row in rows[1:]), "monitor_s": per_epoch,
            "once_s": monitor.begin_s + monitor.epoch_s[0] - per_epoch,
            "weights": sum(int(np.prod(layer.kernel.shape)) for layer in model.layers
                           if getattr(layer, "kernel_quantizer", None) is not None)}


def dead_zone_table(names: list[str], variants: list[str], rounds: int) -> str:
    """The monitor's cost per epoch for each MLP in `names` and variant, `rounds` fits each (median)."""
    lines = []
    for name in names:
        model_name, kwargs, dataset, limit, _ = NETWORKS[name]
        for variant in variants:
            recipe = training.Recipe(name=f"{name}_{variant}", dataset=dataset, model=model_name, model_kwargs=kwargs,
                                     variant=variant, bn_momentum=0.85, epochs=DEAD_ZONE_EPOCHS, batch_size=BATCH,
                                     limit=limit, verbose=0)
            fits = [dead_zone_cost(recipe) for _ in range(rounds)]
            epoch, monitor, once = (statistics.median(f[k] for f in fits) for k in ("epoch_s", "monitor_s", "once_s"))
            line = (f"| {name} | {variant} | {fits[0]['weights']:,} | {epoch * 1e3:.0f} | {monitor * 1e3:.1f} | "
                    f"{monitor / epoch:.2%} | {once * 1e3:.0f} |")
            lines.append(line)
            print(line, flush=True)
    return "\n".join([
        "| network | variant | binary weights | epoch ms | monitor ms/epoch | monitor / epoch | once ms |",
        "|---|---|---|---|---|---|---|", *lines])


def _with_dead_zone_section(text: str, section: str) -> str:
    """`text` with its dead-zone section (from its heading to the end) replaced by `section`."""
    kept = text.split(DEAD_ZONE_SECTION)[0].rstrip()
    return f"{kept}\n\n{section}" if kept else section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of a, b, c, d (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dead-zone-only", action="store_true",
                        help="measure only DeadZoneMonitor's cost per epoch (the MLPs among --models)")
    args = parser.parse_args(argv)

    tfds.disable_progress_bar()
    command = f"`{' '.join(['python benchmarks/fit_speed.py', *(argv if argv is not None else sys.argv[1:])])}`"
    dead_zone_models = [name for name in args.models if name in DEAD_ZONE_NETWORKS]
    if args.dead_zone_only:
        started = time.perf_counter()
        table = dead_zone_table(dead_zone_models, args.variants, args.rounds)
        section = _dead_zone_section(table, command, args.rounds, time.perf_counter() - started, matmul_gflops())
        old = args.out.read_text() if args.out.exists() else ""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(_with_dead_zone_section(old, section))
        print(f"\n{section}wrote {args.out}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="fit_speed_"))
    fake_cifar10(work / "raw", 2 * max(n[3] or 0 for n in NETWORKS.values()) + 1000)
    started = time.perf_counter()
    matmul = matmul_gflops()
    print(f"matmul 2048x2048 float32: {matmul:.1f} GFLOP/s", flush=True)
    lines: list[str] = []
    matmuls = [matmul]
    for name in args.models:
        model_name, kwargs, dataset, limit, epochs = NETWORKS[name]
        for variant in args.variants:
            recipe = training.Recipe(
                name=f"{name}_{variant}", dataset=dataset, model=model_name, model_kwargs=kwargs, variant=variant,
                bn_momentum=0.85 if model_name == "mlp" else 0.9, epochs=epochs, batch_size=BATCH, limit=limit,
                raw_dir=os.fspath(work / "raw") if dataset == "cifar10" else None,
                data_dir=os.fspath(work / "tfds") if dataset == "cifar10" else None, verbose=0,
            )
            arrays, shape, classes = arrays_for(recipe)
            steps = -(-len(arrays[0]) // BATCH)
            off = recipe.replace(jit="off", steps_per_execution=1, output_dir=os.fspath(work / "b"))
            auto = recipe.replace(output_dir=os.fspath(work / "c"))
            # XLA has no deterministic MaxPool gradient: VGG-10 with XLA only without op determinism
            forced = recipe.replace(jit="on", deterministic=model_name == "mlp", output_dir=os.fspath(work / "d"))
            times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
            chosen: dict[str, Any] = {}
            round_matmul: list[float] = []
            runs: dict[str, Callable[[], tuple[float, dict[str, Any]]]] = {
                "a": lambda: (run_plain(recipe, arrays, shape, classes), {}),
                "b": lambda: run_bnn(off, steps),
                "c": lambda: run_bnn(auto, steps),
                "d": lambda: run_bnn(forced, steps),
            }
            for number in range(args.rounds):
                round_matmul.append(matmul_gflops())
                for key in rotated("abcd", number):
                    ms, speed = runs[key]()
                    times[key].append(ms)
                    if key == "c":
                        chosen = speed
            a, b, c, d = (statistics.median(times[k]) for k in "abcd")
            macs = macs_per_example(bk_models.get(model_name)(shape, classes, variant=variant, **kwargs))
            gflops = 6 * macs * BATCH / (c / 1e3) / 1e9
            shares = of_matmul(6 * macs * BATCH, times["c"], round_matmul)
            matmuls += round_matmul
            waiting = input_seconds(recipe) / (c / 1e3 * steps)
            line = (f"| {name} | {variant} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} | {b / a:.2f} | {c / a:.2f} | {d / a:.2f} | "
                    f"{6 * macs * BATCH / (a / 1e3) / 1e9:.1f} | {gflops:.1f} ({statistics.median(shares):.0%}; "
                    f"{min(shares):.0%}-{max(shares):.0%}) | {waiting:.1%} | "
                    f"{'XLA' if chosen['jit_compile'] else 'no XLA'}, {chosen['steps_per_execution']} |")
            lines.append(line)
            print(line, flush=True)
    table = "\n".join([
        "| network | variant | (a) Larq ms/step | (b) off ms/step | (c) auto ms/step | (d) XLA ms/step | b/a | c/a | d/a | "
        "(a) GFLOP/s | (c) GFLOP/s (of matmul; range over rounds) | input | auto chose |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *lines])
    header = (f"Measured by {command}"
              f" on {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, batch {BATCH}, Adam, "
              f"{args.rounds} interleaved round(s), median; matmul 2048x2048 float32: {statistics.median(matmuls):.1f} "
              f"GFLOP/s (median of {len(matmuls)} measurements, {min(matmuls):.0f}-{max(matmuls):.0f}); "
              f"{time.perf_counter() - started:.0f} s in all.\n")
    dead_zone = ""
    if dead_zone_models:
        dead_started = time.perf_counter()
        dead_table = dead_zone_table(dead_zone_models, args.variants, args.rounds)
        dead_zone = "\n" + _dead_zone_section(dead_table, command, args.rounds, time.perf_counter() - dead_started,
                                               matmul)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Training speed\n\n{header}\n{table}\n{dead_zone}")
    print(f"\n{header}\n{table}\n{dead_zone}wrote {args.out}")
    return 0


def _dead_zone_section(table: str, command: str, rounds: int, seconds: float, matmul: float) -> str:
    return (f"{DEAD_ZONE_SECTION}\n\n`DeadZoneMonitor` on a sampled batch of {BATCH} training images, per epoch, "
            f"against the epoch's wall time (training and validation, (c)'s settings, {DEAD_ZONE_EPOCHS} epochs, "
            f"median of epochs 2-{DEAD_ZONE_EPOCHS} and of {rounds} fit(s)); target <= 2%. Measured by {command} on "
            f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, matmul 2048x2048 float32: {matmul:.1f} GFLOP/s; "
            f"{seconds:.0f} s.\n\n{table}\n")


if __name__ == "__main__":
    raise SystemExit(main())

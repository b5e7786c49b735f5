"""How a run compiles its train step: XLA or not, and how many steps per call into TensorFlow.

`choose(model, ...)` turns a recipe's ``jit`` and ``steps_per_execution`` settings
("auto", or an explicit choice) into a `SpeedPlan` for `model.compile`, with the reason
in words. The "auto" rule is measured, not assumed (``benchmarks/fit_speed.py``, results
in the README):

- XLA (``jit_compile=True``): on for a network without convolutions on a CPU (the
  study's 3x2048 MLP trains 2x faster here), off for a convolutional one on a CPU
  (VGG-10 is 1.6-2x *slower* with XLA on this CPU), off under a multi-replica
  `tf.distribute` strategy (not measured). On a GPU or TPU: on for every network —
  the usual finding, but no GPU was available to measure it, so that branch is the
  rule on paper.
- XLA and TensorFlow's op determinism (a recipe's default) do not mix where XLA has no
  deterministic kernel: MaxPool's gradient (VGG-10) raises UnimplementedError at the
  first step. "auto" then keeps XLA off; "on" is refused before training, in one line.
- Steps per execution: the epoch's steps, at most `AUTO_STEPS_CAP`: Keras' per-step
  Python overhead is paid once per block instead of once per step (the 3x256 MLP: 1.5x
  faster). Callbacks' batch hooks (the progress bar, the non-finite-loss check) then
  run once per block; epoch hooks are unchanged.

Neither changes what a step computes: the same losses, up to float rounding for XLA.

```python
plan = choose(model, jit="auto", steps_per_execution="auto", steps_per_epoch=45)
model.compile(optimizer, loss, jit_compile=plan.jit_compile, steps_per_execution=plan.steps_per_execution)
print(plan.describe())  # "XLA on (CPU, no convolution layers: ...); 45 steps per execution (...)"
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from bnn_keras.recipe import FIELDS, JIT_MODES

__all__ = ["AUTO_STEPS_CAP", "JIT_MODES", "SpeedPlan", "choose", "device_kind", "has_convolutions", "xla_nondeterministic_layers"]

AUTO_STEPS_CAP = 64
"""The most steps "auto" puts in one execution block (the progress bar and the non-finite check see every block)."""


@dataclasses.dataclass(frozen=True)
class SpeedPlan:
    """What `choose` picked, and why (for the run's log and summary.json)."""

    jit_compile: bool
    steps_per_execution: int
    device: str  # "CPU", "GPU" or "TPU": where the train step runs
    jit_reason: str
    steps_reason: str

    def describe(self) -> str:
        xla = "XLA on" if self.jit_compile else "XLA off"
        return f"{xla} ({self.jit_reason}); {self.steps_per_execution} step(s) per execution ({self.steps_reason})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def device_kind(strategy: tf.distribute.Strategy | None = None) -> str:
    """"TPU", "GPU" or "CPU": the kind of device the train step runs on under `strategy`."""
    strategy = strategy or tf.distribute.get_strategy()
    if "TPU" in type(strategy).__name__:
        return "TPU"
    try:
        devices = tuple(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # the default strategy has none: TensorFlow's placement decides
        return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    return "GPU" if any("GPU" in d.upper() for d in devices) else "CPU"


def has_convolutions(model: tf.keras.Model) -> bool:
    """Whether `model` (nested models included) holds a convolution layer (Larq's quantised ones too)."""
    convolution = (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D, tf.keras.layers.Conv3D,
                   tf.keras.layers.DepthwiseConv2D, tf.keras.layers.SeparableConv2D)
    return any(isinstance(m, convolution) for m in model.submodules)


def xla_nondeterministic_layers(model: tf.keras.Model) -> list[str]:
    """Names of `model`'s layers whose gradient XLA cannot compute deterministically (max pooling)."""
    pooling = (tf.keras.layers.MaxPool1D, tf.keras.layers.MaxPool2D, tf.keras.layers.MaxPool3D)
    return [m.name for m in model.submodules if isinstance(m, pooling)]


def choose(
    model: tf.keras.Model,
    *,
    jit: str = "auto",
    steps_per_execution: int | str = "auto",
    steps_per_epoch: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    deterministic: bool = False,
) -> SpeedPlan:
    """The `SpeedPlan` for training `model` under `strategy` (the current one if None).

    `jit`: "auto", "on" or "off". `steps_per_execution`: "auto" or an integer >= 1
    (a block longer than the epoch is cut to the epoch by Keras). `steps_per_epoch`
    bounds the "auto" block. `deterministic`: TensorFlow's op determinism will be on.

    Raises:
        ValueError: ``jit="on"`` with `deterministic` for a model XLA cannot train
            deterministically (`xla_nondeterministic_layers`).
    """
    FIELDS["jit"].check("jit", jit)
    FIELDS["steps_per_execution"].check("steps_per_execution", steps_per_execution)
    strategy = strategy or tf.distribute.get_strategy()
    device = device_kind(strategy)
    blocking = xla_nondeterministic_layers(model) if deterministic else []
    if jit == "on" and blocking:
        raise ValueError(
            f"jit 'on' cannot train {model.name!r} deterministically: XLA has no deterministic gradient for "
            f"max pooling ({blocking[0]}{' and more' if len(blocking) > 1 else ''}); "
            "pass --nondeterministic (deterministic=False), or --jit auto / off"
        )
    if jit != "auto":
        jit_compile, jit_reason = jit == "on", f"jit {jit!r} asked for"
    elif blocking:
        jit_compile, jit_reason = False, f"auto: max pooling ({blocking[0]}) has no deterministic XLA gradient"
    elif strategy.num_replicas_in_sync > 1:
        jit_compile, jit_reason = False, f"auto: {strategy.num_replicas_in_sync} replicas, XLA not measured with tf.distribute"
    elif device != "CPU":
        jit_compile, jit_reason = True, f"auto: {device} (rule on paper: no {device} was measured)"
    elif has_convolutions(model):
        jit_compile, jit_reason = False, "auto: CPU, convolution layers (XLA measured 1.6-2x slower on VGG-10)"
    else:
        jit_compile, jit_reason = True, "auto: CPU, no convolution layers (XLA measured 2x faster on the 3x2048 MLP)"
    if steps_per_execution != "auto":
        steps, steps_reason = int(steps_per_execution), "asked for"
    else:
        steps = max(1, min(AUTO_STEPS_CAP, steps_per_epoch or AUTO_STEPS_CAP))
        steps_reason = f"auto: the epoch's {steps_per_epoch} steps" if steps == steps_per_epoch else f"auto: at most {AUTO_STEPS_CAP}"
    return SpeedPlan(jit_compile, steps, device, jit_reason, steps_reason)

"""Make any functional or Sequential Larq model switchable: the study's schedules on a model you already have.

`make_switchable(model)` returns a copy in which every Larq sign quantiser with a clip
value becomes the matching switchable quantiser with that clip value, and every
`WeightClip` a `SwitchableWeightClip` with its range; the weights are copied. In the
phase it starts in, the copy computes what the original computes (outputs and
gradients), and it exports to the same LCE ops. Then `ClippingSchedule`, `set_clipping`
and `bnn-keras train --model-file` work on it.

| in the original | in the copy | starts (``clipped=None``) |
|---|---|---|
| ``"ste_sign"``, `lq.quantizers.SteSign(clip_value=c)`, `ClippedSteSign(c)` | `SwitchableSteSign(clip_value=c)` | clipped |
| `SteSign(clip_value=None)`, `VanillaSteSign` | `SwitchableSteSign(clip_value=1.0)` | vanilla |
| ``"magnitude_aware_sign"`` (`MagnitudeAwareSign(clip_value=c)`) | `SwitchableMagnitudeAwareSign(clip_value=c)` | clipped (vanilla for None) |
| ``"weight_clip"`` (`lq.constraints.WeightClip(c)`) | `SwitchableWeightClip(clip_value=c)` | on |
| `SwitchableSteSign`, `StochasticSteSign` (same seed), `SwitchableWeightClip` | a copy | as they are |

Other quantisers (``"approx_sign"``, ``"swish_sign"``, DoReFa, ternary, ...) have no
clipped STE to switch: they stay as they are and are listed, as are Lambda layers (their
code is not looked into) and nested subclassed models (kept as they are, shared with
the original). A model in which nothing can be switched is refused.

```python
import bnn_keras as bk

switchable, report = bk.make_switchable(model, report=True)
print(report.summary())   # "switched 5 quantisers and 2 weight clips; left 1: ..."
switchable.compile(bk.optimizers.get("adam"), loss="sparse_categorical_crossentropy")
switchable.fit(x, y, epochs=4, callbacks=[bk.callbacks.ClippingSchedule(switch_epoch=2)])
```
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import larq as lq
import tensorflow as tf

from bnn_keras._switch import Switchable, _check_flag, find_switchables, set_clipping
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import (
    ClippedSteSign,
    StochasticSteSign,
    SwitchableMagnitudeAwareSign,
    SwitchableSteSign,
    VanillaSteSign,
)

__all__ = ["NothingToSwitchError", "SwitchReport", "make_switchable"]

# Larq layer arguments that hold a quantiser, and those that hold a weight constraint.
QUANTIZER_ARGS = ("input_quantizer", "kernel_quantizer", "depthwise_quantizer", "pointwise_quantizer")
CONSTRAINT_ARGS = ("kernel_constraint", "depthwise_constraint", "pointwise_constraint")


class NothingToSwitchError(ValueError):
    """The model holds no quantiser or weight clip that `make_switchable` can convert."""


@dataclasses.dataclass
class SwitchReport:
    """What `make_switchable` did: ``switched`` and ``left`` hold ``(layer, argument, description)``."""

    switched: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    @property
    def quantizers(self) -> int:
        return sum(1 for _, argument, _ in self.switched if not argument.endswith("constraint"))

    @property
    def weight_clips(self) -> int:
        return len(self.switched) - self.quantizers

    def summary(self) -> str:
        text = f"switched {self.quantizers} quantiser(s) and {self.weight_clips} weight clip(s)"
        if self.left:
            shown = "; ".join(f"{layer} {argument}: {what}" for layer, argument, what in self.left[:5])
            more = f"; and {len(self.left) - 5} more" if len(self.left) > 5 else ""
            text += f"; left {len(self.left)} as they were ({shown}{more})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantizers": self.quantizers,
            "weight_clips": self.weight_clips,
            "switched": [list(entry) for entry in self.switched],
            "left": [list(entry) for entry in self.left],
        }


def _describe(obj: Any) -> str:
    if isinstance(obj, str):
        return repr(obj)
    name = getattr(obj, "__name__", None) or type(obj).__name__
    clip = getattr(obj, "clip_value", "none")
    return name if clip == "none" else f"{name}(clip_value={clip})"


def _clip_value(quantizer: Any) -> tuple[float, bool]:
    """The switchable's clip value, and whether the original clips its gradient."""
    clip = getattr(quantizer, "clip_value", 1.0)
    return (1.0, False) if clip is None else (float(clip), True)


def _switchable_quantizer(quantizer: Any, clipped: bool | None) -> Switchable | None:
    """The switchable twin of a quantiser object or function, or None when it has none."""
    if isinstance(quantizer, (SwitchableSteSign, SwitchableMagnitudeAwareSign)):
        start = quantizer.clipping_enabled if clipped is None else clipped
        seed = {"seed": quantizer.seed} if isinstance(quantizer, StochasticSteSign) else {}  # the same draws
        return type(quantizer)(clipped=start, clip_value=quantizer.clip_value, **seed)
    if quantizer is lq.quantizers.ste_sign:  # the function: clip value 1
        return SwitchableSteSign(clipped=True if clipped is None else clipped, clip_value=1.0)
    if isinstance(quantizer, VanillaSteSign):
        return SwitchableSteSign(clipped=False if clipped is None else clipped, clip_value=1.0)
    kind: Callable[..., Switchable] | None = None
    if type(quantizer) in (lq.quantizers.SteSign, ClippedSteSign):
        kind = SwitchableSteSign
    elif type(quantizer) is lq.quantizers.MagnitudeAwareSign:
        kind = SwitchableMagnitudeAwareSign
    if kind is None:
        return None
    clip, clips = _clip_value(quantizer)
    return kind(clipped=clips if clipped is None else clipped, clip_value=clip)


def _switchable_constraint(constraint: Any, clipped: bool | None) -> SwitchableWeightClip | None:
    if isinstance(constraint, SwitchableWeightClip):
        start = constraint.clipping_enabled if clipped is None else clipped
        return SwitchableWeightClip(clip_value=constraint.clip_value, enabled=start, glorot_range=constraint.glorot_range)
    if type(constraint) in (lq.constraints.WeightClip, lq.constraints.weight_clip):  # not a subclass of a user's
        return SwitchableWeightClip(clip_value=float(constraint.clip_value), enabled=True if clipped is None else clipped)
    return None


class _Converter:
    """Clones a model layer by layer, swapping quantisers and clips; records what it did."""

    def __init__(self, clipped: bool | None):
        self.clipped = clipped
        self.report = SwitchReport()
        self.pairs: list[tuple[tf.keras.layers.Layer, tf.keras.layers.Layer]] = []
        self.created: set[int] = set()  # the flag variables of switchables made here (no original value)

    def clone_model(self, model: tf.keras.Model) -> tf.keras.Model:
        return tf.keras.models.clone_model(model, clone_function=self.clone_layer)

    def _add(self, new: Switchable, layer: str, argument: str, original: Any) -> Switchable:
        """A switchable for a layer argument: made from a plain one, or a copy of a switchable one."""
        if isinstance(original, Switchable):
            return new  # its flag is copied with the layer's weights
        return self._made(new, layer, argument, original)

    def _made(self, switchable: Switchable, layer: str, argument: str, original: Any) -> Switchable:
        self.created.add(id(switchable.switch_variable))
        self.report.switched.append((layer, argument, f"{_describe(original)} -> {_describe(switchable)}"))
        return switchable

    def clone_layer(self, layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        if isinstance(layer, tf.keras.Model):
            if _is_graph_model(layer):
                return self.clone_model(layer)
            self.report.left.append((layer.name, "model", "a subclassed model: kept as it is (shared with the original)"))
            return layer
        if isinstance(layer, tf.keras.layers.Lambda):
            self.report.left.append((layer.name, "layer", "a Lambda layer: its code is not looked into"))
        if isinstance(layer, lq.quantizers.Quantizer):  # a quantiser used as a layer of its own
            new = _switchable_quantizer(layer, self.clipped)
            if new is not None and not isinstance(layer, Switchable):
                self.pairs.append((layer, new))
                return self._made(new, layer.name, "layer", layer)
            if not isinstance(layer, Switchable):
                self.report.left.append((layer.name, "layer", f"{_describe(layer)} has no clipped STE to switch"))
        config = layer.get_config()
        for argument in QUANTIZER_ARGS:
            original = getattr(layer, argument, None)
            if original is None or argument not in config:
                continue
            new = _switchable_quantizer(original, self.clipped)
            if new is None:
                self.report.left.append((layer.name, argument, f"{_describe(original)} has no clipped STE to switch"))
                continue
            config[argument] = self._add(new, layer.name, argument, original)
        for argument in CONSTRAINT_ARGS:
            original = getattr(layer, argument, None)
            new = _switchable_constraint(original, self.clipped) if argument in config else None
            if new is not None:
                config[argument] = self._add(new, layer.name, argument, original)
        new_layer = layer.__class__.from_config(config)
        self.pairs.append((layer, new_layer))
        return new_layer

    def copy_weights(self) -> None:
        for old, new in self.pairs:
            targets = [w for w in new.weights if id(w) not in self.created]
            values = old.get_weights()
            if len(targets) != len(values) or any(tuple(t.shape) != v.shape for t, v in zip(targets, values)):
                raise ValueError(
                    f"make_switchable could not copy the weights of layer {old.name!r}: expected "
                    f"{[v.shape for v in values]}, the copy has {[tuple(t.shape) for t in targets]}"
                )
            for target, value in zip(targets, values):
                target.assign(value)


def _is_graph_model(model: tf.keras.Model) -> bool:
    """Functional and Sequential models have a graph of layers to rebuild; subclassed ones do not."""
    return isinstance(model, tf.keras.Sequential) or getattr(model, "_is_graph_network", False)


def make_switchable(
    model: tf.keras.Model, *, clipped: bool | None = None, report: bool = False
) -> tf.keras.Model | tuple[tf.keras.Model, SwitchReport]:
    """A copy of `model` whose sign quantisers and weight clips switch between vanilla and clipped.

    `clipped` sets the phase the copy starts in: None (default) keeps each part as the
    original was (a ``"ste_sign"`` with a clip value clips, a `WeightClip` clips), True or
    False sets all. With `report`, returns ``(copy, SwitchReport)``. The copy is not compiled.

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: a subclassed top-level model (no graph of layers to rebuild).
        NothingToSwitchError: nothing in the model can be switched (the report's reasons
            are in the message).
    """
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"make_switchable expects a Keras model, got {type(model).__name__}")
    if clipped is not None:
        _check_flag("clipped", clipped)
    if not _is_graph_model(model):
        raise ValueError(
            f"make_switchable expects a functional or Sequential model, got the subclassed "
            f"{type(model).__name__!r}: it has no graph of layers to rebuild"
        )
    if not model.built:
        raise ValueError(f"make_switchable expects a built model (known input shape), got {model.name!r} unbuilt")
    converter = _Converter(clipped)
    copy = converter.clone_model(model)
    if not copy.built:
        copy.build(model.input_shape)
    if not converter.report.switched and not find_switchables(copy):
        left = "; ".join(f"{layer} {argument}: {what}" for layer, argument, what in converter.report.left[:3])
        raise NothingToSwitchError(
            f"make_switchable expected a model with Larq sign quantisers or weight clips, got {model.name!r} "
            f"with none it can switch{': ' + left if left else ''}"
        )
    converter.copy_weights()
    if clipped is not None:  # switchables copied from the original carry its phase until here
        set_clipping(copy, clipped)
    return (copy, converter.report) if report else copy

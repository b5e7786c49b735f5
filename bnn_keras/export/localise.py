"""Say where a flatbuffer departs from Keras: the first layer off beyond rounding, and why.

The file is run with its float intermediate tensors made graph outputs (the same ops and
kernels, so LCE's interpreter and TFLite's both report them), and each tensor is matched
to the top-level Keras layer it names (TFLite names tensors ``model/layer/op;...``). Every
matched layer is compared twice on the same inputs:

- *direct*: with Keras' own value of that layer;
- *replayed*: with the Keras layer (and the unmatched ones fused before it) computed from
  the file's own values of the layers that feed it.

A layer off on more than `FLIP_SHARE` of its elements even from the file's own inputs
computes something else ("wrong values": a broken kernel, or weights that differ from
Keras'). A layer right on the file's own inputs but off against Keras inherits its
difference: where that starts with inputs that agree within rounding, pre-sign values
within float rounding of 0 took the other sign ("sign flips"). A layer that cannot be
replayed (e.g. a ``TFOpLambda`` add) is judged against Keras only when it is the first to
depart: behind a layer already off it inherits that layer's difference.

Names can mislead (a fused op is named after its first layers, and names are cut at 50
characters), so a tensor off against its named layer but equal to a layer just below
holds that one's output, and a difference counts only when it reaches an output through
compared layers that are off too; anything else is not the named layer's output.

```python
found = localise(model, flatbuffer, "lce", x[:16], rtol=1e-4)
found.kind, found.layer, found.summary
# ('wrong values', 'bn_1', "first wrong layer 'bn_1' (BatchNormalization, computed in one
#  with 'bconv_1'): 100% of its elements off from the file's own inputs, max |diff| 0.732 ...")
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from bnn_keras.export.errors import ExportError, one_line
from bnn_keras.export.flatbuffer import Flatbuffer, FlatbufferRunner, parse

__all__ = ["FLIP_SHARE", "MAX_LOCALISE_BYTES", "LayerComparison", "Localisation", "expose_tensors", "localise"]

FLIP_SHARE = 0.01
"""Most share of a layer's elements off, computed from the file's own inputs, that still reads as sign flips."""

MAX_LOCALISE_BYTES = 1 << 30
"""Most memory (1 GiB) the compared values may take: inputs x (file tensors + Keras layer outputs) x 4 bytes x 2."""

_FLOAT32 = 0  # tflite::TensorType_FLOAT32


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """One Keras layer against the file tensor that holds its output, on `Localisation.num_inputs` inputs."""

    name: str
    class_name: str
    tensor: str
    scale: float  # max |Keras output| of the layer
    wrong_share: float  # elements off by more than rtol x scale, against Keras
    wrong_inputs: int  # inputs with any element off
    max_abs_diff: float
    confirmed: bool  # off, and an output or above a confirmed compared layer that is off too
    computed_with: list[str]  # the layers not compared between it and the compared ones above (fused into its op)
    replay_wrong_share: float | None  # the same against the layer computed from the file's own inputs
    replay_max_abs_diff: float | None


@dataclasses.dataclass(frozen=True)
class Localisation:
    """Where the file departs: ``kind`` is "wrong values", "sign flips", "none" or "not localised"."""

    kind: str
    layer: str | None
    summary: str  # one line
    num_inputs: int
    layers: list[LayerComparison]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _schema() -> Any:
    from tensorflow.lite.python import schema_py_generated  # the object API (ModelT) is TensorFlow's

    return schema_py_generated


def expose_tensors(flatbuffer: bytes, tensors: list[int]) -> bytes:
    """`flatbuffer` with `tensors` appended to its graph outputs; ops and weights unchanged.

    ```python
    FlatbufferRunner(expose_tensors(flatbuffer, [3, 7]), "lce").predict(x)  # [outputs..., t3, t7]
    ```
    """
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    graph = model.subgraphs[0]
    graph.outputs = [int(i) for i in graph.outputs] + [int(t) for t in tensors]
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _named_layers(tensor_name: str, parts_of: dict[str, set[str]]) -> list[tuple[str, bool]]:
    """(layer, inside one of its parts) for each top-level Keras layer a tensor name names.

    In 'model/bn_1/add;model/conv_1/ste_sign_1/Sign' conv_1 is named inside its input
    quantiser (one of its parts): that tensor is conv_1's input, not its output.
    """
    found = []
    for part in tensor_name.split(";"):
        components = part.split("/")
        for i, component in enumerate(components[:-1] or components):  # the last one is the op's name
            if component in parts_of:
                found.append((component, i + 1 < len(components) - 1 and components[i + 1] in parts_of[component]))
                break
    return found


def _layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Top-level layers with one output tensor whose value Keras can fetch (called once)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        try:
            output = layer.output
        except (AttributeError, RuntimeError, ValueError):  # shared, or never called in a graph
            continue
        if len(tf.nest.flatten(output)) == 1:
            found.append(layer)
    return found


def _match(model: tf.keras.Model, parsed: Flatbuffer) -> dict[str, int]:
    """Keras layer name -> the float activation tensor of the file that holds its output.

    A layer gets the last tensor that names it, only when no later layer is named there too
    (a fused op's output is the last fused layer's); the graph outputs are the model's.
    """
    layers = _layers(model)
    order = {layer.name: i for i, layer in enumerate(layers)}
    parts_of = {
        layer.name: {m.name for m in layer.submodules if isinstance(m, tf.keras.layers.Layer)} for layer in layers
    }
    last: dict[str, tuple[int, bool]] = {}  # layer -> (tensor, whether that tensor can be its output)
    for op in parsed.ops:
        for t in op.outputs:
            named = _named_layers(parsed.tensor_names[t], parts_of)
            if named:
                latest = max(order[name] for name, _ in named)
                for name, inside in named:
                    last[name] = (t, order[name] == latest and not inside)
    matched = {name: t for name, (t, output) in last.items() if output}
    for tensor, keras_tensor in zip(parsed.outputs, tf.nest.flatten(model.outputs)):
        layer = keras_tensor._keras_history.layer
        if layer.name in order:
            matched = {name: t for name, t in matched.items() if t != tensor}
            matched[layer.name] = tensor
    by_name = {layer.name: layer for layer in layers}
    return {
        name: t
        for name, t in matched.items()
        if parsed.tensor_types[t] == _FLOAT32 and not parsed.tensor_bytes[t] and t not in parsed.inputs
        and _fits(by_name[name].output.shape, parsed.tensor_shapes[t])
    }


def _fits(keras_shape: tf.TensorShape, tensor_shape: tuple[int, ...]) -> bool:
    """Whether a file tensor (batch 1) holds as many values per example as a Keras output (unknown sizes fit)."""
    dims = list(keras_shape)[1:]
    if any(d is None for d in dims):
        return True
    return int(np.prod(dims, dtype=np.int64)) == int(np.prod(tensor_shape[1:], dtype=np.int64))


def _replayed(
    model: tf.keras.Model, names: list[str], file_values: dict[str, np.ndarray], x: np.ndarray
) -> dict[str, Any]:
    """Each matched layer computed in Keras from the file's values of the matched layers feeding it."""
    memo: dict[str, Any] = {}

    def value(keras_tensor: Any) -> Any:
        history = keras_tensor._keras_history
        layer = history.layer
        if isinstance(layer, tf.keras.layers.InputLayer):
            return tf.constant(x)
        if layer.name in file_values:
            return tf.constant(file_values[layer.name].reshape((len(x), *keras_tensor.shape[1:])))
        return tf.nest.flatten(compute(layer))[history.tensor_index]

    def compute(layer: tf.keras.layers.Layer) -> Any:
        if layer.name not in memo:
            memo[layer.name] = layer(tf.nest.map_structure(value, layer.input))
        return memo[layer.name]

    replayed = {}
    for name in names:
        try:
            replayed[name] = np.asarray(compute(model.get_layer(name)))
        except Exception:  # a layer Keras cannot call again on its own (call arguments of the graph)
            replayed[name] = None
    return replayed


def _off(file: np.ndarray, reference: np.ndarray, rtol: float) -> tuple[float, int, float, float]:
    """(share of elements off by more than rtol x max |reference|, inputs with any, max |diff|, the scale)."""
    n = len(file)
    file, reference = file.reshape(n, -1), reference.reshape(n, -1)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    diff = np.abs(file - reference)
    off = diff > rtol * max(scale, np.finfo(np.float32).tiny)
    return float(np.mean(off)), int(np.sum(np.any(off, axis=1))), float(np.max(diff)), scale


def _consumers(model: tf.keras.Model) -> dict[str, list[str]]:
    """Per top-level layer, the layers that take its output, in layer order."""
    consumers: dict[str, list[str]] = {}
    for layer in _layers(model):
        for keras_tensor in tf.nest.flatten(layer.input):
            consumers.setdefault(keras_tensor._keras_history.layer.name, []).append(layer.name)
    return consumers


def _below(name: str, consumers: dict[str, list[str]], compared: set[str]) -> tuple[list[str], set[str]]:
    """(the layers not compared that `name`'s output reaches first, the compared layers it reaches first)."""
    between, first, stack, seen = [], set(), list(consumers.get(name, [])), set()
    while stack:
        other = stack.pop(0)
        if other in seen:
            continue
        seen.add(other)
        if other in compared:
            first.add(other)
        else:
            between.append(other)
            stack.extend(consumers.get(other, []))
    return between, first


def _above(model: tf.keras.Model, name: str, compared: set[str]) -> list[str]:
    """The layers not compared that feed `name` up to the compared ones (or the input), nearest first."""
    found, stack = [], [name]
    while stack:
        layer = model.get_layer(stack.pop(0))
        for keras_tensor in tf.nest.flatten(layer.input):
            other = keras_tensor._keras_history.layer
            if isinstance(other, tf.keras.layers.InputLayer) or other.name in compared or other.name in found:
                continue
            found.append(other.name)
            stack.append(other.name)
    return found


def _called(c: LayerComparison) -> str:
    """'bn_2' (BatchNormalization), with the layers computed in one op with it."""
    fused = f", computed in one with {', '.join(repr(n) for n in c.computed_with)}" if c.computed_with else ""
    return f"{c.name!r} ({c.class_name}{fused})"


def _verdict(layers: list[LayerComparison], n: int) -> tuple[str, str | None, str]:
    """(kind, layer, one-line summary) from the confirmed comparisons in layer order."""
    departing = [c for c in layers if c.confirmed and c.wrong_share > 0]
    for index, c in enumerate(departing):
        if c.replay_wrong_share is None and index > 0:
            continue  # not replayable (e.g. a TFOpLambda add), and fed by a layer already off: it inherits
        own = c.wrong_share if c.replay_wrong_share is None else c.replay_wrong_share
        if own > FLIP_SHARE:
            source = "against Keras" if c.replay_wrong_share is None else "from the file's own inputs"
            return "wrong values", c.name, (
                f"first wrong layer {_called(c)}: {100 * own:.0f}% of its elements off {source}, "
                f"max |diff| {c.max_abs_diff:.3g} (its scale {c.scale:.3g}) on {n} inputs: wrong values, "
                "not sign flips (a broken kernel, or weights that differ from Keras')"
            )
    for c in departing:
        return "sign flips", c.name, (
            f"sign flips from {_called(c)} on: {100 * c.wrong_share:.2g}% of its elements off "
            f"on {c.wrong_inputs} of {n} inputs, max |diff| {c.max_abs_diff:.3g} (its scale {c.scale:.3g}); "
            "each layer is right on the file's own inputs, so pre-sign values within float rounding "
            "of 0 took the other sign (e.g. behind an untrained BatchNormalization)"
        )
    return "none", None, f"every compared layer ({len(layers)}) agrees within rounding on {n} inputs"


def _budget(x: np.ndarray, parsed: Flatbuffer, tensors: list[int], layers: list[tf.keras.layers.Layer]) -> int:
    """How many of the inputs fit `MAX_LOCALISE_BYTES`, at least one."""
    values = sum(int(np.prod(parsed.tensor_shapes[t][1:], dtype=np.int64)) for t in tensors)
    values += sum(int(np.prod([d or 1 for d in layer.output.shape[1:]], dtype=np.int64)) for layer in layers)
    return max(1, min(len(x), MAX_LOCALISE_BYTES // max(values * 4 * 2, 1)))


def _values(model: tf.keras.Model, flatbuffer: bytes, target: str, x: np.ndarray) -> tuple[dict, dict, dict]:
    """(file tensor names, file values) per matched layer, and Keras' value of every layer; on x cut to the budget."""
    parsed = parse(flatbuffer)
    matched = _match(model, parsed)
    if not matched:
        raise ExportError("no float tensor of the file holds a Keras layer's output")
    layers = _layers(model)
    x = x[: _budget(x, parsed, list(matched.values()), layers)]
    extra = [t for t in matched.values() if t not in parsed.outputs]
    outputs = FlatbufferRunner(expose_tensors(flatbuffer, extra), target).predict(x)
    by_tensor = dict(zip([*parsed.outputs, *extra], outputs))
    probe = tf.keras.Model(model.inputs, [layer.output for layer in layers])
    keras = dict(zip([layer.name for layer in layers], map(np.asarray, probe.predict(x, batch_size=16, verbose=0))))
    names = [n for n in keras if n in matched and keras[n].size == by_tensor[matched[n]].size]
    values = {name: by_tensor[matched[name]] for name in names}
    return {name: parsed.tensor_names[matched[name]] for name in names}, values, keras


def _remap(file_values: dict, tensors: dict, keras: dict, consumers: dict, rtol: float) -> tuple[dict, dict]:
    """A tensor off against its named layer but equal to a layer just below it holds that one's output.

    (A fused op named after its first layers: 'dense_1/MatMul;bn_1/...' may end with a ReLU.)
    """
    remapped, names = {}, {}
    for name, value in file_values.items():
        holder = name
        if _off(value, keras[name], rtol)[0] > 0:
            between, _ = _below(name, consumers, set(file_values))
            equal = (b for b in between if keras[b].size == value.size and _off(value, keras[b], rtol)[0] == 0)
            holder = next(equal, name)
        if holder not in remapped:
            remapped[holder], names[holder] = value, tensors[name]
    return remapped, names


def localise(model: tf.keras.Model, flatbuffer: bytes, target: str, x: np.ndarray, *, rtol: float) -> Localisation:
    """Compare the file's intermediate tensors with the Keras layers they hold, on `x`.

    An element is off when |file - Keras| > `rtol` x the layer's max |Keras output|. A
    layer off against Keras counts ("confirmed") only when it is an output or a confirmed
    compared layer below it is off too: else its tensor is not its output (a fused op's
    name can mislead, or be cut at 50 characters). Never raises: a model or file it
    cannot read gives kind "not localised" and the reason.
    """
    try:
        tensors, file_values, keras = _values(model, flatbuffer, target, x)
        consumers = _consumers(model)
        file_values, tensors = _remap(file_values, tensors, keras, consumers, rtol)
        order = [layer.name for layer in _layers(model) if layer.name in file_values]
        if not order:
            raise ExportError("no float tensor of the file holds a Keras layer's output")
        n = len(file_values[order[0]])
        direct = {name: _off(file_values[name], keras[name], rtol) for name in order}
        outputs = {t._keras_history.layer.name for t in tf.nest.flatten(model.outputs)}
        confirmed: dict[str, bool] = {}
        for name in reversed(order):  # from the outputs up: a confirmation must reach an output
            below = _below(name, consumers, set(order))[1]
            off = direct[name][0] > 0
            confirmed[name] = off and (name in outputs or any(confirmed[b] for b in below))
        # The file's values feed the replay only where they are its layers' outputs.
        trusted = {name: file_values[name] for name in order if confirmed[name] or direct[name][0] == 0}
        replayed = _replayed(model, order, trusted, x[:n])
        layers = []
        for name in order:
            replay = replayed[name]
            fits = replay is not None and replay.size == file_values[name].size
            own = _off(file_values[name], replay, rtol) if fits else None
            share, inputs, diff, scale = direct[name]
            layers.append(LayerComparison(
                name=name, class_name=type(model.get_layer(name)).__name__, tensor=tensors[name], scale=scale,
                wrong_share=share, wrong_inputs=inputs, max_abs_diff=diff, confirmed=confirmed[name],
                computed_with=_above(model, name, set(order)),
                replay_wrong_share=None if own is None else own[0], replay_max_abs_diff=None if own is None else own[2],
            ))
    except Exception as error:  # localising is advice on a failure: it must not hide that failure
        reason = str(error) if isinstance(error, ExportError) else one_line(error)
        return Localisation("not localised", None, f"could not localise: {reason}", len(x), [])
    kind, layer, summary = _verdict(layers, n)
    return Localisation(kind, layer, summary, n, layers)

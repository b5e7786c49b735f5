r"""Export a Keras/Larq model to a TFLite or Larq Compute Engine (LCE) flatbuffer.

`convert` turns a model (object or saved ``.keras`` / ``.h5`` / SavedModel path) into
flatbuffer bytes, checks them against Keras in the matching interpreter, and describes
the result layer by layer; `export` does the same and writes the file atomically,
with its report beside it as ``FILE.report.json``.

- ``target="lce"``: `larq_compute_engine.convert_keras_model`. Every binary
  `QuantDense` (input *and* kernel binarised) is first rewritten as the equivalent 1x1
  binary `QuantConv2D` on a (1, 1, C) tensor, same weights: LCE lowers binary
  convolutions to ``LceBconv2d`` (1 bit per weight) but keeps binary dense layers as
  float ``FULLY_CONNECTED`` (32 bits per weight). With ±1 inputs and weights every
  partial sum is an exact integer, so the rewrite changes no output bit.
- ``target="tflite"``: stock `tf.lite.TFLiteConverter`; binary layers stay float.

```python
from bnn_keras import export, models
model = models.mlp((28, 28, 1), 10, variant="binarynet")
result = export.export(model, "mlp.tflite", target="lce", verify_inputs="embedded")
print(result.report.table())        # per layer: TFLite ops, bytes, why float
```

The command line (``bnn-keras export MODEL --target lce --out FILE``, or
``python -m bnn_keras.export``) calls `add_export_arguments` and `run_export`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import larq as lq
import numpy as np
import tensorflow as tf

from bnn_keras._switch import find_switchables

__all__ = [
    "BINARY_OPS",
    "TARGETS",
    "ConversionReport",
    "ExportError",
    "ExportResult",
    "ExportVerificationError",
    "FlatbufferRunner",
    "LayerReport",
    "add_export_arguments",
    "convert",
    "export",
    "flatbuffer_ops",
    "is_binarizing",
    "load_model",
    "main",
    "randomize_batch_norm",
    "rewrite_binary_dense",
    "run_export",
    "save",
]

TARGETS: tuple[str, ...] = ("lce", "tflite")
"""Export targets: Larq Compute Engine (binary ops) or stock TFLite (float ops only)."""

LCE_TARGETS: tuple[str, ...] = ("arm", "xcore")
"""Hardware targets Larq Compute Engine's converter knows."""

BINARY_OPS: tuple[str, ...] = ("LceBconv2d", "LceBMaxPool2d")
"""LCE ops that compute on bit-packed tensors (1 bit per weight or activation)."""

ModelLike = Union[tf.keras.Model, str, os.PathLike]
VerifyInputs = Union[np.ndarray, str, os.PathLike, None]

_SIGN_QUANTIZERS = (lq.quantizers.SteSign, lq.quantizers.ApproxSign, lq.quantizers.SwishSign)
# MagnitudeAwareSign is sign(w) times a per-channel scale, which LCE folds into its multiplier.
_SIGN_KERNEL_QUANTIZERS = (*_SIGN_QUANTIZERS, lq.quantizers.MagnitudeAwareSign)
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_TFLITE_INT8 = 9  # tflite::TensorType_INT8
_TIE_RTOL = 1e-5  # Keras outputs this close (relative) to the top one count as tied for top-1


class ExportError(ValueError):
    """The model cannot be read or converted, or an option is invalid (one-line message)."""


class ExportVerificationError(ExportError):
    """The flatbuffer's outputs disagree with Keras beyond the allowed threshold."""


# --------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike) -> tf.keras.Model:
    """Load a saved Keras model (``.keras`` in safe mode, ``.h5``, SavedModel directory).

    Importing `bnn_keras` registers its quantisers and constraints and Larq's layers, so
    models built from them load without ``custom_objects``.

    ```python
    model = load_model("runs/mlp/model.keras")
    ```

    Raises:
        ExportError: the path is missing or holds no readable Keras model (one line).
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"no such model file or directory: {str(path)!r}")
    with contextlib.suppress(ModuleNotFoundError):
        importlib.import_module("bnn_keras.models")  # registers any custom layers it defines
    is_saved_model = path.is_dir() and (path / "saved_model.pb").exists()
    if not is_saved_model and (path.is_dir() or path.suffix.lower() not in _KERAS_SUFFIXES):
        raise ExportError(
            f"{str(path)!r} is not a Keras model: expected a .keras or .h5 file or a "
            "SavedModel directory"
        )
    kwargs: dict[str, Any] = {"compile": False}
    if path.suffix.lower() == ".keras":
        kwargs["safe_mode"] = True
    try:
        model = tf.keras.models.load_model(str(path), **kwargs)
    except Exception as error:  # Keras raises many types for a corrupt file
        raise ExportError(
            f"cannot load a Keras model from {str(path)!r}: {_one_line(error)}"
        ) from None
    if not isinstance(model, tf.keras.Model):
        raise ExportError(f"{str(path)!r} holds a {type(model).__name__}, not a Keras model")
    return model


def _as_model(model_or_path: ModelLike) -> tf.keras.Model:
    if isinstance(model_or_path, tf.keras.Model):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path)
    raise ExportError(
        f"expected a tf.keras.Model or a path to a saved model, got {type(model_or_path).__name__}"
    )


# --------------------------------------------------------------------------- binary layers


def is_binarizing(quantizer: Any, *, kernel: bool = False) -> bool:
    """Whether a Larq quantiser (object or name) binarises with a sign LCE can lower.

    Sign-type quantisers count: `SteSign` and its subclasses (bnn_keras'
    `VanillaSteSign`, `ClippedSteSign`, `SwitchableSteSign`), `ApproxSign`, `SwishSign`,
    and for kernels `MagnitudeAwareSign`. `SteHeaviside` (0/1) and `NoOp` do not.

    ```python
    is_binarizing("ste_sign"), is_binarizing("switchable_ste_sign"), is_binarizing(None)
    # (True, True, False)
    ```
    """
    if quantizer is None:
        return False
    if isinstance(quantizer, (str, dict)):
        try:
            quantizer = lq.quantizers.get(quantizer)
        except ValueError:
            return False
    return isinstance(quantizer, _SIGN_KERNEL_QUANTIZERS if kernel else _SIGN_QUANTIZERS)


def _kernel_quantizer(layer: tf.keras.layers.Layer) -> Any:
    for attribute in ("kernel_quantizer", "depthwise_quantizer"):
        if hasattr(layer, attribute):
            return getattr(layer, attribute)
    return None


def _binary_input(layer: tf.keras.layers.Layer) -> bool:
    return is_binarizing(getattr(layer, "input_quantizer", None))


def _binary_kernel(layer: tf.keras.layers.Layer) -> bool:
    return is_binarizing(_kernel_quantizer(layer), kernel=True)


def _has_kernel(layer: tf.keras.layers.Layer) -> bool:
    return any(getattr(layer, a, None) is not None for a in ("kernel", "depthwise_kernel"))


def _leaf_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Layers of `model` in order, nested models flattened, input layers dropped."""
    found: list[tf.keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(_leaf_layers(layer))
        elif not isinstance(layer, tf.keras.layers.InputLayer):
            found.append(layer)
    return found


# --------------------------------------------------------------------------- dense rewrite


class _BinaryDenseAsConv(tf.keras.layers.Layer):
    """A binary `QuantDense` computed as a 1x1 binary `QuantConv2D` on a (1, 1, C) tensor.

    Shares the dense layer's quantiser objects and copies its kernel (C, U) -> (1, 1, C, U)
    and bias. Keeps the dense layer's name, so flatbuffer tensors still name that layer.
    Used only for conversion, never saved.
    """

    def __init__(self, dense: lq.layers.QuantDense):
        super().__init__(name=dense.name, dtype=dense.dtype)
        self.units = int(dense.units)
        self._dense = dense
        # Larq logs "starved weights" for a binary kernel without constraint: irrelevant here.
        larq_log = logging.getLogger("larq.layers_base")
        level = larq_log.level
        larq_log.setLevel(logging.ERROR)
        try:
            self.conv = lq.layers.QuantConv2D(
                self.units,
                1,
                input_quantizer=dense.input_quantizer,
                kernel_quantizer=dense.kernel_quantizer,
                use_bias=dense.use_bias,
                activation=dense.activation,
                name="conv1x1",
            )
        finally:
            larq_log.setLevel(level)

    def build(self, input_shape: tf.TensorShape) -> None:
        channels = int(input_shape[-1])
        self.conv.build(tf.TensorShape([None, 1, 1, channels]))
        self.conv.kernel.assign(tf.reshape(self._dense.kernel, (1, 1, channels, self.units)))
        if self._dense.use_bias:
            self.conv.bias.assign(self._dense.bias)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        outputs = self.conv(tf.reshape(inputs, (-1, 1, 1, inputs.shape[-1])))
        return tf.reshape(outputs, (-1, self.units))


def _dense_rewrite_blocker(layer: tf.keras.layers.Layer) -> str | None:
    """Why a binary QuantDense cannot be rewritten, or None when it can."""
    try:
        shape = layer.input_shape
    except (AttributeError, RuntimeError):
        return "its input shape is unknown"
    if isinstance(shape, list):
        return "it is called on several inputs"
    if len(shape) != 2 or shape[-1] is None:
        return f"only rank-2 inputs with known width are rewritten, its input is {tuple(shape)}"
    return None


def rewrite_binary_dense(model: tf.keras.Model) -> tuple[tf.keras.Model, list[str], dict[str, str]]:
    """Rebuild `model` with every binary `QuantDense` as an equivalent 1x1 binary conv.

    Other layers are reused (shared weights), nested functional and Sequential models
    are rebuilt recursively. Returns the new model, the names of the rewritten layers,
    and for binary dense layers left alone, why.

    ```python
    rewritten, names, skipped = rewrite_binary_dense(model)
    np.testing.assert_array_equal(rewritten(x), model(x))   # exact: ±1 sums are integers
    ```
    """
    rewritten: list[str] = []
    skipped: dict[str, str] = {}

    def candidates(m: tf.keras.Model) -> list[tf.keras.layers.Layer]:
        return [
            layer
            for layer in _leaf_layers(m)
            if isinstance(layer, lq.layers.QuantDense) and _binary_input(layer) and _binary_kernel(layer)
        ]

    def clone(m: tf.keras.Model) -> tf.keras.Model:
        def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
            if isinstance(layer, tf.keras.Model):
                return clone(layer) if candidates(layer) else layer
            if layer in targets:
                blocker = _dense_rewrite_blocker(layer)
                if blocker is None:
                    rewritten.append(layer.name)
                    return _BinaryDenseAsConv(layer)
                skipped[layer.name] = blocker
            return layer

        try:
            return tf.keras.models.clone_model(m, clone_function=clone_layer)
        except ValueError:  # a subclassed model: no graph of layers to rebuild
            for layer in candidates(m):
                rewritten[:] = [name for name in rewritten if name != layer.name]
                skipped[layer.name] = "the model is subclassed, so its graph cannot be rebuilt"
            return m

    targets = candidates(model)
    if not targets:
        return model, [], {}
    new_model = clone(model)
    return new_model, rewritten, skipped


# --------------------------------------------------------------------------- flatbuffer


def _schema() -> Any:
    """The TFLite flatbuffer schema bindings: TensorFlow's, else the copy LCE ships."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:  # pragma: no cover - depends on the TensorFlow build
        from larq_compute_engine.mlir.python import tflite_schema as schema
    return schema


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Flatbuffer:
    ops: list[_Op]
    tensor_names: list[str]
    tensor_bytes: list[int]  # bytes of constant data behind each tensor (0 for activations)
    tensor_buffers: list[int]
    tensor_shapes: list[tuple[int, ...]]
    tensor_types: list[int]  # TFLite TensorType codes (0 float32, 9 int8)
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def _parse(flatbuffer: bytes) -> _Flatbuffer:
    schema = _schema()
    if len(flatbuffer) < 8 or flatbuffer[4:8] != b"TFL3":
        raise ExportError("not a TFLite flatbuffer (no TFL3 identifier)")
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    op_names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        custom = code.CustomCode()
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        op_names.append(custom.decode() if custom else builtin_names.get(builtin, str(builtin)))
    buffer_bytes = []
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        # Models over 2 GB keep buffers after the flatbuffer (offset/size) instead of inline.
        buffer_bytes.append(int(buffer.DataLength() or buffer.Size()))
    if model.SubgraphsLength() != 1:
        raise ExportError(f"expected one subgraph, the flatbuffer has {model.SubgraphsLength()}")
    graph = model.Subgraphs(0)
    names, sizes, buffers, shapes, types = [], [], [], [], []
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        types.append(int(tensor.Type()))
        names.append((tensor.Name() or b"").decode(errors="replace"))
        shapes.append(tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ())
        buffers.append(int(tensor.Buffer()))
        sizes.append(buffer_bytes[tensor.Buffer()] if tensor.Buffer() < len(buffer_bytes) else 0)
    ops = []
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        ops.append(
            _Op(
                name=op_names[op.OpcodeIndex()],
                inputs=tuple(int(i) for i in op.InputsAsNumpy()) if op.InputsLength() else (),
                outputs=tuple(int(i) for i in op.OutputsAsNumpy()) if op.OutputsLength() else (),
            )
        )
    inputs = tuple(int(i) for i in graph.InputsAsNumpy()) if graph.InputsLength() else ()
    outputs = tuple(int(i) for i in graph.OutputsAsNumpy()) if graph.OutputsLength() else ()
    return _Flatbuffer(ops, names, sizes, buffers, shapes, types, inputs, outputs)


def flatbuffer_ops(flatbuffer: bytes) -> list[str]:
    """The op names of a TFLite flatbuffer in execution order (builtin or custom, e.g. LCE's).

    ```python
    flatbuffer_ops(lce.convert_keras_model(model))  # ['LceQuantize', 'LceBconv2d', ...]
    ```
    """
    return [op.name for op in _parse(flatbuffer).ops]


# --------------------------------------------------------------------------- interpreters


class FlatbufferRunner:
    """Runs a flatbuffer one image at a time: LCE's interpreter for ``"lce"``, TFLite's else.

    Stock TFLite cannot run LCE ops; LCE's interpreter runs both kinds. Inputs and outputs
    are float; int8 model I/O is quantised and dequantised with the model's own scales.

    ```python
    runner = FlatbufferRunner(result.flatbuffer, "lce")
    logits = runner.predict(x)                  # (N, classes), float32
    seconds = runner.latency(x[:1], runs=50)    # median per image
    ```
    """

    def __init__(self, flatbuffer: bytes, target: str, *, num_threads: int = 1):
        _check_target(target)
        self.target = target
        if target == "lce":
            from larq_compute_engine.tflite.python.interpreter import Interpreter

            self._lce = Interpreter(flatbuffer, num_threads=num_threads)
            self._input_q = (self._lce.input_types[0], self._lce.input_scales[0], self._lce.input_zero_points[0])
            self._output_q = [
                (t, s, z)
                for t, s, z in zip(
                    self._lce.output_types, self._lce.output_scales, self._lce.output_zero_points
                )
            ]
            if len(self._lce.input_shapes) != 1:
                raise ExportError("verification supports single-input models only; use verify=False")
        else:
            with warnings.catch_warnings():
                # Its successor (ai_edge_litert) is not a dependency; the warning is noise here.
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                self._tfl = tf.lite.Interpreter(model_content=flatbuffer, num_threads=num_threads)
            self._tfl.allocate_tensors()
            inputs = self._tfl.get_input_details()
            if len(inputs) != 1:
                raise ExportError("verification supports single-input models only; use verify=False")
            self._input = inputs[0]
            self._outputs = self._tfl.get_output_details()
            scale, zero = self._input["quantization"]
            self._input_q = (self._input["dtype"], scale, zero)
            self._output_q = [(d["dtype"], *d["quantization"]) for d in self._outputs]

    @staticmethod
    def _quantize(x: np.ndarray, spec: tuple) -> np.ndarray:
        dtype, scale, zero = spec
        if np.dtype(dtype) == np.int8:
            q = np.round(x / scale + zero)
            return np.clip(q, -128, 127).astype(np.int8)
        return x.astype(np.float32)

    @staticmethod
    def _dequantize(y: np.ndarray, spec: tuple) -> np.ndarray:
        dtype, scale, zero = spec
        if np.dtype(dtype) == np.int8:
            return (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def _invoke(self, x1: np.ndarray) -> list[np.ndarray]:
        if self.target == "lce":
            outputs = self._lce.interpreter.predict([x1])
        else:
            self._tfl.set_tensor(self._input["index"], x1)
            self._tfl.invoke()
            outputs = [self._tfl.get_tensor(d["index"]) for d in self._outputs]
        return list(outputs)

    def predict(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs (float32) for a batch, as a list with one array per model output."""
        x = self._quantize(np.asarray(x, dtype=np.float32), self._input_q)
        per_image = [self._invoke(x[i : i + 1]) for i in range(len(x))]
        return [
            self._dequantize(np.concatenate([outs[k] for outs in per_image]), spec)
            for k, spec in enumerate(self._output_q)
        ]

    def latency(self, x1: np.ndarray, *, runs: int = 50, warmup: int = 3) -> float:
        """Median seconds per invocation on one image (batch 1)."""
        x1 = self._quantize(np.asarray(x1, dtype=np.float32)[:1], self._input_q)
        for _ in range(warmup):
            self._invoke(x1)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self._invoke(x1)
            times.append(time.perf_counter() - start)
        return float(np.median(times))


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class LayerReport:
    """What one Keras layer became in the flatbuffer."""

    name: str
    kind: str
    ops: list[str]
    bytes: int
    params: int
    binary_params: int
    ideal_bytes: float
    binary: bool
    note: str = ""


@dataclasses.dataclass
class ConversionReport:
    """Per-layer ops and bytes, size totals against the ideal, and the fidelity check."""

    target: str
    lce_target: str | None
    model_name: str
    layers: list[LayerReport]
    file_bytes: int
    ideal_bytes: float
    binary_mac_share: float
    op_counts: dict[str, int]
    options: dict[str, Any]
    rewritten_dense: list[str] = dataclasses.field(default_factory=list)
    unattributed_bytes: int = 0
    verification: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def layer_bytes(self) -> int:
        """Constant bytes attributed to Keras layers (weights, packed or float)."""
        return sum(layer.bytes for layer in self.layers)

    @property
    def ratio_to_ideal(self) -> float:
        """File size over the ideal size (1 bit per binary weight, 32 per other parameter)."""
        return self.file_bytes / self.ideal_bytes if self.ideal_bytes else float("nan")

    @property
    def binary_ops(self) -> int:
        return sum(self.op_counts.get(name, 0) for name in BINARY_OPS)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(
            layer_bytes=self.layer_bytes,
            ratio_to_ideal=round(self.ratio_to_ideal, 4),
            binary_ops=self.binary_ops,
        )
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def table(self) -> str:
        """The report as a Markdown table plus totals, for printing."""
        rows = [
            "| layer | type | TFLite ops | bytes | ideal bytes | binary | note |",
            "|---|---|---|---:|---:|---|---|",
        ]
        for layer in self.layers:
            ops = ", ".join(_compress(layer.ops)) or "-"
            rows.append(
                f"| {layer.name} | {layer.kind} | {ops} | {layer.bytes:,} | "
                f"{layer.ideal_bytes:,.0f} | {'yes' if layer.binary else 'no'} | {layer.note} |"
            )
        target = f"lce ({self.lce_target})" if self.lce_target else self.target
        lines = [f"{self.model_name} -> {target}", "", *rows, ""]
        lines.append(
            f"file {self.file_bytes:,} B (layers {self.layer_bytes:,} B, other constants "
            f"{self.unattributed_bytes:,} B, flatbuffer structure "
            f"{self.file_bytes - self.layer_bytes - self.unattributed_bytes:,} B); "
            f"ideal {self.ideal_bytes:,.0f} B; file/ideal {self.ratio_to_ideal:.2f}x"
        )
        lines.append(
            f"binary ops {self.binary_ops}; binary MACs {100 * self.binary_mac_share:.1f}% of all MACs; "
            f"ops: {', '.join(f'{k} x{v}' for k, v in sorted(self.op_counts.items()))}"
        )
        if self.rewritten_dense:
            lines.append(f"dense layers rewritten as 1x1 binary convs: {', '.join(self.rewritten_dense)}")
        if self.verification:
            v = self.verification
            lines.append(
                f"verified on {v['num_inputs']} {v['inputs']} inputs: max |diff| {v['max_abs_diff']:.3g}, "
                f"top-1 agreement {100 * v['top1_agreement']:.1f}% "
                f"({100 * v['top1_agreement_strict']:.1f}% counting tied Keras outputs as misses)"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _compress(ops: Sequence[str]) -> list[str]:
    """['A', 'B', 'B'] -> ['A', 'B x2'], keeping first-seen order."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return [name if n == 1 else f"{name} x{n}" for name, n in counts.items()]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tf.dtypes.DType):
        return value.name
    return str(value)


def _layer_of(tensor_name: str, known: set[str], model_name: str) -> list[str]:
    """Keras layer names in a TFLite tensor name like 'model/conv_1/Conv2D;model/bn_1/...'."""
    found = []
    for part in tensor_name.split(";"):
        components = part.split("/")
        if components and components[0] == model_name:
            components = components[1:]
        for component in components[:-1] or components:
            if component in known:
                if component not in found:
                    found.append(component)
                break
    return found


def _float_reason(layer: tf.keras.layers.Layer, target: str, lce_target: str, skipped: dict[str, str], rewrite_dense: bool) -> str:
    """Why a layer with a kernel stayed a float op."""
    binary_input, binary_kernel = _binary_input(layer), _binary_kernel(layer)
    if not binary_input and not binary_kernel:
        return "input and kernel not binarised"
    if target == "tflite":
        return "stock TFLite has no binary ops: binary layers stay float (use target='lce')"
    if not binary_input:
        return "input not binarised (binary weights alone run as a float op)"
    if not binary_kernel:
        return "kernel not binarised"
    if isinstance(layer, lq.layers.QuantDense):
        if not rewrite_dense:
            return "binary dense layer not rewritten (rewrite_dense=False): LCE keeps dense float"
        return f"binary dense layer not rewritten: {skipped.get(layer.name, 'unknown reason')}"
    if not isinstance(layer, lq.layers.QuantConv2D):
        return f"LCE has no binary kernel for {type(layer).__name__}"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "LCE needs channels_last"
    groups = int(getattr(layer, "groups", 1) or 1)
    channels = int(layer.kernel.shape[-2]) * groups
    if groups > 1 and channels and (channels // groups) % 32:
        return (
            f"grouped binary conv needs a multiple of 32 input channels per group "
            f"(has {channels // groups})"
        )
    pad_values = float(tf.keras.backend.get_value(getattr(layer, "pad_values", 0.0)))
    if layer.padding == "same" and pad_values != 1.0 and lce_target != "arm":
        return f"SAME padding with pad_values={pad_values:g} is unsupported on {lce_target}; use pad_values=1.0"
    return "LCE kept it float (no rule matched; see the LCE converter's log)"


_FILTER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "LceBconv2d")


def _filter_shape(op: _Op, parsed: _Flatbuffer) -> tuple[int, ...] | None:
    """The shape of a weight-carrying op's constant filter, else None."""
    if op.name not in _FILTER_OPS or len(op.inputs) < 2:
        return None
    index = op.inputs[1]
    if index < 0 or not parsed.tensor_bytes[index]:
        return None
    return parsed.tensor_shapes[index]


def _kernel_fits(layer: tf.keras.layers.Layer, filter_shape: tuple[int, ...]) -> bool:
    """Whether a flatbuffer filter (OHWI, packed OHW[I/32], depthwise 1HW[I*M], FC OI) is `layer`'s."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        depthwise = getattr(layer, "depthwise_kernel", None)
        if depthwise is None:
            return False
        h, w, i, m = (int(d) for d in depthwise.shape)
        return filter_shape == (1, h, w, i * m)
    shape = tuple(int(d) for d in kernel.shape)
    if len(shape) == 2:
        shape = (1, 1, *shape)
    if len(shape) != 4:
        return False
    h, w, i, o = shape
    if len(filter_shape) == 2:
        return filter_shape == (o, h * w * i)
    return len(filter_shape) == 4 and filter_shape[:3] == (o, h, w) and filter_shape[3] in (i, -(-i // 32))


def _parameter_bits(model: tf.keras.Model) -> dict[str, tuple[int, int, float]]:
    """Per layer: (parameters, binary parameters, ideal bits); switch flags excluded."""
    flags = {id(s.switch_variable) for s in find_switchables(model)}
    seen: set[int] = set()
    result = {}
    for layer in _leaf_layers(model):
        binary_kernel = getattr(_kernel_quantizer(layer), "precision", 32) == 1 and not isinstance(
            _kernel_quantizer(layer), lq.quantizers.NoOp
        )
        kernels = {id(getattr(layer, a, None)) for a in ("kernel", "depthwise_kernel")}
        params = binary = 0
        for weight in layer.weights:
            if id(weight) in flags or id(weight) in seen:
                continue
            seen.add(id(weight))
            count = int(np.prod(weight.shape))
            params += count
            if binary_kernel and id(weight) in kernels:
                binary += count
        result[layer.name] = (params, binary, binary + 32.0 * (params - binary))
    return result


def _binary_mac_share(model: tf.keras.Model) -> float:
    """1-bit MACs over all MACs, from Larq's `ModelProfile`, without bnn_keras' flags.

    Larq counts every non-bias weight of a MAC layer as a kernel, so each scalar
    switch flag would add one 32-bit "MAC" per output pixel; those are taken out.
    """
    flags = {id(s.switch_variable) for s in find_switchables(model)}

    def flag_macs(profile: Any, m: tf.keras.Model) -> int:
        total = 0
        for layer_profile, layer in zip(profile.layer_profiles, m.layers):
            if isinstance(layer, tf.keras.Model):
                total += flag_macs(layer_profile, layer)
            elif layer_profile.op_profiles:
                n_flags = sum(id(w) in flags for w in layer.weights)
                total += n_flags * int(layer_profile.output_pixels or 0)
        return total

    try:
        profile = lq.models.ModelProfile(model)
        total = profile.op_count("mac") - flag_macs(profile, model)
        return profile.op_count("mac", 1) / total if total > 0 else 0.0
    except Exception:  # profiles need static shapes; the share is informative only
        return float("nan")


def _build_report(
    model: tf.keras.Model,
    converted_model: tf.keras.Model,
    flatbuffer: bytes,
    *,
    target: str,
    lce_target: str,
    rewrite_dense: bool,
    rewritten: list[str],
    skipped: dict[str, str],
    options: dict[str, Any],
) -> ConversionReport:
    parsed = _parse(flatbuffer)
    layers = _leaf_layers(model)
    by_name = {layer.name: layer for layer in layers}
    ops_of: dict[str, list[str]] = {name: [] for name in by_name}
    bytes_of: dict[str, int] = {name: 0 for name in by_name}
    fused_into: dict[str, str] = {}
    output_layers = [t._keras_history.layer.name for t in tf.nest.flatten(model.outputs)]
    kernel_layers = [layer for layer in layers if _has_kernel(layer)]
    with_kernel_op: set[str] = set()
    counted: set[int] = set()
    unattributed = 0
    for op in parsed.ops:
        named = list(op.outputs)
        if op.name in BINARY_OPS and op.inputs:
            # A binary op may write bit-packed output named after the *next* layer's input
            # quantiser; its own input is named after this layer's quantiser.
            named = [op.inputs[0], *named]
        candidates: list[str] = []
        for t in named:
            for name in _layer_of(parsed.tensor_names[t], set(by_name), converted_model.name):
                if name not in candidates:
                    candidates.append(name)
        filter_shape = _filter_shape(op, parsed)
        owner = None
        if filter_shape is not None:
            # Fused names can lead with an activation, or be cut off (TFLite keeps 50
            # characters), or be a graph output's: match the weights to a Keras kernel.
            fits = [
                layer.name
                for layer in kernel_layers
                if layer.name not in with_kernel_op and _kernel_fits(layer, filter_shape)
            ]
            owner = next((n for n in candidates if n in fits), fits[0] if fits else None)
            if owner is not None:
                with_kernel_op.add(owner)
        if owner is None and candidates:
            # Constants belong to a layer with weights (a BN's beta in 'relu/Relu;bn/add').
            owner = next((n for n in candidates if by_name[n].weights), candidates[0])
        if owner is None and any(t in parsed.outputs for t in op.outputs):
            owner = next((n for n in output_layers if n in by_name), None)  # names lost
        constant = 0
        for t in op.inputs:
            if t >= 0 and parsed.tensor_bytes[t] and parsed.tensor_buffers[t] not in counted:
                counted.add(parsed.tensor_buffers[t])
                constant += parsed.tensor_bytes[t]
        if owner is None:
            unattributed += constant
            continue
        ops_of[owner].append(op.name)
        bytes_of[owner] += constant
        for other in candidates:
            if other != owner:
                fused_into.setdefault(other, owner)

    bits = _parameter_bits(model)
    reports = []
    for layer in layers:
        params, binary_params, ideal_bits = bits[layer.name]
        ops = ops_of[layer.name]
        binary = any(op in BINARY_OPS for op in ops)
        note = ""
        if layer.name in rewritten and binary:
            note = "binary dense rewritten as a 1x1 LceBconv2d"
        elif _has_kernel(layer) and not binary:
            note = _float_reason(layer, target, lce_target, skipped, rewrite_dense)
        elif not ops:
            note = (
                f"fused into {fused_into[layer.name]}"
                if layer.name in fused_into
                else "no op of its own (folded into a neighbouring op, or identity at inference)"
            )
        reports.append(
            LayerReport(
                name=layer.name,
                kind=type(layer).__name__,
                ops=ops,
                bytes=bytes_of[layer.name],
                params=params,
                binary_params=binary_params,
                ideal_bytes=ideal_bits / 8.0,
                binary=binary,
                note=note,
            )
        )
    op_counts: dict[str, int] = {}
    for op in parsed.ops:
        op_counts[op.name] = op_counts.get(op.name, 0) + 1
    notes = []
    if target == "tflite":
        notes.append("stock TFLite has no binary ops: every binary layer runs as a float op")
    for kind, requested, tensors in (
        ("input", options.get("inference_input_type"), parsed.inputs),
        ("output", options.get("inference_output_type"), parsed.outputs),
    ):
        if requested == "int8" and any(parsed.tensor_types[t] != _TFLITE_INT8 for t in tensors):
            notes.append(
                f"int8 {kind} requested but the flatbuffer's {kind} is not int8: LCE needs "
                "quantisation statistics (fake-quant ops or experimental_default_int8_range)"
            )
    return ConversionReport(
        target=target,
        lce_target=lce_target if target == "lce" else None,
        model_name=model.name,
        layers=reports,
        file_bytes=len(flatbuffer),
        ideal_bytes=sum(r.ideal_bytes for r in reports),
        binary_mac_share=_binary_mac_share(model),
        op_counts=op_counts,
        options=options,
        rewritten_dense=list(rewritten),
        unattributed_bytes=unattributed,
        notes=notes,
    )


# --------------------------------------------------------------------------- verification


def _verification_inputs(
    verify_inputs: VerifyInputs, model: tf.keras.Model, num_verify: int, seed: int
) -> tuple[np.ndarray, str]:
    """(inputs, description): an array, a .npy file, a dataset name, or seeded N(0, 1) noise."""
    shape = tuple(model.inputs[0].shape[1:]) if len(model.inputs) == 1 else None
    if shape is None:
        raise ExportError("verification supports single-input models only; use verify=False")
    if verify_inputs is None:
        if any(d is None for d in shape):
            raise ExportError(f"cannot draw random inputs for the unknown input shape {shape}")
        rng = np.random.default_rng(seed)
        return rng.standard_normal((num_verify, *shape)).astype(np.float32), "random N(0,1)"
    if isinstance(verify_inputs, np.ndarray):
        x, source = verify_inputs, "given"
    elif isinstance(verify_inputs, (str, os.PathLike)) and str(verify_inputs).endswith(".npy"):
        if not Path(verify_inputs).is_file():
            raise ExportError(f"no such verification file: {str(verify_inputs)!r}")
        try:
            x = np.load(verify_inputs, allow_pickle=False)
        except Exception as error:
            raise ExportError(f"cannot read {str(verify_inputs)!r}: {_one_line(error)}") from None
        source = Path(verify_inputs).name
    elif isinstance(verify_inputs, str):
        from bnn_keras import data  # lazily: only verification by dataset name needs it

        try:
            splits = data.load(verify_inputs, batch_size=min(num_verify, 256), limit=num_verify)
        except ValueError as error:
            raise ExportError(f"cannot load verification data {verify_inputs!r}: {_one_line(error)}") from None
        x = np.concatenate([images.numpy() for images, _ in splits.test])
        source = f"{verify_inputs} test"
    else:
        raise ExportError(
            f"verify_inputs must be an array, a .npy path or a dataset name, got {type(verify_inputs).__name__}"
        )
    x = np.asarray(x, dtype=np.float32)[:num_verify]
    if x.shape[1:] != shape or len(x) == 0:
        raise ExportError(
            f"verification inputs have shape {x.shape}, the model expects (N, {', '.join(map(str, shape))})"
        )
    return x, source


def _verify(
    model: tf.keras.Model,
    flatbuffer: bytes,
    runner_target: str,
    x: np.ndarray,
    source: str,
    *,
    min_top1: float,
    max_abs_diff: float | None,
) -> dict[str, Any]:
    expected = [np.asarray(y) for y in tf.nest.flatten(model.predict(x, batch_size=64, verbose=0))]
    actual = FlatbufferRunner(flatbuffer, runner_target).predict(x)
    diffs, strict, tie_aware = [], [], []
    for e, a in zip(expected, actual):
        a = a.reshape(e.shape)
        diffs.append(float(np.max(np.abs(e - a))))
        if e.ndim >= 2 and e.shape[-1] > 1:
            e2, a2 = e.reshape(-1, e.shape[-1]), a.reshape(-1, e.shape[-1])
            top_a = np.argmax(a2, -1)
            strict.append(float(np.mean(np.argmax(e2, -1) == top_a)))
            # Keras outputs that tie for the top (common in untrained binary nets, whose
            # logits are integers) make either class a correct top-1.
            tolerance = _TIE_RTOL * np.maximum(1.0, np.max(np.abs(e2), -1))
            chosen = np.take_along_axis(e2, top_a[:, None], -1)[:, 0]
            tie_aware.append(float(np.mean(chosen >= np.max(e2, -1) - tolerance)))
    result = {
        "inputs": source,
        "num_inputs": int(len(x)),
        "max_abs_diff": max(diffs),
        "max_abs_reference": max(float(np.max(np.abs(e))) for e in expected),
        "top1_agreement": min(tie_aware) if tie_aware else 1.0,
        "top1_agreement_strict": min(strict) if strict else 1.0,
        "min_top1": min_top1,
        "max_abs_diff_allowed": max_abs_diff,
    }
    failures = []
    if result["top1_agreement"] < min_top1:
        failures.append(f"top-1 agreement {100 * result['top1_agreement']:.1f}% < {100 * min_top1:.1f}%")
    if max_abs_diff is not None and result["max_abs_diff"] > max_abs_diff:
        failures.append(f"max |diff| {result['max_abs_diff']:.3g} > {max_abs_diff:.3g}")
    if failures:
        hint = ""
        if any(_binary_input(layer) for layer in _leaf_layers(model)):
            hint = (
                " (binary activations flip where a pre-sign value is within float rounding "
                "of 0, e.g. behind an untrained BatchNormalization)"
            )
        raise ExportVerificationError(
            f"{runner_target} flatbuffer disagrees with Keras on {len(x)} {source} inputs: "
            + "; ".join(failures)
            + hint
        )
    return result


# --------------------------------------------------------------------------- convert / export


@dataclasses.dataclass
class ExportResult:
    """The flatbuffer and what it holds."""

    flatbuffer: bytes
    report: ConversionReport

    def __repr__(self) -> str:
        return f"ExportResult({self.report.model_name!r} -> {self.report.target}, {len(self.flatbuffer):,} bytes)"

    def save(self, out_path: str | os.PathLike) -> Path:
        """Write the flatbuffer and ``OUT.report.json`` atomically; see `save`."""
        return save(self, out_path)


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ExportError(f"target must be one of {', '.join(repr(t) for t in TARGETS)}, got {target!r}")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _dtype(value: Any, name: str) -> tf.dtypes.DType:
    try:
        dtype = tf.as_dtype(value)
    except TypeError:
        dtype = None
    if dtype not in (tf.float32, tf.int8):
        raise ExportError(f"{name} must be tf.float32 or tf.int8, got {value!r}")
    return dtype


def convert(
    model_or_path: ModelLike,
    target: str = "lce",
    *,
    inference_input_type: Any = tf.float32,
    inference_output_type: Any = tf.float32,
    experimental_default_int8_range: tuple[float, float] | None = None,
    lce_target: str = "arm",
    rewrite_dense: bool = True,
    verify: bool = True,
    verify_inputs: VerifyInputs = None,
    num_verify: int = 100,
    min_top1: float = 0.99,
    max_abs_diff: float | None = None,
    seed: int = 0,
) -> ExportResult:
    """Convert a Keras model to a flatbuffer, check it against Keras, and report on it.

    Args:
        model_or_path: a `tf.keras.Model`, or a saved ``.keras`` / ``.h5`` / SavedModel.
        target: ``"lce"`` (Larq Compute Engine, binary ops) or ``"tflite"`` (stock, float).
        inference_input_type, inference_output_type: ``tf.float32`` or ``tf.int8``
            (LCE only), passed to `larq_compute_engine.convert_keras_model`.
        experimental_default_int8_range: (min, max) fallback int8 range (LCE only).
        lce_target: ``"arm"`` or ``"xcore"``; xcore cannot lower SAME zero-padded bconvs.
        rewrite_dense: rewrite binary `QuantDense` layers as 1x1 binary convs (LCE only).
        verify: run the flatbuffer and compare with Keras (max |diff|, top-1 agreement).
        verify_inputs: an array, a ``.npy`` path, or a dataset name for
            `bnn_keras.data.load` (its test split); None draws seeded N(0, 1) inputs.
        num_verify: at most this many verification inputs.
        min_top1: lowest top-1 agreement with Keras that passes (0 to 1).
        max_abs_diff: largest max |output difference| that passes; None: not checked
            (binary activations flip on float rounding near 0, so top-1 is the default).
        seed: seed of the random verification inputs.

    Returns:
        `ExportResult` with the flatbuffer bytes and the `ConversionReport`.

    Raises:
        ExportError: unreadable model, bad option, conversion failure (one line).
        ExportVerificationError: outputs disagree with Keras beyond the thresholds.

    Warns:
        UserWarning: ``target="lce"`` and the flatbuffer holds no binary op.

    ```python
    result = convert(model, "lce", verify_inputs="embedded", num_verify=200)
    result.report.file_bytes, result.report.verification["top1_agreement"]
    ```
    """
    _check_target(target)
    if lce_target not in LCE_TARGETS:
        raise ExportError(f"lce_target must be 'arm' or 'xcore', got {lce_target!r}")
    input_type = _dtype(inference_input_type, "inference_input_type")
    output_type = _dtype(inference_output_type, "inference_output_type")
    if experimental_default_int8_range is not None:
        low, high = (float(v) for v in experimental_default_int8_range)
        if not low < high:
            raise ExportError(f"experimental_default_int8_range needs min < max, got ({low}, {high})")
        experimental_default_int8_range = (low, high)
    if target == "tflite" and (
        input_type != tf.float32 or output_type != tf.float32 or experimental_default_int8_range
    ):
        raise ExportError(
            "int8 I/O and experimental_default_int8_range are LCE converter options; "
            "target='tflite' exports a float model"
        )
    if not 0.0 <= min_top1 <= 1.0:
        raise ExportError(f"min_top1 must be in [0, 1], got {min_top1!r}")
    if num_verify < 1:
        raise ExportError(f"num_verify must be >= 1, got {num_verify!r}")

    model = _as_model(model_or_path)
    if not model.built or not model.inputs:
        raise ExportError(f"model {model.name!r} has no defined inputs: build it on an Input first")
    # Inputs before converting, so a bad dataset name fails fast.
    inputs = _verification_inputs(verify_inputs, model, num_verify, seed) if verify else None

    options: dict[str, Any] = {
        "target": target,
        "inference_input_type": input_type.name,
        "inference_output_type": output_type.name,
        "experimental_default_int8_range": experimental_default_int8_range,
        "lce_target": lce_target,
        "rewrite_dense": rewrite_dense,
    }
    converted_model, rewritten, skipped = model, [], {}
    try:
        if target == "lce":
            import larq_compute_engine as lce

            if rewrite_dense:
                converted_model, rewritten, skipped = rewrite_binary_dense(model)
            flatbuffer = lce.convert_keras_model(
                converted_model,
                inference_input_type=input_type,
                inference_output_type=output_type,
                target=lce_target,
                experimental_default_int8_range=experimental_default_int8_range,
            )
        else:
            flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{target} conversion of {model.name!r} failed: {_one_line(error)}") from None
    flatbuffer = bytes(flatbuffer)

    report = _build_report(
        model,
        converted_model,
        flatbuffer,
        target=target,
        lce_target=lce_target,
        rewrite_dense=rewrite_dense,
        rewritten=rewritten,
        skipped=skipped,
        options=options,
    )
    if target == "lce" and report.binary_ops == 0:
        warnings.warn(
            f"model {model.name!r} has no layer with binarised input and kernel that LCE "
            "lowers: the LCE flatbuffer holds no binary op (it is a float TFLite model)",
            UserWarning,
            stacklevel=2,
        )
    for note in report.notes:
        if note.startswith("int8 "):
            warnings.warn(note, UserWarning, stacklevel=2)
    if inputs is not None:
        report.verification = _verify(
            model, flatbuffer, target, *inputs, min_top1=min_top1, max_abs_diff=max_abs_diff
        )
    return ExportResult(flatbuffer, report)


def report_path(out_path: str | os.PathLike) -> Path:
    """Where the report of ``OUT`` goes: ``OUT.report.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".report.json")


def _write_atomically(path: Path, payload: bytes) -> Path:
    """Write to a temporary file in `path`'s folder, then rename it over `path`."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def save(result: ExportResult, out_path: str | os.PathLike) -> Path:
    """Write ``OUT`` (the flatbuffer) and ``OUT.report.json``, each atomically.

    Both go through a temporary file in the same folder and `os.replace`; when anything
    fails, neither is left behind (a report written before a failing flatbuffer is removed).

    ```python
    save(convert(model, "lce"), "model.tflite")   # -> model.tflite, model.tflite.report.json
    ```
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ExportError(f"output folder does not exist: {str(out_path.parent)!r}")
    if out_path.is_dir():
        raise ExportError(f"output path is a folder: {str(out_path)!r}")
    report_file = report_path(out_path)
    data = result.report.to_dict()
    data["file"] = out_path.name
    _write_atomically(report_file, json.dumps(data, indent=2, default=_json_default).encode())
    try:
        _write_atomically(out_path, result.flatbuffer)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(report_file)
        if isinstance(error, OSError):
            raise ExportError(f"cannot write {str(out_path)!r}: {_one_line(error)}") from None
        raise
    return out_path


def export(model_or_path: ModelLike, out_path: str | os.PathLike, target: str = "lce", **options: Any) -> ExportResult:
    """`convert` then `save`: nothing is written unless conversion and verification pass.

    ```python
    result = export("runs/vgg10/model.keras", "vgg10.tflite", target="lce")
    ```
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ExportError(f"output folder does not exist: {str(out_path.parent)!r}")
    result = convert(model_or_path, target, **options)
    save(result, out_path)
    return result


# --------------------------------------------------------------------------- command line


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` command's arguments (MODEL_PATH, --target, --out, ...) to `parser`."""
    parser.add_argument("model_path", metavar="MODEL_PATH", help="saved model: .keras, .h5 or SavedModel folder")
    parser.add_argument("--target", choices=TARGETS, default="lce", help="lce (binary ops, default) or tflite (float)")
    parser.add_argument("--out", required=True, metavar="FILE", help="flatbuffer to write; the report goes to FILE.report.json")
    parser.add_argument(
        "--verify-data",
        metavar="NAME_OR_NPY",
        default=None,
        help="inputs for the check against Keras: a dataset name (bnn_keras.data) or a .npy file; default: seeded random inputs",
    )
    parser.add_argument("--num-verify", type=int, default=100, metavar="N", help="verification inputs (default 100)")
    parser.add_argument("--min-top1", type=float, default=0.99, metavar="P", help="lowest top-1 agreement that passes (default 0.99)")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against Keras")
    parser.add_argument("--int8-io", action="store_true", help="int8 model inputs and outputs (LCE)")
    parser.add_argument(
        "--default-int8-range", nargs=2, type=float, metavar=("MIN", "MAX"), default=None,
        help="fallback int8 quantisation range for ops without statistics (LCE, experimental)",
    )
    parser.add_argument("--lce-target", choices=LCE_TARGETS, default="arm", help="LCE hardware target (default arm)")
    parser.add_argument("--no-rewrite-dense", action="store_true", help="keep binary dense layers as (float) dense ops")


def run_export(args: argparse.Namespace) -> int:
    """Run ``export`` from parsed arguments: write the file, print the report, return 0.

    Raises `ExportError` / `ExportVerificationError`; the CLI prints them in one line.
    """
    io_type = tf.int8 if args.int8_io else tf.float32
    result = export(
        args.model_path,
        args.out,
        target=args.target,
        inference_input_type=io_type,
        inference_output_type=io_type,
        experimental_default_int8_range=tuple(args.default_int8_range) if args.default_int8_range else None,
        lce_target=args.lce_target,
        rewrite_dense=not args.no_rewrite_dense,
        verify=not args.no_verify,
        verify_inputs=args.verify_data,
        num_verify=args.num_verify,
        min_top1=args.min_top1,
    )
    print(result.report.table())
    print(f"\nwrote {args.out} ({len(result.flatbuffer):,} bytes) and {report_path(args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bnn_keras.export MODEL_PATH --out FILE ...``; errors exit 2 in one line."""
    parser = argparse.ArgumentParser(prog="python -m bnn_keras.export", description=__doc__.splitlines()[0])
    add_export_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_export(args)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def randomize_batch_norm(model: tf.keras.Model, seed: int = 1) -> tf.keras.Model:
    """Give every BatchNormalization random, trained-looking statistics (in place).

    An untrained BinaryNet maps a zero accumulator to exactly 0, on the sign boundary,
    so float rounding in the flatbuffer decides signs and verification looks worse than
    it is; use this to check an export of an untrained model.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_mean.assign(rng.normal(0.0, 3.0, channels))
            layer.moving_variance.assign(rng.uniform(5.0, 50.0, channels))
    return model

if __name__ == "__main__":
    sys.exit(main())

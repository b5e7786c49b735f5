"""Read a TFLite flatbuffer (ops, tensors, constant bytes) and run it in its interpreter."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from bnn_keras.export.errors import ExportError

__all__ = ["BINARY_OPS", "TARGETS", "Flatbuffer", "FlatbufferRunner", "Op", "check_target", "constant_buffers", "flatbuffer_ops", "parse"]

TARGETS: tuple[str, ...] = ("lce", "tflite")
"""Export targets: Larq Compute Engine (binary ops) or stock TFLite (float ops only)."""

BINARY_OPS: tuple[str, ...] = ("LceBconv2d", "LceBMaxPool2d")
"""LCE ops that compute on bit-packed tensors (1 bit per weight or activation)."""


def check_target(target: str) -> None:
    """Raise `ExportError` unless `target` is one of `TARGETS`."""
    if target not in TARGETS:
        raise ExportError(f"target must be one of {', '.join(repr(t) for t in TARGETS)}, got {target!r}")


def _schema() -> Any:
    """The TFLite flatbuffer schema bindings: TensorFlow's, else the copy LCE ships."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:  # pragma: no cover - depends on the TensorFlow build
        from larq_compute_engine.mlir.python import tflite_schema as schema
    return schema


@dataclasses.dataclass(frozen=True)
class Op:
    """One operator of the graph: its name (builtin or custom) and tensor indices."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Flatbuffer:
    """The parts of a one-subgraph flatbuffer the report reads, per op and per tensor."""

    ops: list[Op]
    tensor_names: list[str]
    tensor_bytes: list[int]  # bytes of constant data behind each tensor (0 for activations)
    tensor_buffers: list[int]
    tensor_shapes: list[tuple[int, ...]]
    tensor_types: list[int]  # TFLite TensorType codes (0 float32, 9 int8)
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def _indices(length: int, as_numpy: Any) -> tuple[int, ...]:
    return tuple(int(i) for i in as_numpy()) if length else ()


def _op_names(model: Any, schema: Any) -> list[str]:
    """The name of each operator code: the custom code, else the builtin's name."""
    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        custom = code.CustomCode()
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        names.append(custom.decode() if custom else builtin_names.get(builtin, str(builtin)))
    return names


def _buffer_bytes(model: Any) -> list[int]:
    """The size of each buffer's data."""
    # Models over 2 GB keep buffers after the flatbuffer (offset/size) instead of inline.
    buffers = (model.Buffers(i) for i in range(model.BuffersLength()))
    return [int(buffer.DataLength() or buffer.Size()) for buffer in buffers]


def parse(flatbuffer: bytes) -> Flatbuffer:
    """The ops and tensors of a TFLite flatbuffer with one subgraph.

    Raises:
        ExportError: not a TFLite flatbuffer, or more than one subgraph.
    """
    schema = _schema()
    if len(flatbuffer) < 8 or flatbuffer[4:8] != b"TFL3":
        raise ExportError("not a TFLite flatbuffer (no TFL3 identifier)")
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    op_names, buffer_bytes = _op_names(model, schema), _buffer_bytes(model)
    if model.SubgraphsLength() != 1:
        raise ExportError(f"expected one subgraph, the flatbuffer has {model.SubgraphsLength()}")
    graph = model.Subgraphs(0)
    names, sizes, buffers, shapes, types = [], [], [], [], []
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        types.append(int(tensor.Type()))
        names.append((tensor.Name() or b"").decode(errors="replace"))
        shapes.append(_indices(tensor.ShapeLength(), tensor.ShapeAsNumpy))
        buffers.append(int(tensor.Buffer()))
        sizes.append(buffer_bytes[tensor.Buffer()] if tensor.Buffer() < len(buffer_bytes) else 0)
    ops = []
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        inputs, outputs = _indices(op.InputsLength(), op.InputsAsNumpy), _indices(op.OutputsLength(), op.OutputsAsNumpy)
        ops.append(Op(name=op_names[op.OpcodeIndex()], inputs=inputs, outputs=outputs))
    inputs = _indices(graph.InputsLength(), graph.InputsAsNumpy)
    outputs = _indices(graph.OutputsLength(), graph.OutputsAsNumpy)
    return Flatbuffer(ops, names, sizes, buffers, shapes, types, inputs, outputs)


def flatbuffer_ops(flatbuffer: bytes) -> list[str]:
    """The op names of a TFLite flatbuffer in execution order (builtin or custom, e.g. LCE's).

    ```python
    flatbuffer_ops(lce.convert_keras_model(model))  # ['LceQuantize', 'LceBconv2d', ...]
    ```
    """
    return [op.name for op in parse(flatbuffer).ops]


def constant_buffers(flatbuffer: bytes) -> list[bytes]:
    """The data of every non-empty buffer (weights and other constants), sorted: equal lists mean
    two files hold the same constants whatever their order and tensor names.

    ```python
    constant_buffers(a) == constant_buffers(b)   # the same weights, byte for byte
    ```
    """
    model = _schema().Model.GetRootAsModel(flatbuffer, 0)
    buffers = (model.Buffers(i) for i in range(model.BuffersLength()))
    return sorted(bytes(b.DataAsNumpy()) for b in buffers if b.DataLength())


_SINGLE_INPUT_ONLY = "verification supports single-input models only; use verify=False"


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
        check_target(target)
        self.target = target
        if target == "lce":
            self._open_lce(flatbuffer, num_threads)
        else:
            self._open_tflite(flatbuffer, num_threads)

    def _open_lce(self, flatbuffer: bytes, num_threads: int) -> None:
        from larq_compute_engine.tflite.python.interpreter import Interpreter

        self._lce = Interpreter(flatbuffer, num_threads=num_threads)
        self._input_q = (self._lce.input_types[0], self._lce.input_scales[0], self._lce.input_zero_points[0])
        self._output_q = list(zip(self._lce.output_types, self._lce.output_scales, self._lce.output_zero_points))
        if len(self._lce.input_shapes) != 1:
            raise ExportError(_SINGLE_INPUT_ONLY)

    def _open_tflite(self, flatbuffer: bytes, num_threads: int) -> None:
        with warnings.catch_warnings():
            # Its successor (ai_edge_litert) is not a dependency; the warning is noise here.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            self._tfl = tf.lite.Interpreter(model_content=flatbuffer, num_threads=num_threads)
        self._tfl.allocate_tensors()
        inputs = self._tfl.get_input_details()
        if len(inputs) != 1:
            raise ExportError(_SINGLE_INPUT_ONLY)
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

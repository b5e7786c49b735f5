"""Read the model to export: a `tf.keras.Model`, or a saved ``.keras`` / ``.h5`` / SavedModel.

A saved model can carry Python code: a `Lambda` layer stores its function as bytecode,
which runs when Keras rebuilds the layer, and a ``.keras`` config names the modules Keras
imports to find unregistered classes. `load_model` reads the file's model config first
(``config.json`` of a ``.keras`` zip, the ``model_config`` attribute of a ``.h5``,
``keras_metadata.pb`` of a SavedModel) and refuses what carries code, or names a module
not imported yet, before Keras deserialises anything; ``unsafe_load=True``
(``--unsafe-load``) loads a trusted file as it is. A SavedModel's graph is a TensorFlow
program: its ops are checked for file writes and Python calls only.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Union

import tensorflow as tf

from bnn_keras.export.errors import ExportError, one_line

__all__ = ["KERAS_SUFFIXES", "ModelLike", "as_model", "find_code", "load_model"]

ModelLike = Union[tf.keras.Model, str, os.PathLike]
"""What `convert` and `export` accept: a model object or the path of a saved one."""

KERAS_SUFFIXES: tuple[str, ...] = (".keras", ".h5", ".hdf5")
"""Suffixes of the single-file Keras formats `load_model` reads."""

# TensorFlow namespaces a TFOpLambda layer (a tf.* call recorded by name) must not call:
# they touch files or run Python.
_UNSAFE_TF_NAMESPACES = frozenset(
    {"io", "gfile", "saved_model", "train", "summary", "print", "py_function", "numpy_function", "py_func"}
)
# Packages whose modules a .keras config may name: Keras' own, and the ones bnn_keras builds on.
_KNOWN_PACKAGES = frozenset({"keras", "tf_keras", "builtins", "larq", "bnn_keras"})
# Graph ops of a SavedModel that write files or call back into Python.
_UNSAFE_OPS = frozenset({"WriteFile", "PyFunc", "PyFuncStateless", "EagerPyFunc"})


def find_code(config: Any, owner: str = "the model") -> str | None:
    """What in a Keras model config carries Python code, in words; None when nothing does.

    Finds `Lambda` layers, serialised functions (``"function_type": "lambda"``, Keras 3's
    ``__lambda__``) and TFOpLambda layers calling file or Python-calling TensorFlow APIs.

    >>> find_code({"class_name": "Lambda", "config": {"name": "scale", "function": ["4wEA..."]}})
    "Lambda layer 'scale'"
    """
    if isinstance(config, list):
        return next((found for item in config if (found := find_code(item, owner))), None)
    if not isinstance(config, dict):
        return None
    kind, inner = config.get("class_name"), config.get("config")
    name = inner.get("name") if isinstance(inner, dict) else config.get("name")
    if kind == "Lambda":
        return f"Lambda layer {name!r}"
    if kind == "__lambda__" or any(k.endswith("_type") and v == "lambda" for k, v in config.items()):
        return f"serialised Python function in {owner}"
    if kind == "TFOpLambda" and isinstance(inner, dict):
        symbol = str(inner.get("function", ""))
        if _UNSAFE_TF_NAMESPACES.intersection(symbol.split(".")):
            return f"TFOpLambda layer {name!r} calling tf.{symbol}"
    if isinstance(kind, str) and isinstance(name, str):
        owner = f"layer {name!r}"
    return next((found for value in config.values() if (found := find_code(value, owner))), None)


def _unimported_module(config: Any) -> str | None:
    """A module a ``.keras`` config names that is not imported yet: Keras would import it to load."""
    if isinstance(config, list):
        return next((found for item in config if (found := _unimported_module(item))), None)
    if not isinstance(config, dict):
        return None
    module = config.get("module")
    if isinstance(module, str) and module.split(".")[0] not in _KNOWN_PACKAGES and module not in sys.modules:
        return module
    parts = (value for key, value in config.items() if key != "compile_config")  # compile=False skips it
    return next((found for value in parts if (found := _unimported_module(value))), None)


def _saved_model_code(path: Path) -> str | None:
    """What in a SavedModel carries code (its Keras metadata, then its graph's ops)."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tf_keras.protobuf import saved_metadata_pb2

    metadata = saved_metadata_pb2.SavedMetadata.FromString((path / "keras_metadata.pb").read_bytes())
    for node in metadata.nodes:
        found = find_code(json.loads(node.metadata or "{}"))
        if found:
            return found
    saved_model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    for graph in saved_model.meta_graphs:
        node_lists = [graph.graph_def.node, *(f.node_def for f in graph.graph_def.library.function)]
        ops = {node.op for nodes in node_lists for node in nodes}
        if ops & _UNSAFE_OPS:
            return f"graph op {sorted(ops & _UNSAFE_OPS)[0]}"
    return None


def _keras_config(path: Path) -> Any:
    """The model config of a ``.keras`` or ``.h5`` file, read without deserialising it (None: none)."""
    if path.suffix.lower() == ".keras":
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    import h5py

    with h5py.File(path, "r") as file:
        config = file.attrs.get("model_config")
    return None if config is None else json.loads(config.decode() if isinstance(config, bytes) else config)


def _refuse_code(path: Path, is_saved_model: bool) -> None:
    """Raise `ExportError` if the saved model at `path` carries code (or cannot be checked)."""
    trust = "pass unsafe_load=True only for a file you trust"
    if is_saved_model and not (path / "keras_metadata.pb").is_file():
        raise ExportError(f"{str(path)!r} has no keras_metadata.pb, so its layers cannot be checked for code: {trust}")
    try:
        config = None if is_saved_model else _keras_config(path)
        found = _saved_model_code(path) if is_saved_model else find_code(config)
    except Exception as error:  # a damaged file: unreadable zip, HDF5, JSON or protobuf
        raise ExportError(f"cannot load a Keras model from {str(path)!r}: {one_line(error)}") from None
    if found:
        raise ExportError(f"{str(path)!r} holds a {found}, which would run code once loaded: refused; {trust}")
    module = _unimported_module(config)
    if module:  # .keras: Keras imports the module a config names when no registered object has the name
        raise ExportError(
            f"{str(path)!r} names module {module!r}, which Keras would import to load it: refused; "
            f"import it first (--import {module}) if you trust it"
        )


def load_model(path: str | os.PathLike, *, unsafe_load: bool = False) -> tf.keras.Model:
    """Load a saved Keras model (``.keras``, ``.h5``, SavedModel directory), refusing code.

    Importing `bnn_keras` registers its quantisers and constraints and Larq's layers, so
    models built from them load without ``custom_objects``; import the module of other
    custom objects first. Unless `unsafe_load`, a file whose config holds a `Lambda` layer
    or another carrier of Python code (`find_code`) or names a module not imported yet,
    and a SavedModel without ``keras_metadata.pb``, are refused before Keras deserialises
    them, and ``.keras`` files load in Keras' safe mode.

    ```python
    model = load_model("runs/mlp/model.keras")
    ```

    Raises:
        ExportError: the path is missing, holds no readable Keras model, or carries code
            (one line).
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"no such model file or directory: {str(path)!r}")
    is_saved_model = path.is_dir() and (path / "saved_model.pb").exists()
    if not is_saved_model and (path.is_dir() or path.suffix.lower() not in KERAS_SUFFIXES):
        raise ExportError(
            f"{str(path)!r} is not a Keras model: expected a .keras or .h5 file or a "
            "SavedModel directory"
        )
    if not unsafe_load:
        _refuse_code(path, is_saved_model)
    kwargs: dict[str, Any] = {"compile": False}
    if path.suffix.lower() == ".keras":
        kwargs["safe_mode"] = not unsafe_load
    try:
        model = tf.keras.models.load_model(str(path), **kwargs)
    except Exception as error:  # Keras raises many types for a corrupt file
        raise ExportError(f"cannot load a Keras model from {str(path)!r}: {one_line(error)}") from None
    if not isinstance(model, tf.keras.Model):
        raise ExportError(f"{str(path)!r} holds a {type(model).__name__}, not a Keras model")
    return model


def as_model(model_or_path: ModelLike, *, unsafe_load: bool = False) -> tf.keras.Model:
    """`model_or_path` itself when it is a model, else `load_model` of it."""
    if isinstance(model_or_path, tf.keras.Model):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path, unsafe_load=unsafe_load)
    raise ExportError(
        f"expected a tf.keras.Model or a path to a saved model, got {type(model_or_path).__name__}"
    )

"""Read the model to export: a `tf.keras.Model`, or a saved ``.keras`` / ``.h5`` / SavedModel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import tensorflow as tf

from bnn_keras.export.errors import ExportError, one_line

__all__ = ["KERAS_SUFFIXES", "ModelLike", "as_model", "load_model"]

ModelLike = Union[tf.keras.Model, str, os.PathLike]
"""What `convert` and `export` accept: a model object or the path of a saved one."""

KERAS_SUFFIXES: tuple[str, ...] = (".keras", ".h5", ".hdf5")
"""Suffixes of the single-file Keras formats `load_model` reads."""


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
    is_saved_model = path.is_dir() and (path / "saved_model.pb").exists()
    if not is_saved_model and (path.is_dir() or path.suffix.lower() not in KERAS_SUFFIXES):
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
        raise ExportError(f"cannot load a Keras model from {str(path)!r}: {one_line(error)}") from None
    if not isinstance(model, tf.keras.Model):
        raise ExportError(f"{str(path)!r} holds a {type(model).__name__}, not a Keras model")
    return model


def as_model(model_or_path: ModelLike) -> tf.keras.Model:
    """`model_or_path` itself when it is a model, else `load_model` of it."""
    if isinstance(model_or_path, tf.keras.Model):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path)
    raise ExportError(
        f"expected a tf.keras.Model or a path to a saved model, got {type(model_or_path).__name__}"
    )

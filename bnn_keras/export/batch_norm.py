"""Trained-looking BatchNorm statistics for checking the export of an untrained model."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["randomize_batch_norm"]


def _batch_norms(layer: tf.keras.layers.Layer) -> list[tf.keras.layers.BatchNormalization]:
    """The BatchNormalization layers in `layer`: in model order, nested models and layers too, each once."""
    found: list[tf.keras.layers.BatchNormalization] = []
    children = layer.layers if isinstance(layer, tf.keras.Model) else layer.submodules
    for child in children:
        if isinstance(child, tf.keras.layers.BatchNormalization):
            found.append(child)
        elif isinstance(child, tf.keras.layers.Layer):
            found.extend(_batch_norms(child))
    unique = {id(bn): bn for bn in found}
    return list(unique.values())


def randomize_batch_norm(model: tf.keras.Model, seed: int = 1) -> tf.keras.Model:
    """Give every BatchNormalization random, trained-looking statistics (in place).

    Nested models and layers are included; a layer built with ``scale=False`` has no
    gamma and one with ``center=False`` no beta, so only its other statistics change.
    An untrained BinaryNet maps a zero accumulator to exactly 0, on the sign boundary,
    so float rounding in the flatbuffer decides signs and verification looks worse than
    it is; use this to check an export of an untrained model.

    ```python
    model = randomize_batch_norm(models.mlp((28, 28, 1), 10, variant="binarynet"))
    export(model, "mlp.tflite")   # top-1 agreement now measures the exporter, not ties
    ```
    """
    rng = np.random.default_rng(seed)
    for layer in _batch_norms(model):
        if not layer.built:  # no statistics yet
            continue
        shape = layer.moving_mean.shape
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, 0.5, shape))
        layer.moving_mean.assign(rng.normal(0.0, 3.0, shape))
        layer.moving_variance.assign(rng.uniform(5.0, 50.0, shape))
    return model

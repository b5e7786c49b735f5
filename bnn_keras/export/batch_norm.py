"""Trained-looking BatchNorm statistics for checking the export of an untrained model."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["randomize_batch_norm"]


def randomize_batch_norm(model: tf.keras.Model, seed: int = 1) -> tf.keras.Model:
    """Give every BatchNormalization random, trained-looking statistics (in place).

    An untrained BinaryNet maps a zero accumulator to exactly 0, on the sign boundary,
    so float rounding in the flatbuffer decides signs and verification looks worse than
    it is; use this to check an export of an untrained model.

    ```python
    model = randomize_batch_norm(models.mlp((28, 28, 1), 10, variant="binarynet"))
    export(model, "mlp.tflite")   # top-1 agreement now measures the exporter, not ties
    ```
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

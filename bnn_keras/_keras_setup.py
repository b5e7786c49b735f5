"""Make `tf.keras` resolve to tf-keras (Keras 2), which Larq needs, before Keras is touched.

TensorFlow decides what `tf.keras` is on first attribute access, from the environment
variable TF_USE_LEGACY_KERAS. The installed `bnn_keras_legacy_keras.pth` sets it at
interpreter start-up; this module does the same for source checkouts and refuses to go on,
in one line, when Keras 3 has already been bound to `tf.keras`.
"""

from __future__ import annotations

import os
import sys

_FIX = (
    "set TF_USE_LEGACY_KERAS=1 in the environment before starting Python "
    "(or import bnn_keras before tensorflow)"
)


class Keras3LoadedError(ImportError):
    """tf.keras was already bound to Keras 3, which Larq cannot use."""


def ensure_legacy_keras() -> None:
    """Route tf.keras to tf-keras, or raise `Keras3LoadedError` naming the fix."""
    value = os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if value not in ("1", "true", "True"):
        raise Keras3LoadedError(
            f"bnn_keras needs tf.keras to be tf-keras (Keras 2) but TF_USE_LEGACY_KERAS={value!r}: "
            + _FIX
        )
    if "tensorflow" not in sys.modules:
        return  # tf.keras will be bound on first use, with the variable now set
    import tensorflow as tf

    # Resolves tf.keras now (to tf-keras unless Keras 3 was bound before we got here).
    if not tf.keras.layers.Layer.__module__.startswith("tf_keras"):
        raise Keras3LoadedError(
            "bnn_keras needs tf.keras to be tf-keras (Keras 2) but Keras 3 was already "
            "loaded as tf.keras: " + _FIX
        )

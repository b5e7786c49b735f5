"""Test set-up: tf.keras must be tf-keras before anything imports TensorFlow."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bnn_keras  # noqa: E402,F401  (registers the custom objects)

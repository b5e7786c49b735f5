"""Test set-up: tf.keras must be tf-keras before anything imports TensorFlow."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bnn_keras  # noqa: E402,F401  (registers the custom objects)


import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a fresh folder with a tmpfs of `size` (e.g. "64k") mounted on it, a small
    full-able disk; unmounted at the end. Needs root: the test is skipped where mounting fails."""
    mounted = []

    def mount(size: str):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs (root needed): {result.stderr.decode().strip()[:100]}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at(epoch, batch)``: from that batch of that 0-based epoch (of a stage) on, layer bn_1's
    gamma is NaN, set where `StopOnNonFinite` sees each batch begin; `monkeypatch.undo()` stops it."""
    import numpy as np
    import tensorflow as tf

    from bnn_keras import callbacks

    def poison_from(epoch: int, batch: int) -> None:
        def poison(self, at, logs=None):
            if self._epoch == epoch and at == batch:
                gamma = self.model.get_layer("bn_1").gamma
                gamma.assign(tf.fill(gamma.shape, np.nan))

        monkeypatch.setattr(callbacks.StopOnNonFinite, "on_train_batch_begin", poison, raising=False)

    return poison_from

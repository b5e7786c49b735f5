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

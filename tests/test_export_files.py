"""Files `export` writes get an ordinary file's mode under the umask, like training outputs.

`tempfile.mkstemp` creates its file 0600; an atomic write that renames it into place
without a chmod leaves the exported model and report unreadable to the group.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import tensorflow as tf

from bnn_keras import export


def _tiny_model() -> tf.keras.Model:
    inputs = tf.keras.Input((6,))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(4, name="head")(inputs), name="tiny")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exported_files_have_the_umask_mode(tmp_path, umask, mode):
    out = tmp_path / "tiny.tflite"
    previous = os.umask(umask)
    try:
        result = export.export(_tiny_model(), out, target="tflite", verify=False)
    finally:
        os.umask(previous)
    assert out.read_bytes() == result.flatbuffer
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"tiny.tflite": mode, "tiny.tflite.report.json": mode}


def test_an_export_over_an_earlier_one_keeps_the_umask_mode_and_leaves_only_the_pair(tmp_path):
    out = tmp_path / "tiny.tflite"
    export.export(_tiny_model(), out, target="tflite", verify=False)
    previous = os.umask(0o027)
    try:
        inputs = tf.keras.Input((6,))
        wider = tf.keras.Model(inputs, tf.keras.layers.Dense(8)(inputs), name="wider")
        result = export.export(wider, out, target="tflite", verify=False)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"tiny.tflite": 0o640, "tiny.tflite.report.json": 0o640}
    assert out.read_bytes() == result.flatbuffer
    assert json.loads(export.report_path(out).read_text())["file_bytes"] == len(result.flatbuffer)

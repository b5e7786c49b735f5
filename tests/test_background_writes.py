"""The per-epoch backup is written in the background (run_folder.Backup): it must hold the
weights of the epoch's end even when they change while it is written, binary kernels
included (larq's QuantizedVariable needed teaching); anything the asynchronous copy would
skip makes it write synchronously; a failed write raises at `wait`.
"""

from __future__ import annotations

import threading
import time

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import run_folder
from bnn_keras.run_folder import Backup, RunFolder, not_copyable


def _binary_model(units: int = 8) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([
        tf.keras.Input((6,)),
        lq.layers.QuantDense(units, kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False),
        tf.keras.layers.BatchNormalization(),
        lq.layers.QuantDense(3, input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip"),
    ])
    model.compile(tf.keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    return model


def _data() -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


class _Record(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.weights = [w.copy() for w in self.model.get_weights()]


class _Scramble(tf.keras.callbacks.Callback):
    """After the backup has started: every weight changes while it is being written."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.set_weights([np.full_like(w, 7.5) for w in self.model.get_weights()])


def test_the_background_backup_holds_the_epoch_end_weights_binary_kernels_included(tmp_path):
    model = _binary_model()
    record, backup = _Record(), Backup(str(tmp_path / "backup"))
    model.fit(_data(), epochs=1, verbose=0, callbacks=[record, backup, _Scramble()])
    assert backup.background and backup.issued == 1
    fresh = _binary_model()
    latest = tf.train.latest_checkpoint(str(tmp_path / "backup" / "chief"))
    tf.train.Checkpoint(model=fresh).restore(latest).expect_partial()
    restored = fresh.get_weights()
    assert len(restored) == len(record.weights) == 7
    for got, want in zip(restored, record.weights):
        np.testing.assert_array_equal(got, want)
    assert not np.any(restored[0] == 7.5)  # the binary kernel: written, from before the scramble


def test_larqs_quantized_variable_is_copyable_once_taught_and_listed_when_not(monkeypatch):
    model = _binary_model()
    run_folder._async_support()
    assert not_copyable(tf.train.Checkpoint(model=model)) == []
    base = tf.__internal__.tracking.Trackable._copy_trackable_to_cpu
    monkeypatch.setattr(lq.quantized_variable.QuantizedVariable, "_copy_trackable_to_cpu", base)
    names = not_copyable(tf.train.Checkpoint(model=model))
    assert len(names) == 2 and all(name.startswith("QuantizedVariable") for name in names)


class _Opaque(tf.Module):
    """A saved object of its own kind, which asynchronous checkpointing cannot copy."""

    def __init__(self):
        super().__init__()
        self.value = np.zeros(2, "float32")

    def _serialize_to_tensors(self):
        return {"value": tf.constant(self.value)}

    def _restore_from_tensors(self, restored_tensors):
        self.value = restored_tensors["value"].numpy()


def test_an_object_the_copy_would_skip_makes_the_backup_synchronous(tmp_path):
    model = _binary_model()
    model.opaque = _Opaque()
    assert not_copyable(tf.train.Checkpoint(model=model)) == ["_Opaque __opaque"]  # tf.Module names itself after its class
    backup = Backup(str(tmp_path / "backup"))
    model.fit(_data(), epochs=1, verbose=0, callbacks=[backup])
    assert not backup.background and backup.issued == 1
    assert tf.train.latest_checkpoint(str(tmp_path / "backup" / "chief")).endswith("ckpt-1")


def test_a_failed_background_write_raises_at_wait(tmp_path, tmpfs):
    model = _binary_model(units=4000)  # a 96 kB kernel (plus Adam's two slots) on a 64 kB disk
    backup = Backup(str(tmpfs("64k") / "backup"))
    model.fit(_data().take(1), epochs=1, verbose=0, callbacks=[_Record()])
    backup.set_model(model)
    backup.on_train_begin()
    backup.on_epoch_begin(0)
    backup.on_epoch_end(0)
    assert backup.background
    with pytest.raises(Exception, match="No space left on device"):
        backup.wait()
    backup.wait()  # the error is reported once: a later wait has nothing left to report


def test_a_fresh_backup_has_issued_nothing_and_waits_for_nothing(tmp_path):
    backup = Backup(str(tmp_path / "backup"))  # fit can fail before on_train_begin: _settle still waits on it
    assert backup.issued == 0 and not backup.background
    assert backup.wait() is None and not (tmp_path / "backup").exists()


@pytest.fixture
def slow_background_writes(monkeypatch):
    """Every checkpoint written off the main thread (the asynchronous writer) takes 3 s longer: far longer than a failed fit takes to return."""
    write = tf.train.Checkpoint._write

    def slow(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(3.0)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.Checkpoint, "_write", slow)


def test_fit_returns_once_the_last_background_backup_is_written(tmp_path, slow_background_writes):
    model = _binary_model()
    backup = Backup(str(tmp_path / "backup"))
    model.fit(_data(), epochs=2, verbose=0, callbacks=[backup])
    assert backup.background and backup.issued == 2
    assert tf.train.latest_checkpoint(str(tmp_path / "backup" / "chief")).endswith("ckpt-2")


def test_the_same_model_fits_again_after_a_backed_up_fit_from_epoch_zero(tmp_path):
    model = _binary_model()
    model.fit(_data(), epochs=2, verbose=0, callbacks=[Backup(str(tmp_path / "backup"))])
    history = model.fit(_data(), epochs=2, verbose=0)  # Keras' BackupAndRestore left an AttributeError here
    assert history.epoch == [0, 1]


def test_mid_run_promotion_keeps_the_bests_of_epochs_not_yet_backed_up(tmp_path):
    folder = RunFolder(tmp_path)
    for epoch in (0, 2, 3):
        folder.pending_best_path(epoch).write_text(str(epoch))
    folder.promote_best(3, keep_later=True)  # epochs 0-2 backed up; epoch 3's backup still being written
    assert (tmp_path / "best_model.keras").read_text() == "2"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".pending-best_model-epoch3.keras", "best_model.keras"]
    folder.promote_best(3)  # at a restart: epoch 3 is not finished, its pending file goes
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best_model.keras"]


def test_a_stage_without_a_best_model_has_its_backups_written_when_its_fit_fails(tmp_path, nan_at, slow_background_writes):
    from bnn_keras import cli

    out = tmp_path / "run"  # two-stage: the float stage keeps no best model of its own, so nothing promotes there
    argv = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "8", "--pretrain-epochs", "3", "--epochs", "1",
            "--batch-size", "50", "--schedule", "two-stage", "--steps-per-execution", "1", "--verbose", "0", "--out", str(out)]
    nan_at(1, 2)  # a NaN weight in the float stage's epoch 2 (0-based 1)
    assert cli.main(argv) == 1
    # epoch 1's backup was still being written when the NaN stopped epoch 2: the command waited for it
    assert tf.train.latest_checkpoint(str(out / "backup" / "pretrain" / "chief")).endswith("ckpt-1")

"""Plateau switches at the edges of a run: decided just before a kill, or after the last epoch."""

import json
import os
import signal
import subprocess
import sys

import larq as lq
import numpy as np
import tensorflow as tf

from bnn_keras.callbacks import ClippingSchedule
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import SwitchableSteSign

HERE = os.path.dirname(os.path.abspath(__file__))
KILLED_RUN = os.path.join(HERE, "helpers", "killed_run.py")
ENV = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
# The case: a constant LR and patience 1, so the plateau switch comes early.
PLATEAU = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "16", "16", "--epochs", "6", "--batch-size", "50",
           "--schedule", "vanilla-then-clipped", "--patience", "1", "--lr-schedule", "constant", "--lr", "0.01",
           "--lr-factor", "0.5", "--verbose", "0"]


def _run(argv, out, kill_at=None):
    prefix = [sys.executable, "-m", "bnn_keras.cli"] if kill_at is None else [sys.executable, KILLED_RUN, kill_at]
    result = subprocess.run(prefix + argv + ["--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == (0 if kill_at is None else -signal.SIGKILL), result.stderr[-2000:]


def _read(out, name):
    with open(out / name) as file:
        return json.load(file)


def test_a_plateau_switch_decided_just_before_a_kill_survives_the_resume(tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    _run(PLATEAU, whole)
    switched = _read(whole, "summary.json")["switched_at_epoch"]
    phases = [row["clipping_phase"] for row in _read(whole, "history.json")]
    assert switched is not None and 1 <= switched < 6 and phases.index(1.0) == switched
    # killed right after the backup of the epoch whose end decided the switch
    _run(PLATEAU, pieces, kill_at=f"backup:{switched - 1}")
    assert _read(pieces, "run.json")["resumed_at_epochs"] == []
    _run(PLATEAU, pieces)
    summary = _read(pieces, "summary.json")
    assert summary["resumed_at_epochs"] == [switched]
    assert summary["switched_at_epoch"] == switched
    wall = {"epoch_time_s"}
    assert [{k: v for k, v in r.items() if k not in wall} for r in _read(pieces, "history.json")] == [
        {k: v for k, v in r.items() if k not in wall} for r in _read(whole, "history.json")]


def test_replay_counts_a_switch_decided_at_the_end_of_the_last_finished_epoch():
    rows = [{"val_accuracy": 0.5, "clipping_phase": 0.0}, {"val_accuracy": 0.4, "clipping_phase": 0.0}]
    schedule = ClippingSchedule(patience=1, verbose=0)
    schedule.replay(rows, epochs=6)
    assert schedule.switched_at_epoch == 2
    finished = ClippingSchedule(patience=1, verbose=0)
    finished.replay(rows, epochs=2)  # that plateau came after the last epoch: no switch
    assert finished.switched_at_epoch is None


def _frozen_model():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((4,))
    x = lq.layers.QuantDense(1, kernel_quantizer=SwitchableSteSign(), kernel_constraint=SwitchableWeightClip())(inputs)
    model = tf.keras.Model(inputs, x)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.0), loss="mse")  # LR 0: the loss never improves
    return model


def test_no_switch_is_decided_after_the_last_epoch():
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")
    model = _frozen_model()
    schedule = ClippingSchedule(monitor="loss", patience=2, lr_factor=0.1, verbose=0)
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[schedule])
    # best at epoch 0, no improvement in epochs 1 and 2: the plateau is reached as training ends
    assert history.history["clipping_phase"] == [0.0, 0.0, 0.0]
    assert schedule.switched_at_epoch is None
    assert float(model.optimizer.learning_rate) == 0.0 and not schedule.phase
    longer = ClippingSchedule(monitor="loss", patience=2, lr_factor=0.1, verbose=0)
    history = _frozen_model().fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[longer])
    assert history.history["clipping_phase"] == [0.0, 0.0, 0.0, 1.0] and longer.switched_at_epoch == 3

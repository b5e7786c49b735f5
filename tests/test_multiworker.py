"""--strategy: two MultiWorkerMirroredStrategy workers on loopback train one run, switch its
phase on both, equal a one-process run on the same global batch, and only the chief writes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import cli

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TF_CONFIG", None)
TIMEOUT = 240
RUN = ["train", "mnist_mlp", "--limit", "400", "--hidden-units", "16", "16", "--epochs", "2",
       "--schedule", "vanilla-then-clipped", "--switch-epoch", "1", "--verbose", "2"]
WALL = {"epoch_time_s"}


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(argv, env):
    return subprocess.Popen([sys.executable, "-m", "bnn_keras.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """(chief folder, worker folder, one-process folder, chief log)."""
    root = tmp_path_factory.mktemp("multiworker")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    processes = []
    try:
        for index in range(2):
            env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
            processes.append(_start(RUN + ["--strategy", "multi-worker", "--out", str(root / f"worker{index}")], env))
        # One process on the same global batch (2 x 100) and the scaled learning rate (2 x 1e-3 -> 2 x 3e-6).
        processes.append(_start(RUN + ["--batch-size", "200", "--lr", "0.002", "--lr-end", "6e-6",
                                       "--out", str(root / "one")], ENV))
        logs = [process.communicate(timeout=TIMEOUT)[0] for process in processes]
    finally:
        for process in processes:  # on any failure or timeout: no worker left waiting for the other
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    return root / "worker0", root / "worker1", root / "one", logs[0]


def _history(out):
    with open(out / "history.json") as file:
        return json.load(file)


def _assert_rows_match(row, expected, rel):
    """Text columns ("stage") exactly, numbers to `rel`; wall-clock columns are not compared."""
    for key, value in row.items():
        if key in WALL:
            continue
        if isinstance(value, (str, bool)) or value is None:
            assert value == expected[key], key
        else:
            assert value == pytest.approx(expected[key], rel=rel), key


def test_two_workers_train_one_run_and_switch_phase(two_workers):
    chief, _, _, log = two_workers
    rows = _history(chief)
    assert [r["clipping_phase"] for r in rows] == [0.0, 1.0]
    assert rows[0]["lr"] == pytest.approx(2e-3)  # linear scaling rule: 1e-3 x 2 replicas
    assert ("MultiWorkerMirroredStrategy, 2 replicas: global batch 200 (100 per replica), learning rate 0.001 x 2 = 0.002 "
            "(linear scaling rule)") in log
    with open(chief / "summary.json") as file:
        distribution = json.load(file)["distribution"]
    assert (distribution["replicas"], distribution["global_batch"], distribution["per_replica_batch"]) == (2, 200, 100)


def test_two_workers_equal_one_process_on_the_same_global_batch(two_workers):
    """Equal to rounding: each worker got its half of every global batch, and the synchronised
    BatchNormalization took its statistics over all 200 examples, not over each replica's 100."""
    chief, _, one, _ = two_workers
    two_rows, one_rows = _history(chief), _history(one)
    assert [set(r) for r in two_rows] == [set(r) for r in one_rows]
    for two, single in zip(two_rows, one_rows):
        _assert_rows_match(two, single, rel=1e-5)


def test_only_the_chief_writes_and_its_model_loads_anywhere(two_workers):
    chief, worker, _, _ = two_workers
    assert set(os.listdir(chief)) == {"best_model.keras", "curves.png", "history.csv", "history.json", "summary.json"}
    assert not worker.exists() or [p for p in worker.rglob("*") if p.is_file()] == []
    model = tf.keras.models.load_model(chief / "best_model.keras", compile=False, safe_mode=True)
    batch_norms = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    assert len(batch_norms) == 3 and not any(layer.synchronized for layer in batch_norms)  # plain BN saved


def test_mirrored_on_one_device_equals_the_default_strategy_and_logs_its_scaling(tmp_path, capsys):
    """One replica: the same run as without a strategy (same seed, same batches, nothing scaled)."""
    common = ["train", "mnist_mlp", "--limit", "200", "--hidden-units", "8", "--epochs", "2", "--batch-size", "50",
              "--verbose", "2"]
    assert cli.main(common + ["--out", str(tmp_path / "default")]) == 0
    assert "bnn-keras: default strategy, 1 replica: batch 50, learning rate 0.001\n" in capsys.readouterr().out
    assert cli.main(common + ["--strategy", "mirrored", "--out", str(tmp_path / "mirrored")]) == 0
    assert "bnn-keras: MirroredStrategy, 1 replica: batch 50, learning rate 0.001\n" in capsys.readouterr().out
    summaries, histories = {}, {}
    for name in ("default", "mirrored"):
        with open(tmp_path / name / "summary.json") as file:
            summaries[name] = json.load(file)
        histories[name] = _history(tmp_path / name)
    assert summaries["mirrored"]["distribution"] == {
        "strategy": "MirroredStrategy", "replicas": 1, "per_replica_batch": 50, "global_batch": 50,
        "base_learning_rate": 0.001, "learning_rate": 0.001,
        "description": "MirroredStrategy, 1 replica: batch 50, learning rate 0.001",
    }
    assert summaries["mirrored"]["recipe"]["strategy"] == "mirrored"
    assert summaries["default"]["distribution"]["strategy"] == "default strategy"
    assert [set(r) for r in histories["mirrored"]] == [set(r) for r in histories["default"]]
    assert len(histories["mirrored"]) == 2
    for mirrored, default in zip(histories["mirrored"], histories["default"]):
        _assert_rows_match(mirrored, default, rel=1e-6)
    for key in ("best_epoch", "best_val_accuracy", "test_accuracy_at_best", "final_test_accuracy"):
        assert summaries["mirrored"][key] == pytest.approx(summaries["default"][key], rel=1e-6), key
    models = [tf.keras.models.load_model(tmp_path / name / "best_model.keras", compile=False, safe_mode=True)
              for name in ("default", "mirrored")]
    assert [w.shape for w in models[1].weights] == [w.shape for w in models[0].weights]
    for mirrored, default in zip(models[1].get_weights(), models[0].get_weights()):
        np.testing.assert_allclose(mirrored, default, rtol=1e-6, atol=1e-7)

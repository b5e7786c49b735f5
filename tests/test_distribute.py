"""tf.distribute: strategy names, chief detection, the scaling rule, and mirrored == one device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras.distribute import get_strategy, is_chief, scaling_plan

HERE = os.path.dirname(os.path.abspath(__file__))


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown strategy 'horovod': expected one of default, mirrored, multi-worker, tpu"):
        get_strategy("horovod")


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="expects the cluster in the TF_CONFIG"):
        get_strategy("multi-worker")


@pytest.mark.parametrize("config,chief", [
    (None, True),
    ({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c"], "worker": ["a"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"chief": ["c"], "worker": ["a"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_is_chief(monkeypatch, config, chief):
    if config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert is_chief() is chief


def test_scaling_plan_on_one_replica_changes_nothing():
    plan = scaling_plan(tf.distribute.get_strategy(), 100, 1e-3)
    assert (plan.replicas, plan.global_batch, plan.learning_rate) == (1, 100, 1e-3)
    assert plan.describe() == "default strategy, 1 replica: batch 100, learning rate 0.001"


def test_mirrored_over_two_cpus_matches_one_device_on_the_same_global_batch():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, os.path.join(HERE, "helpers", "mirrored_equivalence.py")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["description"] == ("MirroredStrategy, 2 replicas: global batch 32 (16 per replica), "
                                  "learning rate 0.005 x 2 = 0.01 (linear scaling rule)")
    np.testing.assert_allclose(out["two_loss"], out["one_loss"], rtol=1e-5)
    assert out["max_weight_diff"] < 1e-5
    # the schedule switched every switchable on both replicas
    assert out["one_flags"] == [1.0] * 5 and out["two_flags"] == [1.0] * 10

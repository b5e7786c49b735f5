"""TensorFlow's own distribution strategies for recipe runs, and the batch/LR scaling rule.

```python
strategy = get_strategy("mirrored")          # all local GPUs (or CPUs as configured)
plan = scaling_plan(strategy, batch_size=100, learning_rate=1e-3)
print(plan.describe())   # "MirroredStrategy, 2 replicas: global batch 200 (100 per replica), ..."
```

`multi-worker` reads the cluster from the standard `TF_CONFIG` environment variable; only
the chief writes outputs (`is_chief()`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

__all__ = ["STRATEGIES", "ScalingPlan", "get_strategy", "is_chief", "scaling_plan"]

STRATEGIES = ("default", "mirrored", "multi-worker", "tpu")

# What users called the strategy, for the classes whose names say otherwise.
_DISPLAY_NAMES = {
    "_DefaultDistributionStrategy": "default strategy",
    "CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy",
}


def get_strategy(name: str = "default") -> tf.distribute.Strategy:
    """The `tf.distribute` strategy called `name` (one of `STRATEGIES`)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if not _tf_config().get("cluster"):
            got = 'one without "cluster"' if os.environ.get("TF_CONFIG", "").strip() else "none"
            raise ValueError(
                "strategy 'multi-worker' expects the cluster in the TF_CONFIG environment "
                f"variable, got {got}"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker."""
    config = _tf_config()
    task = config.get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    if kind in (None, "chief"):
        return True
    has_chief = "chief" in config.get("cluster", {})
    return kind == "worker" and index == 0 and not has_chief


_TF_CONFIG_SHAPE = (
    'TF_CONFIG must be a JSON object like {"cluster": {"worker": ["host:port", ...]}, '
    '"task": {"type": "worker", "index": 0}}'
)
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "true/false", type(None): "null"}


def _tf_config() -> dict:
    """The TF_CONFIG environment variable parsed ({} when unset), in the shape TensorFlow reads.

    Raises a one-line ValueError naming TF_CONFIG, what it should hold and what it holds.
    """
    text = os.environ.get("TF_CONFIG") or ""
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"{_TF_CONFIG_SHAPE}; got {shown!r}, which is not JSON ({error.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{_TF_CONFIG_SHAPE}; got {_JSON_TYPES[type(config)]}")
    cluster, task = config.get("cluster", {}), config.get("task", {})
    if not isinstance(cluster, dict) or not all(
        isinstance(hosts, list) and hosts and all(isinstance(h, str) for h in hosts)
        for hosts in cluster.values()
    ):
        raise ValueError(f"{_TF_CONFIG_SHAPE}; its \"cluster\" must map job names to lists of "
                         f"addresses, got {_shown(cluster)}")
    kind, index = (task.get("type"), task.get("index", 0)) if isinstance(task, dict) else (None, None)
    if (not isinstance(task, dict) or not isinstance(kind, (str, type(None)))
            or not isinstance(index, int) or isinstance(index, bool) or index < 0):
        raise ValueError(f"{_TF_CONFIG_SHAPE}; its \"task\" must hold a job \"type\" and an "
                         f"\"index\" >= 0, got {_shown(task)}")
    if kind in cluster and index >= len(cluster[kind]):
        raise ValueError(f"TF_CONFIG names task {kind!r} {index}, but its cluster has "
                         f"{len(cluster[kind])} {kind!r} address(es) (index from 0)")
    return config


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass(frozen=True)
class ScalingPlan:
    """Global batch and learning rate for a run on `replicas` replicas (linear scaling rule)."""

    strategy: str
    replicas: int
    per_replica_batch: int
    global_batch: int
    base_learning_rate: float
    learning_rate: float

    def describe(self) -> str:
        """One log line saying what the scaling rule did."""
        if self.replicas == 1:
            return (f"{self.strategy}, 1 replica: batch {self.global_batch}, "
                    f"learning rate {self.learning_rate:g}")
        return (f"{self.strategy}, {self.replicas} replicas: global batch {self.global_batch} "
                f"({self.per_replica_batch} per replica), learning rate "
                f"{self.base_learning_rate:g} x {self.replicas} = {self.learning_rate:g} "
                "(linear scaling rule)")


def scaling_plan(strategy: tf.distribute.Strategy, batch_size: int, learning_rate: float) -> ScalingPlan:
    """Keep `batch_size` per replica; scale the global batch and the LR by the replica count."""
    replicas = int(strategy.num_replicas_in_sync)
    return ScalingPlan(
        strategy=_DISPLAY_NAMES.get(type(strategy).__name__, type(strategy).__name__),
        replicas=replicas,
        per_replica_batch=batch_size,
        global_batch=batch_size * replicas,
        base_learning_rate=learning_rate,
        learning_rate=learning_rate * replicas,
    )

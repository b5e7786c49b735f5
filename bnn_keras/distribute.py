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
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "strategy 'multi-worker' expects the cluster in the TF_CONFIG environment "
                "variable, got none"
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
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    if kind in (None, "chief"):
        return True
    has_chief = "chief" in config.get("cluster", {})
    return kind == "worker" and index == 0 and not has_chief


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

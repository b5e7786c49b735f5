"""What the larq-zoo benchmarks share: building a zoo network and running a table of them.

larq-zoo is not a dependency (it pins protobuf < 3.21, which TensorFlow 2.21 cannot use);
install it with `INSTALL`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import tensorflow as tf

INSTALL = "pip install --no-deps larq-zoo==2.4.0 zookeeper==1.4.0 && pip install typeguard click"


def require_larq_zoo(parser: argparse.ArgumentParser) -> None:
    """Exit in one line naming the install command when larq-zoo is missing."""
    try:
        import larq_zoo  # noqa: F401
    except ImportError:
        parser.error(f"expected larq-zoo installed, got none: {INSTALL}")


def zoo_model(name: str, input_shape: Sequence[int], num_classes: int) -> tf.keras.Model:
    """larq-zoo's `name` (from `sota` or `literature`), untrained, seeded."""
    import larq_zoo

    tf.keras.utils.set_random_seed(0)
    family = larq_zoo.sota if hasattr(larq_zoo.sota, name) else larq_zoo.literature
    return getattr(family, name)(weights=None, input_shape=tuple(input_shape), num_classes=num_classes)


def run_table(
    names: Sequence[str],
    run_one: Callable[[str], dict[str, Any]],
    table: Callable[[list[dict[str, Any]], float], str],
    results: Path,
) -> str:
    """Run each network, printing its row and rewriting `results` after each (a stopped run keeps its rows)."""
    started, rows = time.perf_counter(), []
    for name in names:
        row = run_one(name)
        print({k: v for k, v in row.items() if k != "classes"}, flush=True)
        rows.append(row)
        text = table(rows, (time.perf_counter() - started) / 60)
        results.write_text(text, encoding="utf-8")
    print(text)
    return text

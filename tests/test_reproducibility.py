"""--seed: two runs with one seed on one machine have identical histories; another seed differs."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from bnn_keras import training
from bnn_keras.training import Recipe

WALL = {"epoch_time_s"}

TINY = Recipe(
    name="repro",
    limit=300,  # 270 train / 30 validation / 300 test images
    model_kwargs={"hidden_units": (16, 16)},
    epochs=2,
    batch_size=50,
    schedule="vanilla-then-clipped",
    switch_epoch=1,
    lr_factor=0.1,
    verbose=0,
)


def _run(tmp_path_factory, seed):
    result = training.run(TINY.replace(seed=seed, output_dir=str(tmp_path_factory.mktemp(f"seed{seed}"))))
    rows = [{k: v for k, v in row.items() if k not in WALL} for row in result["history"]]
    model = tf.keras.models.load_model(f"{result['output_dir']}/best_model.keras", compile=False, safe_mode=True)
    return rows, model.get_weights()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    determinism_before = tf_config.is_op_determinism_enabled()
    runs = {name: _run(tmp_path_factory, seed) for name, seed in (("first", 7), ("again", 7), ("other", 8))}
    return runs, determinism_before


def test_same_seed_gives_identical_histories_and_weights(runs):
    runs, _ = runs
    (first, first_weights), (again, again_weights) = runs["first"], runs["again"]
    assert len(first) == 2 and {"loss", "val_accuracy", "test_accuracy", "lr"} <= set(first[0])
    assert first == again  # every metric, exactly
    for a, b in zip(first_weights, again_weights):
        np.testing.assert_array_equal(a, b)


def test_another_seed_gives_another_run(runs):
    runs, _ = runs
    first, other = runs["first"][0], runs["other"][0]
    assert [r["loss"] for r in first] != [r["loss"] for r in other]
    assert [r["lr"] for r in first] == [r["lr"] for r in other]  # the schedule does not depend on it


def test_op_determinism_is_switched_back_after_a_run(runs):
    _, before = runs
    assert tf_config.is_op_determinism_enabled() == before

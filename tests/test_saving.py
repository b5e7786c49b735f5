"""The clipping phase and predictions survive every Keras save format and tf.train.Checkpoint."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import SwitchableSteSign

X = np.random.RandomState(0).randn(6, 8).astype("float32")


def build(clipped=False):
    inp = tf.keras.Input((8,))
    x = lq.layers.QuantDense(16, use_bias=False, kernel_quantizer=SwitchableSteSign(clipped=clipped),
                             kernel_constraint=SwitchableWeightClip(enabled=clipped))(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantDense(4, input_quantizer=SwitchableSteSign(clipped=clipped),
                             kernel_quantizer=SwitchableSteSign(clipped=clipped),
                             kernel_constraint=SwitchableWeightClip(enabled=clipped))(x)
    return tf.keras.Model(inp, x)


def phases(model):
    return [s.clipping_enabled for s in bnn_keras.find_switchables(model)]


@pytest.fixture(scope="module")
def trained():
    """A model switched to the clipped phase after a little training (weights not at init)."""
    tf.keras.utils.set_random_seed(0)
    model = build()
    model.compile("adam", "mse")
    model.fit(X, np.ones((6, 4), "float32"), epochs=2, verbose=0)
    assert bnn_keras.set_clipping(model, True) == 5
    return model, model.predict(X, verbose=0)


@pytest.mark.parametrize("filename,kwargs", [
    ("model.keras", {}),
    ("model.h5", {}),
    ("saved_model", {"save_format": "tf"}),
])
def test_model_save_and_load_model(tmp_path, trained, filename, kwargs):
    model, expected = trained
    path = str(tmp_path / filename)
    model.save(path, **kwargs)
    loaded = tf.keras.models.load_model(path)
    assert phases(loaded) == [True] * 5
    np.testing.assert_allclose(loaded.predict(X, verbose=0), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("filename", ["weights.h5", "weights_ckpt"])
def test_save_weights_into_a_fresh_vanilla_model(tmp_path, trained, filename):
    model, expected = trained
    path = str(tmp_path / filename)
    model.save_weights(path)
    fresh = build(clipped=False)
    assert phases(fresh) == [False] * 5
    fresh.load_weights(path)
    assert phases(fresh) == [True] * 5
    np.testing.assert_allclose(fresh.predict(X, verbose=0), expected, rtol=0, atol=1e-6)


def test_tf_train_checkpoint(tmp_path, trained):
    model, expected = trained
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    fresh = build(clipped=False)
    tf.train.Checkpoint(model=fresh).restore(path).assert_existing_objects_matched()
    assert phases(fresh) == [True] * 5
    np.testing.assert_allclose(fresh.predict(X, verbose=0), expected, rtol=0, atol=1e-6)


def test_vanilla_phase_also_round_trips(tmp_path, trained):
    model, _ = trained
    bnn_keras.set_clipping(model, False)
    try:
        path = str(tmp_path / "vanilla.keras")
        model.save(path)
        assert phases(tf.keras.models.load_model(path)) == [False] * 5
    finally:
        bnn_keras.set_clipping(model, True)

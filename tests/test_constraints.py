"""Switchable weight clipping and the BinaryConnect Glorot range."""

import math

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bnn_keras.constraints import SwitchableWeightClip, glorot_limit


@pytest.mark.parametrize("shape,fan_in,fan_out", [
    ((784, 2048), 784, 2048),
    ((3, 3, 128, 256), 9 * 128, 9 * 256),
    ((2048, 10), 2048, 10),
])
def test_glorot_limit_includes_receptive_field(shape, fan_in, fan_out):
    assert glorot_limit(shape) == pytest.approx(math.sqrt(1.5 / (fan_in + fan_out)), rel=1e-12)


def test_glorot_limit_rejects_vectors():
    with pytest.raises(ValueError, match="rank >= 2"):
        glorot_limit((10,))


def _one_step(enabled, glorot_range=False, lr=10.0):
    """One SGD step with a huge LR on a QuantDense kernel; returns the kernel after it."""
    tf.keras.utils.set_random_seed(0)
    clip = SwitchableWeightClip(enabled=enabled, glorot_range=glorot_range)
    model = tf.keras.Sequential([
        tf.keras.Input((32,)),
        lq.layers.QuantDense(16, use_bias=False, kernel_quantizer="switchable_ste_sign",
                             kernel_constraint=clip),
    ])
    model.compile(optimizer=tf.keras.optimizers.SGD(lr), loss="mse")
    x = np.random.RandomState(1).randn(64, 32).astype("float32")
    y = np.random.RandomState(2).randn(64, 16).astype("float32") * 10
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    return model.layers[0].kernel.numpy(), clip


def test_clip_on_bounds_every_kernel_value_after_a_step():
    kernel, _ = _one_step(enabled=True)
    assert np.abs(kernel).max() <= 1.0
    assert np.isclose(np.abs(kernel).max(), 1.0)  # the step really pushed values to the edge


def test_clip_off_lets_values_leave_the_range():
    kernel, _ = _one_step(enabled=False)
    assert np.abs(kernel).max() > 1.0


def test_glorot_range_clips_to_h():
    kernel, clip = _one_step(enabled=True, glorot_range=True)
    h = glorot_limit((32, 16))
    assert clip.limit((32, 16)) == pytest.approx(h)
    assert np.abs(kernel).max() <= h + 1e-7
    assert np.isclose(np.abs(kernel).max(), h)


def test_constraint_is_identity_when_off_and_larq_weight_clip_when_on():
    w = tf.constant(np.linspace(-3, 3, 13).reshape(13, 1).astype("float32"))
    clip = SwitchableWeightClip(clip_value=0.5)
    np.testing.assert_array_equal(clip(w).numpy(), w.numpy())
    clip.set_clipping_enabled(True)
    np.testing.assert_array_equal(clip(w).numpy(), lq.constraints.WeightClip(0.5)(w).numpy())


def test_config_round_trip_and_resolution_by_name():
    clip = SwitchableWeightClip(clip_value=0.5, enabled=True, glorot_range=True)
    clone = SwitchableWeightClip.from_config(clip.get_config())
    assert (clone.clip_value, clone.clipping_enabled, clone.glorot_range) == (0.5, True, True)
    layer = tf.keras.layers.Dense(2, kernel_constraint="switchable_weight_clip")
    assert isinstance(layer.kernel_constraint, SwitchableWeightClip)


def test_bad_clip_value():
    with pytest.raises(ValueError, match="clip_value must be a positive number, got -1"):
        SwitchableWeightClip(clip_value=-1)

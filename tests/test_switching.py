"""set_clipping / find_switchables, and switching inside one compiled fit without retracing."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import SwitchableSteSign


def _nested_model():
    inner = tf.keras.Sequential([
        tf.keras.Input((8,)),
        lq.layers.QuantDense(8, input_quantizer="switchable_ste_sign",
                             kernel_quantizer="switchable_ste_sign",
                             kernel_constraint=SwitchableWeightClip()),
    ], name="inner")
    inp = tf.keras.Input((8,))
    x = inner(inp)
    out = lq.layers.QuantConv2D(2, 1, kernel_quantizer=SwitchableSteSign(),
                                kernel_constraint=SwitchableWeightClip())(tf.keras.layers.Reshape((1, 1, 8))(x))
    return tf.keras.Model(inp, out)


def test_set_clipping_reaches_nested_models_and_counts_flips():
    model = _nested_model()
    assert len(bnn_keras.find_switchables(model)) == 5
    assert bnn_keras.set_clipping(model, True) == 5
    assert all(s.clipping_enabled for s in bnn_keras.find_switchables(model))
    assert bnn_keras.set_clipping(model, True) == 0  # already clipped: nothing flipped
    assert bnn_keras.set_clipping(model, False) == 5
    assert not any(s.clipping_enabled for s in bnn_keras.find_switchables(model))


def test_model_without_switchables_flips_nothing():
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    assert bnn_keras.set_clipping(model, True) == 0


class _SwitchAtEpoch(tf.keras.callbacks.Callback):
    """Records the kernel after every epoch and flips to clipped at epoch `at`."""

    def __init__(self, at):
        super().__init__()
        self.at, self.kernels, self.traces = at, [], []

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            bnn_keras.set_clipping(self.model, True)

    def on_epoch_end(self, epoch, logs=None):
        self.kernels.append(self.model.layers[0].kernel.numpy().copy())
        self.traces.append(self.model.train_function.experimental_get_tracing_count())


@pytest.mark.parametrize("jit, block", [(False, 1), (True, 1), (True, 4)])  # the speed settings' choices
def test_switching_inside_one_fit_freezes_large_weights_without_retracing(jit, block):
    tf.keras.utils.set_random_seed(0)
    layer = lq.layers.QuantDense(4, use_bias=False, kernel_quantizer=SwitchableSteSign())
    model = tf.keras.Sequential([tf.keras.Input((6,)), layer])
    kernel = np.random.RandomState(0).uniform(-0.5, 0.5, (6, 4)).astype("float32")
    large = np.zeros_like(kernel, dtype=bool)
    large[::2] = True
    kernel[large] = np.sign(kernel[large]) * 1.5  # |w| > 1: outside the clipped STE
    layer.kernel.assign(kernel)
    # Plain SGD: no momentum carries old gradients into the clipped phase.
    model.compile(optimizer=tf.keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit, steps_per_execution=block)
    x = np.random.RandomState(1).randn(32, 6).astype("float32")
    y = np.random.RandomState(2).randn(32, 4).astype("float32")
    recorder = _SwitchAtEpoch(at=1)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[recorder])

    after_vanilla, after_clipped = recorder.kernels
    assert np.all(after_vanilla != kernel)  # vanilla STE: every weight moves
    moved = after_clipped != after_vanilla
    assert not moved[large].any()  # clipped STE: |w| > 1 gets no gradient
    assert moved[~large].all()
    # tf.function traces twice on its first call (variable creation); none after the switch.
    assert recorder.traces[1] == recorder.traces[0]


@pytest.mark.parametrize("make", [
    lambda on: SwitchableSteSign(clipped=on), lambda on: SwitchableWeightClip(enabled=on),
])
def test_the_flag_variable_holds_exactly_0_or_1(make):
    """The documented encoding (1.0 = clipping on), at construction and after every flip."""
    for on in (False, True):
        switchable = make(on)
        assert switchable.switch_variable.numpy() == (1.0 if on else 0.0)
        switchable.set_clipping_enabled(not on)
        assert switchable.switch_variable.numpy() == (0.0 if on else 1.0)


@pytest.mark.parametrize("make", [lambda: SwitchableSteSign(), lambda: SwitchableWeightClip()])
@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_setting_the_flag_takes_only_a_boolean(make, bad):
    switchable = make()
    with pytest.raises(ValueError, match=f"^value must be True or False, got {bad!r}$"):
        switchable.set_clipping_enabled(bad)
    assert switchable.switch_variable.numpy() == 0.0  # unchanged

"""make_switchable: a user's Larq model made switchable computes what it computed, switches, exports the same."""

import larq as lq
import larq_compute_engine as lce
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras
from bnn_keras.callbacks import ClippingSchedule
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.export import FlatbufferRunner
from bnn_keras.export.flatbuffer import constant_buffers, flatbuffer_ops
from bnn_keras.quantizers import SwitchableMagnitudeAwareSign, SwitchableSteSign, VanillaSteSign
from bnn_keras.switchable import NothingToSwitchError, make_switchable

IN = 12


def _dense_model():
    """String quantisers, SteSign(1.3), weight clips, a nested Sequential, a shortcut, a non-STE quantiser."""
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input((IN,), name="x")
    x = lq.layers.QuantDense(16, kernel_quantizer="ste_sign", kernel_constraint="weight_clip", name="first")(inputs)
    x = tf.keras.layers.BatchNormalization(name="bn")(x)
    block = tf.keras.Sequential([
        tf.keras.Input((16,)),
        lq.layers.QuantDense(16, input_quantizer=lq.quantizers.SteSign(clip_value=1.3),
                             kernel_quantizer="ste_sign", kernel_constraint=lq.constraints.WeightClip(0.5),
                             name="inner"),
        tf.keras.layers.BatchNormalization(name="inner_bn"),
    ], name="block")
    x = tf.keras.layers.Add(name="shortcut")([x, block(x)])
    x = lq.layers.QuantDense(5, input_quantizer="approx_sign", kernel_quantizer="magnitude_aware_sign", name="head")(x)
    model = tf.keras.Model(inputs, x, name="users_model")
    for layer in (model.get_layer("first"), block.get_layer("inner"), model.get_layer("head")):
        kernel = np.random.RandomState(len(layer.name)).uniform(-1.6, 1.6, layer.kernel.shape)
        layer.kernel.assign(kernel.astype("float32"))  # some beyond every clip value
    return model


X = np.random.RandomState(0).randn(40, IN).astype("float32") * 1.5
Y = np.random.RandomState(1).randint(0, 5, 40)


def _gradients(model):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(X, training=True)))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]


def test_the_copy_computes_and_differentiates_as_the_original():
    model = _dense_model()
    copy, report = make_switchable(model, report=True)
    assert (report.quantizers, report.weight_clips) == (4, 2)
    assert report.left == [("head", "input_quantizer", "ApproxSign has no clipped STE to switch")]
    assert "switched 4 quantiser(s) and 2 weight clip(s); left 1 as they were (head input_quantizer:" in report.summary()
    inner = copy.get_layer("block").get_layer("inner")
    assert isinstance(inner.input_quantizer, SwitchableSteSign) and inner.input_quantizer.clip_value == 1.3
    assert isinstance(inner.kernel_constraint, SwitchableWeightClip) and inner.kernel_constraint.clip_value == 0.5
    assert isinstance(copy.get_layer("head").kernel_quantizer, SwitchableMagnitudeAwareSign)
    # The original clips (clip values 1, 1.3; weight clips 1, 0.5): so does the copy, from the start.
    assert {s.clipping_enabled for s in bnn_keras.find_switchables(copy)} == {True}

    for training in (False, True):
        np.testing.assert_array_equal(copy(X, training=training).numpy(), model(X, training=training).numpy())
    for g_copy, g_model in zip(_gradients(copy), _gradients(model), strict=True):
        np.testing.assert_array_equal(g_copy, g_model)
    # One SGD step (constraints applied after it) lands on the same weights.
    for m in (model, copy):
        m.compile(tf.keras.optimizers.SGD(0.5), loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.train_on_batch(X, Y)
    flags = {id(s.switch_variable) for s in bnn_keras.find_switchables(copy)}
    copied = [w for w in copy.weights if id(w) not in flags]
    for w_copy, w_model in zip(copied, model.weights, strict=True):
        np.testing.assert_array_equal(w_copy.numpy(), w_model.numpy(), err_msg=w_model.name)
    assert np.abs(model.get_layer("first").kernel.numpy()).max() == 1.0  # the clip acted


def test_the_copy_is_independent_and_its_vanilla_phase_passes_the_clipped_gradient():
    model = _dense_model()
    copy = make_switchable(model, clipped=False)
    assert {s.clipping_enabled for s in bnn_keras.find_switchables(copy)} == {False}
    np.testing.assert_array_equal(copy(X).numpy(), model(X).numpy())  # the forward pass has no phase
    kernel = model.get_layer("first").kernel.numpy()
    g_copy, g_model = _gradients(copy)[0], _gradients(model)[0]
    beyond = np.abs(kernel) > 1.0
    assert beyond.any() and not g_model[beyond].any()  # clipped STE: no gradient beyond 1
    assert np.all(g_copy[beyond] != 0)  # vanilla: there is
    copy.get_layer("first").kernel.assign(np.zeros_like(kernel))
    np.testing.assert_array_equal(model.get_layer("first").kernel.numpy(), kernel)  # weights were copied


def test_a_clipping_schedule_flips_the_copy_inside_one_fit_without_retracing():
    copy = make_switchable(_dense_model())
    copy.compile(tf.keras.optimizers.Adam(1e-2), loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    traces = []
    record = tf.keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: traces.append(copy.train_function.experimental_get_tracing_count()))
    history = copy.fit(X, Y, epochs=3, batch_size=10, verbose=0,
                       callbacks=[ClippingSchedule(switch_epoch=1, monitor="loss", verbose=0), record])
    assert history.history["clipping_phase"] == [0.0, 1.0, 1.0]
    assert traces[0] == traces[1] == traces[2]
    assert {s.clipping_enabled for s in bnn_keras.find_switchables(copy)} == {True}


def test_phases_of_switchable_and_vanilla_originals_are_kept_unless_told():
    inputs = tf.keras.Input((IN,))
    x = lq.layers.QuantDense(4, input_quantizer=VanillaSteSign(), kernel_quantizer=SwitchableSteSign(clipped=False),
                             kernel_constraint=SwitchableWeightClip(enabled=True, clip_value=0.7))(inputs)
    x = lq.layers.QuantDense(3, kernel_quantizer=lq.quantizers.SteSign(clip_value=None))(x)
    model = tf.keras.Model(inputs, x)
    copy, report = make_switchable(model, report=True)
    first, second = copy.layers[1], copy.layers[2]
    assert not first.input_quantizer.clipping_enabled and not first.kernel_quantizer.clipping_enabled
    assert first.kernel_constraint.clipping_enabled and first.kernel_constraint.clip_value == 0.7
    assert not second.kernel_quantizer.clipping_enabled and second.kernel_quantizer.clip_value == 1.0
    assert report.quantizers == 2  # the two that were not switchable already
    assert first.kernel_quantizer is not model.layers[1].kernel_quantizer
    assert first.input_quantizer.clip_value == 1.0
    copy = make_switchable(model, clipped=True)
    assert {s.clipping_enabled for s in bnn_keras.find_switchables(copy)} == {True}
    assert copy.layers[1].input_quantizer.clip_value == 1.0


def test_a_model_already_switchable_is_copied_with_nothing_to_convert():
    inputs = tf.keras.Input((IN,))
    x = lq.layers.QuantDense(4, kernel_quantizer=SwitchableSteSign(clipped=True),
                             kernel_constraint=SwitchableWeightClip(enabled=False))(inputs)
    model = tf.keras.Model(inputs, x)
    copy, report = make_switchable(model, report=True)
    assert (report.quantizers, report.weight_clips) == (0, 0)
    assert [s.clipping_enabled for s in bnn_keras.find_switchables(copy)] == [True, False]
    np.testing.assert_array_equal(copy.predict(X, verbose=0), model.predict(X, verbose=0))


def test_larqs_ste_sign_function_becomes_a_clipped_switchable_at_one():
    """`lq.quantizers.ste_sign` (the function) clips at 1: its twin starts clipped unless told."""
    inputs = tf.keras.Input((IN,))
    x = lq.layers.QuantDense(4, input_quantizer=lq.quantizers.ste_sign, kernel_quantizer=lq.quantizers.ste_sign)(inputs)
    model = tf.keras.Model(inputs, x)
    for clipped, expected in ((None, True), (False, False), (True, True)):
        layer = make_switchable(model, clipped=clipped).layers[1]
        for quantizer in (layer.input_quantizer, layer.kernel_quantizer):
            assert isinstance(quantizer, SwitchableSteSign)
            assert (quantizer.clipping_enabled, quantizer.clip_value) == (expected, 1.0)


def test_quantisers_used_as_layers_are_switched():
    inputs = tf.keras.Input((IN,))
    x = lq.quantizers.SteSign(clip_value=0.8, name="sign")(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3)(x))
    copy, report = make_switchable(model, report=True)
    assert report.switched == [("sign", "layer", "SteSign(clip_value=0.8) -> SwitchableSteSign(clip_value=0.8)")]
    np.testing.assert_array_equal(copy(X).numpy(), model(X).numpy())
    np.testing.assert_array_equal(_gradients(copy)[0], _gradients(model)[0])


def _conv_model():
    tf.keras.utils.set_random_seed(5)
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = tf.keras.layers.BatchNormalization(name="stem_bn")(x)
    quant = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                 use_bias=False, pad_values=1.0, padding="same")
    y = lq.layers.QuantConv2D(16, 3, name="binary", **quant)(x)
    y = tf.keras.layers.BatchNormalization(name="binary_bn")(y)
    nested_in = tf.keras.Input((8, 8, 16))
    nested = tf.keras.Model(nested_in, lq.layers.QuantConv2D(16, 3, name="nested_conv", **quant)(nested_in), name="nested")
    x = tf.keras.layers.Add()([x, nested(y)])
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(10, name="logits")(x))
    return bnn_keras.export.randomize_batch_norm(model, seed=1)


def test_the_copy_exports_to_the_same_lce_file():
    model = _conv_model()
    copy = make_switchable(model)
    original, switched = lce.convert_keras_model(model), lce.convert_keras_model(copy)
    assert flatbuffer_ops(switched) == flatbuffer_ops(original)
    assert flatbuffer_ops(original).count("LceBconv2d") == 2
    assert constant_buffers(switched) == constant_buffers(original)  # every weight byte, in any order
    assert abs(len(switched) - len(original)) < 200  # only tensor names differ
    x = np.random.RandomState(2).randn(16, 8, 8, 3).astype("float32")
    (a,), (b,) = FlatbufferRunner(original, "lce").predict(x), FlatbufferRunner(switched, "lce").predict(x)
    np.testing.assert_array_equal(a, b)


def test_the_copy_saves_and_loads_with_its_phase(tmp_path):
    copy = make_switchable(_dense_model(), clipped=False)
    copy.get_layer("head").kernel_quantizer.set_clipping_enabled(True)
    copy.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras")
    head = loaded.get_layer("head").kernel_quantizer
    assert isinstance(head, SwitchableMagnitudeAwareSign) and head.clipping_enabled
    assert sum(s.clipping_enabled for s in bnn_keras.find_switchables(loaded)) == 1
    np.testing.assert_array_equal(loaded(X).numpy(), copy(X).numpy())


def test_nested_subclassed_models_and_lambdas_are_listed_as_left():
    class Inner(tf.keras.Model):
        def __init__(self):
            super().__init__(name="inner_subclassed")
            self.dense = lq.layers.QuantDense(4, kernel_quantizer="ste_sign")

        def call(self, x):
            return self.dense(x)

    inputs = tf.keras.Input((IN,))
    x = tf.keras.layers.Lambda(lambda t: 2.0 * t, name="double")(inputs)
    x = lq.layers.QuantDense(4, kernel_quantizer="ste_sign", name="q")(x)
    model = tf.keras.Model(inputs, Inner()(x))
    copy, report = make_switchable(model, report=True)
    assert [entry[:2] for entry in report.left] == [("double", "layer"), ("inner_subclassed", "model")]
    assert "kept as it is (shared with the original)" in report.left[1][2]
    np.testing.assert_array_equal(copy(X).numpy(), model(X).numpy())


@pytest.mark.parametrize("make, error, message", [
    (lambda: tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2, name="d")]), NothingToSwitchError,
     "make_switchable expected a model with Larq sign quantisers or weight clips, got 'sequential"),
    (lambda: tf.keras.Sequential([tf.keras.Input((3,)), lq.layers.QuantDense(2, kernel_quantizer="approx_sign", name="d")]),
     NothingToSwitchError, "with none it can switch: d kernel_quantizer: ApproxSign has no clipped STE to switch"),
    (lambda: "model.h5", TypeError, "make_switchable expects a Keras model, got str"),
])
def test_what_cannot_be_switched_is_refused_in_one_line(make, error, message):
    with pytest.raises(error) as raised:
        make_switchable(make())
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_subclassed_model_and_a_non_boolean_phase_are_refused():
    class Net(tf.keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="expects a functional or Sequential model, got the subclassed 'Net'"):
        make_switchable(Net())
    with pytest.raises(ValueError, match="clipped must be True or False, got 'yes'"):
        make_switchable(_dense_model(), clipped="yes")


def test_the_report_summary_shows_five_things_left_and_counts_the_rest():
    from bnn_keras.switchable import SwitchReport

    def left(n):
        return SwitchReport(left=[(f"layer{i}", "kernel_quantizer", "ApproxSign has no clipped STE to switch") for i in range(n)])

    assert left(5).summary().count("ApproxSign") == 5 and "more" not in left(5).summary()
    six = left(6).summary()
    assert six.count("ApproxSign") == 5 and six.endswith("; and 1 more)") and "left 6 as they were" in six


def test_the_refusal_names_the_first_three_reasons():
    inputs = tf.keras.Input((IN,))
    x = inputs
    for i in range(4):
        x = lq.layers.QuantDense(4, kernel_quantizer="approx_sign", name=f"approx{i}")(x)
    with pytest.raises(NothingToSwitchError) as raised:
        make_switchable(tf.keras.Model(inputs, x))
    message = str(raised.value)
    assert message.count("has no clipped STE to switch") == 3 and "approx2" in message and "approx3" not in message

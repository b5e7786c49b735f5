"""STE quantisers: forward sign and backward gradients against a numpy reference."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bnn_keras.quantizers import ClippedSteSign, SwitchableSteSign, VanillaSteSign

CLIP = 1.0
# Below, at and above the clip value, 0 and both signs.
VALUES = np.array([-3.0, -1.0 - 1e-6, -1.0, -0.5, -1e-7, 0.0, 1e-7, 0.5, 1.0, 1.0 + 1e-6, 3.0], "float32")


def reference_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def reference_grad(x, upstream, clip_value):
    if clip_value is None:
        return upstream
    return np.where(np.abs(x) <= clip_value, upstream, 0.0)


def forward_and_grad(quantizer, x, upstream, jit=None):
    """Eagerly (jit None), or inside a tf.function compiled by XLA (True) or not (False)."""

    def both(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quantizer(x)
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, x)

    if jit is not None:
        both = tf.function(both, jit_compile=jit)
    y, grad = both(tf.constant(x))
    return y.numpy(), grad.numpy()


JIT = [None, False, True]  # eager, graph, XLA (the speed setting's "on")


CASES = [
    (VanillaSteSign, {}, None),
    (ClippedSteSign, {}, CLIP),
    (ClippedSteSign, {"clip_value": 0.5}, 0.5),
    (SwitchableSteSign, {}, None),
    (SwitchableSteSign, {"clipped": True}, CLIP),
    (SwitchableSteSign, {"clipped": True, "clip_value": 2.0}, 2.0),
]


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("cls,kwargs,clip_value", CASES)
def test_forward_and_gradient_match_numpy(cls, kwargs, clip_value, jit):
    upstream = np.linspace(-2.0, 3.0, VALUES.size).astype("float32")
    y, grad = forward_and_grad(cls(**kwargs), VALUES, upstream, jit)
    np.testing.assert_array_equal(y, reference_sign(VALUES))
    np.testing.assert_array_equal(grad, reference_grad(VALUES, upstream, clip_value))


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("clipped", [False, True])
def test_switchable_gradients_in_a_layer_for_weights_and_activations(clipped, jit):
    """As input and kernel quantiser of a QuantDense: both gradients follow the phase."""
    x = np.array([[-2.0, -1.0, 0.0, 0.3, 1.0, 1.5]], "float32")
    kernel = np.array([[-1.5], [-0.2], [0.0], [0.9], [1.0], [2.5]], "float32")
    layer = lq.layers.QuantDense(
        1,
        use_bias=False,
        input_quantizer=SwitchableSteSign(clipped=clipped),
        kernel_quantizer=SwitchableSteSign(clipped=clipped),
    )
    layer.build((None, 6))
    layer.kernel.assign(kernel)
    xt = tf.constant(x)

    def grads(xt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = tf.reduce_sum(layer(xt))
        return tape.gradient(y, [xt, layer.kernel])

    dx, dk = (grads if jit is None else tf.function(grads, jit_compile=jit))(xt)
    clip = CLIP if clipped else None
    # y = sum_j sign(x_j) sign(k_j): dy/dsign(x) = sign(k), dy/dsign(k) = sign(x)
    np.testing.assert_array_equal(dx.numpy(), reference_grad(x, reference_sign(kernel.T), clip))
    np.testing.assert_array_equal(dk.numpy(), reference_grad(kernel, reference_sign(x.T), clip))


@pytest.mark.parametrize("jit", [False, True])
def test_switch_changes_gradient_of_the_same_traced_function(jit):
    q = SwitchableSteSign()
    x = tf.constant(VALUES)

    @tf.function(jit_compile=jit)
    def grad():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(q(x))
        return tape.gradient(y, x)

    np.testing.assert_array_equal(grad().numpy(), np.ones_like(VALUES))
    q.set_clipping_enabled(True)
    np.testing.assert_array_equal(grad().numpy(), (np.abs(VALUES) <= CLIP).astype("float32"))
    assert grad.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("alias,cls", [
    ("vanilla_ste_sign", VanillaSteSign),
    ("clipped_ste_sign", ClippedSteSign),
    ("switchable_ste_sign", SwitchableSteSign),
])
def test_string_aliases_resolve_where_larq_accepts_quantizers(alias, cls):
    assert isinstance(lq.quantizers.get(alias), cls)
    layer = lq.layers.QuantDense(3, input_quantizer=alias, kernel_quantizer=alias)
    assert isinstance(layer.kernel_quantizer, cls) and isinstance(layer.input_quantizer, cls)


def test_precision_and_summary_report_one_bit():
    assert VanillaSteSign.precision == ClippedSteSign.precision == SwitchableSteSign.precision == 1
    model = tf.keras.Sequential([
        tf.keras.Input((16,)),
        lq.layers.QuantDense(8, use_bias=False, input_quantizer="switchable_ste_sign",
                             kernel_quantizer="switchable_ste_sign"),
    ])
    profile = lq.models.ModelProfile(model)
    layer_profile = profile.layer_profiles[0]
    kernel_profiles = [p for p in layer_profile.weight_profiles if p.count == 16 * 8]
    assert [p.bitwidth for p in kernel_profiles] == [1]
    assert layer_profile.input_precision == 1


def test_get_config_round_trip_keeps_phase_and_clip_value():
    q = SwitchableSteSign(clip_value=0.7)
    q.set_clipping_enabled(True)
    config = q.get_config()
    assert config["clipped"] is True and config["clip_value"] == 0.7
    q2 = SwitchableSteSign.from_config(config)
    assert q2.clipping_enabled and q2.clip_value == 0.7
    v = VanillaSteSign.from_config(VanillaSteSign().get_config())
    assert v.clip_value is None
    c = ClippedSteSign.from_config(ClippedSteSign(0.25).get_config())
    assert c.clip_value == 0.25


@pytest.mark.parametrize("bad", [0.0, -1.0, None])
def test_bad_clip_value_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="clip_value must be a positive number"):
        SwitchableSteSign(clip_value=bad)
    with pytest.raises(ValueError, match="clip_value must be a positive number"):
        ClippedSteSign(clip_value=bad)


@pytest.mark.parametrize("cls, name", [
    (VanillaSteSign, "VanillaSteSign"), (ClippedSteSign, "ClippedSteSign"), (SwitchableSteSign, "SwitchableSteSign"),
])
def test_registered_for_keras_under_the_package_name(cls, name):
    assert tf.keras.utils.get_registered_name(cls) == f"bnn_keras>{name}"
    assert tf.keras.utils.get_registered_object(f"bnn_keras>{name}") is cls


def test_vanilla_ste_ignores_a_clip_value_and_does_not_record_one():
    """A config that carries clip_value (Larq's SteSign has one) still builds the identity STE."""
    q = VanillaSteSign(clip_value=0.5)
    assert q.clip_value is None and "clip_value" not in q.get_config()
    x = tf.constant([-3.0, 0.75, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [1.0, 1.0, 1.0])

"""Stochastic binarisation: BinaryConnect's draws while training, the sign at inference, the switchable STE."""

import json
import os
import re
import subprocess
import sys
import textwrap

import larq as lq
import larq_compute_engine as lce
import numpy as np
import pytest
import tensorflow as tf
from larq_compute_engine.tflite.python.interpreter import Interpreter

from bnn_keras import models
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import StochasticSteSign, SwitchableSteSign

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP = 1.0
# Below, at and above the clip value, 0 and both signs.
VALUES = np.array([-3.0, -1.0 - 1e-6, -1.0, -0.5, -1e-7, 0.0, 1e-7, 0.5, 1.0, 1.0 + 1e-6, 3.0], "float32")
# Saturated (|w| >= 1: always one sign), 0 (a fair coin) and in between; step 0.25.
WEIGHTS = np.linspace(-1.5, 1.5, 13).astype("float32")


def reference_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def reference_grad(x, upstream, clip_value):
    if clip_value is None:
        return upstream
    return np.where(np.abs(x) <= clip_value, upstream, 0.0)


def expected_mean(w):
    """BinaryConnect: P(+1) = hard_sigmoid(w) = clip((w + 1) / 2, 0, 1), so E[q] = 2 P(+1) - 1."""
    return 2.0 * np.clip((w.astype("float64") + 1.0) / 2.0, 0.0, 1.0) - 1.0


def draws(quantizer, x, n, jit=False):
    """`n` training-mode outputs of `quantizer` on `x`, stacked, from one traced loop."""

    @tf.function(jit_compile=jit)
    def loop():
        outputs = tf.TensorArray(tf.float32, size=n)
        for i in tf.range(n):
            outputs = outputs.write(i, quantizer(x, training=True))
        return outputs.stack()

    return loop().numpy()


def quantizers_of(model, attribute):
    return [getattr(layer, attribute) for layer in model.layers if getattr(layer, attribute, None) is not None]


# --------------------------------------------------------------------------- the draws


@pytest.mark.parametrize("jit", [False, True])
def test_training_mean_is_two_hard_sigmoid_minus_one(jit):
    n = 4000
    q = StochasticSteSign(seed=1234)
    y = draws(q, tf.constant(WEIGHTS), n, jit)
    assert set(np.unique(y)) == {-1.0, 1.0}
    m = expected_mean(WEIGHTS)
    tolerance = 5 * np.sqrt((1 - m**2) / n)  # 5 standard errors; 0 where |w| >= 1 (always the same sign)
    np.testing.assert_array_less(np.abs(y.mean(axis=0) - m), tolerance + 1e-12)
    np.testing.assert_array_equal(y[:, np.abs(WEIGHTS) >= 1], np.broadcast_to(np.sign(WEIGHTS[np.abs(WEIGHTS) >= 1]), (n, 6)))
    assert int(q.draws_variable.numpy()) == n  # one count per training call


def test_glorot_scale_draws_in_units_of_the_layer_range():
    n = 4000
    kernel_shape = (20, 10)
    h = np.sqrt(1.5 / 30)  # BinaryConnect's H for fan-in 20, fan-out 10
    w = (np.linspace(-1.5, 1.5, 200).reshape(kernel_shape) * h).astype("float32")
    q = StochasticSteSign(seed=7, scale="glorot")
    y = draws(q, tf.constant(w), n)
    assert q._scale == pytest.approx(h)
    m = expected_mean(w / h)
    tolerance = 5 * np.sqrt((1 - m**2) / n)
    np.testing.assert_array_less(np.abs(y.mean(axis=0) - m), tolerance + 1e-12)
    assert StochasticSteSign(scale=0.5).get_config()["scale"] == 0.5
    assert StochasticSteSign.from_config(q.get_config()).scale == "glorot"
    with pytest.raises(ValueError, match="scale must be a number > 0 or 'glorot', got 0"):
        StochasticSteSign(scale=0)


def test_builders_draw_glorot_clipped_kernels_in_units_of_h():
    model = models.mlp((4,), 3, hidden_units=(8,), weight_clip="glorot", weight_binarisation="stochastic",
                       variant="binarynet", activation_binarisation="stochastic")
    kernels, inputs = quantizers_of(model, "kernel_quantizer"), quantizers_of(model, "input_quantizer")
    assert [k.scale for k in kernels] == ["glorot", "glorot"] and [i.scale for i in inputs] == [1.0, 1.0]
    unit = models.mlp((4,), 3, hidden_units=(8,), weight_binarisation="stochastic")
    assert [k.scale for k in quantizers_of(unit, "kernel_quantizer")] == [1.0, 1.0]


def test_each_training_call_draws_anew_and_elements_are_independent():
    q = StochasticSteSign(seed=0)
    x = tf.zeros((2000,))
    first, second = q(x, training=True).numpy(), q(x, training=True).numpy()
    assert not np.array_equal(first, second)
    # Within one draw, a fair coin per element: the mean of 2000 is within 5 standard errors of 0.
    assert abs(first.mean()) < 5 * np.sqrt(1 / 2000)
    assert int(q.draws_variable.numpy()) == 2


def test_same_seed_same_draws_and_another_seed_other_draws():
    x = tf.zeros((500,))

    def sequence(seed):
        q = StochasticSteSign(seed=seed)
        return [q(x, training=True).numpy() for _ in range(3)]

    a, b, c = sequence(7), sequence(7), sequence(8)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not any(np.array_equal(u, v) for u, v in zip(a, c))


def test_default_seed_comes_from_the_seeded_python_random():
    tf.keras.utils.set_random_seed(3)
    first = StochasticSteSign().seed
    tf.keras.utils.set_random_seed(3)
    again, other = StochasticSteSign().seed, StochasticSteSign().seed
    assert first == again != other


def test_default_seeds_span_2_to_the_31():
    """Unseeded quantisers draw seeds from [0, 2**31): 100 of them, 100 distinct seeds."""
    tf.keras.utils.set_random_seed(4)
    seeds = [StochasticSteSign().seed for _ in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= s < 2**31 for s in seeds)
    assert max(seeds) > 2**30  # not a small range: P(max of 100 uniform draws <= 2**30) = 2**-100


def test_larqs_flip_ratio_metric_counts_the_signs_two_draws_changed():
    x = tf.constant(np.linspace(-0.9, 0.9, 40).astype("float32"))
    q = StochasticSteSign(seed=5, metrics=["flip_ratio"])
    first = q(x, training=True).numpy()
    second = q(x, training=True).numpy()
    (metric,) = q.metrics
    assert float(metric.result()) == pytest.approx(np.mean(first != second), abs=1e-6)
    assert 0 < np.mean(first != second) < 1


def test_draws_resume_from_the_counter():
    """A quantiser whose counter is set to k draws what another draws on its (k+1)-th call."""
    x = tf.zeros((500,))
    q = StochasticSteSign(seed=11)
    for _ in range(3):
        third = q(x, training=True).numpy()
    resumed = StochasticSteSign(seed=11)
    resumed.draws_variable.assign(2)
    np.testing.assert_array_equal(resumed(x, training=True).numpy(), third)


# --------------------------------------------------------------------------- inference


def test_inference_is_the_deterministic_sign_and_draws_nothing():
    q = StochasticSteSign(seed=0)
    x = tf.constant(VALUES)
    np.testing.assert_array_equal(q(x).numpy(), reference_sign(VALUES))
    np.testing.assert_array_equal(q(x, training=False).numpy(), reference_sign(VALUES))
    assert int(q.draws_variable.numpy()) == 0
    graph = tf.function(lambda x: q(x, training=False)).get_concrete_function(x).graph
    ops = {op.type for op in graph.get_operations()}
    assert "Sign" in ops and not any("Random" in op or "AssignAdd" in op for op in ops), ops


def test_a_tensor_training_flag_picks_the_branch_at_run_time():
    q = StochasticSteSign(seed=0)
    x = tf.zeros((500,))
    both = tf.function(lambda x, training: q(x, training=training))
    np.testing.assert_array_equal(both(x, tf.constant(False)).numpy(), np.ones(500))
    assert int(q.draws_variable.numpy()) == 0
    drawn = both(x, tf.constant(True)).numpy()
    assert set(np.unique(drawn)) == {-1.0, 1.0} and int(q.draws_variable.numpy()) == 1


def _stochastic_and_deterministic_mlps():
    tf.keras.utils.set_random_seed(0)
    kwargs = {"hidden_units": (16, 16), "variant": "binarynet"}
    stochastic = models.mlp((6,), 3, weight_binarisation="stochastic", activation_binarisation="stochastic", **kwargs)
    deterministic = models.mlp((6,), 3, **kwargs)
    models.copy_weights(stochastic, deterministic)
    return stochastic, deterministic


X = np.random.RandomState(0).randn(32, 6).astype("float32")
Y = np.random.RandomState(1).randint(0, 3, 32)


def test_predict_is_repeatable_and_equals_the_switchable_sign_model():
    stochastic, deterministic = _stochastic_and_deterministic_mlps()
    first = stochastic.predict(X, verbose=0)
    np.testing.assert_array_equal(stochastic.predict(X, verbose=0), first)
    np.testing.assert_array_equal(deterministic.predict(X, verbose=0), first)
    assert not np.array_equal(stochastic(X, training=True).numpy(), stochastic(X, training=True).numpy())


@pytest.mark.parametrize("jit", [False, True])
def test_fit_counts_one_draw_per_step_and_predict_evaluate_none(jit):
    stochastic, _ = _stochastic_and_deterministic_mlps()
    stochastic.compile(
        tf.keras.optimizers.Adam(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit
    )
    stochastic.fit(X, Y, batch_size=8, epochs=2, verbose=0)  # 4 steps an epoch
    counters = [q.draws_variable for q in quantizers_of(stochastic, "kernel_quantizer") + quantizers_of(stochastic, "input_quantizer")]
    assert len(counters) == 3 + 3  # binarynet: every dense layer binarises its kernel and its input
    assert [int(c.numpy()) for c in counters] == [8] * 6
    stochastic.predict(X, verbose=0)
    stochastic.evaluate(X, Y, verbose=0)
    assert [int(c.numpy()) for c in counters] == [8] * 6


@pytest.mark.parametrize("filename", ["model.keras", "model.h5"])
def test_save_and_load_keep_predictions_seed_and_counter(tmp_path, filename):
    stochastic, _ = _stochastic_and_deterministic_mlps()
    stochastic.compile(tf.keras.optimizers.Adam(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stochastic.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / filename)
    stochastic.save(path)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), stochastic.predict(X, verbose=0))
    for attribute in ("kernel_quantizer", "input_quantizer"):
        original, restored = quantizers_of(stochastic, attribute), quantizers_of(loaded, attribute)
        assert all(isinstance(q, StochasticSteSign) for q in restored)
        assert [q.seed for q in restored] == [q.seed for q in original]
        assert [int(q.draws_variable.numpy()) for q in restored] == [4] * 3
    # The next training step draws the same binarisation in both: the resumed run replays it.
    np.testing.assert_array_equal(loaded(X, training=True).numpy(), stochastic(X, training=True).numpy())


def test_counter_follows_the_flag_in_the_weights_lists():
    q = StochasticSteSign(seed=0)
    assert q.non_trainable_weights == [q.switch_variable, q.draws_variable]
    layer = lq.layers.QuantDense(2, use_bias=False, kernel_quantizer=q)
    layer.build((None, 3))
    assert any(w is q.draws_variable for w in layer.non_trainable_weights)


def test_make_switchable_copies_seed_and_counter_so_the_copy_draws_the_same():
    import bnn_keras

    stochastic, _ = _stochastic_and_deterministic_mlps()
    stochastic(X, training=True)  # counters at 1
    copy = bnn_keras.make_switchable(stochastic)
    for attribute in ("kernel_quantizer", "input_quantizer"):
        original, copied = quantizers_of(stochastic, attribute), quantizers_of(copy, attribute)
        assert [type(q) for q in copied] == [StochasticSteSign] * 3
        assert [q.seed for q in copied] == [q.seed for q in original]
        assert [int(q.draws_variable.numpy()) for q in copied] == [1] * 3
    np.testing.assert_array_equal(copy(X, training=True).numpy(), stochastic(X, training=True).numpy())


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("jit", [None, False, True])
@pytest.mark.parametrize("clipped,clip_value", [(False, None), (True, CLIP), (True, 0.5)])
def test_training_gradient_is_the_switchable_ste(clipped, clip_value, jit):
    q = StochasticSteSign(clipped=clipped, clip_value=clip_value or CLIP, seed=0)
    upstream = np.linspace(-2.0, 3.0, VALUES.size).astype("float32")

    def both(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, x)

    if jit is not None:
        both = tf.function(both, jit_compile=jit)
    y, grad = both(tf.constant(VALUES))
    assert set(np.unique(y.numpy())) <= {-1.0, 1.0}
    np.testing.assert_array_equal(grad.numpy(), reference_grad(VALUES, upstream, clip_value))


@pytest.mark.parametrize("jit", [False, True])
def test_switch_changes_the_training_gradient_without_retracing(jit):
    q = StochasticSteSign(seed=0)
    x = tf.constant(VALUES)

    @tf.function(jit_compile=jit)
    def grad():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(q(x, training=True))
        return tape.gradient(y, x)

    np.testing.assert_array_equal(grad().numpy(), np.ones_like(VALUES))
    q.set_clipping_enabled(True)
    np.testing.assert_array_equal(grad().numpy(), (np.abs(VALUES) <= CLIP).astype("float32"))
    assert grad.experimental_get_tracing_count() == 1


# --------------------------------------------------------------------------- registration


def test_alias_registration_and_config_round_trip():
    assert isinstance(lq.quantizers.get("stochastic_ste_sign"), StochasticSteSign)
    assert tf.keras.utils.get_registered_name(StochasticSteSign) == "bnn_keras>StochasticSteSign"
    layer = lq.layers.QuantDense(3, input_quantizer="stochastic_ste_sign", kernel_quantizer="stochastic_ste_sign")
    assert isinstance(layer.kernel_quantizer, StochasticSteSign) and isinstance(layer.input_quantizer, StochasticSteSign)
    q = StochasticSteSign(clipped=True, clip_value=0.7, seed=42)
    config = q.get_config()
    assert (config["clipped"], config["clip_value"], config["seed"]) == (True, 0.7, 42)
    copy = StochasticSteSign.from_config(config)
    assert copy.clipping_enabled and copy.clip_value == 0.7 and copy.seed == 42
    assert StochasticSteSign.precision == 1


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True, 2**63])
def test_bad_seed_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\) or None, got"):
        StochasticSteSign(seed=bad)


# --------------------------------------------------------------------------- models


def test_mlp_and_vgg10_put_stochastic_quantisers_where_asked():
    weights_only = models.mlp((6,), 3, hidden_units=(4, 4), variant="binarynet", weight_binarisation="stochastic")
    assert [type(q) for q in quantizers_of(weights_only, "kernel_quantizer")] == [StochasticSteSign] * 3
    assert [type(q) for q in quantizers_of(weights_only, "input_quantizer")] == [SwitchableSteSign] * 3
    vgg = models.vgg10((8, 8, 1), 3, width_multiplier=0.03125, variant="binarynet", activation_binarisation="stochastic")
    assert [type(q) for q in quantizers_of(vgg, "kernel_quantizer")] == [SwitchableSteSign] * 9
    assert [type(q) for q in quantizers_of(vgg, "input_quantizer")] == [StochasticSteSign] * 9
    res = models.resnet18((8, 8, 3), 3, width_multiplier=0.0625, weight_binarisation="stochastic")
    assert [type(q) for q in quantizers_of(res, "kernel_quantizer")] == [StochasticSteSign] * 18
    assert quantizers_of(res, "input_quantizer") == []  # binaryconnect: real activations
    seeds = [q.seed for q in quantizers_of(weights_only, "kernel_quantizer")]
    assert len(set(seeds)) == 3  # every layer draws its own noise


@pytest.mark.parametrize("builder,kwargs,layers", [
    (models.mlp, {"hidden_units": (4, 4)}, 3),
    (models.vgg10, {"width_multiplier": 0.03125}, 9),
])
def test_binary_activations_variant_is_binarynet_with_real_weights(builder, kwargs, layers):
    model = builder((8, 8, 1), 3, variant="binary-activations", **kwargs)
    binarynet = builder((8, 8, 1), 3, variant="binarynet", **kwargs)
    inputs = quantizers_of(model, "input_quantizer")
    assert [type(q) for q in inputs] == [SwitchableSteSign] * layers
    assert len(inputs) == len(quantizers_of(binarynet, "input_quantizer"))
    assert quantizers_of(model, "kernel_quantizer") == [] and quantizers_of(model, "kernel_constraint") == []
    assert not [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Activation)]
    def trainable(m):
        return [tuple(w.shape) for w in m.trainable_weights]

    assert trainable(model) == trainable(binarynet)  # the same kernels and BN parameters
    padding = [getattr(layer, "pad_values", None) for layer in model.layers if isinstance(layer, lq.layers.QuantConv2D)]
    assert padding == [getattr(layer, "pad_values", None) for layer in binarynet.layers if isinstance(layer, lq.layers.QuantConv2D)]
    stochastic = builder((8, 8, 1), 3, variant="binary-activations", activation_binarisation="stochastic", **kwargs)
    assert [type(q) for q in quantizers_of(stochastic, "input_quantizer")] == [StochasticSteSign] * layers


def test_copy_weights_hands_float_to_binary_activations_to_binarynet():
    tf.keras.utils.set_random_seed(0)
    kwargs = {"hidden_units": (5, 4)}
    chain = [models.mlp((6,), 3, variant=v, **kwargs) for v in ("float", "binary-activations", "binarynet")]
    # Real weights, so the binary-activations step keeps exactly what the float step learned.
    assert models.copy_weights(chain[0], chain[1]) == models.copy_weights(chain[1], chain[2]) == 6
    for name in ("dense_1", "dense_2", "dense_out"):
        np.testing.assert_array_equal(chain[2].get_layer(name).kernel.numpy(), chain[0].get_layer(name).kernel.numpy())
    for name in ("bn_1", "bn_2", "bn_out"):
        np.testing.assert_array_equal(chain[2].get_layer(name).get_weights(), chain[0].get_layer(name).get_weights())
    x = np.random.RandomState(2).randn(4, 6).astype("float32")
    # Binary activations with real weights: the first layer sees sign(x) times the float kernel.
    dense_1 = chain[1].get_layer("dense_1")
    expected = reference_sign(x) @ chain[0].get_layer("dense_1").kernel.numpy()
    probe = tf.keras.Model(chain[1].input, dense_1.output)
    np.testing.assert_allclose(probe(x).numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("argument", ["weight_binarisation", "activation_binarisation"])
@pytest.mark.parametrize("builder", [models.mlp, models.vgg10, models.resnet18])
def test_unknown_binarisation_is_a_clear_error(builder, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be 'deterministic' or 'stochastic', got 'random'$"):
        builder((8, 8, 3), 3, **{argument: "random"})


def test_unknown_variant_lists_binary_activations():
    with pytest.raises(ValueError, match="expected one of float, binaryconnect, binarynet, binary-activations"):
        models.mlp((6,), 3, variant="xnor")


# --------------------------------------------------------------------------- Larq Compute Engine


def test_stochastic_quantconv2d_still_becomes_lce_bconv2d():
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((8, 8, 32))
    x = lq.layers.QuantConv2D(32, 3, padding="same", pad_values=1.0, use_bias=False,
                              input_quantizer=StochasticSteSign(), kernel_quantizer=StochasticSteSign(),
                              kernel_constraint=SwitchableWeightClip())(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    model = tf.keras.Model(inp, x)
    flatbuffer = lce.convert_keras_model(model)
    assert b"LceBconv2d" in flatbuffer
    assert not re.search(rb"CONV_2D|RandomUniform", flatbuffer)  # neither a float conv nor a draw left
    x_in = np.random.RandomState(1).randn(4, 8, 8, 32).astype("float32")
    out = Interpreter(flatbuffer, num_threads=1).predict(x_in)
    np.testing.assert_allclose(out, model(x_in).numpy(), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- tf.distribute

MIRRORED = textwrap.dedent("""
    import json, os
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from bnn_keras import models

    X = np.random.RandomState(0).randn(64, 6).astype("float32")
    Y = np.random.RandomState(1).randint(0, 3, 64)

    def train(strategy):
        tf.keras.utils.set_random_seed(0)
        with strategy.scope():
            model = models.mlp((6,), 3, hidden_units=(16,), weight_binarisation="stochastic", synchronized_bn=True)
            model.compile(tf.keras.optimizers.Adam(0.01), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        counts = [int(layer.kernel_quantizer.draws_variable.numpy()) for layer in model.layers
                  if getattr(layer, "kernel_quantizer", None) is not None]
        return model.get_weights(), counts

    one, one_counts = train(tf.distribute.get_strategy())
    two, two_counts = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one, two))
    print(json.dumps({"one": one_counts, "two": two_counts, "diff": diff}))
""")


def test_mirrored_replicas_draw_the_same_weights_as_one_device():
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", MIRRORED], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["one"] == out["two"] == [8, 8]  # 4 steps x 2 epochs, counted once, not once per replica
    assert out["diff"] < 1e-5  # replicas that drew different kernels would train apart

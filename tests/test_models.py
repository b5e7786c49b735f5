"""The study's MLP and VGG-10: layer order, BN settings, quantisers per variant, sizes, two-stage copy."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import bnn_keras as bk
from bnn_keras import models
from bnn_keras.constraints import SwitchableWeightClip, glorot_limit
from bnn_keras.quantizers import SwitchableSteSign


def _count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def test_study_mlp_parameter_counts_are_exact():
    model = models.mlp((28, 28, 1), 10)  # 3 x 2048, binaryconnect
    kernels = 784 * 2048 + 2048 * 2048 + 2048 * 2048 + 2048 * 10
    bn_units = 3 * 2048 + 10
    assert kernels == 10_014_720
    assert _count(model.trainable_weights) == kernels + 2 * bn_units == 10_027_028
    # BN moving mean/variance + one STE flag and one weight-clip flag per binary layer.
    assert _count(model.non_trainable_weights) == 2 * bn_units + 2 * 4 == 12_316
    assert [tuple(model.get_layer(n).kernel.shape) for n in ("dense_1", "dense_2", "dense_3", "dense_out")] == [
        (784, 2048), (2048, 2048), (2048, 2048), (2048, 10),
    ]
    assert all(model.get_layer(n).bias is None for n in ("dense_1", "dense_2", "dense_3", "dense_out"))


def test_vgg10_full_size_parameter_count_and_shapes():
    model = models.vgg10((32, 32, 3), 10)
    convs = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512)
    dense = 4 * 4 * 512 * 1024 + 1024 * 1024 + 1024 * 10
    bn_units = 128 + 128 + 256 + 256 + 512 + 512 + 1024 + 1024 + 10
    assert _count(model.trainable_weights) == convs + dense + 2 * bn_units == 14_029_716
    assert model.output_shape == (None, 10)
    assert model.get_layer("flatten").output_shape == (None, 4 * 4 * 512)


def test_vgg10_pools_right_after_its_convolution():
    model = models.vgg10((32, 32, 3), 10, width_multiplier=0.0625)
    names = [layer.name for layer in model.layers]
    for i in (2, 4, 6):
        at = names.index(f"conv_{i}")
        assert names[at : at + 4] == [f"conv_{i}", f"pool_{i}", f"bn_{i}", f"relu_{i}"]
        pool = model.get_layer(f"pool_{i}")
        assert pool.pool_size == (2, 2) and pool.strides == (2, 2)
    for i in (1, 3, 5):
        at = names.index(f"conv_{i}")
        assert names[at : at + 3] == [f"conv_{i}", f"bn_{i}", f"relu_{i}"]
        conv = model.get_layer(f"conv_{i}")
        assert conv.kernel_size == (3, 3) and conv.strides == (1, 1) and conv.padding == "same"
        assert conv.bias is None
    assert names[-2:] == ["dense_out", "bn_out"]  # BN after the last layer, no activation
    assert model.get_layer("conv_1").filters == 8 and model.get_layer("dense_1").units == 64


@pytest.mark.parametrize(
    "builder, kwargs, momentum",
    [(models.mlp, {"hidden_units": (8, 8)}, 0.85), (models.vgg10, {"width_multiplier": 0.0625}, 0.9)],
)
def test_batch_norm_settings_follow_the_study(builder, kwargs, momentum):
    model = builder((28, 28, 1), 10, **kwargs)
    bns = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    weighted = [l for l in model.layers if isinstance(l, (tf.keras.layers.Dense, tf.keras.layers.Conv2D))]
    assert len(bns) == len(weighted)  # BN after every layer, the last one included
    assert {(l.momentum, l.epsilon) for l in bns} == {(momentum, 1e-4)}
    other = builder((28, 28, 1), 10, bn_momentum=0.99, bn_epsilon=1e-3, **kwargs)
    assert {(l.momentum, l.epsilon) for l in other.layers if isinstance(l, tf.keras.layers.BatchNormalization)} == {
        (0.99, 1e-3)
    }


def _latent(variable):
    """The stored (latent) value of a kernel, unquantised."""
    return tf.convert_to_tensor(getattr(variable, "latent_variable", variable)).numpy()


def _binary_layers(model):
    return [l for l in model.layers if isinstance(l, (tf.keras.layers.Dense, tf.keras.layers.Conv2D))]


def test_binaryconnect_has_binary_weights_and_real_activations():
    model = models.vgg10((28, 28, 1), 10, width_multiplier=0.0625, variant="binaryconnect")
    for layer in _binary_layers(model):
        assert isinstance(layer.kernel_quantizer, SwitchableSteSign)
        assert layer.input_quantizer is None
        assert isinstance(layer.kernel_constraint, SwitchableWeightClip)
        assert layer.kernel_constraint.glorot_range is False
    assert model.get_layer("conv_1").pad_values == 0.0
    assert sum(isinstance(l, tf.keras.layers.Activation) for l in model.layers) == 8  # 6 conv + 2 dense


def test_binarynet_binarises_every_input_first_and_last_included():
    model = models.vgg10((28, 28, 1), 10, width_multiplier=0.0625, variant="binarynet")
    for layer in _binary_layers(model):
        assert isinstance(layer.kernel_quantizer, SwitchableSteSign)
        assert isinstance(layer.input_quantizer, SwitchableSteSign)
    convs = [l for l in model.layers if isinstance(l, tf.keras.layers.Conv2D)]
    assert [c.pad_values for c in convs] == [1.0] * 6  # LCE's SAME padding with +1
    assert not any(isinstance(l, tf.keras.layers.Activation) for l in model.layers)

    real_input = models.vgg10((28, 28, 1), 10, width_multiplier=0.0625, variant="binarynet", binarize_input=False)
    assert real_input.get_layer("conv_1").input_quantizer is None
    assert real_input.get_layer("conv_1").pad_values == 0.0
    assert isinstance(real_input.get_layer("conv_2").input_quantizer, SwitchableSteSign)


def test_binarynet_first_layer_computes_sign_input_times_sign_weights():
    model = models.mlp((6,), 3, hidden_units=(4,), variant="binarynet")
    x = np.array([[0.5, -2.0, 0.0, 3.0, -0.1, 1.0]], dtype=np.float32)
    kernel = _latent(model.get_layer("dense_1").kernel)
    first = tf.keras.Model(model.input, model.get_layer("dense_1").output)
    sign = lambda a: np.where(a >= 0, 1.0, -1.0)  # noqa: E731  (Larq: sign(0) = +1)
    np.testing.assert_allclose(first(x).numpy(), sign(x) @ sign(kernel), rtol=0, atol=0)


def test_float_variant_is_plain_layers_with_the_same_weights():
    model = models.mlp((28, 28, 1), 10, hidden_units=(16, 16), variant="float")
    for layer in _binary_layers(model):
        assert layer.kernel_quantizer is None and layer.input_quantizer is None
        assert layer.kernel_constraint is None
    assert bk.find_switchables(model) == []
    binary = models.mlp((28, 28, 1), 10, hidden_units=(16, 16))
    assert _count(model.trainable_weights) == _count(binary.trainable_weights)
    assert isinstance(model.get_layer("relu_1"), tf.keras.layers.Activation)


def test_weight_clip_options_and_clipped_start():
    glorot = models.mlp((20,), 10, hidden_units=(30,), weight_clip="glorot", clipped=True)
    clip = glorot.get_layer("dense_1").kernel_constraint
    assert clip.glorot_range and clip.clipping_enabled
    assert clip.limit((20, 30)) == pytest.approx(glorot_limit((20, 30))) == pytest.approx(np.sqrt(1.5 / 50))
    assert all(s.clipping_enabled for s in bk.find_switchables(glorot))
    none = models.mlp((20,), 10, hidden_units=(30,), weight_clip=None)
    assert none.get_layer("dense_1").kernel_constraint is None
    assert len(bk.find_switchables(none)) == 2  # the two kernel quantisers only
    assert not any(s.clipping_enabled for s in bk.find_switchables(none))


def test_bad_names_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"^unknown variant 'xnor': expected one of float, binaryconnect, binarynet, binary-activations$"):
        models.mlp((4,), 2, variant="xnor")
    with pytest.raises(ValueError, match=r"^unknown model 'resnet': expected one of mlp, resnet18, vgg10$"):
        models.get("resnet")
    with pytest.raises(ValueError, match="bn_momentum must be in"):
        models.vgg10((8, 8, 1), 2, bn_momentum=1.0)
    assert models.get("mlp") is models.mlp and models.get("vgg10") is models.vgg10


def test_copy_weights_hands_float_weights_to_the_binary_model():
    tf.keras.utils.set_random_seed(1)
    source = models.vgg10((12, 12, 1), 3, width_multiplier=0.03125, variant="float")
    for variable in source.weights:  # make BN statistics and parameters non-default
        variable.assign(tf.random.uniform(variable.shape, 0.5, 1.5))
    target = models.vgg10((12, 12, 1), 3, width_multiplier=0.03125, variant="binarynet", clipped=True)
    assert models.copy_weights(source, target) == 18
    for src, dst in zip(models._weighted_layers(source), models._weighted_layers(target)):
        if isinstance(src, tf.keras.layers.BatchNormalization):
            for a, b in zip(models._bn_variables(src), models._bn_variables(dst)):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
        else:
            np.testing.assert_array_equal(_latent(src.kernel), _latent(dst.kernel))
    assert all(s.clipping_enabled for s in bk.find_switchables(target))  # flags untouched


def test_copy_weights_mismatch_is_one_line():
    small = models.mlp((10,), 2, hidden_units=(4,), variant="float")
    wide = models.mlp((10,), 2, hidden_units=(5,))
    with pytest.raises(ValueError) as error:
        models.copy_weights(small, wide)
    assert "\n" not in str(error.value)
    assert "layer 0 is 'dense_1' (QuantDense, kernel (10, 4), no bias)" in str(error.value)
    with pytest.raises(ValueError, match="has 4 dense/conv/BN layers but .* has 6"):
        models.copy_weights(small, models.mlp((10,), 2, hidden_units=(4, 4)))


@pytest.mark.parametrize(
    "builder, kwargs", [(models.mlp, {"hidden_units": (6, 5)}), (models.vgg10, {"width_multiplier": 0.0625})]
)
def test_clip_value_sets_every_quantisers_gradient_window_and_the_weight_clip_range(builder, kwargs):
    """clip_value=0.5, clipped phase: STE gradient 1 for |x| <= 0.5 and 0 beyond (0.75 included), in
    every kernel and input quantiser; weight clipping to [-0.5, 0.5]."""
    model = builder((8, 8, 1), 3, variant="binarynet", clipped=True, clip_value=0.5, **kwargs)
    x = tf.constant([-1.5, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.5])
    window = np.array([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=np.float32)  # 1 where |x| <= 0.5
    layers = _binary_layers(model)
    assert len(layers) == (3 if builder is models.mlp else 9)
    for layer in layers:
        for quantizer in (layer.kernel_quantizer, layer.input_quantizer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = quantizer(x)
            np.testing.assert_array_equal(tape.gradient(y, x).numpy(), window, err_msg=layer.name)
        np.testing.assert_array_equal(
            layer.kernel_constraint(x).numpy(), [-0.5, -0.5, -0.5, -0.25, 0.0, 0.25, 0.5, 0.5, 0.5], err_msg=layer.name
        )
    glorot = builder((8, 8, 1), 3, clipped=True, clip_value=0.5, weight_clip="glorot", **kwargs)
    for layer in _binary_layers(glorot):  # the Glorot range does not depend on clip_value; the STE's does
        shape = tuple(layer.kernel.shape)
        limit = np.float32(np.sqrt(1.5 / (np.prod(shape[:-2]) * (shape[-2] + shape[-1]))))
        assert limit < 0.5
        w = np.resize(x.numpy(), shape)
        np.testing.assert_allclose(layer.kernel_constraint(tf.constant(w)).numpy(), np.clip(w, -limit, limit), rtol=1e-6)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer.kernel_quantizer(x)
        np.testing.assert_array_equal(tape.gradient(y, x).numpy(), window)


def test_clip_value_in_the_model_gradient_matches_a_numpy_reference():
    """BinaryNet MLP, clip_value=0.5: d(sum(u * dense_1(x)))/dW = sign(x)^T u * [|W| <= 0.5] and
    d/dx = u sign(W)^T * [|x| <= 0.5]; kernel entries and inputs at |.| = 0.75 get no gradient."""
    model = models.mlp((6,), 3, hidden_units=(4,), variant="binarynet", clipped=True, clip_value=0.5)
    layer = model.get_layer("dense_1")
    kernel = np.array([[0.75, -0.25, 0.5, -0.75]] * 3 + [[0.25, -0.75, 0.1, 0.6]] * 3, dtype=np.float32)
    layer.kernel.latent_variable.assign(kernel)
    x = tf.constant([[0.75, -0.25, 0.0, -0.75, 0.5, 0.3], [-0.1, 0.75, 0.4, 0.2, -0.6, -0.75]])
    u = tf.constant(np.random.RandomState(0).randn(2, 4).astype(np.float32))
    first = tf.keras.Model(model.input, layer.output)
    with tf.GradientTape() as tape:
        tape.watch(x)
        objective = tf.reduce_sum(u * first(x))
    grad_kernel, grad_x = tape.gradient(objective, [layer.kernel.latent_variable, x])
    sign = lambda a: np.where(a >= 0, 1.0, -1.0)  # noqa: E731
    expected_kernel = sign(x.numpy()).T @ u.numpy() * (np.abs(kernel) <= 0.5)
    expected_x = u.numpy() @ sign(kernel).T * (np.abs(x.numpy()) <= 0.5)
    np.testing.assert_allclose(grad_kernel.numpy(), expected_kernel, rtol=1e-6, atol=0)
    np.testing.assert_allclose(grad_x.numpy(), expected_x, rtol=1e-6, atol=0)
    assert np.all(grad_kernel.numpy()[np.abs(kernel) == 0.75] == 0) and np.all(grad_x.numpy()[np.abs(x.numpy()) == 0.75] == 0)
    assert np.count_nonzero(expected_kernel) > 0 and np.count_nonzero(expected_x) > 0


def _distinct_random_weights(model, seed):
    """Seeded random values in every weight of `model` (positive for BN's moving variance)."""
    rng = np.random.RandomState(seed)
    values = [
        rng.uniform(0.5, 2.0, w.shape) if "moving_variance" in w.name else rng.normal(0.0, 0.5, w.shape)
        for w in model.weights
    ]
    model.set_weights([v.astype(np.float32) for v in values])


def assert_copies_every_variable(source, target, weighted):
    """`copy_weights(source, target)` against each Keras layer's own weights list (`weighted` layers with weights)."""
    pairs = []  # (source variable, the target's variable of the same name)
    for layer in source.layers:
        if layer.weights:
            by_name = {w.name: w for w in target.get_layer(layer.name).weights}
            pairs += [(w, by_name.pop(w.name)) for w in layer.weights]
            assert all("clipped" in n or "clip_enabled" in n for n in by_name), by_name  # the rest: flags
    kinds = collections.Counter(src.name.split("/")[-1] for src, _ in pairs)
    assert kinds == {"kernel:0": weighted, **{n: weighted for n in ("gamma:0", "beta:0", "moving_mean:0", "moving_variance:0")}}
    for src, dst in pairs:  # the target's own values differ from the source's everywhere
        dst.assign(tf.fill(dst.shape, -7.0))
        assert np.all(src.numpy() != -7.0)
    assert models.copy_weights(source, target) == 2 * weighted
    for src, dst in pairs:
        np.testing.assert_array_equal(_latent(dst), src.numpy(), err_msg=src.name)
    assert all(s.clipping_enabled for s in bk.find_switchables(target))  # flags untouched


@pytest.mark.parametrize(
    "builder, kwargs, variant, weighted",
    [(models.vgg10, {"width_multiplier": 0.03125}, "binarynet", 9), (models.mlp, {"hidden_units": (5, 4)}, "binaryconnect", 3)],
)
def test_copy_weights_copies_every_variable_of_every_layer(builder, kwargs, variant, weighted):
    """Against each Keras layer's own weights list: every kernel, gamma, beta, moving mean and variance."""
    source = builder((12, 12, 1), 3, variant="float", **kwargs)
    _distinct_random_weights(source, seed=1)
    target = builder((12, 12, 1), 3, variant=variant, clipped=True, **kwargs)
    assert_copies_every_variable(source, target, weighted)


@pytest.mark.parametrize("builder, kwargs", [(models.mlp, {"hidden_units": (8,)}), (models.vgg10, {"width_multiplier": 0.0625})])
def test_builders_use_plain_batch_norm_unless_asked_to_synchronise(builder, kwargs):
    shape = (28, 28, 1) if builder is models.mlp else (32, 32, 3)
    plain = builder(shape, 10, **kwargs)
    synced = builder(shape, 10, synchronized_bn=True, **kwargs)
    def synchronised(model):
        return [layer.synchronized for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]

    assert synchronised(plain) and not any(synchronised(plain))  # one device: no cross-replica reduction
    assert all(synchronised(synced)) and len(synchronised(synced)) == len(synchronised(plain))


def test_copy_weights_looks_into_nested_models():
    def nested(variant):
        inner = models.mlp((4, 4, 1), 3, hidden_units=(6,), variant=variant, name=f"inner_{variant}")
        inputs = tf.keras.Input((4, 4, 1))
        return tf.keras.Model(inputs, inner(inputs))

    source, target = nested("float"), nested("binaryconnect")
    _distinct_random_weights(source.layers[1], seed=2)
    assert models.copy_weights(source, target) == 4  # two dense and two BN layers inside
    np.testing.assert_array_equal(_latent(target.layers[1].get_layer("dense_1").kernel),
                                  source.layers[1].get_layer("dense_1").kernel.numpy())


@pytest.mark.parametrize("builder, kwargs", [
    (models.vgg10, {"input_shape": (8, 8, 1), "width_multiplier": 0.03125}),
    (models.mlp, {"input_shape": (6,), "hidden_units": (5, 4)}),
])
def test_builders_clip_at_one_by_default(builder, kwargs):
    model = builder(num_classes=3, variant="binarynet", clipped=True, **kwargs)
    layers = _binary_layers(model)
    assert len(layers) == (9 if builder is models.vgg10 else 3)
    assert {layer.kernel_quantizer.clip_value for layer in layers} == {1.0}
    assert {layer.kernel_constraint.clip_value for layer in layers} == {1.0}
    assert {layer.input_quantizer.clip_value for layer in layers if layer.input_quantizer is not None} == {1.0}


def test_vgg10_conventional_order_pools_after_the_activation_with_the_same_shapes():
    paper = models.vgg10((32, 32, 3), 10, width_multiplier=0.0625)
    conventional = models.vgg10((32, 32, 3), 10, width_multiplier=0.0625, block_order="conventional")
    names = [layer.name for layer in conventional.layers]
    pooled = (2, 4, 6)
    assert [names[names.index(f"conv_{i}"):][:4] for i in pooled] == [
        [f"conv_{i}", f"bn_{i}", f"relu_{i}", f"pool_{i}"] for i in pooled
    ]
    pools = [conventional.get_layer(f"pool_{i}") for i in pooled]
    assert {(pool.pool_size, pool.strides) for pool in pools} == {((2, 2), (2, 2))}
    # 32 -> 16 -> 8 -> 4 either way: the same parameters, a 4 x 4 x 32 map into the first dense layer.
    assert conventional.get_layer("flatten").output_shape == paper.get_layer("flatten").output_shape == (None, 4 * 4 * 32)
    assert _count(conventional.trainable_weights) == _count(paper.trainable_weights)
    assert conventional.get_layer("bn_2").input_shape == (None, 32, 32, 8)  # BN before the pool
    assert paper.get_layer("bn_2").input_shape == (None, 16, 16, 8)


def test_vgg10_defaults_start_vanilla_and_name_the_variant():
    model = models.vgg10((8, 8, 1), 3, variant="binarynet", width_multiplier=0.03125)
    assert model.name == "vgg10_binarynet"
    switchables = bk.find_switchables(model)
    assert len(switchables) == 3 * 9  # 6 conv + 3 dense layers: a kernel quantiser, weight clip, input quantiser each
    assert not any(s.clipping_enabled for s in switchables)
    assert models.vgg10((8, 8, 1), 3, width_multiplier=0.03125, name="mine").name == "mine"

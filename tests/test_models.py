"""The study's MLP and VGG-10: layer order, BN settings, quantisers per variant, sizes, two-stage copy."""

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
    with pytest.raises(ValueError, match=r"^unknown variant 'xnor': expected one of float, binaryconnect, binarynet$"):
        models.mlp((4,), 2, variant="xnor")
    with pytest.raises(ValueError, match=r"^unknown model 'resnet': expected one of mlp, vgg10$"):
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

"""ResNet-18 (sizes, binary layers per variant, two-stage copy, clipping, LCE export), VGG-10's
block order, and the cifar10_resnet18 recipe."""

import json
import os

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras as bk
from bnn_keras import cli, export, models, training
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import SwitchableSteSign
from test_models import _distinct_random_weights, assert_copies_every_variable

BINARY_3X3 = 1 + 4 * 2 * 2  # the stem and two convs in each of 4 stages x 2 blocks
SHORTCUTS = ("block2_1", "block3_1", "block4_1")  # where the shape changes (stride 2, more filters)


def _count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def _hand_counts(channels, num_classes, widths=(64, 128, 256, 512)):
    """(kernel weights, BN units) of the CIFAR ResNet-18, from the architecture alone."""
    stem, kernels, bn_units = widths[0], 9 * channels * widths[0], widths[0]
    previous = stem
    for filters in widths:
        kernels += 9 * previous * filters + 3 * 9 * filters * filters  # four 3x3 convs per stage
        bn_units += 4 * filters
        if filters != previous:  # the first block's 1x1 projection and its BN
            kernels += previous * filters
            bn_units += filters
        previous = filters
    return kernels + previous * num_classes, bn_units + num_classes


def _binary_convs(model):
    return [l for l in model.layers if isinstance(l, lq.layers.QuantConv2D)]


# --------------------------------------------------------------------------- sizes and layers


def test_float_resnet18_parameter_count_is_the_hand_computed_one():
    model = models.resnet18((32, 32, 3), 10, variant="float")
    kernels, bn_units = _hand_counts(3, 10)
    assert (kernels, bn_units) == (11_164_352, 4_810)
    assert _count(model.trainable_weights) == kernels + 2 * bn_units == 11_173_972
    # The usual CIFAR ResNet-18 (classifier with a bias, no BN after it) has 11,173,962.
    assert kernels + 2 * (bn_units - 10) + 10 == 11_173_962
    assert _count(model.non_trainable_weights) == 2 * bn_units  # moving mean and variance; no flags
    assert models.resnet18_parameters((32, 32, 3), 10) == kernels + 4 * bn_units == 11_183_592
    assert model.get_layer("pool").output_shape == (None, 512) and model.output_shape == (None, 10)
    assert model.get_layer("block4_2_add").output_shape == (None, 4, 4, 512)


@pytest.mark.parametrize("shape, width, variant", [((9, 11, 3), 0.125, "binarynet"), ((28, 28, 1), 0.0625, "float")])
def test_resnet18_parameters_counts_kerass_own_weights(shape, width, variant):
    model = models.resnet18(shape, 7, width_multiplier=width, variant=variant)
    weights = sum(int(np.prod(w.shape)) for w in model.weights if w.shape.rank)  # scalar clip flags aside
    kernels, bn_units = _hand_counts(shape[-1], 7, tuple(round(w * width) for w in (64, 128, 256, 512)))
    assert models.resnet18_parameters(shape, 7, width) == weights == kernels + 4 * bn_units


def test_resnet18_blocks_strides_and_real_valued_shortcuts():
    model = models.resnet18((32, 32, 3), 10, width_multiplier=0.125, variant="binarynet")
    convs = _binary_convs(model)
    assert len(convs) == BINARY_3X3
    assert all(c.kernel_size == (3, 3) and c.padding == "same" and c.bias is None for c in convs)
    assert [c.name for c in convs if c.strides == (2, 2)] == [f"{b}_conv_1" for b in SHORTCUTS]
    assert [c.filters for c in convs] == [8] * 5 + [16] * 4 + [32] * 4 + [64] * 4
    shortcuts = [l for l in model.layers if isinstance(l, tf.keras.layers.Conv2D) and l not in convs]
    assert [s.name for s in shortcuts] == [f"{b}_shortcut_conv" for b in SHORTCUTS]
    for conv in shortcuts:  # plain Keras: no quantiser, no weight clip
        assert type(conv) is tf.keras.layers.Conv2D and conv.kernel_constraint is None
        assert conv.kernel_size == (1, 1) and conv.strides == (2, 2) and conv.bias is None
        assert model.get_layer(conv.name.replace("_conv", "_bn")).input is conv.output
    adds = [l for l in model.layers if isinstance(l, tf.keras.layers.Add)]
    assert len(adds) == 8
    identity = model.get_layer("block1_2_add")  # adds the block's own input back
    assert identity.input[1] is model.get_layer("block1_1_add").output
    bns = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert len(bns) == BINARY_3X3 + len(SHORTCUTS) + 1  # after every conv and the classifier
    assert {(l.momentum, l.epsilon) for l in bns} == {(0.9, 1e-4)}


@pytest.mark.parametrize(
    "variant, kernel, inputs, clips, relus",
    [("float", 0, 0, 0, 17), ("binaryconnect", 18, 0, 18, 17), ("binarynet", 18, 18, 18, 0)],
)
def test_resnet18_switchable_quantisers_per_variant(variant, kernel, inputs, clips, relus):
    """17 binary 3x3 convs and the binary classifier; ReLU after the stem, each block's first BN and each sum."""
    model = models.resnet18((16, 16, 3), 10, width_multiplier=0.0625, variant=variant)
    quantised = [l for l in model.layers if isinstance(l, (lq.layers.QuantConv2D, lq.layers.QuantDense))]
    assert [l.name for l in quantised][-1] == "dense_out" and len(quantised) == BINARY_3X3 + 1
    assert sum(isinstance(l.kernel_quantizer, SwitchableSteSign) for l in quantised) == kernel
    assert sum(isinstance(l.input_quantizer, SwitchableSteSign) for l in quantised) == inputs
    assert sum(isinstance(l.kernel_constraint, SwitchableWeightClip) for l in quantised) == clips
    assert len(bk.find_switchables(model)) == kernel + inputs + clips
    assert sum(isinstance(l, tf.keras.layers.Activation) for l in model.layers) == relus
    assert [c.pad_values for c in _binary_convs(model)] == [1.0 if inputs else 0.0] * BINARY_3X3


def test_resnet18_real_input_keeps_only_the_stem_input_real():
    model = models.resnet18((16, 16, 3), 10, width_multiplier=0.0625, variant="binarynet", binarize_input=False)
    assert model.get_layer("stem_conv").input_quantizer is None and model.get_layer("stem_conv").pad_values == 0.0
    assert isinstance(model.get_layer("block1_1_conv_1").input_quantizer, SwitchableSteSign)
    assert len(bk.find_switchables(model)) == 3 * 18 - 1


def test_set_clipping_flips_every_switchable_of_resnet18():
    model = models.resnet18((16, 16, 3), 10, width_multiplier=0.0625, variant="binarynet", weight_clip="glorot")
    switchables = bk.find_switchables(model)
    assert len(switchables) == 54 and not any(s.clipping_enabled for s in switchables)
    assert bk.set_clipping(model, True) == 54
    assert all(s.clipping_enabled for s in switchables)
    assert bk.set_clipping(model, True) == 0  # already clipped
    assert bk.set_clipping(model, False) == 54 and not any(s.clipping_enabled for s in switchables)


@pytest.mark.parametrize("variant", ["binaryconnect", "binarynet"])
def test_copy_weights_float_resnet18_into_binary_copies_every_variable(variant):
    source = models.resnet18((12, 12, 1), 3, width_multiplier=0.0625, variant="float")
    _distinct_random_weights(source, seed=3)
    target = models.resnet18((12, 12, 1), 3, width_multiplier=0.0625, variant=variant, clipped=True)
    weighted = BINARY_3X3 + len(SHORTCUTS) + 1
    assert_copies_every_variable(source, target, weighted)


def test_tiny_binarynet_resnet18_exports_one_lce_bconv_per_binary_layer():
    tf.keras.utils.set_random_seed(0)
    model = export.randomize_batch_norm(
        models.resnet18((32, 32, 3), 10, width_multiplier=0.125, variant="binarynet"), seed=2
    )
    result = export.convert(model, target="lce", num_verify=20)
    ops = export.flatbuffer_ops(result.flatbuffer)
    rows = {row.name: row for row in result.report.layers}
    convs = [c.name for c in _binary_convs(model)]
    assert len(convs) == BINARY_3X3
    assert [rows[name].ops.count("LceBconv2d") for name in convs] == [1] * BINARY_3X3
    assert "LceBconv2d" not in rows[f"{SHORTCUTS[0]}_shortcut_conv"].ops  # real-valued: CONV_2D
    assert ops.count("CONV_2D") == len(SHORTCUTS)
    # The binary classifier becomes a 1x1 LceBconv2d too (the exporter's dense rewrite).
    assert rows["dense_out"].ops.count("LceBconv2d") == 1 and result.report.rewritten_dense == ["dense_out"]
    assert ops.count("LceBconv2d") == result.report.op_counts["LceBconv2d"] == BINARY_3X3 + 1
    assert "FULLY_CONNECTED" not in ops
    assert result.report.verification["top1_agreement"] >= 0.99


# --------------------------------------------------------------------------- VGG-10 block order


def test_vgg10_conventional_order_pools_after_the_activation():
    for variant, tail in (("binaryconnect", ["relu"]), ("binarynet", [])):
        model = models.vgg10((16, 16, 1), 10, width_multiplier=0.0625, variant=variant, block_order="conventional")
        names = [layer.name for layer in model.layers]
        for i in (2, 4, 6):
            at = names.index(f"conv_{i}")
            assert names[at : at + 3 + len(tail)] == [f"conv_{i}", f"bn_{i}", *(f"{t}_{i}" for t in tail), f"pool_{i}"]
        assert sum(isinstance(l, tf.keras.layers.MaxPool2D) for l in model.layers) == 3


def test_vgg10_block_orders_have_equal_parameters_but_different_outputs():
    paper = models.vgg10((16, 16, 3), 10, width_multiplier=0.0625, variant="float")
    conventional = models.vgg10((16, 16, 3), 10, width_multiplier=0.0625, variant="float", block_order="conventional")
    assert _count(paper.weights) == _count(conventional.weights) == models.vgg10_parameters((16, 16, 3), 10, 0.0625)
    x = np.random.RandomState(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    # Positive gammas: inference BN and ReLU are increasing, so they commute with max-pooling.
    export.randomize_batch_norm(paper, seed=4)
    assert models.copy_weights(paper, conventional) == 18
    np.testing.assert_allclose(conventional(x, training=False), paper(x, training=False), rtol=1e-4, atol=1e-4)
    # Some negative gammas: BN then reverses the order, and max-pooling before or after it differs.
    _distinct_random_weights(paper, seed=5)
    models.copy_weights(paper, conventional)
    gap = np.abs(conventional(x, training=False).numpy() - paper(x, training=False).numpy())
    assert gap.max() > 0.1


def test_vgg10_refuses_an_unknown_block_order_in_one_line():
    with pytest.raises(ValueError, match=r"^unknown block_order 'pool-first': expected one of 'paper', 'conventional'$"):
        models.vgg10((8, 8, 1), 2, block_order="pool-first")
    with pytest.raises(ValueError, match=r"^model_kwargs block_order not accepted by model 'resnet18'"):
        training.Recipe(model="resnet18", model_kwargs={"block_order": "paper"})
    assert training.Recipe(model="vgg10", model_kwargs={"block_order": "conventional"}).model_kwargs == {
        "block_order": "conventional"
    }


# --------------------------------------------------------------------------- the recipe


def test_cifar10_resnet18_recipe_has_the_vgg10_training_settings():
    r, vgg = training.get_recipe("cifar10_resnet18"), training.get_recipe("cifar10_vgg10")
    assert (r.model, r.model_kwargs, r.dataset, r.variant) == ("resnet18", {"width_multiplier": 1.0}, "cifar10", "binaryconnect")
    assert (r.optimizer, r.lr_start, r.lr_end, r.lr_schedule) == ("adam", 3e-3, 2e-6, "exponential")
    assert (r.epochs, r.batch_size, r.bn_momentum, r.loss, r.schedule) == (500, 50, 0.9, "squared_hinge", "clipped")
    same = ("optimizer", "lr_start", "lr_end", "epochs", "batch_size", "bn_momentum", "bn_epsilon", "loss", "schedule")
    assert all(getattr(r, f) == getattr(vgg, f) for f in same)


def test_cifar10_resnet18_trains_by_name_from_the_command_line(tmp_path):
    out = tmp_path / "resnet"
    argv = ["train", "cifar10_resnet18", "--dataset", "embedded", "--limit", "200", "--width-multiplier", "0.0625",
            "--epochs", "1", "--verbose", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["model"] == "resnet18" and summary["recipe"]["batch_size"] == 50
    kernels, bn_units = _hand_counts(1, 10, (4, 8, 16, 32))  # embedded data: 28x28x1
    assert summary["params"]["trainable"] == kernels + 2 * bn_units
    assert {"summary.json", "history.json", "best_model.keras"} <= set(os.listdir(out))

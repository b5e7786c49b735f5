"""TensorBoard logs (``Recipe.tensorboard``, `TensorBoardLog`): the events read back equal the
history's numbers, the flipped share equals the sign changes of the latent kernels."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import callbacks as bk_callbacks
from bnn_keras import cli, run_folder, training
from bnn_keras.callbacks import TensorBoardLog
from bnn_keras.quantizers import SwitchableSteSign
from bnn_keras.training import Recipe

TINY = Recipe(
    name="tiny",
    limit=300,  # 270 train / 30 validation / 300 test images of the embedded Fashion-MNIST subset
    model_kwargs={"hidden_units": (16, 16)},
    epochs=3,
    batch_size=50,
    lr_start=1e-2,
    lr_end=1e-3,
    verbose=0,
)
NOT_LOGGED = {"epoch", "stage", "stage_epoch"}  # HistoryRows' own columns, not epoch logs


def _events(folder):
    """{tag: {step: (plugin name, value)}} of the event files in `folder`, in the order written."""
    found = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                found.setdefault(value.tag, {})[event.step] = (plugin, tf.make_ndarray(value.tensor))
    return found


def _scalars(events):
    return {tag: {step: float(v) for step, (_, v) in steps.items()} for tag, steps in events.items()
            if all(plugin == "scalars" for plugin, _ in steps.values())}


def _binary_layers(model):
    return [layer for layer in model.layers if getattr(layer, "kernel_quantizer", None) is not None]


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    """vanilla-then-clipped, constant LR, switch at epoch 1 with LR x0.1 and BN momentum 0.5, histograms on; a spy
    on HistoryRows (the callback before TensorBoardLog) keeps every binary kernel at each epoch's begin and end."""
    out = tmp_path_factory.mktemp("switched")
    kernels = {"begin": [], "end": []}
    begin, end = bk_callbacks.HistoryRows.on_epoch_begin, bk_callbacks.HistoryRows.on_epoch_end

    def snapshot(model):
        return {layer.name: np.array(layer.kernel.numpy()) for layer in _binary_layers(model)}

    def spy_begin(self, epoch, logs=None):
        kernels["begin"].append(snapshot(self.model))
        return begin(self, epoch, logs)

    def spy_end(self, epoch, logs=None):
        kernels["end"].append(snapshot(self.model))
        return end(self, epoch, logs)

    recipe = TINY.replace(
        schedule="vanilla-then-clipped", switch_epoch=1, lr_factor=0.1, switch_bn_momentum=0.5,
        lr_schedule="constant", tensorboard="histograms", output_dir=str(out),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bk_callbacks.HistoryRows, "on_epoch_begin", spy_begin)
        patch.setattr(bk_callbacks.HistoryRows, "on_epoch_end", spy_end)
        result = training.run(recipe)
    return result, _events(out / "tensorboard" / "train"), kernels


def test_every_history_number_is_a_scalar_per_epoch(switched):
    result, events, _ = switched
    rows = result["history"]
    scalars = _scalars(events)
    logged = {tag for tag in scalars if not tag.startswith(("flipped_share", "dead_zone/"))}
    assert logged == {key for key in rows[0] if key not in NOT_LOGGED}
    for tag in logged:
        assert scalars[tag] == {row["epoch"]: float(np.float32(row[tag])) for row in rows}, tag
    # the schedule's own numbers, as the recipe set them: switch at epoch 1, LR x0.1, BN momentum 0.5
    assert scalars["clipping_phase"] == {0: 0.0, 1: 1.0, 2: 1.0}
    assert scalars["bn_momentum"] == {0: np.float32(0.85), 1: 0.5, 2: 0.5}
    assert scalars["lr"] == pytest.approx({0: 1e-2, 1: 1e-3, 2: 1e-3}, rel=1e-6)


def test_flipped_share_is_the_share_of_latent_kernels_whose_sign_changed(switched):
    _, events, kernels = switched
    scalars = _scalars(events)
    assert len(kernels["begin"]) == len(kernels["end"]) == 3
    for epoch, (before, after) in enumerate(zip(kernels["begin"], kernels["end"])):
        flips = {name: int(np.sum(lq.math.sign(before[name]).numpy() != lq.math.sign(after[name]).numpy()))
                 for name in before}
        sizes = {name: before[name].size for name in before}
        assert sizes and sum(flips.values()) > 0  # the fixture flips some: a share of 0 would prove nothing
        for name in before:
            assert scalars[f"flipped_share/{name}"][epoch] == pytest.approx(flips[name] / sizes[name], rel=1e-6)
        assert scalars["flipped_share"][epoch] == pytest.approx(sum(flips.values()) / sum(sizes.values()), rel=1e-6)


def test_latent_weight_histograms_count_every_weight_at_the_epochs_end(switched):
    _, events, kernels = switched
    for epoch, after in enumerate(kernels["end"]):
        for name, kernel in after.items():
            plugin, buckets = events[f"latent_weights/{name}"][epoch]
            assert plugin == "histograms" and buckets.shape == (30, 3)
            counts, edges = np.histogram(kernel, bins=30, range=(kernel.min(), kernel.max()))
            np.testing.assert_allclose(buckets[:, 0], edges[:-1], rtol=1e-6)
            np.testing.assert_allclose(buckets[:, 1], edges[1:], rtol=1e-6)
            np.testing.assert_array_equal(buckets[:, 2], counts)
            assert buckets[:, 2].sum() == kernel.size


def test_two_stage_logs_each_stage_apart_on_the_runs_epoch_axis(tmp_path):
    recipe = TINY.replace(schedule="two-stage", pretrain_epochs=2, epochs=1, tensorboard="scalars", output_dir=str(tmp_path))
    rows = training.run(recipe)["history"]
    pretrain = _scalars(_events(tmp_path / "tensorboard" / "pretrain"))
    finetune = _scalars(_events(tmp_path / "tensorboard" / "finetune"))
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["finetune", "pretrain"]
    assert pretrain["val_accuracy"] == {0: np.float32(rows[0]["val_accuracy"]), 1: np.float32(rows[1]["val_accuracy"])}
    assert finetune["val_accuracy"] == {2: np.float32(rows[2]["val_accuracy"])}
    assert "flipped_share" not in pretrain  # the float twin has no binary weights
    assert set(finetune["flipped_share"]) == {2} and 0.0 < finetune["flipped_share"][2] < 1.0
    assert not any(tag.startswith(("flipped_share/", "latent_weights/")) for tag in finetune)  # scalars only


def test_no_option_no_tensorboard_folder_and_it_is_not_a_training_setting(tmp_path):
    recipe = TINY.replace(epochs=1, output_dir=str(tmp_path))
    first = training.run(recipe)
    assert not (tmp_path / "tensorboard").exists()
    assert run_folder.same_settings(recipe.to_dict(), recipe.replace(tensorboard="histograms"))
    assert not run_folder.same_settings(recipe.to_dict(), recipe.replace(tensorboard="histograms", epochs=2))
    again = training.run(recipe.replace(tensorboard="scalars"))  # the same run, finished: nothing to train
    assert again["wall_time_s"] == first["wall_time_s"] and not (tmp_path / "tensorboard").exists()


def test_overwrite_removes_the_old_runs_logs(tmp_path):
    (tmp_path / "tensorboard" / "train").mkdir(parents=True)
    (tmp_path / "tensorboard" / "train" / "events.out.tfevents.1.old").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("not ours")
    run_folder.RunFolder(tmp_path).prepare("overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def _model():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((4,))
    x = lq.layers.QuantDense(5, use_bias=False, kernel_quantizer=SwitchableSteSign(), name="binary_a")(inputs)
    x = tf.keras.layers.Dense(3, name="float_b")(x)  # no kernel quantiser: not a binary layer
    x = lq.layers.QuantDense(2, use_bias=False, kernel_quantizer="ste_sign", name="binary_c")(x)
    return tf.keras.Model(inputs, x)


def test_flipped_share_of_a_known_kernel_change(tmp_path):
    """20 + 6 weights; 7 and 2 of them change sign (0 counts as +1, as Larq's sign has it)."""
    model = _model()
    a = np.linspace(-1.0, 1.0, 20, dtype=np.float32).reshape(4, 5)  # 10 negative, 10 positive, no 0
    c = np.array([[0.3, -0.2], [-0.4, 0.1], [0.2, -0.6]], dtype=np.float32)
    model.get_layer("binary_a").kernel.assign(a)
    model.get_layer("binary_c").kernel.assign(c)
    log = TensorBoardLog(tmp_path, histograms=True, epoch_offset=5)
    log.set_model(model)
    log.on_epoch_begin(1)
    a_after = a.copy()
    a_after.flat[:7] *= -1  # 7 negative weights made positive
    a_after.flat[15] = 0.0  # a positive weight to 0: no flip
    c_after = c.copy()
    c_after[0, 0], c_after[0, 1] = -0.3, 0.0  # two flips: + to -, and - to 0 (= +1)
    model.get_layer("binary_a").kernel.assign(a_after)
    model.get_layer("binary_c").kernel.assign(c_after)
    log.on_epoch_end(1, {"loss": 0.25, "val_accuracy": 0.5})
    log.on_train_end()
    expected_a = np.mean(lq.math.sign(a).numpy() != lq.math.sign(a_after).numpy())
    assert expected_a == 7 / 20
    scalars = _scalars(_events(tmp_path))
    assert scalars == {
        "loss": {6: 0.25},
        "val_accuracy": {6: 0.5},
        "flipped_share": {6: np.float32(9 / 26)},
        "flipped_share/binary_a": {6: np.float32(7 / 20)},
        "flipped_share/binary_c": {6: np.float32(2 / 6)},
    }
    histograms = {tag for tag in _events(tmp_path) if tag not in scalars}
    assert histograms == {"latent_weights/binary_a", "latent_weights/binary_c"}


def test_scalars_level_writes_only_the_aggregate_share(tmp_path):
    model = _model()
    log = TensorBoardLog(tmp_path)
    log.set_model(model)
    log.on_epoch_begin(0)
    kernel = model.get_layer("binary_c").kernel
    kernel.assign(-kernel)  # all 6 of 26 binary weights flip (glorot init has no zeros)
    log.on_epoch_end(0, {"loss": 1.0})
    assert _scalars(_events(tmp_path)) == {"loss": {0: 1.0}, "flipped_share": {0: np.float32(6 / 26)}}
    assert set(_events(tmp_path)) == {"loss", "flipped_share"}


def test_config_round_trips():
    args = {"log_dir": "runs/x/tensorboard/finetune", "histograms": True, "epoch_offset": 3}
    config = TensorBoardLog(**args).get_config()
    assert config == args and TensorBoardLog(**config).get_config() == args
    assert tf.keras.utils.get_registered_object("bnn_keras>TensorBoardLog") is TensorBoardLog


@pytest.mark.parametrize("make, message", [
    (lambda: TINY.replace(tensorboard="all"), "unknown tensorboard 'all': expected one of None, 'scalars', 'histograms'"),
    (lambda: TINY.replace(tensorboard=True), "unknown tensorboard True: expected one of None, 'scalars', 'histograms'"),
    (lambda: TensorBoardLog("x", histograms="yes"), "histograms must be True or False, got 'yes'"),
    (lambda: TensorBoardLog("x", epoch_offset=-1), "epoch_offset must be an integer >= 0, got -1"),
])
def test_bad_values_say_what_was_expected(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value) == message


@pytest.mark.parametrize("command", [["train", "mnist_mlp"], ["study"]])
def test_the_flag_reaches_the_recipe_of_train_and_study(command):
    parser = cli.build_parser()
    base = training.get_recipe("mnist_mlp")
    for given, level in [([], None), (["--tensorboard"], "scalars"), (["--tensorboard", "histograms"], "histograms"),
                         (["--tensorboard", "none"], None)]:
        args = parser.parse_args(command + given)
        for name in cli._EXECUTOR_FLAGS:  # the study's, not recipe settings (as cli._study drops them)
            vars(args).pop(name, None)
        assert cli._recipe(base, args).tensorboard == level


def test_a_bad_level_on_the_command_line_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "mnist_mlp", "--tensorboard", "all", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "bnn-keras: error: argument --tensorboard: invalid choice: 'all' (choose from 'none', 'scalars', 'histograms')\n"
    assert not (tmp_path / "o").exists()

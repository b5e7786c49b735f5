"""The last mile: the plateau epoch, and a run that keeps going, lowers its LR or stops there."""

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import lr_schedules, plateau, training
from bnn_keras.recipe import Recipe


@pytest.mark.parametrize(
    "values, window, margin, complete, expected",
    [
        ([0.5, 0.7, 0.71, 0.705, 0.712], 2, 0.005, False, 2),  # 0.71 beats 0.7 by more than 0.005; nothing beats 0.71
        ([0.5, 0.6, 0.7, 0.8], 2, 0.0, False, 3),  # always improving: the last epoch
        ([0.5, 0.6, 0.7, 0.8], 2, 0.0, True, None),  # ... which no full window confirms
        ([0.8, 0.5, 0.5, 0.81], 3, 0.02, True, 0),  # 0.81 is within the margin of 0.8
        ([0.8, 0.5, 0.5, 0.81, 0.7, 0.7, 0.7], 3, 0.0, True, 3),  # 0.81 beats 0.8: the plateau starts there
        ([0.5, 0.8, 0.6, 0.7, 0.75], 2, 0.0, True, 1),  # after 0.8 nothing beats it, though 0.7 beats 0.6
        ([0.4, 0.4, 0.4], 2, 0.0, True, 0),
        ([0.5, 0.5, 0.5, 0.9], 2, 0.0, False, 0),  # 0.9 comes one epoch after epoch 0's window: too late
        ([], 2, 0.0, False, None),
    ],
)
def test_plateau_epoch_follows_its_definition(values, window, margin, complete, expected):
    assert plateau.plateau_epoch(values, window, margin, complete=complete) == expected


def _model(lr: float = 0.1) -> tf.keras.Model:
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    model.compile(tf.keras.optimizers.Adam(lr_schedules.ExponentialDecayPerEpoch(lr, lr / 10, 4, 10)), "mse")
    return model


def test_the_action_runs_once_when_the_window_has_passed():
    model = _model()
    stop, lower = plateau.PlateauAction("stop", window=2, margin=0.0), plateau.PlateauAction("reduce_lr", window=2, lr_factor=0.5, margin=0.0)
    for callback in (stop, lower):
        callback.set_model(model)
    lr = lr_schedules.current_learning_rate(model.optimizer)
    reached = []
    for epoch, value in enumerate([0.6, 0.7, 0.69, 0.7]):  # plateau at epoch 1, known at epoch 3
        for callback in (stop, lower):
            logs = {"val_accuracy": value}
            callback.on_epoch_end(epoch, logs)
        reached.append(logs["plateau_reached"])
        assert model.stop_training == (epoch == 3)
    assert reached == [0.0, 0.0, 0.0, 1.0] and stop.plateau == 1
    assert lr_schedules.current_learning_rate(model.optimizer) == pytest.approx(lr * 0.5)
    lower.on_epoch_end(4, {"val_accuracy": 0.6})
    assert lr_schedules.current_learning_rate(model.optimizer) == pytest.approx(lr * 0.5)  # not twice


def test_a_resumed_callback_knows_the_plateau_it_already_acted_on():
    model = _model()
    resumed = plateau.PlateauAction("reduce_lr", window=2, margin=0.0, history=[0.6, 0.7, 0.69, 0.7])
    resumed.set_model(model)
    lr = lr_schedules.current_learning_rate(model.optimizer)
    resumed.on_epoch_end(4, {"val_accuracy": 0.5})
    assert resumed.plateau == 1 and lr_schedules.current_learning_rate(model.optimizer) == pytest.approx(lr)
    config = resumed.get_config()
    assert plateau.PlateauAction(**config).get_config() == config
    assert config["history"] == [0.6, 0.7, 0.69, 0.7, 0.5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"action": "halt"}, r"^unknown plateau action 'halt': expected one of 'none', 'reduce_lr', 'stop'$"),
        ({"window": 0}, r"^window must be an integer >= 1, got 0$"),
        ({"margin": -0.1}, r"^margin must be a finite number >= 0, got -0.1$"),
        ({"lr_factor": 0}, r"^lr_factor must be a finite number > 0, got 0$"),
    ],
)
def test_bad_settings_fail_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plateau.PlateauAction(**kwargs)
    with pytest.raises(ValueError, match=r"^unknown plateau_action 'halt'"):
        Recipe(plateau_action="halt")


_FROZEN = dict(  # an LR so small that nothing moves: validation accuracy is the same every epoch
    limit=300, model_kwargs={"hidden_units": (8,)}, epochs=6, batch_size=50, lr_start=1e-12,
    lr_schedule="constant", lr_end=None, verbose=0, plateau_window=2,
)


def test_a_run_stops_or_lowers_its_lr_at_the_plateau_and_records_it(tmp_path):
    summaries = {}
    for action in ("none", "stop", "reduce_lr"):
        recipe = Recipe(**_FROZEN, plateau_action=action, output_dir=str(tmp_path / action))
        summaries[action] = training.run(recipe)
    vals = [row["val_accuracy"] for row in summaries["none"]["history"]]
    assert len(set(vals)) == 1  # frozen: the plateau is epoch 1, known after epoch 3
    for action, summary in summaries.items():
        assert summary["plateau"]["epoch_1based"] == 1 and summary["plateau"]["window"] == 2
        assert summary["plateau"]["action"] == action
        assert summary["plateau"]["val_gain_to_best"] == 0.0
    assert summaries["none"]["total_epochs"] == 6
    assert summaries["stop"]["total_epochs"] == 3  # epochs 1-3: the window ends with epoch 3
    assert [row["plateau_reached"] for row in summaries["stop"]["history"]] == [0.0, 0.0, 1.0]
    lrs = [row["lr"] for row in summaries["reduce_lr"]["history"]]
    assert lrs[:3] == [pytest.approx(1e-12)] * 3 and lrs[3:] == [pytest.approx(1e-13)] * 3
    # A finished stopped run read back is the same run.
    again = training.run(Recipe(**_FROZEN, plateau_action="stop", output_dir=str(tmp_path / "stop")))
    assert again["total_epochs"] == 3


def test_the_default_window_is_a_tenth_of_the_budget():
    assert [plateau.default_window(n) for n in (1, 3, 20, 21, 250)] == [2, 2, 2, 3, 25]
    assert np.isclose(Recipe().plateau_margin, 0.002)


def test_the_action_says_what_it_did_only_when_verbose(capsys):
    for verbose in (0, 1):
        callback = plateau.PlateauAction("stop", window=2, margin=0.0, **({"verbose": verbose} if verbose else {}))
        callback.set_model(_model())
        for epoch, value in enumerate([0.6, 0.7, 0.69, 0.7]):
            callback.on_epoch_end(epoch, {"val_accuracy": value})
        out = capsys.readouterr().out
        expected = "\nPlateauAction: val_accuracy plateaued at epoch 2 (no gain > 0 within 2 epochs): stopping (early stopping at the plateau)\n"
        assert out == (expected if verbose else "")


def test_the_callbacks_defaults_are_the_recipes_window_10_and_margin_0_002():
    # Epoch 0 then ten epochs 0.0015 better (< 0.002): the plateau is epoch 0, known after ten more.
    assert plateau.PlateauAction(history=[0.5] + [0.5015] * 10).plateau == 0
    assert plateau.PlateauAction(history=[0.5] + [0.5015] * 9).plateau is None  # the window is not over yet
    # A gain of 0.003 (> 0.002) at epoch 1 moves the plateau there.
    assert plateau.PlateauAction(history=[0.5, 0.503] + [0.503] * 10).plateau == 1
    assert Recipe().plateau_margin == plateau.PlateauAction().margin == 0.002

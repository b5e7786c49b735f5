"""ClippingSchedule (switch at an epoch / on plateau, LR and BN changes, resume) and BestValidation."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import bnn_keras
from bnn_keras import callbacks
from bnn_keras.callbacks import BestValidation, ClippingSchedule
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.quantizers import SwitchableSteSign

RNG = np.random.RandomState(0)
X = RNG.randn(64, 10).astype("float32")
Y = (X[:, :3].sum(axis=1, keepdims=True) > 0).astype("float32")


def build(lr=0.1):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((10,))
    x = lq.layers.QuantDense(16, use_bias=False, kernel_quantizer=SwitchableSteSign(),
                             kernel_constraint=SwitchableWeightClip())(inp)
    x = tf.keras.layers.BatchNormalization(momentum=0.9)(x)
    x = lq.layers.QuantDense(1, input_quantizer=SwitchableSteSign(),
                             kernel_quantizer=SwitchableSteSign(),
                             kernel_constraint=SwitchableWeightClip())(x)
    model = tf.keras.Model(inp, x)
    model.compile(optimizer=tf.keras.optimizers.SGD(lr), loss="mse", metrics=["accuracy"])
    return model


def phases(model):
    return {s.clipping_enabled for s in bnn_keras.find_switchables(model)}


def test_switch_at_epoch_logs_phase_lr_and_bn_momentum():
    model = build(lr=0.1)
    schedule = ClippingSchedule(switch_epoch=2, lr_factor=0.1, bn_momentum=0.5, verbose=0)
    history = model.fit(X, Y, epochs=4, batch_size=16, validation_split=0.25, verbose=0,
                        callbacks=[schedule])
    assert history.history["clipping_phase"] == [0.0, 0.0, 1.0, 1.0]
    np.testing.assert_allclose(history.history["lr"], [0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    np.testing.assert_allclose(history.history["bn_momentum"], [0.9, 0.9, 0.5, 0.5])
    assert schedule.switched_at_epoch == 2
    assert phases(model) == {True}


def test_new_bn_momentum_is_used_by_the_training_step():
    """After the switch the moving mean follows momentum 0.0: it equals the last batch mean."""
    model = build(lr=0.0)  # fixed kernel, so the batch statistics are reproducible
    model.fit(X, Y, epochs=2, batch_size=64, verbose=0,
              callbacks=[ClippingSchedule(switch_epoch=1, bn_momentum=0.0, monitor="loss", verbose=0)])
    bn = model.layers[2]
    pre_bn = tf.keras.Model(model.input, model.layers[1].output)
    np.testing.assert_allclose(bn.moving_mean.numpy(), pre_bn(X).numpy().mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("momentum, functions", [(0.9, 1), (0.5, 2)])
def test_the_train_step_is_rebuilt_only_when_the_bn_momentum_changes(momentum, functions):
    """The model's BN momentum is 0.9: switching to 0.9 keeps the traced step, 0.5 retraces once."""
    model = build()
    seen = []
    record = tf.keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append(model.train_function))
    model.fit(X, Y, epochs=4, batch_size=16, verbose=0,
              callbacks=[ClippingSchedule(switch_epoch=2, bn_momentum=momentum, monitor="loss", verbose=0), record])
    assert len({id(f) for f in seen}) == functions
    assert seen[0] is seen[1] and seen[2] is seen[3]


def test_switch_epoch_zero_is_clipped_from_the_start():
    model = build()
    history = model.fit(X, Y, epochs=2, verbose=0, callbacks=[ClippingSchedule(switch_epoch=0, verbose=0)],
                        validation_split=0.25)
    assert history.history["clipping_phase"] == [1.0, 1.0]


def test_plateau_switch_after_patience_epochs():
    model = build(lr=0.0)  # one full batch and no learning: the loss never improves after epoch 0
    schedule = ClippingSchedule(monitor="loss", patience=2, min_delta=1e-6, verbose=0)
    history = model.fit(X, Y, epochs=5, batch_size=64, verbose=0, callbacks=[schedule])
    # best at epoch 0; epochs 1 and 2 without improvement -> clipped from epoch 3
    assert history.history["clipping_phase"] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert schedule.switched_at_epoch == 3


def test_model_without_switchables_is_a_clear_error():
    model = tf.keras.Sequential([tf.keras.Input((10,)), tf.keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="expected a model with switchable"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[ClippingSchedule(switch_epoch=1)])


@pytest.mark.parametrize("kwargs,message", [
    ({}, "needs switch_epoch or patience"),
    ({"switch_epoch": -1}, "switch_epoch must be an integer >= 0, got -1"),
    ({"patience": 0}, "patience must be an integer >= 1, got 0"),
    ({"switch_epoch": 1, "lr_factor": 0}, "lr_factor must be > 0"),
    ({"switch_epoch": 1, "bn_momentum": 1.0}, r"bn_momentum must be in \[0, 1\), got 1.0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClippingSchedule(**kwargs)


class _Interrupt(tf.keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt


def test_resume_with_backup_and_restore_continues_in_the_clipped_phase(tmp_path):
    backup = str(tmp_path / "backup")
    schedule_args = dict(switch_epoch=2, lr_factor=0.5, bn_momentum=0.6, verbose=0)
    model = build(lr=0.1)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, epochs=5, validation_split=0.25, verbose=0, callbacks=[
            tf.keras.callbacks.BackupAndRestore(backup), ClippingSchedule(**schedule_args), _Interrupt(3)])

    fresh = build(lr=0.1)  # a new process would rebuild the model in the vanilla phase
    assert phases(fresh) == {False}
    history = fresh.fit(X, Y, epochs=5, validation_split=0.25, verbose=0, callbacks=[
        tf.keras.callbacks.BackupAndRestore(backup), ClippingSchedule(**schedule_args)])
    assert len(history.history["clipping_phase"]) == 1  # only epoch 4 was left
    assert history.history["clipping_phase"] == [1.0]
    np.testing.assert_allclose(history.history["lr"], [0.05], rtol=1e-6)
    assert history.history["bn_momentum"] == [0.6]
    assert phases(fresh) == {True}


def test_best_validation_records_test_metric_at_best_epoch_and_never_stops():
    model = build(lr=0.05)
    best = BestValidation(monitor="val_loss", test_data=(X[:16], Y[:16]))
    history = model.fit(X, Y, epochs=6, validation_split=0.25, verbose=0, callbacks=[best])
    assert len(history.history["loss"]) == 6  # no early stopping
    val = np.array(history.history["val_loss"])
    assert best.best_epoch == int(np.argmin(val))
    assert best.best == pytest.approx(val.min())
    assert best.best_logs["test_loss"] == pytest.approx(history.history["test_loss"][best.best_epoch])
    assert history.history["best_epoch"][-1] == best.best_epoch
    best_predictions = None
    best.restore()
    best_predictions = model.predict(X[:4], verbose=0)
    model.set_weights(best.best_weights)
    np.testing.assert_array_equal(model.predict(X[:4], verbose=0), best_predictions)
    assert best.model.evaluate(X[:16], Y[:16], verbose=0, return_dict=True)["loss"] == pytest.approx(
        best.best_logs["test_loss"], rel=1e-5)


def test_best_validation_needs_the_monitored_metric():
    model = build()
    with pytest.raises(ValueError, match="monitors 'val_accuracy' but the epoch logs only have"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[BestValidation()])


def test_callback_configs():
    """Every argument set to a non-default value comes back from get_config and through the constructor."""
    schedule_args = dict(switch_epoch=3, monitor="val_loss", patience=4, mode="max", min_delta=0.01,
                         lr_factor=0.1, bn_momentum=0.8, verbose=0)
    best_args = dict(monitor="val_loss", mode="max", restore_best_weights=True)
    for cls, args in [(ClippingSchedule, schedule_args), (BestValidation, best_args)]:
        config = cls(**args).get_config()
        assert config == args
        rebuilt = cls(**config)
        assert rebuilt.get_config() == args
        assert {name: getattr(rebuilt, name) for name in args} == args
    # mode "max" on a loss survives the round trip in behaviour too: the higher val_loss is the best.
    rebuilt = BestValidation(**BestValidation(**best_args).get_config())
    rebuilt.set_model(_marked_model())
    for epoch, value in enumerate([0.2, 0.9, 0.5]):
        rebuilt.on_epoch_end(epoch, {"val_loss": value})
    assert rebuilt.best_epoch == 1


def _marked_model():
    """A one-kernel model whose weights can mark an epoch."""
    return tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1, use_bias=False)])


@pytest.mark.parametrize("monitor, mode, values, best_epoch", [
    ("val_accuracy", "auto", [0.5, 0.8, 0.6, 0.7], 1),  # max, best in the middle
    ("val_accuracy", "auto", [0.9, 0.5, 0.6, 0.7], 0),  # max, best first
    ("val_accuracy", "auto", [0.5, 0.8, 0.8, 0.7], 1),  # a tie: the first epoch with it
    ("val_loss", "auto", [0.9, 0.3, 0.5, 0.4], 1),      # min, best in the middle
    ("val_loss", "auto", [0.2, 0.5, 0.4, 0.3], 0),      # min, best first
    ("val_accuracy", "min", [0.5, 0.2, 0.6, 0.3], 1),   # mode overrides the name
    ("val_loss", "max", [0.5, 0.9, 0.6, 0.7], 1),
])
def test_best_validation_keeps_the_best_epoch_not_the_last(monitor, mode, values, best_epoch):
    """Hand-made logs; the weights mark each epoch (kernel = epoch number), the logs carry a test metric."""
    model = _marked_model()
    best = BestValidation(monitor=monitor, mode=mode)
    best.set_model(model)
    logged = []
    for epoch, value in enumerate(values):
        model.set_weights([np.full((2, 1), float(epoch), dtype="float32")])
        logs = {monitor: value, "test_accuracy": 0.1 * epoch}
        best.on_epoch_end(epoch, logs)
        logged.append(logs["best_epoch"])
    pick = np.argmin if mode == "min" or (mode == "auto" and monitor == "val_loss") else np.argmax
    assert logged == [float(pick(values[: epoch + 1])) for epoch in range(len(values))]  # first on ties
    assert best.best_epoch == best_epoch
    assert best.best == values[best_epoch]
    assert best.best_logs == {monitor: values[best_epoch], "test_accuracy": 0.1 * best_epoch}
    np.testing.assert_array_equal(best.best_weights[0], np.full((2, 1), best_epoch))
    best.restore()
    np.testing.assert_array_equal(model.get_weights()[0], np.full((2, 1), best_epoch))


class _SetWeights(tf.keras.callbacks.Callback):
    """At the start of epoch e, put weights[e] into the model (a zero learning rate keeps them)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def on_epoch_begin(self, epoch, logs=None):
        self.model.set_weights(self.weights[epoch])


def test_best_validation_in_a_real_fit_picks_the_epoch_the_weights_made_best():
    """Epoch weights: wrong way round, the perfect rule y = [x0 + x1 + x2 > 0], the same rule 4x more
    confident, noise, wrong way round. Accuracy peaks (tied) at epochs 1 and 2, the loss at epoch 2."""
    rule = np.zeros((10, 1), dtype="float32")
    rule[:3] = 1.0
    noise = np.random.RandomState(1).randn(10, 1).astype("float32")
    kernels = [-rule, rule, 4 * rule, noise, -rule]
    model = tf.keras.Sequential([tf.keras.Input((10,)), tf.keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.0), loss="mse", metrics=["accuracy"])
    by_accuracy = BestValidation(test_data=(X[:16], Y[:16]), restore_best_weights=True)
    by_loss = BestValidation(monitor="val_loss")
    history = model.fit(X, Y, validation_data=(X, Y), epochs=5, batch_size=16, verbose=0,
                        callbacks=[_SetWeights([[k, np.zeros(1, "float32")] for k in kernels]), by_loss, by_accuracy])
    accuracy = history.history["val_accuracy"]
    assert accuracy[1] == accuracy[2] == 1.0 and max(accuracy[0], accuracy[3], accuracy[4]) < 1.0
    loss = history.history["val_loss"]
    assert loss[2] < loss[1] and loss[2] == min(loss)
    assert (by_accuracy.best_epoch, by_loss.best_epoch) == (1, 2)
    assert by_accuracy.best_logs["test_accuracy"] == 1.0  # the perfect rule on the test rows too
    assert history.history["best_epoch"] == [0.0, 1.0, 1.0, 1.0, 1.0]
    np.testing.assert_array_equal(model.get_weights()[0], rule)  # restored at the end of fit
    np.testing.assert_array_equal(by_loss.best_weights[0], 4 * rule)


def test_replay_rebuilds_the_plateau_counter_of_an_interrupted_run():
    """Epochs 0-2 ran before a kill: best at 0, two epochs without improvement."""
    history = [{"val_loss": 1.0, "clipping_phase": 0.0},
               {"val_loss": 1.5, "clipping_phase": 0.0},
               {"val_loss": 1.2, "clipping_phase": 0.0}]
    schedule = ClippingSchedule(monitor="val_loss", patience=3, verbose=0)
    schedule.replay(history)
    assert (schedule._best, schedule._wait) == (1.0, 2)
    schedule.replay(history + [{"val_loss": 0.5, "clipping_phase": 0.0}, {"val_loss": 0.7, "clipping_phase": 1.0}])
    assert (schedule._best, schedule._wait, schedule.switched_at_epoch) == (0.5, 0, 4)


def test_logged_lr_is_the_rate_each_epoch_trained_with():
    from bnn_keras.optimizers import ExponentialDecayPerEpoch

    model = build()
    schedule = ExponentialDecayPerEpoch(1e-2, 1e-4, epochs=3, steps_per_epoch=4)
    model.compile(optimizer=tf.keras.optimizers.SGD(schedule), loss="mse")
    history = model.fit(X, Y, epochs=3, batch_size=16, verbose=0,
                        callbacks=[ClippingSchedule(switch_epoch=5, monitor="loss", verbose=0)])
    np.testing.assert_allclose(history.history["lr"], [1e-2, 1e-3, 1e-4], rtol=1e-5)


def test_plateau_switch_epoch_is_logged_in_the_phase_it_trained_in():
    model = build(lr=0.0)
    schedule = ClippingSchedule(monitor="loss", patience=1, min_delta=1e-6, bn_momentum=0.3, verbose=0)
    history = model.fit(X, Y, epochs=3, batch_size=64, verbose=0, callbacks=[schedule])
    assert history.history["clipping_phase"] == [0.0, 0.0, 1.0]
    assert history.history["bn_momentum"] == [0.9, 0.9, 0.3]


@pytest.mark.parametrize(
    "monitor, start, cases",
    [
        # (current, best, min_delta) -> better?
        ("val_accuracy", -np.inf, [((0.0, -np.inf, 0.0), True), ((0.51, 0.5, 0.005), True),
                                   ((0.504, 0.5, 0.005), False), ((0.5, 0.5, 0.0), False), ((0.4, 0.5, 0.0), False)]),
        ("val_loss", np.inf, [((9.0, np.inf, 0.0), True), ((0.44, 0.5, 0.05), True),
                              ((0.46, 0.5, 0.05), False), ((0.5, 0.5, 0.0), False), ((0.6, 0.5, 0.0), False)]),
    ],
)
def test_improvement_rule_and_starting_best_follow_keras_early_stopping(monitor, start, cases):
    from bnn_keras.callbacks import _improvement_op

    better, best = _improvement_op(monitor, "auto")
    assert best == start
    assert [better(*args) for args, _ in cases] == [expected for _, expected in cases]


@pytest.mark.parametrize(
    "kwargs, line",
    [
        ({"lr_factor": 0.1, "bn_momentum": 0.5, "verbose": 1},
         "ClippingSchedule: clipped phase from epoch 3, learning rate x0.1 -> 0.01, BN momentum -> 0.5"),
        ({"verbose": 1}, "ClippingSchedule: clipped phase from epoch 3"),
        ({"lr_factor": 0.1, "bn_momentum": 0.5, "verbose": 0}, None),
    ],
    ids=["lr-and-bn", "plain", "quiet"],
)
def test_the_switch_prints_one_line_saying_what_changed(capsys, kwargs, line):
    model = build(lr=0.1)
    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[ClippingSchedule(switch_epoch=2, **kwargs)])
    printed = capsys.readouterr().out.strip()
    assert printed == ("" if line is None else line)


def test_best_validation_before_any_epoch_has_no_best_yet():
    best = BestValidation()
    assert (best.best_epoch, best.best_logs, best.best_weights, best.best) == (None, {}, None, -np.inf)


def test_a_second_fit_after_a_replayed_one_starts_its_plateau_counter_afresh():
    """replay() carries the counter into the resumed fit only; the next fit starts from none."""
    model = build(lr=0.0)  # the loss never changes, so every epoch after the first is a plateau
    schedule = ClippingSchedule(monitor="loss", patience=2, verbose=0)
    schedule.replay([{"loss": -1.0, "clipping_phase": 0.0}])  # best -1: nothing here beats it
    model.fit(X, Y, epochs=2, initial_epoch=1, batch_size=64, verbose=0, callbacks=[schedule])
    assert schedule.switched_at_epoch is None  # one epoch without improvement, last epoch
    history = model.fit(X, Y, epochs=3, batch_size=64, verbose=0, callbacks=[schedule])
    # Fresh: best at epoch 0, then 1 and 2 without improvement; the plateau ends with the last epoch.
    assert history.history["clipping_phase"] == [0.0, 0.0, 0.0]
    assert schedule.switched_at_epoch is None


@pytest.mark.parametrize("as_dataset", [False, True])
def test_best_validation_evaluates_the_test_rows_silently(as_dataset, capfd):
    model = build()
    test_data = (X[:16], Y[:16])
    if as_dataset:
        test_data = tf.data.Dataset.from_tensor_slices(test_data).batch(8)
    best = BestValidation(monitor="loss", test_data=test_data)
    capfd.readouterr()
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[best])
    assert capfd.readouterr().out == ""
    assert set(best.best_logs) >= {"test_loss", "test_accuracy"}


def test_a_replayed_plateau_counter_carries_into_the_resumed_fit():
    """Killed after epoch 2 with two epochs since the best: the resumed fit's first plateau epoch switches."""
    model = build(lr=0.0)  # the loss never changes and never beats the replayed best
    schedule = ClippingSchedule(monitor="loss", patience=3, verbose=0)
    schedule.replay([{"loss": -1.0, "clipping_phase": 0.0}, {"loss": 5.0, "clipping_phase": 0.0},
                     {"loss": 5.0, "clipping_phase": 0.0}], epochs=5)
    history = model.fit(X, Y, epochs=5, initial_epoch=3, batch_size=64, verbose=0, callbacks=[schedule])
    assert history.history["clipping_phase"] == [0.0, 1.0]  # afresh it would be [0.0, 0.0]
    assert schedule.switched_at_epoch == 4


def test_a_new_schedule_is_in_the_vanilla_phase_with_nothing_counted():
    schedule = ClippingSchedule(patience=2, verbose=0)
    assert (schedule.phase, schedule.switched_at_epoch) == (0, None)


def test_replay_skips_rows_without_the_monitored_value():
    """Rows of a stage without validation (no val_loss) neither improve nor count as a plateau."""
    schedule = ClippingSchedule(monitor="val_loss", patience=2, verbose=0)
    schedule.replay([{"loss": 1.0, "clipping_phase": 0.0}, {"val_loss": 0.5, "clipping_phase": 0.0},
                     {"loss": 0.9, "clipping_phase": 0.0}])
    assert (schedule._best, schedule._wait, schedule.switched_at_epoch) == (0.5, 0, None)


def test_replay_reads_rows_without_a_phase_as_vanilla_epochs():
    """A plain Keras history (no clipping_phase): vanilla epochs, so their plateau decides the switch."""
    schedule = ClippingSchedule(monitor="val_loss", patience=2, verbose=0)
    schedule.replay([{"val_loss": 0.5}, {"val_loss": 0.6}, {"val_loss": 0.7}], epochs=10)
    assert (schedule._best, schedule._wait, schedule.switched_at_epoch) == (0.5, 2, 3)


def test_replay_starts_afresh_each_time_it_is_called():
    schedule = ClippingSchedule(monitor="val_loss", patience=3, verbose=0)
    schedule.replay([{"val_loss": 0.2, "clipping_phase": 0.0}, {"val_loss": 0.9, "clipping_phase": 1.0}])
    assert (schedule._best, schedule.switched_at_epoch) == (0.2, 1)
    schedule.replay([{"val_loss": 0.9, "clipping_phase": 0.0}, {"val_loss": 0.8, "clipping_phase": 0.0}])
    assert (schedule._best, schedule._wait, schedule.switched_at_epoch) == (0.8, 0, None)


def test_stop_on_non_finite_names_the_first_block_from_construction_on():
    """Straight after construction (epoch 0, offset 0): the first block is batches 1-3 of epoch 1."""
    stop = callbacks.StopOnNonFinite(steps=6)
    stop.on_train_batch_end(2, {"loss": 0.5})  # a finite block: nothing
    with pytest.raises(callbacks.TrainingDivergedError) as error:
        stop.on_train_batch_end(5, {"loss": float("inf")})
    assert str(error.value) == "the training loss became inf in epoch 1, batches 4-6 of 6"
    fresh = callbacks.StopOnNonFinite()
    with pytest.raises(callbacks.TrainingDivergedError, match="^the training loss became nan in epoch 1, batches 1-3$"):
        fresh.on_train_batch_end(2, {"loss": float("nan")})
    assert fresh.get_config() == {"epoch_offset": 0, "steps": None}

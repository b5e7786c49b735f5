"""The clipped STE's dead zone (`bnn_keras.dead_zone`): shares of a hand-set model counted by hand,
the callback's columns in a real fit against a NumPy reference, and their TensorBoard tags."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import models
from bnn_keras.callbacks import HistoryRows, TensorBoardLog
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.dead_zone import (
    DeadZoneMonitor,
    DeadZoneProbe,
    _counts,
    dead_zone_columns,
    dead_zone_shares,
    kernel_signs,
)
from bnn_keras.quantizers import ClippedSteSign, SwitchableSteSign, VanillaSteSign

ABOVE_ONE = float(np.nextafter(np.float32(1), np.float32(2)))  # 1 + 1.19e-7: beyond the 1e-7 tolerance
BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))  # 1 - 5.96e-8: within it, saturated

# binary_a (c = 1): 3 of 8 weights at |w| = 1, 2 beyond (1.5, -2.0); sign 0 is +1
A = np.array([[1.0, -1.0], [1.5, -0.5], [1.0, -2.0], [0.0, 0.75]], np.float32)
# binary_b ("ste_sign", c = 1): 2 of 6 saturated (-1.0 and the float just below 1), 1 beyond (the float just above)
B = np.array([[0.3, -1.0, ABOVE_ONE], [BELOW_ONE, 0.9, -0.4]], np.float32)
# binary_a's inputs (c = 1): 3 of 8 beyond (-1.5, 2.0, -3.0); 1.0 is at c, not beyond
X = np.array([[0.5, -1.5, 1.0, 2.0], [-0.2, 0.0, -3.0, 0.9]], np.float32)
# binary_a's output: sign(X) @ sign(A) = [[1-1+1+1, -1+1-1+1], [-1+1-1+1, 1-1+1+1]] = [[2, 0], [0, 2]];
# 0.25 x that + [0.5, -0.25] = [[1.0, -0.25], [0.5, 0.25]] is binary_b's input (c = 0.5): 1 of 4 beyond (0.5 is at c)
SCALE, SHIFT = 0.25 * np.eye(2, dtype=np.float32), np.array([0.5, -0.25], np.float32)


def _hand_model():
    inputs = tf.keras.Input((4,), name="x")
    h = lq.layers.QuantDense(2, use_bias=False, input_quantizer=SwitchableSteSign(),
                             kernel_quantizer=SwitchableSteSign(), name="binary_a")(inputs)
    h = tf.keras.layers.Dense(2, name="float_scale")(h)  # no kernel quantiser: not a binary layer
    h = tf.keras.layers.Dropout(0.9, name="dropout")(h)  # in training mode it would change binary_b's input
    outputs = lq.layers.QuantDense(3, use_bias=False, input_quantizer=ClippedSteSign(clip_value=0.5),
                                   kernel_quantizer="ste_sign", name="binary_b")(h)
    model = tf.keras.Model(inputs, outputs)
    model.get_layer("binary_a").kernel.assign(A)
    model.get_layer("float_scale").set_weights([SCALE, SHIFT])
    model.get_layer("binary_b").kernel.assign(B)
    return model


def test_hand_set_layers_give_the_shares_counted_by_hand():
    shares = dead_zone_shares(_hand_model(), X)
    assert shares == {
        "binary_a": {"saturated": 3 / 8, "beyond": 2 / 8, "weights": 8.0, "inputs_beyond": 3 / 8, "inputs": 8.0},
        "binary_b": {"saturated": 2 / 6, "beyond": 1 / 6, "weights": 6.0, "inputs_beyond": 1 / 4, "inputs": 4.0},
    }
    assert dead_zone_columns(shares) == pytest.approx({
        "dead_zone_saturated": (3 + 2) / 14,
        "dead_zone_beyond": (2 + 1) / 14,
        "dead_zone_inputs_beyond": (3 + 1) / 12,
    }, rel=1e-12)


def test_flipped_share_counts_sign_changes_and_zero_is_plus_one():
    model = _hand_model()
    signs = kernel_signs(model)
    np.testing.assert_array_equal(signs["binary_a"], [[True, False], [True, False], [True, False], [True, True]])
    a, b = A.copy(), B.copy()
    a[0, 0] = -1.0  # + to -: flip
    a[1, 1] = 0.0  # - to 0 (+1): flip
    a[3, 0] = 0.5  # 0 (+1) to +: no flip
    a[2, 0] = 0.3  # + to +: no flip
    b[1, 2] = 0.4  # - to +: flip
    b[0, 0] = 0.0  # + to 0 (+1): no flip
    model.get_layer("binary_a").kernel.assign(a)
    model.get_layer("binary_b").kernel.assign(b)
    shares = dead_zone_shares(model, X, previous_signs=signs)
    assert shares["binary_a"]["flipped"] == 2 / 8 and shares["binary_b"]["flipped"] == 1 / 6
    assert dead_zone_columns(shares)["dead_zone_flipped"] == pytest.approx(3 / 14, rel=1e-12)
    # the other shares follow the new kernel: a has two at |w| = 1 left (-1, -1), b's two saturated stay
    assert shares["binary_a"]["saturated"] == 2 / 8 and shares["binary_b"]["saturated"] == 2 / 6


def test_an_explicit_clip_value_replaces_every_quantisers_own():
    shares = dead_zone_shares(_hand_model(), X, clip_value=0.5)
    # |A| = 1, 1, 1.5, .5, 1, 2, 0, .75: one at 0.5, six above; |X| > 0.5: 1.5, 1, 2, 3, .9
    assert {k: shares["binary_a"][k] for k in ("saturated", "beyond", "inputs_beyond")} == {
        "saturated": 1 / 8, "beyond": 6 / 8, "inputs_beyond": 5 / 8}
    assert (shares["binary_b"]["saturated"], shares["binary_b"]["beyond"]) == (0.0, 4 / 6)


def test_weights_clipped_to_a_clip_value_float32_cannot_hold_are_saturated():
    assert float(np.float32(0.1)) != 0.1  # what weight clipping writes is not the Python float c
    inputs = tf.keras.Input((1,))
    layer = lq.layers.QuantDense(6, use_bias=False, kernel_quantizer=SwitchableSteSign(clip_value=0.1),
                                 kernel_constraint=SwitchableWeightClip(clip_value=0.1, enabled=True))
    model = tf.keras.Model(inputs, layer(inputs))
    two_steps_above = np.nextafter(np.nextafter(np.float32(0.1), np.float32(1)), np.float32(1))
    layer.kernel.assign(layer.kernel_constraint(tf.constant([[0.5, -0.3, 0.05, 0.1, -0.02, 0.0]])))
    np.testing.assert_array_equal(layer.kernel.numpy(), np.float32([[0.1, -0.1, 0.05, 0.1, -0.02, 0.0]]))
    assert dead_zone_shares(model, None)[layer.name]["saturated"] == 3 / 6
    layer.kernel.assign([[two_steps_above, -0.1, 0.0, 0.0, 0.0, 0.0]])  # 2 float32 steps (1.5e-8) > 1e-8 above
    shares = dead_zone_shares(model, None)[layer.name]
    assert (shares["saturated"], shares["beyond"]) == (1 / 6, 1 / 6)


def test_the_tolerance_admits_only_the_float32_neighbours_of_c():
    one_below, one_above = np.float32(BELOW_ONE), np.float32(ABOVE_ONE)
    two_below = np.nextafter(one_below, np.float32(0))
    assert (1 - two_below, 1 - one_below, one_above - 1) == pytest.approx((1.19e-7, 5.96e-8, 1.19e-7), rel=1e-2)
    inputs = tf.keras.Input((1,))
    layer = lq.layers.QuantDense(5, use_bias=False, kernel_quantizer="ste_sign", name="edges")
    model = tf.keras.Model(inputs, layer(inputs))
    layer.kernel.assign([[two_below, -one_below, 1.0, one_above, -two_below]])
    shares = dead_zone_shares(model, None)["edges"]
    assert (shares["saturated"], shares["beyond"]) == (2 / 5, 1 / 5)  # 1e-7 from 1: 1 - 5.96e-8 in, 1 +- 1.19e-7 out


def test_a_quantiser_without_a_clip_value_is_measured_against_one():
    inputs = tf.keras.Input((1,))
    layer = lq.layers.QuantDense(4, use_bias=False, kernel_quantizer=VanillaSteSign(), name="vanilla")
    model = tf.keras.Model(inputs, layer(inputs))
    assert VanillaSteSign().clip_value is None
    layer.kernel.assign([[1.0, 1.5, 0.2, -3.0]])
    shares = dead_zone_shares(model, None)["vanilla"]
    assert (shares["saturated"], shares["beyond"], "inputs_beyond" in shares) == (1 / 4, 2 / 4, False)


def test_a_sequential_model_has_its_inputs_measured():
    model = tf.keras.Sequential([
        tf.keras.Input((4,)),
        lq.layers.QuantDense(2, use_bias=False, input_quantizer="ste_sign", kernel_quantizer="ste_sign", name="only"),
    ])
    model.get_layer("only").kernel.assign(A)
    shares = dead_zone_shares(model, X)["only"]
    assert (shares["saturated"], shares["beyond"], shares["inputs_beyond"]) == (3 / 8, 2 / 8, 3 / 8)


def test_a_float_model_has_no_binary_layers_and_no_columns():
    tf.keras.utils.set_random_seed(0)
    model = models.mlp((4,), 3, hidden_units=(8,), variant="float")
    assert dead_zone_shares(model, X) == {} and dead_zone_columns({}) == {}
    model.compile(optimizer="adam", loss="squared_hinge")
    history = model.fit(np.tile(X, (4, 1)), np.ones((8, 3), np.float32), epochs=2, verbose=0,
                        callbacks=[DeadZoneMonitor(X)])
    assert not any(key.startswith("dead_zone") for key in history.history)
    assert set(history.history) == {"loss"}


class _Subclassed(tf.keras.Model):
    def __init__(self, input_quantizer):
        super().__init__()
        self.dense = lq.layers.QuantDense(2, use_bias=False, input_quantizer=input_quantizer,
                                          kernel_quantizer="ste_sign", name="sub_dense")

    def call(self, x):
        return self.dense(x)


def test_a_subclassed_model_with_input_quantisers_is_refused_in_one_line():
    model = _Subclassed("ste_sign")
    model(X)
    with pytest.raises(ValueError) as error:
        dead_zone_shares(model, X)
    assert str(error.value) == (
        "dead-zone inputs need a functional or Sequential model with symbolic inputs; model "
        f"{model.name!r} has none (subclassed?) but input-quantised layers ['sub_dense']")
    plain = _Subclassed(None)  # no input quantiser: its weights are measured all the same
    plain(X)
    plain.dense.kernel.assign(A)
    assert dead_zone_shares(plain, X) == {"sub_dense": {"saturated": 3 / 8, "beyond": 2 / 8, "weights": 8.0}}


def _mlp_fit(weight_clip, folder):
    """A binarynet MLP 4-8-3 in the clipped phase, Adam at 0.1 for 3 epochs; kernels and BN weights at
    train begin and each epoch's end (a spy); the monitor before HistoryRows and TensorBoardLog."""
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = np.where(np.eye(3)[rng.integers(0, 3, 64)] > 0, 1.0, -1.0).astype(np.float32)
    model = models.mlp((4,), 3, hidden_units=(8,), variant="binarynet", clipped=True, weight_clip=weight_clip)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.1), loss="squared_hinge")
    snapshots = []

    def snapshot(*_):
        snapshots.append({layer.name: [w.numpy().copy() for w in layer.weights] for layer in model.layers})

    rows = []
    spy = tf.keras.callbacks.LambdaCallback(on_train_begin=snapshot, on_epoch_end=snapshot)
    sample = x[:16]
    monitor = DeadZoneMonitor(sample)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=2, callbacks=[  # verbose: the progress bar reads every log
        monitor, HistoryRows(rows), TensorBoardLog(folder, dead_zone=monitor), spy])
    return {**history.history, "per_layer": monitor.per_layer}, rows, snapshots, sample


def _sign(values):
    return np.where(values >= 0, 1.0, -1.0)


def _expected(snapshots, sample):
    """Each epoch's shares from the spy's kernels and BN weights, in NumPy (c = 1, tolerance 1e-7)."""
    per_epoch = []
    for before, after in zip(snapshots, snapshots[1:]):
        w1, w2 = after["dense_1"][0], after["dense_out"][0]
        gamma, beta, mean, variance = after["bn_1"]
        h = _sign(sample.astype(np.float64)) @ _sign(w1)
        bn = gamma * (h - mean) / np.sqrt(variance + 1e-4) + beta  # inference-mode BN: dense_out's input
        layers = {}
        for name, kernel, inputs in (("dense_1", w1, sample), ("dense_out", w2, bn)):
            layers[name] = {
                "saturated": np.mean(np.isclose(np.abs(kernel), 1.0, rtol=0, atol=1e-7)),
                "beyond": np.mean(np.abs(kernel) > 1.0 + 1e-7),
                "inputs_beyond": np.mean(np.abs(inputs) > 1.0 + 1e-7),
                "flipped": np.mean(_sign(kernel) != _sign(before[name][0])),
            }
        sizes = {"dense_1": (32, 64), "dense_out": (24, 128)}  # weights, inputs on the 16-example sample
        columns = {f"dead_zone_{m}": sum(layers[n][m] * sizes[n][m == "inputs_beyond"] for n in layers)
                   / sum(sizes[n][m == "inputs_beyond"] for n in layers)
                   for m in ("saturated", "beyond", "inputs_beyond", "flipped")}
        per_epoch.append((layers, columns))
    return per_epoch


@pytest.mark.parametrize("weight_clip, dead", [("unit", "saturated"), (None, "beyond")])
def test_the_monitor_logs_each_epochs_shares_as_numpy_counts_them(tmp_path, weight_clip, dead):
    history, rows, snapshots, sample = _mlp_fit(weight_clip, tmp_path)
    expected = _expected(snapshots, sample)
    assert len(expected) == 3 == len(rows)
    for epoch, (layers, columns) in enumerate(expected):
        logged = history["per_layer"][epoch]
        assert set(logged) == set(layers)
        for name, shares in layers.items():
            assert logged[name] == pytest.approx(shares, abs=1e-12), (epoch, name)
        for column, value in columns.items():
            assert history[column][epoch] == pytest.approx(value, abs=1e-12), (epoch, column)
            assert rows[epoch][column] == pytest.approx(value, abs=1e-12), (epoch, column)
        assert not any("/" in key or "layers" in key for key in rows[epoch])  # per layer: TensorBoard only
    # the fixture can tell right from wrong: weights in the dead zone, signs flipping, inputs on both sides of c
    assert all(columns[f"dead_zone_{dead}"] > 0 for _, columns in expected[1:])
    assert all(columns["dead_zone_flipped"] > 0 for _, columns in expected)
    assert all(0 < layers[n]["inputs_beyond"] < 1 for layers, _ in expected for n in layers)
    if weight_clip == "unit":
        assert all(columns["dead_zone_beyond"] == 0 for _, columns in expected)  # clipping holds them at c


def _events(folder):
    """{tag: {step: value}} of the scalar events in `folder`, read as tests/test_tensorboard.py reads them."""
    from test_tensorboard import _events as events, _scalars

    return _scalars(events(folder))


def test_tensorboard_writes_each_layers_share_under_dead_zone_metric_layer(tmp_path):
    history, _, _, _ = _mlp_fit(None, tmp_path)
    events = _events(tmp_path)
    per_layer = {tag for tag in events if tag.startswith("dead_zone/")}
    assert per_layer == {f"dead_zone/{m}/{n}" for m in ("saturated", "beyond", "inputs_beyond", "flipped")
                         for n in ("dense_1", "dense_out")}
    for tag in per_layer:
        _, metric, layer = tag.split("/")
        logged = history["per_layer"]
        assert events[tag] == {epoch: float(np.float32(s[layer][metric])) for epoch, s in enumerate(logged)}
    assert events["dead_zone_beyond"] == {e: float(np.float32(v)) for e, v in enumerate(history["dead_zone_beyond"])}


def test_tensorboard_writes_a_hand_made_per_layer_dict(tmp_path):
    model = _hand_model()
    monitor = DeadZoneMonitor(X)
    monitor.per_layer.append({"binary_a": {"beyond": 0.25, "flipped": 0.125}, "binary_b": {"saturated": 0.5}})
    log = TensorBoardLog(tmp_path, epoch_offset=2, dead_zone=monitor)
    log.set_model(model)
    log.on_epoch_begin(0)
    log.on_epoch_end(0, {"loss": 0.5, "dead_zone_beyond": 0.25})
    log.on_train_end()
    assert _events(tmp_path) == {
        "loss": {2: 0.5}, "dead_zone_beyond": {2: 0.25}, "flipped_share": {2: 0.0},
        "dead_zone/beyond/binary_a": {2: 0.25}, "dead_zone/flipped/binary_a": {2: 0.125},
        "dead_zone/saturated/binary_b": {2: 0.5},
    }


def test_the_probe_reads_inputs_in_inference_mode_with_one_traced_call():
    model = _hand_model()
    probe = DeadZoneProbe(model)
    kernels, inputs = probe(tf.constant(X))
    np.testing.assert_array_equal(kernels["binary_b"], B)
    np.testing.assert_array_equal(inputs["binary_b"], [[1.0, -0.25], [0.5, 0.25]])  # no dropout
    probe(tf.constant(X))
    assert probe._read.experimental_get_tracing_count() == 1


def test_the_callback_outside_fit_and_its_config():
    model = _hand_model()
    monitor = DeadZoneMonitor(X, clip_value=0.5)
    monitor.set_model(model)
    logs = {}
    monitor.on_epoch_end(0, logs)  # signs taken on first use: nothing flipped yet
    assert "dead_zone_saturated" in logs and monitor.per_layer[-1]["binary_a"] == {"saturated": 1 / 8, "beyond": 6 / 8, "inputs_beyond": 5 / 8,
                                                    "flipped": 0.0}
    config = monitor.get_config()
    assert config == {"clip_value": 0.5} and DeadZoneMonitor(X, **config).get_config() == config
    assert tf.keras.utils.get_registered_object("bnn_keras>DeadZoneMonitor") is DeadZoneMonitor


@pytest.mark.parametrize("make, message", [
    (lambda: DeadZoneMonitor(X, clip_value=0), "clip_value must be a positive finite number or None, got 0"),
    (lambda: DeadZoneMonitor(X, clip_value=True), "clip_value must be a positive finite number or None, got True"),
    (lambda: DeadZoneMonitor(X, clip_value=float("inf")),
     "clip_value must be a positive finite number or None, got inf"),
    (lambda: DeadZoneMonitor(object()), "sample must be a batch of model inputs (a NumPy array or tensor), got object"),
    (lambda: DeadZoneMonitor(np.zeros((0, 4))), "sample must hold at least one example, got shape (0, 4)"),
    (lambda: dead_zone_shares(_hand_model(), X, previous_signs={"binary_a": np.ones((2, 4), bool)}),
     "previous_signs['binary_a'] has shape (2, 4), the layer's kernel (4, 2)"),
])
def test_bad_values_say_what_was_expected(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value) == message


@pytest.mark.parametrize("deep, reason", [
    (False, "layer 'deep' reads the input of a nested model, not a tensor computed from these"),
    (True, "Graph disconnected: cannot obtain value for tensor "),  # Keras' own first line
])
def test_an_input_quantised_layer_inside_a_nested_model_is_refused_in_one_line(deep, reason):
    """Its input is no tensor of the outer graph: said at once, not as an AssertionError inside predict."""
    inner_in = tf.keras.Input((4,))
    h = tf.keras.layers.Dense(4)(inner_in) if deep else inner_in
    binary = lq.layers.QuantDense(2, use_bias=False, input_quantizer="ste_sign", kernel_quantizer="ste_sign", name="deep")
    inner = tf.keras.Model(inner_in, binary(h), name="inner")
    inputs = tf.keras.Input((4,))
    model = tf.keras.Model(inputs, inner(tf.keras.layers.Dense(4)(inputs)), name="outer")
    with pytest.raises(ValueError) as error:
        dead_zone_shares(model, X)
    message = str(error.value)
    assert message.startswith(
        "cannot read the inputs of layers ['deep'] from model 'outer''s inputs (a shared or nested layer?): " + reason)
    assert "\n" not in message


def test_the_clip_band_includes_its_lower_edge_when_float32_holds_it_exactly():
    # For this c the band's lower edge c - 1e-7 c is a float32 value itself: a weight right there
    # is at the clip, the next float32 below it is not.
    c = 0.30000004192093316
    edge = np.float32(c - 1e-7 * c)
    assert float(edge) == c - 1e-7 * c
    values = np.array([edge, -edge, np.nextafter(edge, np.float32(0)), np.float32(c)], np.float32)
    beyond, at_clip, _, _ = _counts(values, c)
    assert (beyond, at_clip) == (0, 3)

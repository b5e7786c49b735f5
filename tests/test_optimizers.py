"""Optimisers, per-epoch schedules and layer-wise LR scaling, against numpy references."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from bnn_keras.optimizers import (
    NAMES,
    BopCaseOptimizer,
    ExponentialDecayPerEpoch,
    LayerwiseLrScaling,
    PiecewiseConstantPerEpoch,
    current_learning_rate,
    get,
    glorot_limit,
    scale_learning_rate,
)

STUDY_NAMES = ("adadelta", "adagrad", "adam", "bop", "momentum", "nesterov", "rmsprop", "sgd")


def tiny_binary_model(seed=0):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential(
        [lq.layers.QuantDense(3, kernel_quantizer="ste_sign", input_shape=(4,))]
    )


def tiny_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")


# --------------------------------------------------------------------------- get()


def test_names_are_the_study_optimisers_plus_bop():
    assert NAMES == STUDY_NAMES


@pytest.mark.parametrize("name", STUDY_NAMES)
def test_every_optimiser_moves_every_variable_inside_fit(name):
    model = tiny_binary_model()
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.compile(optimizer=get(name.upper(), learning_rate=0.01), loss="mse")
    x, y = tiny_data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = [v.numpy() for v in model.trainable_variables]
    assert len(after) == 2
    for old, new in zip(before, after):
        assert np.any(old != new)


# Two steps with known gradients against each optimiser's update rule in numpy, with the
# hyperparameters the built optimiser reports (epsilon, rho, momentum, ...). Two steps, not one:
# after one step momentum and SGD agree, and the state carried between steps is what differs.
# Gradients from 2 down to 1e-4 (and 0): g^2 then spans the epsilons, so where an epsilon sits
# (inside or outside the square root) shows.
START = np.array([[0.3, -0.2, 0.05], [1e-3, -0.7, 0.4]], "float64")
GRADIENTS = (
    np.array([[0.5, -1e-3, 2.0], [-0.3, 1e-4, 0.0]], "float64"),
    np.array([[-0.25, -2e-3, 1.0], [0.6, 3e-4, 0.05]], "float64"),
)


def _sgd(w, grads, c):
    for g in grads:
        w = w - c["learning_rate"] * g
    return w


def _momentum(w, grads, c, nesterov=False):
    """Keras' form: v <- mu v - lr g; w <- w + v (nesterov: w <- w + mu v - lr g)."""
    mu, lr, v = c["momentum"], c["learning_rate"], np.zeros_like(w)
    for g in grads:
        v = mu * v - lr * g
        w = w + (mu * v - lr * g if nesterov else v)
    return w


def _adagrad(w, grads, c):
    accumulator = np.full_like(w, c["initial_accumulator_value"])
    for g in grads:
        accumulator = accumulator + g * g
        w = w - c["learning_rate"] * g / np.sqrt(accumulator + c["epsilon"])
    return w


def _adadelta(w, grads, c):
    rho, eps = c["rho"], c["epsilon"]
    mean_g2, mean_dx2 = np.zeros_like(w), np.zeros_like(w)
    for g in grads:
        mean_g2 = rho * mean_g2 + (1 - rho) * g * g
        dx = -np.sqrt(mean_dx2 + eps) / np.sqrt(mean_g2 + eps) * g
        mean_dx2 = rho * mean_dx2 + (1 - rho) * dx * dx
        w = w + c["learning_rate"] * dx
    return w


def _rmsprop(w, grads, c):
    assert (c.get("momentum", 0.0), c.get("centered", False)) == (0.0, False)  # plain RMSProp
    mean_g2 = np.zeros_like(w)
    for g in grads:
        mean_g2 = c["rho"] * mean_g2 + (1 - c["rho"]) * g * g
        w = w - c["learning_rate"] * g / np.sqrt(mean_g2 + c["epsilon"])
    return w


def _adam(w, grads, c):
    assert not c.get("amsgrad", False)
    b1, b2 = c["beta_1"], c["beta_2"]
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - c["learning_rate"] * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + c["epsilon"])
    return w


NUMPY_RULES = {
    "sgd": _sgd,
    "momentum": _momentum,
    "nesterov": lambda w, grads, c: _momentum(w, grads, c, nesterov=True),
    "adagrad": _adagrad,
    "adadelta": _adadelta,
    "rmsprop": _rmsprop,
    "adam": _adam,
}


@pytest.mark.parametrize("name", sorted(NUMPY_RULES))
def test_two_steps_follow_the_optimisers_update_rule(name):
    optimizer = get(name, learning_rate=0.01)
    variable = tf.Variable(START)
    for gradient in GRADIENTS:
        optimizer.apply_gradients([(tf.constant(gradient), variable)])
    expected = NUMPY_RULES[name](START, GRADIENTS, optimizer.get_config())
    # rtol 1e-5: Keras casts the betas through float32 (Adam's step is off by 7e-6 relative); an
    # epsilon in the wrong place, a lost state or a wrong hyperparameter is off by 1e-3 or more.
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-12)
    # Every entry with a gradient moved; by more than float32 rounding of an lr-sized step.
    assert np.all(np.abs(variable.numpy() - START)[GRADIENTS[1] != 0] > 1e-7)


def test_bop_two_steps_follow_its_rule_and_the_latent_adams():
    """Bop (Helwegen et al. 2019): m <- m + gamma (g - m); flip w where w m > threshold.
    With gamma 1e-4 and threshold 1e-8 a flip needs w g > 1e-4 in one step, or momentum."""
    model = tiny_binary_model()
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    signs = np.array([[1, -1, 1], [-1, 1, -1], [1, 1, -1], [-1, -1, 1]], "float32")
    kernel.assign(signs)
    g_kernel = (
        # row 0: flips at step 1 (w g = 0.5), then agrees with the new sign: stays flipped;
        # row 1: against the sign at step 1, with it at step 2: flips at step 2;
        # row 2: 5e-5 at step 1 (m w = 5e-9 < 1e-8), 8e-5 at step 2: m w = 1.3e-8, flips only
        #        because the momentum kept step 1's gradient; row 3: never passes the threshold.
        np.array([[0.5, -0.5, 0.5], [-0.5, 0.5, -0.5], [5e-5, 5e-5, -5e-5], [-2e-5, -2e-5, 2e-5]], "float32"),
        np.array([[0.5, -0.5, 0.5], [-0.9, 0.9, -0.9], [8e-5, 8e-5, -8e-5], [-5e-5, -5e-5, 5e-5]], "float32"),
    )
    g_bias = (np.array([1.0, -2.0, 0.5], "float32"), np.array([-0.5, -1.0, 1e-3], "float32"))
    opt = get("bop", learning_rate=0.01)
    bop, latent = opt.bop.get_config(), opt.default.get_config()
    for step in range(2):
        opt.apply_gradients([(tf.constant(g_kernel[step]), kernel), (tf.constant(g_bias[step]), bias)])

    w, m = signs.astype("float64"), np.zeros((4, 3))
    for g in g_kernel:
        m = m + bop["gamma"] * (g - m)
        w = np.where(w * m > bop["threshold"], -w, w)
    np.testing.assert_array_equal(_latent(kernel), w)
    np.testing.assert_array_equal(w, [[-1, 1, -1], [1, -1, 1], [-1, -1, 1], [-1, -1, 1]])
    np.testing.assert_allclose(bias.numpy(), _adam(np.zeros(3), g_bias, latent), rtol=1e-5)
    assert int(opt.iterations.numpy()) == 2


def test_unknown_name_is_one_line_listing_all_names():
    with pytest.raises(ValueError) as error:
        get("adamw")
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        "unknown optimiser 'adamw': expected one of "
        "adadelta, adagrad, adam, bop, momentum, nesterov, rmsprop, sgd"
    )


@pytest.mark.parametrize("name, hyperparameter", [("adam", "beta_3"), ("bop", "beta_1")])
def test_unknown_hyperparameter_is_one_line(name, hyperparameter):
    pattern = f"unknown hyperparameter.*{hyperparameter}.*'{name}'"
    with pytest.raises(ValueError, match=pattern) as error:
        get(name, **{hyperparameter: 0.5})
    assert "\n" not in str(error.value)


def test_study_defaults():
    adam = get("adam")
    assert (adam.beta_1, adam.beta_2) == (0.9, 0.999)
    assert isinstance(adam, tf.keras.optimizers.Adam)
    momentum, nesterov = get("momentum", 0.1), get("nesterov", 0.1)
    assert (momentum.momentum, momentum.nesterov) == (0.9, False)
    assert (nesterov.momentum, nesterov.nesterov) == (0.9, True)
    assert get("sgd").momentum == 0.0
    assert get("momentum", momentum=0.5).momentum == 0.5
    assert current_learning_rate(get("rmsprop", learning_rate=0.25)) == 0.25


# --------------------------------------------------------------------------- Bop


def test_bop_flips_binary_kernels_whose_momentum_passes_the_threshold():
    model = tiny_binary_model()
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    assert getattr(kernel, "precision", None) == 1
    signs = np.array([[1, -1, 1], [-1, 1, -1], [1, 1, -1], [-1, -1, 1]], "float32")
    kernel.assign(signs)
    # gamma = 1: the momentum is the gradient. Flip where w * m > threshold = 0.5.
    grad_kernel = np.array(
        [[0.9, -0.9, 0.3], [0.2, 0.7, -0.7], [-0.3, 0.6, 0.4], [0.0, -0.4, -1.0]], "float32"
    )
    grad_bias = np.array([1.0, -2.0, 0.5], "float32")
    opt = get("bop", learning_rate=0.01, threshold=0.5, gamma=1.0)
    opt.apply_gradients([(tf.constant(grad_kernel), kernel), (tf.constant(grad_bias), bias)])
    flip = signs * grad_kernel > 0.5
    np.testing.assert_array_equal(_latent(kernel), np.where(flip, -signs, signs))
    assert flip.sum() == 5 and (signs * grad_kernel > 0).sum() == 7  # 2 agree, below threshold
    # The bias goes to the latent Adam: first step = -lr * sign(g) (epsilon aside).
    np.testing.assert_allclose(bias.numpy(), -0.01 * np.sign(grad_bias), rtol=1e-5)


def test_bop_latent_optimiser_by_name_and_by_instance():
    opt = get("bop", learning_rate=0.5, latent_optimizer="sgd")
    assert isinstance(opt.default, tf.keras.optimizers.legacy.SGD)
    assert current_learning_rate(opt) == 0.5
    opt = get("bop", latent_optimizer="adam", latent_hyperparameters={"beta_2": 0.99})
    assert opt.default.get_config()["beta_2"] == pytest.approx(0.99)
    latent = tf.keras.optimizers.legacy.RMSprop(0.125)
    assert get("bop", latent_optimizer=latent).default is latent
    with pytest.raises(TypeError, match="legacy"):
        get("bop", latent_optimizer=tf.keras.optimizers.Adam())


def test_bop_reloaded_from_config_still_trains_and_counts_steps():
    model = tiny_binary_model()
    opt = get("bop", learning_rate=0.01)
    model.compile(optimizer=opt, loss="mse")
    x, y = tiny_data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert isinstance(opt, lq.optimizers.CaseOptimizer)
    assert int(opt.iterations.numpy()) == 2  # Larq's own CaseOptimizer says 0
    clone = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt))
    assert isinstance(clone, BopCaseOptimizer)
    assert clone.bop.get_config() == opt.bop.get_config()
    assert clone.default.get_config() == opt.default.get_config()
    before = [_latent(v).copy() for v in model.trainable_variables]
    model.compile(optimizer=clone, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # Larq's from_config keeps process-local variable ids: nothing would move.
    assert all(np.any(b != _latent(v)) for b, v in zip(before, model.trainable_variables))


def _latent(variable):
    return getattr(variable, "latent_variable", variable).numpy()


# --------------------------------------------------------------------------- schedules


def test_exponential_decay_per_epoch_matches_numpy():
    start, end, epochs, spe = 1e-3, 3e-6, 250, 7
    lr = ExponentialDecayPerEpoch(start, end, epochs, spe)
    for epoch in (0, 1, 2, 124, epochs - 1, epochs, epochs + 50):
        expected = start * (end / start) ** (min(epoch, epochs - 1) / (epochs - 1))
        values = [float(lr(epoch * spe + i)) for i in (0, 3, spe - 1)]
        np.testing.assert_allclose(values, expected, rtol=1e-6)
        assert values[0] == values[1] == values[2]  # constant within the epoch
    np.testing.assert_allclose(float(lr(0)), start, rtol=1e-7)
    np.testing.assert_allclose(float(lr((epochs - 1) * spe)), end, rtol=1e-6)
    # The legacy optimisers call the schedule with a float step.
    np.testing.assert_allclose(float(lr(tf.constant(2.0 * spe))), float(lr(2 * spe)), rtol=0)


def test_piecewise_constant_per_epoch_is_exact():
    lr = PiecewiseConstantPerEpoch([2, 5], [0.1, 0.01, 0.001], steps_per_epoch=10)
    steps = [0, 19, 20, 49, 50, 10_000]
    np.testing.assert_array_equal(
        [float(lr(s)) for s in steps], np.float32([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    )
    with pytest.raises(ValueError, match="3 entries"):
        PiecewiseConstantPerEpoch([2, 5], [0.1, 0.01], steps_per_epoch=10)


def make_schedule(kind):
    if kind == "exponential":
        return ExponentialDecayPerEpoch(1e-2, 1e-4, epochs=3, steps_per_epoch=2)
    return PiecewiseConstantPerEpoch([1], [1e-2, 1e-3], steps_per_epoch=2)


@pytest.mark.parametrize("kind", ["float", "exponential", "piecewise"])
@pytest.mark.parametrize("legacy", [False, True])
def test_scale_learning_rate_halves(kind, legacy):
    learning_rate = 1e-2 if kind == "float" else make_schedule(kind)
    opt = (tf.keras.optimizers.legacy.Adam if legacy else tf.keras.optimizers.Adam)(learning_rate)
    before = current_learning_rate(opt)
    assert before == pytest.approx(1e-2, rel=1e-6)
    assert scale_learning_rate(opt, 0.5) == pytest.approx(before / 2, rel=1e-6)
    assert current_learning_rate(opt) == pytest.approx(before / 2, rel=1e-6)


def test_helpers_look_through_wrappers():
    wrapped = LayerwiseLrScaling(get("adam", learning_rate=make_schedule("exponential")))
    bop = get("bop", learning_rate=make_schedule("piecewise"))
    for opt in (wrapped, bop):
        assert current_learning_rate(opt) == pytest.approx(1e-2, rel=1e-6)
        assert scale_learning_rate(opt, 0.5) == pytest.approx(5e-3, rel=1e-6)


def test_scale_learning_rate_refuses_a_foreign_schedule():
    schedule = tf.keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5)
    with pytest.raises(TypeError, match="cannot scale a ExponentialDecay") as error:
        scale_learning_rate(tf.keras.optimizers.Adam(schedule), 0.5)
    assert "\n" not in str(error.value)


def test_scaled_schedule_round_trips_through_a_checkpoint(tmp_path):
    opt = get("adam", learning_rate=make_schedule("exponential"))
    scale_learning_rate(opt, 0.25)
    path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    saved = dict(tf.train.list_variables(path))
    assert "optimizer/_learning_rate/scale/.ATTRIBUTES/VARIABLE_VALUE" in saved
    restored = get("adam", learning_rate=make_schedule("exponential"))
    tf.train.Checkpoint(optimizer=restored).restore(path).assert_existing_objects_matched()
    assert float(restored._learning_rate.scale.numpy()) == 0.25
    assert current_learning_rate(restored) == pytest.approx(2.5e-3, rel=1e-6)


def test_bop_latent_schedule_is_checkpointed(tmp_path):
    opt = get("bop", learning_rate=make_schedule("piecewise"))
    scale_learning_rate(opt, 0.5)
    path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    restored = get("bop", learning_rate=make_schedule("piecewise"))
    tf.train.Checkpoint(optimizer=restored).restore(path)
    assert current_learning_rate(restored) == pytest.approx(5e-3, rel=1e-6)


@pytest.mark.parametrize("kind", ["exponential", "piecewise"])
def test_schedule_config_round_trip(kind):
    schedule = make_schedule(kind)
    schedule.scale.assign(0.5)
    serialised = tf.keras.optimizers.schedules.serialize(schedule)
    clone = tf.keras.optimizers.schedules.deserialize(serialised)
    assert type(clone) is type(schedule)
    assert clone.get_config() == schedule.get_config()
    for step in range(8):
        assert float(clone(step)) == float(schedule(step))


# --------------------------------------------------------------------------- layer-wise LR


def one_step(optimizer, initial, gradient, constraint=None):
    variable = tf.Variable(initial, constraint=constraint)
    optimizer.apply_gradients([(tf.constant(gradient), variable)])
    return variable.numpy()


INITIAL = np.array([[0.3, -0.2, 0.05], [1e-3, -0.7, 0.4]], "float64")
GRADIENT = np.array([[0.5, -1e-3, 2.0], [-0.3, 0.01, 0.0]], "float64")


@pytest.mark.parametrize("m", [0.5, 3.0, 17.0])
def test_update_mode_is_m_times_the_adam_step(m):
    reference = one_step(tf.keras.optimizers.Adam(1e-2), INITIAL, GRADIENT)
    wrapped = LayerwiseLrScaling(tf.keras.optimizers.Adam(1e-2), multipliers={".*": m})
    scaled = one_step(wrapped, INITIAL, GRADIENT)
    np.testing.assert_allclose(scaled - INITIAL, m * (reference - INITIAL), rtol=1e-6, atol=0)
    assert np.abs(reference - INITIAL).max() > 9e-3  # a real Adam step


def test_gradient_mode_is_m_times_sgd_and_nearly_nothing_under_adam():
    m = 4.0
    sgd_reference = one_step(tf.keras.optimizers.SGD(0.1), INITIAL, GRADIENT)
    sgd_scaled = one_step(
        LayerwiseLrScaling(tf.keras.optimizers.SGD(0.1), {"Variable": m}, mode="gradient"),
        INITIAL,
        GRADIENT,
    )
    np.testing.assert_allclose(sgd_scaled - INITIAL, m * (sgd_reference - INITIAL), rtol=1e-6)
    adam_reference = one_step(tf.keras.optimizers.Adam(1e-2, epsilon=1e-12), INITIAL, GRADIENT)
    adam_scaled = one_step(
        LayerwiseLrScaling(tf.keras.optimizers.Adam(1e-2, epsilon=1e-12), {"": m}, mode="gradient"),
        INITIAL,
        GRADIENT,
    )
    np.testing.assert_allclose(adam_scaled, adam_reference, rtol=1e-6)


def test_update_mode_clips_once_after_scaling():
    # SGD lr 1 and gradient -0.2: the raw step is +0.2. BinaryConnect: clip(w + m * step).
    clip = lq.constraints.WeightClip(1.0)
    opt = LayerwiseLrScaling(tf.keras.optimizers.SGD(1.0), multipliers={"": 0.5})
    variable = tf.Variable([0.95, 0.5, -0.99], constraint=clip)
    opt.apply_gradients([(tf.constant([-0.2, -0.2, 3.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [1.0, 0.6, -1.0], rtol=1e-6)
    assert variable.constraint is clip  # put back after the step


def test_default_multipliers_are_one_over_glorot_limit():
    model = tf.keras.Sequential([tf.keras.layers.Dense(5, input_shape=(7,))])
    opt = LayerwiseLrScaling(tf.keras.optimizers.Adam())
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    assert opt.multiplier(kernel) == pytest.approx(1 / np.sqrt(1.5 / (7 + 5)), rel=1e-12)
    assert opt.multiplier(kernel) == 1 / glorot_limit((7, 5))
    assert opt.multiplier(bias) == 1.0
    conv = tf.Variable(tf.zeros((3, 3, 4, 8)))
    assert opt.multiplier(conv) == pytest.approx(1 / np.sqrt(1.5 / (9 * 4 + 9 * 8)), rel=1e-12)


def test_invalid_mode_is_one_line():
    with pytest.raises(ValueError, match="mode must be one of 'gradient', 'update', got 'weights'"):
        LayerwiseLrScaling(tf.keras.optimizers.Adam(), mode="weights")


def test_update_mode_inside_fit_scales_kernel_not_bias_and_does_not_retrace():
    x, y = tiny_data(n=8)
    steps, tracings = {}, {}
    for wrapped in (False, True):
        model = tiny_binary_model(seed=1)
        before = [_latent(v).copy() for v in model.trainable_variables]
        adam = tf.keras.optimizers.Adam(ExponentialDecayPerEpoch(1e-2, 1e-3, 4, 1))
        model.compile(optimizer=LayerwiseLrScaling(adam) if wrapped else adam, loss="mse")
        halve = tf.keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: scale_learning_rate(model.optimizer, 0.5)
        )
        model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[halve])
        assert int(model.optimizer.iterations.numpy()) == 4
        tracings[wrapped] = model.train_function.experimental_get_tracing_count()
        steps[wrapped] = [_latent(v) - b for v, b in zip(model.trainable_variables, before)]
    # Keras traces twice (the first trace creates the optimiser's variables), never per step.
    assert tracings[True] == tracings[False] == 2
    m = 1 / glorot_limit((4, 3))
    # Four Adam steps: each is scaled by m, so the sum is too.
    np.testing.assert_allclose(steps[True][0], m * steps[False][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(steps[True][1], steps[False][1], rtol=1e-5, atol=1e-7)


def test_layerwise_config_round_trip_and_checkpoint(tmp_path):
    opt = LayerwiseLrScaling(
        get("adam", learning_rate=make_schedule("exponential")),
        multipliers={"kernel": 3.0},
        mode="gradient",
    )
    config = tf.keras.optimizers.serialize(opt)
    clone = tf.keras.optimizers.deserialize(config)
    assert isinstance(clone, LayerwiseLrScaling)
    assert (clone.mode, clone.get_config()["multipliers"]) == ("gradient", {"kernel": 3.0})
    assert isinstance(clone.inner_optimizer, tf.keras.optimizers.Adam)
    assert isinstance(clone.inner_optimizer._learning_rate, ExponentialDecayPerEpoch)
    assert clone.get_config() == opt.get_config()

    variable = tf.Variable([1.0, 2.0])
    opt.apply_gradients([(tf.constant([0.1, 0.1]), variable)])
    path = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    clone.build([variable])
    tf.train.Checkpoint(optimizer=clone).restore(path)
    assert int(clone.iterations.numpy()) == 1
    assert len(clone.variables) == len(opt.variables) == 3  # iterations, m, v
    for restored, saved in zip(clone.variables, opt.variables):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())


def test_layerwise_state_survives_a_keras_model_file(tmp_path):
    model = tiny_binary_model()
    schedule = ExponentialDecayPerEpoch(1e-2, 1e-3, 3, 2)
    model.compile(optimizer=LayerwiseLrScaling(get("adam", learning_rate=schedule)), loss="mse")
    x, y = tiny_data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    scale_learning_rate(model.optimizer, 0.5)
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.optimizer, LayerwiseLrScaling)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    assert current_learning_rate(loaded.optimizer) == current_learning_rate(model.optimizer)
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables) == 5
    for restored, saved in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())


def test_callable_multipliers_serialise_as_exact_names_after_a_step():
    opt = LayerwiseLrScaling(tf.keras.optimizers.SGD(0.1), multipliers=lambda v: 2.0)
    with pytest.raises(ValueError, match="after its first step"):
        opt.get_config()
    variable = tf.Variable([1.0], name="w")
    opt.apply_gradients([(tf.constant([1.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [0.8], rtol=1e-6)
    assert opt.get_config()["multipliers"] == {"^w:0$": 2.0}


@pytest.mark.parametrize("name,hyperparameters,message", [
    ("adam", {"beta_2": "fast"}, "hyperparameter beta_2 of optimiser 'adam' must be a finite number (default 0.999), got 'fast'"),
    ("adam", {"amsgrad": 1}, "hyperparameter amsgrad of optimiser 'adam' must be true or false (default False), got 1"),
    ("momentum", {"momentum": float("nan")}, "hyperparameter momentum of optimiser 'momentum' must be a finite number (default 0.9), got nan"),
    ("bop", {"threshold": "small"}, "hyperparameter threshold of optimiser 'bop' must be a finite number (default 1e-08), got 'small'"),
])
def test_wrongly_typed_hyperparameters_fail_at_get_in_one_line(name, hyperparameters, message):
    with pytest.raises(ValueError) as error:
        get(name, **hyperparameters)
    assert str(error.value) == message


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_exponential_decay_reaches_end_in_the_last_epoch_for_short_runs(epochs):
    """start in the first epoch, end in the last (1 epoch: start throughout), per-epoch steps in between."""
    from bnn_keras.optimizers import ExponentialDecayPerEpoch

    schedule = ExponentialDecayPerEpoch(1e-2, 1e-4, epochs=epochs, steps_per_epoch=3)
    expected = [1e-2] if epochs == 1 else list(np.geomspace(1e-2, 1e-4, epochs))
    got = [float(schedule(epoch * 3 + 1)) for epoch in range(epochs)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # float32 learning rates


@pytest.mark.parametrize("boundaries", [[2, 2], [3, 2, 5], [-1, 2]])
def test_piecewise_boundaries_must_strictly_increase_from_zero(boundaries):
    from bnn_keras.optimizers import PiecewiseConstantPerEpoch

    with pytest.raises(ValueError, match=r"boundaries_epochs must be increasing and >= 0"):
        PiecewiseConstantPerEpoch(boundaries, [1.0] * (len(boundaries) + 1), steps_per_epoch=3)


@pytest.mark.parametrize("mode", ["gradient", "update"])
@pytest.mark.parametrize("m", [2.0, 3.0])
def test_layerwise_takes_a_zip_and_none_gradients_as_keras_optimisers_do(mode, m):
    """Keras code passes `zip(grads, vars)` (an iterator) and None for unused variables."""
    used, unused = tf.Variable([1.0, 2.0], name="used"), tf.Variable([5.0], name="unused")
    opt = LayerwiseLrScaling(tf.keras.optimizers.SGD(0.1), multipliers={"": m}, mode=mode)
    opt.apply_gradients(zip([tf.constant([1.0, -1.0]), None], [used, unused]))
    np.testing.assert_allclose(used.numpy(), [1.0 - 0.1 * m, 2.0 + 0.1 * m], rtol=1e-6)  # 0.1 x m x gradient
    assert unused.numpy().tolist() == [5.0]


def test_layerwise_scales_sparse_gradients_of_gathered_rows():
    table = tf.Variable(np.ones((4, 2), np.float32), name="embedding")
    opt = LayerwiseLrScaling(tf.keras.optimizers.SGD(0.5), multipliers={"embedding": 4.0}, mode="gradient")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, [1, 3]))
    gradient = tape.gradient(loss, table)
    assert isinstance(gradient, tf.IndexedSlices)
    opt.apply_gradients([(gradient, table)])
    np.testing.assert_allclose(table.numpy(), [[1, 1], [-1, -1], [1, 1], [-1, -1]], rtol=1e-6)  # 1 - 0.5 x 4 x 1


def test_layerwise_set_weights_sets_the_inner_optimiser_state():
    variable = tf.Variable([1.0, 2.0])
    trained = LayerwiseLrScaling(tf.keras.optimizers.Adam(1e-2))
    trained.apply_gradients([(tf.constant([0.3, -0.2]), variable)])
    fresh = LayerwiseLrScaling(tf.keras.optimizers.Adam(1e-2))
    fresh.build([variable])
    fresh.set_weights([v.numpy() for v in trained.variables])
    assert len(fresh.variables) == 3  # iterations, m, v
    for a, b in zip(fresh.variables, trained.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh.iterations.numpy()) == 1


def test_a_callables_numpy_multiplier_serialises_as_a_plain_number():
    import json

    opt = LayerwiseLrScaling(tf.keras.optimizers.SGD(0.1), multipliers=lambda v: np.float32(2.0))
    variable = tf.Variable([1.0], name="w")
    opt.apply_gradients([(tf.constant([1.0]), variable)])
    config = opt.get_config()
    assert config["multipliers"] == {"^w:0$": 2.0} and type(config["multipliers"]["^w:0$"]) is float
    json.dumps(config["multipliers"])


@pytest.mark.parametrize("kwargs, names", [({"clipnorm": 1.0}, "clipnorm"), ({"weight_decay": 0.1, "clipvalue": 2.0}, "weight_decay, clipvalue")])
def test_layerwise_scaling_sends_gradient_options_to_the_inner_optimiser(kwargs, names):
    with pytest.raises(ValueError, match=f"^set {names} on the inner optimiser, not on LayerwiseLrScaling$"):
        LayerwiseLrScaling(tf.keras.optimizers.SGD(0.1), **kwargs)

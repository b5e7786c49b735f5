r"""The dead zone of the clipped straight-through estimator, measured during training.

The clipped STE passes a gradient only where its input lies inside the clip value c:
$\partial q/\partial x = \partial C/\partial q \cdot 1_{|x| \leq c}$. Outside, a latent
weight or a pre-activation gets no gradient at all: it sits in the dead zone. Per binary
layer (a Larq layer with a `kernel_quantizer`; its latent kernel is
``getattr(kernel, "latent_variable", kernel)``) this module measures:

- ``saturated``: the share of latent weights with $|w| = c$, held at the clip value by
  weight clipping (still inside the STE's window, but every update that pushes them
  outwards is clipped away);
- ``beyond``: the share of latent weights with $|w| > c$, where the clipped STE passes no
  gradient (only possible without weight clipping, e.g. in the vanilla phase);
- ``inputs_beyond``: the share of the layer's input pre-activations with $|x| > c$, the
  tensor fed into its `input_quantizer` on one sampled batch, computed in inference mode
  (BN with its moving statistics); absent for a layer without an input quantiser;
- ``flipped``: the share of binary weights whose sign (Larq's: 0 is +1) changed since
  the signs given as `previous_signs`; absent for a layer without previous signs.

"$|w| = c$" is up to a tolerance of $10^{-7} c$ (``np.isclose(|w|, c, rtol=0,
atol=1e-7 * c)``): weight clipping writes float32(c) exactly, which differs from the
Python float c by up to 6e-8 relative (0.1, say); the tolerance admits float32(c) and at
most its immediate float32 neighbours. "$> c$" means beyond that tolerance, for weights
and inputs alike.

c is each quantiser's own ``clip_value`` (the kernel quantiser's for weights, the input
quantiser's for inputs): `SwitchableSteSign`, `ClippedSteSign`, Larq's ``"ste_sign"``.
A quantiser without one (`VanillaSteSign`: None) is measured against c = 1.0; an
explicit `clip_value` overrides both. The clip value is what counts even while a
`SwitchableSteSign` is in its vanilla phase: the shares then say how much would be dead
once clipping turns on.

```python
shares, signs = dead_zone_shares(model, x_batch), kernel_signs(model)
# ... train ...
shares = dead_zone_shares(model, x_batch, previous_signs=signs)
shares["dense_1"]       # {"saturated": 0.02, "beyond": 0.0, "inputs_beyond": 0.31, "flipped": 0.004, ...}
dead_zone_columns(shares)  # {"dead_zone_saturated": ..., "dead_zone_flipped": ..., ...}

model.fit(x, y, epochs=10, callbacks=[DeadZoneMonitor(x[:100]), HistoryRows(rows)])
```
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "COLUMNS",
    "DeadZoneMonitor",
    "DeadZoneProbe",
    "METRICS",
    "binary_layers",
    "dead_zone_columns",
    "dead_zone_shares",
    "kernel_signs",
]

METRICS: tuple[str, ...] = ("saturated", "beyond", "inputs_beyond", "flipped")
"""The per-layer shares `dead_zone_shares` measures (a layer has a subset: see the module docstring)."""

COLUMNS: dict[str, str] = {f"dead_zone_{metric}": metric for metric in METRICS}
"""Epoch-log column -> the per-layer share it aggregates (`dead_zone_columns`)."""

_COUNTS = {"saturated": "weights", "beyond": "weights", "flipped": "weights", "inputs_beyond": "inputs"}
_TOLERANCE = 1e-7  # relative to c: see the module docstring
_FALLBACK_CLIP = 1.0
_CHUNK = 1 << 19  # elements per pass: each chunk's |w| is counted while in cache (2x faster than whole arrays)


def binary_layers(model: tf.keras.Model) -> dict[str, tf.keras.layers.Layer]:
    """Every layer of `model` (nested ones too) with a kernel quantiser and a kernel, by name."""
    found: dict[str, tf.keras.layers.Layer] = {}
    for layer in [model, *model.submodules]:
        if getattr(layer, "kernel_quantizer", None) is not None and getattr(layer, "kernel", None) is not None:
            found.setdefault(layer.name, layer)
    return found


def _latent(layer: tf.keras.layers.Layer) -> np.ndarray:
    return getattr(layer.kernel, "latent_variable", layer.kernel).numpy()


def kernel_signs(model: tf.keras.Model) -> dict[str, np.ndarray]:
    """Each binary layer's weight signs as booleans, True where +1 (Larq's sign: 0 is +1)."""
    return {name: _latent(layer) >= 0 for name, layer in binary_layers(model).items()}


def _check_clip_value(clip_value: float | None) -> float | None:
    if clip_value is None:
        return None
    if isinstance(clip_value, bool) or not isinstance(clip_value, numbers.Real) or not 0 < clip_value < np.inf:
        raise ValueError(f"clip_value must be a positive finite number or None, got {clip_value!r}")
    return float(clip_value)


def _clip(quantizer: Any, override: float | None) -> float:
    """c for `quantizer`: the override, else its ``clip_value``, else 1.0."""
    if override is not None:
        return override
    value = getattr(quantizer, "clip_value", None)
    return _FALLBACK_CLIP if value is None else float(value)


def _float32_bounds(c: float) -> tuple[np.float32, np.float32]:
    """The float32 range [low, high] of |w| within 1e-7 c of c, rounded inwards."""
    low_exact, high_exact = c - _TOLERANCE * c, c + _TOLERANCE * c
    low, high = np.float32(low_exact), np.float32(high_exact)
    if float(low) < low_exact:
        low = np.nextafter(low, np.float32(np.inf))
    if float(high) > high_exact:
        high = np.nextafter(high, np.float32(-np.inf))
    return low, high


def _counts(values: np.ndarray, c: float, previous: np.ndarray | None = None) -> tuple[int, int, np.ndarray, int]:
    """(|v| > c, |v| = c, the signs v >= 0, signs changed from `previous`) of `values`, up to the tolerance."""
    low, high = _float32_bounds(c)
    flat = values.reshape(-1)
    signs = np.empty(flat.shape, bool)
    before = None if previous is None else np.asarray(previous).reshape(-1)
    beyond = at_least = flipped = 0
    for start in range(0, flat.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        size = np.abs(flat[part])
        beyond += np.count_nonzero(size > high)
        at_least += np.count_nonzero(size >= low)
        np.greater_equal(flat[part], 0, out=signs[part])
        if before is not None:
            flipped += np.count_nonzero(signs[part] != before[part])
    return int(beyond), int(at_least - beyond), signs.reshape(values.shape), int(flipped)


class DeadZoneProbe:
    """One traced call that reads a model's binary kernels and its input quantisers' inputs.

    Built once per model: the sub-model ``tf.keras.Model(model.inputs, [layer.input,
    ...])`` of the input-quantised binary layers, run in inference mode, and the latent
    kernels of all binary layers, in one `tf.function` (compiled with XLA when the model
    was compiled with ``jit_compile=True``). Calling it with a batch returns NumPy arrays
    ``(kernels, inputs)``, each by layer name. The inputs need the model's symbolic inputs
    (a functional or Sequential model): a subclassed model has none, and is refused with
    ValueError if it has a layer with an input quantiser (without one, its kernels are
    read all the same).

    ```python
    probe = DeadZoneProbe(model)
    kernels, inputs = probe(x_batch)
    inputs["dense_2"]  # what dense_2's input quantiser binarised
    ```
    """

    def __init__(self, model: tf.keras.Model):
        self.layers = binary_layers(model)
        self.input_layers = [name for name, layer in self.layers.items()
                             if getattr(layer, "input_quantizer", None) is not None]
        kernels = [getattr(layer.kernel, "latent_variable", layer.kernel) for layer in self.layers.values()]
        probe = self._sub_model(model) if self.input_layers else None

        def read(x: Any) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
            outputs = [] if probe is None else probe(x, training=False)
            return [tf.identity(k) for k in kernels], outputs if isinstance(outputs, list) else [outputs]

        self._read = tf.function(read, jit_compile=bool(getattr(model, "jit_compile", False)))

    def _sub_model(self, model: tf.keras.Model) -> tf.keras.Model:
        if not getattr(model, "inputs", None):
            raise ValueError(
                f"dead-zone inputs need a functional or Sequential model with symbolic inputs; "
                f"model {model.name!r} has none (subclassed?) but input-quantised layers {self.input_layers}"
            )
        try:
            tensors = [self.layers[name].input for name in self.input_layers]
            for name, tensor in zip(self.input_layers, tensors):
                # A nested model's own Input is no tensor of this graph, and Keras only notices when called.
                if _is_input_of_another_graph(tensor, model.inputs):
                    raise ValueError(f"layer {name!r} reads the input of a nested model, not a tensor computed from these")
            return tf.keras.Model(model.inputs, tensors)
        except (AttributeError, ValueError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"cannot read the inputs of layers {self.input_layers} from model "
                             f"{model.name!r}'s inputs (a shared or nested layer?): {first}") from None

    def __call__(self, x: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if not self.layers:
            return {}, {}
        kernels, inputs = self._read(x if self.input_layers else None)
        return ({name: np.asarray(k) for name, k in zip(self.layers, kernels)},
                {name: np.asarray(v) for name, v in zip(self.input_layers, inputs)})




def _is_input_of_another_graph(tensor: Any, inputs: Sequence[Any]) -> bool:
    layer = getattr(tensor, "_keras_history", (None,))[0]
    return isinstance(layer, tf.keras.layers.InputLayer) and not any(tensor is i for i in inputs)


def _measure(
    probe: DeadZoneProbe,
    x: Any,
    previous_signs: Mapping[str, np.ndarray] | None,
    clip_value: float | None,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """`dead_zone_shares` by one call of `probe`, and the signs it read (for the next call)."""
    kernels, inputs = probe(x)
    shares: dict[str, dict[str, float]] = {}
    signs: dict[str, np.ndarray] = {}
    for name, kernel in kernels.items():
        layer = probe.layers[name]
        before = (previous_signs or {}).get(name)
        if before is not None and np.shape(before) != kernel.shape:
            raise ValueError(
                f"previous_signs[{name!r}] has shape {np.shape(before)}, the layer's kernel {kernel.shape}"
            )
        beyond, at, signs[name], flipped = _counts(kernel, _clip(layer.kernel_quantizer, clip_value), before)
        row = {"saturated": at / kernel.size, "beyond": beyond / kernel.size, "weights": float(kernel.size)}
        if name in inputs:
            values = inputs[name].astype(np.float32, copy=False)
            outside = _counts(values, _clip(layer.input_quantizer, clip_value))[0]
            row.update(inputs_beyond=outside / values.size, inputs=float(values.size))
        if before is not None:
            row["flipped"] = flipped / kernel.size
        shares[name] = row
    return shares, signs


def dead_zone_shares(
    model: tf.keras.Model,
    x: Any,
    previous_signs: Mapping[str, np.ndarray] | None = None,
    clip_value: float | None = None,
    probe: DeadZoneProbe | None = None,
) -> dict[str, dict[str, float]]:
    """Each binary layer's dead-zone shares (module docstring), with the element counts.

    Returns ``{layer: {"saturated", "beyond", "weights"[, "inputs_beyond", "inputs"][,
    "flipped"]}}``: shares in [0, 1]; ``weights`` is the kernel's size and ``inputs`` the
    number of input elements on `x` (the weights `dead_zone_columns` averages with).
    `x` is a batch of model inputs (used only where a layer has an input quantiser);
    `previous_signs` as `kernel_signs` returns them; `clip_value` overrides every
    quantiser's c; `probe` reuses a `DeadZoneProbe(model)` across calls (built here
    otherwise: it traces). A model without binary layers gives ``{}``.

    ```python
    dead_zone_shares(model, x[:100])["dense_out"]["beyond"]  # e.g. 0.125: 2 of 16 weights
    ```
    """
    clip_value = _check_clip_value(clip_value)
    return _measure(probe or DeadZoneProbe(model), x, previous_signs, clip_value)[0]


def dead_zone_columns(shares: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    r"""The epoch-log columns: each share over all binary layers, weighted by element counts.

    - ``dead_zone_saturated``: of all latent binary weights, the share with |w| = c;
    - ``dead_zone_beyond``: of all latent binary weights, the share with |w| > c;
    - ``dead_zone_inputs_beyond``: of all inputs of input quantisers on the sampled
      batch, the share with |x| > c;
    - ``dead_zone_flipped``: of all binary weights, the share whose sign changed since
      the previous signs.

    That is $\sum_l s_l n_l / \sum_l n_l$ over the layers l that have share $s_l$, with
    $n_l$ its weights (inputs for ``inputs_beyond``). A column no layer has is left out.

    ```python
    dead_zone_columns({"a": {"beyond": 0.5, "weights": 8.0}, "b": {"beyond": 0.0, "weights": 24.0}})
    # {"dead_zone_beyond": 0.125}
    ```
    """
    columns: dict[str, float] = {}
    for column, metric in COLUMNS.items():
        counted = [(row[metric], row[_COUNTS[metric]]) for row in shares.values() if metric in row]
        if counted:
            columns[column] = float(sum(s * n for s, n in counted) / sum(n for _, n in counted))
    return columns


def _as_batch(sample: Any) -> Any:
    """`sample` as tensors, or a one-line ValueError."""
    try:
        batch = tf.nest.map_structure(tf.convert_to_tensor, sample)
    except (TypeError, ValueError):
        raise ValueError(
            f"sample must be a batch of model inputs (a NumPy array or tensor), got {type(sample).__name__}"
        ) from None
    for tensor in tf.nest.flatten(batch):
        if tensor.shape.rank == 0 or tensor.shape[0] == 0:
            raise ValueError(f"sample must hold at least one example, got shape {tuple(tensor.shape)}")
    return batch


@tf.keras.utils.register_keras_serializable(package="bnn_keras")
class DeadZoneMonitor(tf.keras.callbacks.Callback):
    """Log the clipped STE's dead zone at the end of each epoch (`dead_zone_shares` on `sample`).

    Adds to the epoch logs the floats of `dead_zone_columns` (``dead_zone_saturated``,
    ``dead_zone_beyond``, ``dead_zone_inputs_beyond`` where a layer has an input
    quantiser, ``dead_zone_flipped``), and appends the per-layer shares ``{layer: {metric:
    share}}`` (no counts) to `per_layer`, one dict per epoch: not to the logs, whose every
    value Keras' progress bar averages as a number. The signs are taken when each epoch
    begins, so each epoch's ``flipped`` is the share of sign changes during it, epoch 0's
    included, and a run resumed by `BackupAndRestore` measures what an uninterrupted one would. A model without binary layers (a float twin)
    gets no columns.

    Put it before `HistoryRows` (which keeps every scalar of the logs, so the columns
    reach history.csv) and a ``TensorBoardLog(..., dead_zone=monitor)``, which writes its
    latest `per_layer` as ``dead_zone/<metric>/<layer>``. Per epoch it costs one traced call (`DeadZoneProbe`: the kernels and
    one forward pass of `sample`; keep it small, 100 examples) and a few NumPy passes over
    the kernels: 0.5-2% of an epoch of the study's MLPs on the embedded data set
    (``python benchmarks/fit_speed.py --dead-zone-only``).

    ```python
    model.fit(x, y, epochs=10, callbacks=[DeadZoneMonitor(x[:100]), HistoryRows(rows)])
    rows[-1]["dead_zone_beyond"], monitor.per_layer[-1]["dense_1"]["saturated"]
    ```

    `sample` is data, not configuration: `get_config` leaves it out, as
    `BestValidation` leaves out its test data; rebuild with ``DeadZoneMonitor(sample, **config)``.
    """

    def __init__(self, sample: Any, clip_value: float | None = None):
        super().__init__()
        self.clip_value = _check_clip_value(clip_value)
        self.sample = _as_batch(sample)
        self._signs: dict[str, np.ndarray] = {}
        self._probe: DeadZoneProbe | None = None
        self.per_layer: list[dict[str, dict[str, float]]] = []  # one {layer: {metric: share}} per measured epoch

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._probe = DeadZoneProbe(self.model)  # refuses a model it cannot read inputs from, before any epoch

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # At each epoch's begin, not the training's: `BackupAndRestore` restores a resumed run's
        # weights in its own on_train_begin, which may come after this one.
        self._signs = kernel_signs(self.model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._probe is None:  # called outside fit
            self.on_train_begin()
        if not self._probe.layers:
            return
        if not self._signs:  # outside fit: signs taken on first use
            self._signs = kernel_signs(self.model)
        shares, self._signs = _measure(self._probe, self.sample, self._signs, self.clip_value)
        if logs is not None:
            logs.update(dead_zone_columns(shares))
        self.per_layer.append({name: {m: row[m] for m in METRICS if m in row} for name, row in shares.items()})

    def get_config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

"""bnn_keras: the ICLR 2019 binary-network optimisation study's rules as Keras/Larq pieces.

Add a quantiser, a constraint and a callback to an ordinary `model.fit`:

```python
import bnn_keras as bk
import larq as lq
import tensorflow as tf

layer = lq.layers.QuantDense(
    64,
    input_quantizer="switchable_ste_sign",
    kernel_quantizer="switchable_ste_sign",
    kernel_constraint=bk.constraints.SwitchableWeightClip(),
)
# ... model.fit(..., callbacks=[bk.callbacks.ClippingSchedule(switch_epoch=50)])
```
"""

from bnn_keras import _keras_setup

_keras_setup.ensure_legacy_keras()
with _keras_setup.quiet_interrupt():  # the command's Ctrl-C while importing: one line, exit 130
    # The command line keeps TensorFlow's start-up notices off the terminal (`bnn_keras.cli`).
    TENSORFLOW_LOG = _keras_setup.import_tensorflow(quiet=_keras_setup.started_as_command())

    from bnn_keras import constraints, quantizers  # noqa: E402
    from bnn_keras._switch import Switchable, find_switchables, set_clipping  # noqa: E402

__version__ = "0.1.0"

# Heavier modules (tfds, LCE, matplotlib) load on first use: `bnn_keras.data.load(...)`.
_LAZY_SUBMODULES = ("callbacks", "data", "export", "models", "optimizers", "plots", "study", "switchable", "training")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"bnn_keras.{name}")
    if name == "make_switchable":  # a user's own Larq model, made switchable (`bnn_keras.switchable`)
        from bnn_keras.switchable import make_switchable

        return make_switchable
    raise AttributeError(f"module 'bnn_keras' has no attribute {name!r}")


__all__ = [
    "Switchable",
    "constraints",
    "find_switchables",
    "make_switchable",
    "quantizers",
    "set_clipping",
]

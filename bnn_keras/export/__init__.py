r"""Export a Keras/Larq model to a TFLite or Larq Compute Engine (LCE) flatbuffer.

`convert` turns a model (object or saved ``.keras`` / ``.h5`` / SavedModel path) into
flatbuffer bytes, checks them against Keras in the matching interpreter, and describes
the result layer by layer; `export` does the same and writes the file atomically,
with its report beside it as ``FILE.report.json``.

- ``target="lce"``: `larq_compute_engine.convert_keras_model`. Every binary
  `QuantDense` (input *and* kernel binarised) is first rewritten as the equivalent 1x1
  binary `QuantConv2D` on a (1, 1, C) tensor, same weights: LCE lowers binary
  convolutions to ``LceBconv2d`` (1 bit per weight) but keeps binary dense layers as
  float ``FULLY_CONNECTED`` (32 bits per weight). With ±1 inputs and weights every
  partial sum is an exact integer, so the rewrite changes no output bit.
- ``target="tflite"``: stock `tf.lite.TFLiteConverter`; binary layers stay float.

```python
from bnn_keras import export, models
model = models.mlp((28, 28, 1), 10, variant="binarynet")
result = export.export(model, "mlp.tflite", target="lce", verify_inputs="embedded")
print(result.report.table())        # per layer: TFLite ops, bytes, why float
```

The command line (``bnn-keras export MODEL --target lce --out FILE``, or
``python -m bnn_keras.export``) calls `add_export_arguments` and `run_export`.

One job per module, data flowing down: `loading` (read the model), `rewrite` (binary
layers, dense -> 1x1 conv), `pitfalls` (LCE 0.16: zero padding on small maps, kernels over
the folding limit), `flatbuffer` (parse and run a flatbuffer), `report` (the
report's data and table), `attribution` (ops and bytes -> Keras layers), `verify` (the
check against Keras), `localise` (where a file departs from Keras), `conversion` (`convert`, `save`, `export`), `cli` (the command),
`batch_norm` (statistics for checking untrained models).
"""

from bnn_keras.export.batch_norm import randomize_batch_norm
from bnn_keras.export.cli import add_export_arguments, main, run_export
from bnn_keras.export.conversion import LCE_TARGETS, ExportResult, check_pair, convert, export, report_path, save
from bnn_keras.export.errors import ExportError, ExportVerificationError
from bnn_keras.export.flatbuffer import BINARY_OPS, TARGETS, FlatbufferRunner, flatbuffer_ops
from bnn_keras.export.loading import load_model
from bnn_keras.export.localise import Localisation, localise
from bnn_keras.export.pitfalls import fold_limit_pitfall, rewrite_lce_pitfalls, zero_padding_pitfall
from bnn_keras.export.report import ConversionReport, LayerReport
from bnn_keras.export.verify import MAX_WRONG_SHARE, OUTPUT_RTOL
from bnn_keras.export.rewrite import is_binarizing, rewrite_binary_dense

__all__ = [
    "BINARY_OPS",
    "LCE_TARGETS",
    "TARGETS",
    "ConversionReport",
    "ExportError",
    "ExportResult",
    "ExportVerificationError",
    "FlatbufferRunner",
    "LayerReport",
    "Localisation",
    "MAX_WRONG_SHARE",
    "OUTPUT_RTOL",
    "add_export_arguments",
    "check_pair",
    "convert",
    "export",
    "flatbuffer_ops",
    "fold_limit_pitfall",
    "is_binarizing",
    "load_model",
    "localise",
    "main",
    "randomize_batch_norm",
    "report_path",
    "rewrite_binary_dense",
    "rewrite_lce_pitfalls",
    "run_export",
    "save",
    "zero_padding_pitfall",
]

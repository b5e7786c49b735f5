"""The ``export`` command: its arguments, and running it (``bnn-keras export``, ``python -m``)."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Sequence

import tensorflow as tf

from bnn_keras.export.conversion import LCE_TARGETS, export, report_path
from bnn_keras.export.errors import ExportError, one_line
from bnn_keras.export.flatbuffer import TARGETS
from bnn_keras.export.verify import MAX_VERIFY_BYTES, MAX_WRONG_SHARE, OUTPUT_RTOL, VALUE_RTOL

__all__ = ["add_export_arguments", "main", "run_export"]

DESCRIPTION = "Export a Keras/Larq model to a TFLite or Larq Compute Engine (LCE) flatbuffer."

# The Python names export's messages use, and the flags that say the same on the command line.
_FLAGS = (
    ("verify=False", "--no-verify"),
    ("unsafe_load=True", "--unsafe-load"),
    ("experimental_default_int8_range", "--default-int8-range"),
    ("verify_inputs", "--verify-data"),
    ("num_verify", "--num-verify"),
    ("min_top1", "--min-top1"),
    ("max_abs_diff", "--max-abs-diff"),
    ("value_rtol", "--value-rtol"),
    ("output_rtol", "--output-rtol"),
    ("max_wrong_share", "--max-wrong-share"),
    ("localise=True", "--localise"),
    ("lce_target", "--lce-target"),
    ("target='tflite'", "--target tflite"),
)
# A quoted text (a path, a model name) is matched first, so that it is left as it is.
_PYTHON_NAMES = re.compile(
    "|".join([r"(?<!\w)'[^']*'", r'(?<!\w)"[^"]*"', *(rf"(?<![\w-]){re.escape(name)}(?!\w)" for name, _ in _FLAGS)])
)

# argparse takes "-1e3" for an option (its negative-number pattern knows no exponent or inf),
# so "--default-int8-range -1e3 1e3" would fail; the parser has no option that looks like one.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` command's arguments (MODEL_PATH, --target, --out, ...) to `parser`."""
    from bnn_keras.recipe import Rule

    parser._negative_number_matcher = _NEGATIVE_NUMBER  # see _NEGATIVE_NUMBER
    parser.add_argument("model_path", metavar="MODEL_PATH", help="saved model: .keras, .h5 or SavedModel folder")
    parser.add_argument("--target", choices=TARGETS, default="lce", help="lce (binary ops, default) or tflite (float)")
    parser.add_argument(
        "--out", required=True, metavar="FILE",
        help="flatbuffer to write; then FILE.report.json, with FILE's size and sha256",
    )
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import MODULE (on PYTHONPATH) first, so the custom Keras objects it registers load; repeatable",
    )
    parser.add_argument(
        "--unsafe-load", action="store_true",
        help="load a model file that carries code (a Lambda layer, a SavedModel without keras_metadata.pb): "
        "only for a file you trust",
    )
    parser.add_argument(
        "--verify-data",
        metavar="NAME_OR_NPY",
        default=None,
        help="inputs for the check against Keras: a dataset name (bnn_keras.data) or a .npy file; default: seeded random inputs",
    )
    parser.add_argument(
        "--num-verify", type=Rule("int", 1).parse, default=100, metavar="N",
        help=f"verification inputs (default 100; at most {MAX_VERIFY_BYTES / 2**30:g} GiB of them)",
    )
    parser.add_argument(
        "--min-top1", type=Rule("number", 0, 1).parse, default=0.99, metavar="P",
        help="lowest top-1 agreement that passes, for outputs with a class axis (default 0.99)",
    )
    parser.add_argument(
        "--max-abs-diff", type=Rule("number", 0).parse, default=None, metavar="X",
        help="largest max |output difference| that passes (default: not checked)",
    )
    parser.add_argument(
        "--value-rtol", type=Rule("number", 0, low_open=True).parse, default=VALUE_RTOL, metavar="R",
        help="outputs without a class axis (one value per example) pass when max |diff| <= "
        f"R x max(1, max |Keras output|) (default {VALUE_RTOL:g}; int8 outputs need more)",
    )
    parser.add_argument(
        "--output-rtol", type=Rule("number", 0, low_open=True).parse, default=OUTPUT_RTOL, metavar="R",
        help="an input's class output is off when max |diff| > R x the output's max |Keras output| "
        f"(default {OUTPUT_RTOL:g}; float rounding is about 1e-6)",
    )
    parser.add_argument(
        "--max-wrong-share", type=Rule("number", 0, 1).parse, default=MAX_WRONG_SHARE, metavar="P",
        help="most share of inputs whose class outputs may be off, e.g. by sign flips near 0 "
        f"(default {MAX_WRONG_SHARE:g})",
    )
    parser.add_argument(
        "--localise", action="store_true",
        help="also when verification passes, report the first layer where the file departs from Keras "
        "(a failure always does)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the check against Keras")
    parser.add_argument("--int8-io", action="store_true", help="int8 model inputs and outputs (LCE)")
    parser.add_argument(
        "--default-int8-range", nargs=2, type=float, metavar=("MIN", "MAX"), default=None,
        help="fallback int8 quantisation range for ops without statistics: finite, MIN < MAX (LCE, experimental)",
    )
    parser.add_argument("--lce-target", choices=LCE_TARGETS, default="arm", help="LCE hardware target (default arm)")
    parser.add_argument("--no-rewrite-dense", action="store_true", help="keep binary dense layers as (float) dense ops")


def _import_modules(names: Sequence[str]) -> None:
    """Import each ``--import`` module (its Keras objects register on import)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not f"{name}.".startswith(f"{error.name}."):
                raise ExportError(f"--import {name!r}: importing it failed: {one_line(error)}") from None
            raise ExportError(
                f"--import {name!r}: no such module on sys.path: expected a module name importable "
                "from PYTHONPATH (add its folder there)"
            ) from None
        except Exception as error:  # whatever the module raises while it runs
            raise ExportError(f"--import {name!r}: importing it failed: {one_line(error)}") from None


def _in_flags(error: ExportError) -> ExportError:
    """`error` with the Python names of options replaced by their flags (``num_verify`` -> ``--num-verify``)."""
    flags = dict(_FLAGS)
    message = _PYTHON_NAMES.sub(lambda match: flags.get(match.group(0), match.group(0)), str(error))
    return type(error)(message)


def run_export(args: argparse.Namespace) -> int:
    """Run ``export`` from parsed arguments: write the file, print the report, return 0.

    Raises `ExportError` / `ExportVerificationError` naming the flags; the CLI prints them in one line.
    """
    io_type = tf.int8 if args.int8_io else tf.float32
    try:
        _import_modules(args.imports)
        result = export(
            args.model_path,
            args.out,
            target=args.target,
            inference_input_type=io_type,
            inference_output_type=io_type,
            experimental_default_int8_range=tuple(args.default_int8_range) if args.default_int8_range else None,
            lce_target=args.lce_target,
            rewrite_dense=not args.no_rewrite_dense,
            verify=not args.no_verify,
            verify_inputs=args.verify_data,
            num_verify=args.num_verify,
            min_top1=args.min_top1,
            max_abs_diff=args.max_abs_diff,
            value_rtol=args.value_rtol,
            output_rtol=args.output_rtol,
            max_wrong_share=args.max_wrong_share,
            localise=args.localise,
            unsafe_load=args.unsafe_load,
        )
    except ExportError as error:
        raise _in_flags(error) from None
    print(result.report.table())
    print(f"\nwrote {args.out} ({len(result.flatbuffer):,} bytes) and {report_path(args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bnn_keras.export MODEL_PATH --out FILE ...``; errors exit 2 in one line."""
    parser = argparse.ArgumentParser(prog="python -m bnn_keras.export", description=DESCRIPTION)
    add_export_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_export(args)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

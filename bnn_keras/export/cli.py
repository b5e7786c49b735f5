"""The ``export`` command: its arguments, and running it (``bnn-keras export``, ``python -m``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import tensorflow as tf

from bnn_keras.export.conversion import LCE_TARGETS, export, report_path
from bnn_keras.export.errors import ExportError
from bnn_keras.export.flatbuffer import TARGETS

__all__ = ["add_export_arguments", "main", "run_export"]

DESCRIPTION = "Export a Keras/Larq model to a TFLite or Larq Compute Engine (LCE) flatbuffer."


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` command's arguments (MODEL_PATH, --target, --out, ...) to `parser`."""
    parser.add_argument("model_path", metavar="MODEL_PATH", help="saved model: .keras, .h5 or SavedModel folder")
    parser.add_argument("--target", choices=TARGETS, default="lce", help="lce (binary ops, default) or tflite (float)")
    parser.add_argument("--out", required=True, metavar="FILE", help="flatbuffer to write; the report goes to FILE.report.json")
    parser.add_argument(
        "--verify-data",
        metavar="NAME_OR_NPY",
        default=None,
        help="inputs for the check against Keras: a dataset name (bnn_keras.data) or a .npy file; default: seeded random inputs",
    )
    parser.add_argument("--num-verify", type=int, default=100, metavar="N", help="verification inputs (default 100)")
    parser.add_argument("--min-top1", type=float, default=0.99, metavar="P", help="lowest top-1 agreement that passes (default 0.99)")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against Keras")
    parser.add_argument("--int8-io", action="store_true", help="int8 model inputs and outputs (LCE)")
    parser.add_argument(
        "--default-int8-range", nargs=2, type=float, metavar=("MIN", "MAX"), default=None,
        help="fallback int8 quantisation range for ops without statistics (LCE, experimental)",
    )
    parser.add_argument("--lce-target", choices=LCE_TARGETS, default="arm", help="LCE hardware target (default arm)")
    parser.add_argument("--no-rewrite-dense", action="store_true", help="keep binary dense layers as (float) dense ops")


def run_export(args: argparse.Namespace) -> int:
    """Run ``export`` from parsed arguments: write the file, print the report, return 0.

    Raises `ExportError` / `ExportVerificationError`; the CLI prints them in one line.
    """
    io_type = tf.int8 if args.int8_io else tf.float32
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
    )
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

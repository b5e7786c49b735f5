"""The conversion report: per layer ops and bytes, size totals, the check against Keras."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from bnn_keras.export.flatbuffer import BINARY_OPS

__all__ = ["ConversionReport", "LayerReport", "json_text"]


@dataclasses.dataclass
class LayerReport:
    """What one Keras layer became in the flatbuffer."""

    name: str
    kind: str
    ops: list[str]
    bytes: int
    params: int
    binary_params: int
    ideal_bytes: float
    binary: bool
    note: str = ""


@dataclasses.dataclass
class ConversionReport:
    """Per-layer ops and bytes, size totals against the ideal, and the fidelity check."""

    target: str
    lce_target: str | None
    model_name: str
    layers: list[LayerReport]
    file_bytes: int
    ideal_bytes: float
    binary_mac_share: float | None  # MACs of layers that became binary ops; None: no MACs, or unknown
    op_counts: dict[str, int]
    options: dict[str, Any]
    rewritten_dense: list[str] = dataclasses.field(default_factory=list)
    unattributed_bytes: int = 0
    verification: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def layer_bytes(self) -> int:
        """Constant bytes attributed to Keras layers (weights, packed or float)."""
        return sum(layer.bytes for layer in self.layers)

    @property
    def ratio_to_ideal(self) -> float | None:
        """File size over the ideal size (1 bit per binary weight, 32 per other parameter); None without parameters."""
        return self.file_bytes / self.ideal_bytes if self.ideal_bytes else None

    @property
    def binary_ops(self) -> int:
        return sum(self.op_counts.get(name, 0) for name in BINARY_OPS)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(
            layer_bytes=self.layer_bytes,
            ratio_to_ideal=None if self.ratio_to_ideal is None else round(self.ratio_to_ideal, 4),
            binary_ops=self.binary_ops,
        )
        return data

    def to_json(self) -> str:
        return json_text(self.to_dict())

    def table(self) -> str:
        """The report as a Markdown table plus totals, for printing."""
        target = f"lce ({self.lce_target})" if self.lce_target else self.target
        return "\n".join([f"{self.model_name} -> {target}", "", *self._layer_rows(), "", *self._totals()])

    def _layer_rows(self) -> list[str]:
        rows = [
            "| layer | type | TFLite ops | bytes | ideal bytes | binary | note |",
            "|---|---|---|---:|---:|---|---|",
        ]
        for layer in self.layers:
            ops = ", ".join(_compress(layer.ops)) or "-"
            rows.append(
                f"| {layer.name} | {layer.kind} | {ops} | {layer.bytes:,} | "
                f"{layer.ideal_bytes:,.0f} | {'yes' if layer.binary else 'no'} | {layer.note} |"
            )
        return rows

    def _totals(self) -> list[str]:
        lines = [
            f"file {self.file_bytes:,} B (layers {self.layer_bytes:,} B, other constants "
            f"{self.unattributed_bytes:,} B, flatbuffer structure "
            f"{self.file_bytes - self.layer_bytes - self.unattributed_bytes:,} B); "
            f"ideal {self.ideal_bytes:,.0f} B; file/ideal "
            + ("n/a" if self.ratio_to_ideal is None else f"{self.ratio_to_ideal:.2f}x"),
            f"binary ops {self.binary_ops}; binary MACs "
            + ("n/a" if self.binary_mac_share is None else f"{100 * self.binary_mac_share:.1f}% of all MACs")
            + "; "
            f"ops: {', '.join(f'{k} x{v}' for k, v in sorted(self.op_counts.items()))}",
        ]
        if self.rewritten_dense:
            lines.append(f"dense layers rewritten as 1x1 binary convs: {', '.join(self.rewritten_dense)}")
        if self.verification:
            v = self.verification
            checks = []
            if v.get("top1_outputs", True):
                checks.append(
                    f"top-1 agreement {100 * v['top1_agreement']:.1f}% "
                    f"({100 * v['top1_agreement_strict']:.1f}% counting tied Keras outputs as misses)"
                )
            cv = v.get("class_values") or {}
            if v.get("output_rtol") and any(c["checked"] for c in cv.values()):
                worst = max(c["wrong_inputs"] for c in cv.values() if c["checked"])
                rel = max(c["max_relative_diff"] for c in cv.values())
                checks.append(
                    f"class outputs within {v['output_rtol']:g} x their scale on {100 * (1 - worst):.0f}% of inputs (max {rel:.2g} x)"
                )
            if v.get("value_outputs"):
                checks.append(f"outputs without a class axis within {v['value_rtol']:g} x max(1, max |Keras output|)")
            lines.append(f"verified on {v['num_inputs']} {v['inputs']} inputs: max |diff| {v['max_abs_diff']:.3g}, " + "; ".join(checks))
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


def _compress(ops: Sequence[str]) -> list[str]:
    """['A', 'B', 'B'] -> ['A', 'B x2'], keeping first-seen order."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return [name if n == 1 else f"{name} x{n}" for name, n in counts.items()]


def _json_default(value: Any) -> Any:
    if isinstance(value, tf.dtypes.DType):
        return value.name
    return str(value)


def _finite(value: Any) -> Any:
    """`value` with NumPy scalars as Python numbers and NaN or infinite floats as None (JSON has neither)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(data: dict[str, Any]) -> str:
    """`data` (a report's `to_dict`, maybe with more keys) as indented, valid JSON text (NaN and inf as null)."""
    return json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False)

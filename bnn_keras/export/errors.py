"""The export errors, and the one-line form every message about a caught error takes."""

from __future__ import annotations

__all__ = ["ExportError", "ExportVerificationError", "one_line"]


class ExportError(ValueError):
    """The model cannot be read or converted, or an option is invalid (one-line message)."""


class ExportVerificationError(ExportError):
    """The flatbuffer's outputs disagree with Keras beyond the allowed threshold."""


def one_line(error: BaseException) -> str:
    """``"Type: message"`` on one line, cut at 300 characters, for an `ExportError` message."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

"""The export errors, and the one-line form every message about a caught error takes."""

from __future__ import annotations

__all__ = ["ExportError", "ExportVerificationError", "one_line"]

MAX_CHARS = 300
"""A caught error's message longer than this is shortened to its start and its last clause."""

_CLAUSE_BREAKS = ("; ", ": ", ". ")


class ExportError(ValueError):
    """The model cannot be read or converted, or an option is invalid (one-line message)."""


class ExportVerificationError(ExportError):
    """The flatbuffer's outputs disagree with Keras beyond the allowed threshold."""


def _last_clause_start(text: str) -> int:
    """Where the clause after the last ``"; "``, ``": "`` or ``". "`` outside brackets begins; 0 if none."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and text[i : i + 2] in _CLAUSE_BREAKS:
            start = i + 2
    return start


def _shorten(text: str, limit: int = MAX_CHARS) -> str:
    """`text`, or its start and its whole last clause (where advice goes) joined by " ... "."""
    if len(text) <= limit:
        return text
    start = _last_clause_start(text)
    last = text[start:]
    room = limit - len(last) - len(" ... ")
    if start == 0 or room < 40:  # no clause to keep whole within the limit: keep everything
        return text
    head = text[:room].rsplit(" ", 1)[0]
    return f"{head} ... {last}"


def one_line(error: BaseException) -> str:
    """``"Type: message"`` on one line, for an `ExportError` message about a caught error.

    A message over `MAX_CHARS` keeps its start and its last clause, the advice, whole:

    >>> one_line(ValueError("bad: " + "detail " * 60 + "; pass --data-dir")).endswith("detail ... pass --data-dir")
    True
    """
    text = _shorten(" ".join(str(error).split()))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

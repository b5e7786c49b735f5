"""Make `tf.keras` resolve to tf-keras (Keras 2), which Larq needs, before Keras is touched.

TensorFlow decides what `tf.keras` is on first attribute access, from the environment
variable TF_USE_LEGACY_KERAS. `import bnn_keras` sets it (unless set) and refuses to go
on, in one line, when Keras 3 has already been bound to `tf.keras`. Nothing else in the
environment changes: a program that never imports bnn_keras keeps Keras 3 as tf.keras.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Sequence

_FIX = (
    "set TF_USE_LEGACY_KERAS=1 in the environment before starting Python "
    "(or import bnn_keras before tensorflow)"
)


class Keras3LoadedError(ImportError):
    """tf.keras was already bound to Keras 3, which Larq cannot use."""


def ensure_legacy_keras() -> None:
    """Route tf.keras to tf-keras, or raise `Keras3LoadedError` naming the fix."""
    preset = "TF_USE_LEGACY_KERAS" in os.environ
    value = os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    if value not in ("1", "true", "True"):
        raise Keras3LoadedError(
            f"bnn_keras needs tf.keras to be tf-keras (Keras 2) but TF_USE_LEGACY_KERAS={value!r}: "
            + _FIX
        )
    if "tensorflow" not in sys.modules:
        return  # tf.keras will be bound on first use, with the variable now set
    import tensorflow as tf

    # Resolves tf.keras now (to tf-keras unless Keras 3 was bound before we got here).
    if not tf.keras.layers.Layer.__module__.startswith("tf_keras"):
        raise Keras3LoadedError(
            "bnn_keras needs tf.keras to be tf-keras (Keras 2) but Keras 3 was already "
            "loaded as tf.keras: " + _FIX
        )
    if not preset:  # TensorFlow 2.21 half-binds Keras 3 when imported: Larq would fail obscurely
        raise Keras3LoadedError(
            "bnn_keras needs tf.keras to be tf-keras (Keras 2) but tensorflow was imported before "
            "bnn_keras without TF_USE_LEGACY_KERAS=1: " + _FIX
        )


def started_as_command() -> bool:
    """Whether this process is the ``bnn-keras`` command (or ``python -m bnn_keras...``)."""
    return sys.argv[:1] == ["-m"] or os.path.basename(sys.argv[0] if sys.argv else "") == "bnn-keras"


@contextlib.contextmanager
def quiet_interrupt() -> Iterator[None]:
    """As the command, Ctrl-C during the imports (TensorFlow's take seconds) ends in one line, exit 130.

    Elsewhere (a program importing bnn_keras) the KeyboardInterrupt goes on as usual.
    """
    try:
        yield
    except KeyboardInterrupt:
        if not started_as_command():
            raise
        sys.stderr.write("\nbnn-keras: interrupted while starting\n")
        raise SystemExit(130) from None


def explicit_verbose(argv: Sequence[str]) -> str | None:
    """The value of ``--verbose`` in a command line (``--verbose V`` or ``--verbose=V``), None without one."""
    for i, arg in enumerate(argv):
        if arg == "--verbose" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--verbose="):
            return arg.partition("=")[2]
    return None


def import_tensorflow(quiet: bool) -> str:
    """Import TensorFlow; with `quiet`, keep its C++ start-up lines off the terminal and return them.

    TensorFlow and absl print CUDA probing and CPU-feature notices to file descriptor 2
    while importing and probing devices, whatever TF_CPP_MIN_LOG_LEVEL says; `quiet`
    captures both (the probe runs here), and sets TF_CPP_MIN_LOG_LEVEL (unless the
    environment sets a level) for the later ones: 3 (none) unless the command line asks
    for ``--verbose 2``, 2 (errors) then. TensorFlow logs notices at error level too
    (oneDNN's "supports DT_UINT8 only on platforms with AVX-512" on some CPUs, mid-fit);
    a real failure reaches the user as a Python exception all the same.
    """
    if not quiet or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401

        return ""
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if explicit_verbose(sys.argv[1:]) == "2" else "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow

            tensorflow.config.list_physical_devices()  # probes CUDA now, into the capture
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return captured.read().decode("utf-8", "replace")

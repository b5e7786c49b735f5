"""Atomic file writes and the JSON / CSV helpers every output of bnn_keras goes through.

Every file is written to a temporary file in its own folder (``.<name>-<random>.tmp``),
flushed, given the mode an ordinary file gets under the process umask (0644 under umask
022; `tempfile.mkstemp` alone would leave 0600), and renamed into place, so a reader
sees the old file or the new one, never half of one.

```python
from bnn_keras import files
files.write_json("runs/x/summary.json", {"best_epoch": 3, "loss": float("nan")})  # nan -> null
files.read_json("runs/x/summary.json")
```
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["BusyError", "TEMPORARY", "history_csv", "locked_folder", "own_folder", "jsonable", "read_json", "write_atomically", "write_bytes", "write_json", "write_text"]

TEMPORARY = re.compile(r"\..+-\w+\.tmp(\.\w+)?")
"""The name of a temporary file `write_atomically` leaves behind when it is killed mid-write."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file over `path`.

    The temporary file sits in `path`'s folder and ends in `path`'s suffix (Keras picks
    the format of ``model.save(temporary_path)`` from it); it is removed when `write` or
    the rename fails.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(descriptor)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, os.fspath(path)) from error  # say which file (zipfile does not)
        raise
    return path


def write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write `payload` to `path` atomically, synced to disk before the rename."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())

    return write_atomically(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` (UTF-8) atomically."""
    return write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """`value` as plain JSON data: NumPy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write `value` as indented JSON, atomically (non-finite floats become null)."""
    return write_text(path, json.dumps(jsonable(value), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, advice: str = "") -> Any:
    """Read a JSON file; a missing or damaged one raises ValueError naming the file (and `advice`)."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(
            f"cannot read {os.fspath(path)!r} ({type(error).__name__}: {reason})" + (f": {advice}" if advice else "")
        ) from None


def history_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV text; the columns are every key in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(jsonable(list(rows)))
    return buffer.getvalue()


class BusyError(ValueError):
    """Another process holds the lock of a folder or file bnn_keras is about to write."""


def _flock_holder(path: Path) -> str:
    """The process id holding a ``flock`` on `path`, from /proc/locks ("" where unknown)."""
    with contextlib.suppress(OSError, ValueError):
        inode = os.stat(path).st_ino
        with open("/proc/locks", encoding="ascii") as locks:
            for line in locks:
                fields = line.split()  # id: FLOCK ADVISORY WRITE pid maj:min:inode start end
                if len(fields) >= 6 and fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
                    return fields[4]
    return ""


@contextlib.contextmanager
def own_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Own an output folder while the block runs: create it and hold an OS lock on it.

    The lock is a ``flock`` on the folder itself, so it leaves no file behind and dies
    with its process (a SIGKILLed run never leaves a stale lock). A second process on the
    same folder is refused at once with `BusyError`, naming the holder's process id.
    Folders this call created are removed again if the block leaves them empty (work
    refused before it wrote anything).

    ```python
    with files.own_folder("runs/x"):
        ...  # no other bnn_keras process writes runs/x meanwhile
    ```
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {os.fspath(folder)!r} is a file: expected a folder or a path that does not exist yet")
    created = []
    for candidate in (folder, *folder.parents):  # what mkdir creates, deepest first
        if candidate.exists():
            break
        created.append(candidate)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"cannot create the output folder {os.fspath(folder)!r} ({error.strerror or error}): choose one you can write"
        ) from None
    try:
        with locked_folder(folder, wait=False):
            yield
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, *, wait: bool) -> Iterator[None]:
    """Hold a ``flock`` on the existing `folder` while the block runs.

    With `wait`, wait for another holder to end (short critical sections, e.g. writing an
    export's pair of files); without, refuse at once with `BusyError` naming the holder.
    """
    folder = Path(folder)
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise ValueError(f"cannot open the folder {os.fspath(folder)!r} ({error.strerror or error})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _flock_holder(folder)
            by = f"process {holder}" if holder else "another process"
            raise BusyError(
                f"output folder {os.fspath(folder)!r} is in use by {by}: wait until it ends, or choose another folder"
            ) from None
        yield
    finally:
        os.close(descriptor)  # releases the lock

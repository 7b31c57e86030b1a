"""Atomic file writes: a temporary file beside the target, fsync, then one rename.

A reader sees the old file or the new one, never a half-written one; a failure (disk full,
unwritable folder) leaves nothing behind and ends in :class:`~nodule_edge.errors.OutputError`.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from nodule_edge.errors import OutputError

__all__ = ["write_csv_atomic", "write_text_atomic"]


def write_text_atomic(path: str | Path, text: str, *, newline: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8); the folder must exist.

    Raises:
        OutputError: The folder is missing or unwritable, or the write failed.
    """
    path = Path(path)
    folder = path.resolve().parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed, nothing was written: {exc}") from exc
    return path


def write_csv_atomic(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write a CSV (header, then rows) atomically; see :func:`write_text_atomic`."""
    import io

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue(), newline="")

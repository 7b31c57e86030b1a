"""File safety in one place: content hashes, atomic file writes and atomic folder swaps.

Every writer in the package goes through this module, so the rules hold everywhere:

* **Atomic file**: the bytes go to a temporary file beside the target, are flushed and
  fsynced, and one ``os.replace`` puts them in place. A reader sees the old file or the new
  one, never a half-written one; a failure (disk full, unwritable folder) removes the
  temporary and ends in :class:`~nodule_edge.errors.OutputError` naming the path.
* **Atomic folder**: a multi-file output (inference results, a bundle, an index, a Triton
  model folder) is built in a staging folder beside the target and swapped in only when
  complete. POSIX cannot exchange two directories atomically, so the old folder is moved
  aside first and moved back if the second rename fails; the parent is fsynced after.
* **Hashes**: sha256 of a file (streamed) or of bytes, hex-encoded.

Example:
    >>> from nodule_edge._files import staged_folder, write_json_atomic
    >>> with staged_folder(Path("out/run1"), overwrite=False) as tmp:  # doctest: +SKIP
    ...     write_json_atomic(tmp / "report.json", {"ok": True})
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nodule_edge.errors import OutputError

__all__ = [
    "atomic_file",
    "fsync_dir",
    "sha256_bytes",
    "sha256_file",
    "staged_folder",
    "swap_folder",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

_HASH_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of an in-memory buffer."""
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    For writers that take a file name (``np.save``, ``safetensors.save_file``, ``onnx.save``,
    SimpleITK). The folder must exist. On any exception the temporary is removed and nothing
    at ``path`` changes.

    Raises:
        OutputError: The folder is missing or unwritable, or the write or rename failed.
    """
    path = Path(path)
    # Not mkstemp: its 0600 mode would survive the rename, and a bundle's manifest or a report
    # must keep the permissions the user's umask gives (0666 & ~umask), as a plain write would.
    tmp = path.resolve().parent / f".{path.name}.{uuid.uuid4().hex[:12]}{path.suffix}"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed, nothing was written: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically; see :func:`atomic_file`."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | Path, text: str, *, newline: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8); the folder must exist.

    Raises:
        OutputError: The folder is missing or unwritable, or the write failed.
    """
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as fh:
        fh.write(text)
    return path


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2, **dump_options: Any) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) atomically; see :func:`write_text_atomic`.

    ``dump_options`` go to :func:`json.dumps` (``allow_nan``, ``separators``, ``sort_keys``).
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent, **dump_options) + "\n")


def write_csv_atomic(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write a CSV (header, then rows) atomically; see :func:`write_text_atomic`."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue(), newline="")


def swap_folder(staged: Path, target: Path) -> None:
    """Move a complete ``staged`` folder to ``target``, replacing what is there.

    The old ``target`` (if any) is renamed aside, ``staged`` renamed onto ``target`` and the old
    one deleted; if the second rename fails the old one is put back, so the target is either the
    old folder or the new one. The parent folder is fsynced.

    Raises:
        OSError: A rename failed (after the rollback).
    """
    if not target.exists():
        os.rename(staged, target)
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (written with plain writes) before it is swapped in."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(folder)


@contextlib.contextmanager
def staged_folder(
    target: str | Path,
    *,
    overwrite: bool,
    what: str = "output folder",
) -> Iterator[Path]:
    """Yield a staging folder beside ``target`` that replaces ``target`` when the block succeeds.

    The block writes files into the staging folder with plain writes; before the swap every file
    is fsynced, so the folder that appears at ``target`` is complete on disk.

    Args:
        target: The folder to produce; its parent is created.
        overwrite: Replace a non-empty ``target``; otherwise a non-empty one is refused. An
            empty existing folder is always replaced.
        what: How errors name the folder ("output folder", "index", "bundle").

    Raises:
        OutputError: ``target`` is a file, non-empty without ``overwrite``, or creating, writing or swapping failed; nothing partial is
            left behind and an existing ``target`` is unchanged.
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputError(f"{what} {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"{what} {target} is not empty (use --overwrite to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.resolve().parent))
    except OSError as exc:
        raise OutputError(f"cannot create {what} {target}: {exc}") from exc
    try:
        yield staged
        _fsync_tree(staged)
        swap_folder(staged, target)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise OutputError(f"writing {what} {target} failed, nothing was changed: {exc}") from exc
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise

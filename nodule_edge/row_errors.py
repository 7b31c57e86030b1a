"""Per-row failures of commands that loop over many nodules or studies.

``evaluate``, ``index build``/``index add`` and ``infer-batch`` run the model on many rows. One bad
row (a centre outside its volume, an unreadable study) should not cost a user the others: each
failure is recorded with the row's id and a one-line reason, the loop goes on, the failures are
written to ``errors.csv`` and the run ends with :class:`~nodule_edge.errors.RowsFailedError`
(non-zero exit code) naming how many rows failed. ``fail_fast=True`` restores stop-at-first.

Example:
    >>> rows = RowErrors(fail_fast=False)
    >>> for rec in records:
    ...     result = rows.attempt(rec.id, inferer.infer, rec.image_path, worlds=[rec.center_lps_mm])
    ...     if result is None:
    ...         continue  # recorded; rows.failures[-1].reason says why
    >>> rows.write_csv("out/errors.csv")
    >>> rows.raise_if_failed(total=len(records), errors_csv="out/errors.csv")

Only the package's own errors (:class:`~nodule_edge.errors.NoduleEdgeError`, raised for bad
input) are recorded; anything else is a bug and propagates. Output errors propagate too: a full
disk fails every later row the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nodule_edge._files import write_csv_atomic
from nodule_edge.errors import NoduleEdgeError, OutputError, RowsFailedError

__all__ = ["ERRORS_CSV_COLUMNS", "RowFailure", "RowErrors"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Columns of ``errors.csv``.
ERRORS_CSV_COLUMNS: tuple[str, ...] = ("id", "error", "reason")


@dataclass(frozen=True)
class RowFailure:
    """One failed row: its id, the error class name and the one-line reason."""

    id: str
    error: str
    reason: str


class RowErrors:
    """Collect per-row failures instead of stopping at the first.

    Args:
        fail_fast: Re-raise the first failure instead of recording it.
    """

    def __init__(self, fail_fast: bool = False) -> None:
        self.fail_fast = fail_fast
        self.failures: list[RowFailure] = []

    def __len__(self) -> int:
        return len(self.failures)

    def __repr__(self) -> str:
        return f"RowErrors(failures={len(self.failures)}, fail_fast={self.fail_fast})"

    def record(self, row_id: str, exc: NoduleEdgeError) -> None:
        """Record ``exc`` as the failure of ``row_id`` (re-raised when ``fail_fast``)."""
        if isinstance(exc, OutputError):
            raise exc
        if self.fail_fast:
            # Stop here, but say which row: the bare message names values, not the row.
            try:
                named = type(exc)(f"{row_id}: {exc}")
            except TypeError:  # an error class with a richer constructor: keep it as it is
                raise exc from None
            raise named from exc
        reason = " ".join(str(exc).split())  # one line: messages may quote multi-line decoder errors
        self.failures.append(RowFailure(str(row_id), type(exc).__name__, reason))
        log.info("row %s failed: %s", row_id, reason)
        log.debug("row %s failed", row_id, exc_info=exc)

    def sort(self, order: Sequence[str]) -> None:
        """Order the failures as ``order`` lists their ids (e.g. input order after parallel work)."""
        rank = {row_id: i for i, row_id in enumerate(order)}
        self.failures.sort(key=lambda f: rank.get(f.id, len(rank)))

    def attempt(self, row_id: str, func: Callable[..., T], *args: object, **kwargs: object) -> T | None:
        """Call ``func(*args, **kwargs)``; on a package error record it for ``row_id`` and return None."""
        try:
            return func(*args, **kwargs)
        except NoduleEdgeError as exc:
            self.record(row_id, exc)
            return None

    def write_csv(self, path: str | Path) -> Path:
        """Write ``errors.csv`` (``id, error, reason``; a header only when nothing failed) atomically."""
        path = Path(path)
        try:
            path.resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc}") from exc
        return write_csv_atomic(path, ERRORS_CSV_COLUMNS, ((f.id, f.error, f.reason) for f in self.failures))

    def raise_if_failed(self, total: int, errors_csv: str | Path | None = None, noun: str = "rows") -> None:
        """Raise :class:`RowsFailedError` saying how many of ``total`` rows (or ``noun``) failed, if any did."""
        if not self.failures:
            return
        first = self.failures[0]
        where = f"; reasons in {errors_csv}" if errors_csv is not None else ""
        raise RowsFailedError(
            f"{len(self.failures)} of {total} {noun} failed (first: {first.id}: {first.reason}){where}",
            failed=len(self.failures),
            total=total,
        )

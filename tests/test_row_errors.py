"""Per-row failures: recorded with id and one-line reason, written to errors.csv, counted at the end."""

from __future__ import annotations

import csv

import pytest

from nodule_edge.errors import CoordinateError, OutputError, RowsFailedError, StudyError
from nodule_edge.row_errors import ERRORS_CSV_COLUMNS, RowErrors


def _bad(x: int) -> int:
    if x < 0:
        raise CoordinateError(f"point {x} is outside\nthe volume")
    return x * 2


def test_attempt_records_package_errors_and_goes_on(tmp_path):
    rows = RowErrors()
    results = [rows.attempt(f"r{i}", _bad, x) for i, x in enumerate([1, -1, 3, -4])]
    assert results == [2, None, 6, None]
    assert [(f.id, f.error) for f in rows.failures] == [("r1", "CoordinateError"), ("r3", "CoordinateError")]
    assert rows.failures[0].reason == "point -1 is outside the volume"  # one line
    path = rows.write_csv(tmp_path / "sub" / "errors.csv")
    with path.open(newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == list(ERRORS_CSV_COLUMNS) and [r[0] for r in table[1:]] == ["r1", "r3"]
    with pytest.raises(RowsFailedError) as info:
        rows.raise_if_failed(4, path, noun="nodules")
    assert info.value.exit_code == 9 and (info.value.failed, info.value.total) == (2, 4)
    assert str(info.value).startswith("2 of 4 nodules failed (first: r1: point -1 is outside the volume)")
    assert str(path) in str(info.value)


def test_nothing_failed_writes_a_header_and_does_not_raise(tmp_path):
    rows = RowErrors()
    assert rows.attempt("a", _bad, 1) == 2
    rows.raise_if_failed(1)
    with rows.write_csv(tmp_path / "errors.csv").open(newline="") as fh:
        assert list(csv.reader(fh)) == [list(ERRORS_CSV_COLUMNS)]


def test_fail_fast_raises_the_same_error_naming_the_row():
    rows = RowErrors(fail_fast=True)
    with pytest.raises(CoordinateError, match="^r7: point -2 is outside"):
        rows.attempt("r7", _bad, -2)
    assert not rows.failures


def test_bugs_and_output_errors_are_not_recorded():
    rows = RowErrors()
    with pytest.raises(ZeroDivisionError):
        rows.attempt("a", lambda: 1 / 0)
    with pytest.raises(OutputError):
        rows.record("b", OutputError("disk full"))
    assert not rows.failures


def test_sort_orders_failures_as_the_input():
    rows = RowErrors()
    for row_id in ["c", "a", "b"]:
        rows.record(row_id, StudyError("x"))
    rows.sort(["a", "b", "c"])
    assert [f.id for f in rows.failures] == ["a", "b", "c"]

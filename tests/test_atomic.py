"""Atomic writes: the whole file or nothing, and one error naming the path."""

from __future__ import annotations

import csv

import pytest

from nodule_edge._atomic import write_csv_atomic, write_text_atomic
from nodule_edge.errors import OutputError


def test_text_and_csv_are_written_whole(tmp_path):
    path = write_text_atomic(tmp_path / "a.html", "<p>é</p>")
    assert path.read_text(encoding="utf-8") == "<p>é</p>"
    table = write_csv_atomic(tmp_path / "t.csv", ["id", "reason"], [["x", "a, b"], ["y", "line\nbreak"]])
    with table.open(newline="") as fh:
        assert list(csv.reader(fh)) == [["id", "reason"], ["x", "a, b"], ["y", "line\nbreak"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "t.csv"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_text_atomic(tmp_path / "r.txt", "old")

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("nodule_edge._atomic.os.replace", fail)
    with pytest.raises(OutputError, match="r.txt.*No space left"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(OutputError, match="nope"):
        write_text_atomic(tmp_path / "nope" / "x.txt", "x")

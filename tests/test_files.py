"""Atomic writes: the whole file or nothing, and one error naming the path."""

from __future__ import annotations

import csv

import pytest

from nodule_edge._files import write_csv_atomic, write_text_atomic
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

    monkeypatch.setattr("nodule_edge._files.os.replace", fail)
    with pytest.raises(OutputError, match="r.txt.*No space left"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(OutputError, match="nope"):
        write_text_atomic(tmp_path / "nope" / "x.txt", "x")


def test_hashes_agree_with_hashlib(tmp_path):
    import hashlib

    from nodule_edge._files import sha256_bytes, sha256_file

    data = bytes(range(256)) * 5000  # > one 1 MiB block
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest() == sha256_bytes(data)


def test_atomic_file_keeps_the_umask_mode_and_removes_the_temporary_on_error(tmp_path):
    import os

    from nodule_edge._files import atomic_file, write_json_atomic

    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    # mkstemp's 0600 would make a shipped manifest unreadable for other users.
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError), atomic_file(tmp_path / "x.npz") as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        tmp.write_bytes(b"partial")
        raise ValueError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_staged_folder_replaces_only_when_complete(tmp_path):
    from nodule_edge._files import staged_folder

    target = tmp_path / "out"
    with staged_folder(target, overwrite=False) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"

    with pytest.raises(OutputError, match="not empty"):
        with staged_folder(target, overwrite=False):
            pass
    with pytest.raises(RuntimeError), staged_folder(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # old folder untouched
    with staged_folder(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        with staged_folder(tmp_path / "file", overwrite=True):
            pass


def test_swap_folder_rolls_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    import os

    from nodule_edge import _files

    target, staged = tmp_path / "t", tmp_path / "s"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staged.mkdir()
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(_files.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        _files.swap_folder(staged, target)
    assert (target / "old.txt").read_text() == "old"
    assert staged.is_dir()


def test_staged_folder_fsyncs_every_file_before_the_swap(tmp_path, monkeypatch):
    import os

    from nodule_edge import _files

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(_files.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    with _files.staged_folder(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("2")
    # two files and two folders (the staging folder and sub/), then the parent after the swap
    assert len(synced) >= 5

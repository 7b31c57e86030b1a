"""The one rule for where the real data lives."""

from __future__ import annotations

from pathlib import Path

from nodule_edge.data_paths import data_dir, lidc_voi_dir


def test_environment_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("NODULE_EDGE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir("/any/repo") == tmp_path
    assert lidc_voi_dir() == tmp_path / "lidc_voi"


def test_default_is_shared_data_beside_the_origin(monkeypatch):
    monkeypatch.delenv("NODULE_EDGE_DATA", raising=False)
    assert data_dir() == Path("../shared/data")
    assert data_dir(Path("/work/main")) == Path("/work/shared/data")
    assert lidc_voi_dir(Path("/work/main")) == Path("/work/shared/data/lidc_voi")

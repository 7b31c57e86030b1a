"""Shared fixtures: where the real data lives, and skips with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NODULE_EDGE_DATA", REPO_ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set NODULE_EDGE_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def lidc_voi_dir() -> Path:
    """The 679 LIDC-IDRI nodule VOIs with manifest.csv."""
    return _need(SHARED_DATA / "lidc_voi")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """The real DICOM series for the runtime."""
    return _need(SHARED_DATA / "dicom")

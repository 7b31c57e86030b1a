"""Benchmark fixtures: the bundle and the real data, with skips that say what is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodule_edge.data_paths import data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = data_dir(REPO_ROOT)
#: Quick mode (CI) unless NODULE_EDGE_BENCH_FULL=1.
FULL = os.environ.get("NODULE_EDGE_BENCH_FULL") == "1"


def engine_precision(engine: object) -> str:
    """The precision an engine ran in, for a ratio whose baseline depends on it (benches/ratios.py):
    ``cpu-fast`` reports bf16 or f32 (what the CPU runs natively); the ONNX Runtime engines run f32."""
    return str(getattr(engine, "precision", "f32"))


@pytest.fixture(scope="session")
def chest_study() -> Path:
    path = SHARED_DATA / "dicom" / "chest_ricord_jpeg_lossless"
    if not path.is_dir():
        pytest.skip(f"real chest study not found at {path}")
    return path


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    from nodule_edge.runtime.bundle import default_bundle_path

    path = default_bundle_path()
    if not (path / "manifest.json").is_file():
        pytest.skip(f"no model bundle at {path} (run nodule-edge export)")
    return path

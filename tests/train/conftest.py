"""Fixtures of synthetic training data (see :mod:`synthetic`): VOI folders and tiny configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .synthetic import write_tiny_config, write_voi_dir


@pytest.fixture(scope="session")
def synthetic_voi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic nodules of 6 patients, all with masks and ratings (written once)."""
    return write_voi_dir(tmp_path_factory.mktemp("syn_voi"))


@pytest.fixture(scope="session")
def small_voi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 nodules of 3 patients; nodule 4 has no mask and nodule 5 no ratings."""
    return write_voi_dir(
        tmp_path_factory.mktemp("small_voi"), n_nodules=6, n_patients=3, missing_masks=(4,), unrated=(5,)
    )


@pytest.fixture
def tiny_config(tmp_path: Path, synthetic_voi_dir: Path) -> Callable[..., Path]:
    """Factory: ``tiny_config(**sections)`` writes a tiny config with outputs under ``tmp_path``."""

    def make(name: str = "tiny.toml", **sections: str) -> Path:
        return write_tiny_config(tmp_path / name, synthetic_voi_dir, tmp_path / "out", tmp_path / "cache", **sections)

    return make

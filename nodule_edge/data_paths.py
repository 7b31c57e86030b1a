"""Where the real data lives: one rule for the CLI, training, tests and benchmarks.

``$NODULE_EDGE_DATA`` when it is set, else ``../shared/data`` next to the working directory (the
layout of a checkout with the shared data beside it; README, Data).

Example:
    >>> from nodule_edge.data_paths import lidc_voi_dir
    >>> lidc_voi_dir()  # doctest: +SKIP
    PosixPath('../shared/data/lidc_voi')
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "data_dir", "lidc_voi_dir"]

#: Environment variable that points at the data folder.
DATA_ENV = "NODULE_EDGE_DATA"


def data_dir(origin: str | Path | None = None) -> Path:
    """The shared data folder: ``$NODULE_EDGE_DATA``, else ``<origin>/../shared/data``.

    Args:
        origin: The folder ``../shared/data`` is relative to; the working directory by default
            (tests and benchmarks pass the repository root).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path("..", "shared", "data") if origin is None else Path(origin).parent / "shared" / "data"


def lidc_voi_dir(origin: str | Path | None = None) -> Path:
    """The LIDC-IDRI VOI folder (``manifest.csv``, ``image/``, ``mask/``) inside :func:`data_dir`."""
    return data_dir(origin) / "lidc_voi"

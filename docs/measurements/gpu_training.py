"""`nodule-edge train` on a CUDA machine that lacks hnswlib (docs/measurements/gpu_training.sh).

The lent GPU machine has no package registry and no hnswlib wheel for its Python exists, so the
fold's retrieval comparison (hnswlib) is recorded as skipped there; everything else is the
unchanged command: ``python docs/measurements/gpu_training.py CONFIG [--set KEY=VALUE ...]``.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from nodule_edge.cli.train import train
from nodule_edge.train import run


def _skipped_retrieval(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
    return {"skipped": "hnswlib is not installed on this machine"}


if __name__ == "__main__":
    if importlib.util.find_spec("hnswlib") is None:
        run.retrieval_comparison = _skipped_retrieval  # type: ignore[assignment]
    train.main(sys.argv[1:], prog_name="nodule-edge train")

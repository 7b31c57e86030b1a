"""CPU engine candidates side by side: ONNX Runtime settings, static INT8, OpenVINO, ORT's OpenVINO EP.

One benchmark per candidate × batch (1 and 8), all in one run, so the ratios to ``ort-fp32``
(ONNX Runtime fp32, ``ORT_ENABLE_ALL``, one thread per core: the reference and fallback) are
comparable even on a busy machine. Candidates whose dependency is missing are skipped with the
reason; ``ortov-ep-*`` need the ``onnxruntime-openvino`` wheel, which replaces ``onnxruntime``,
so run this file again from a separate virtual environment that has it to fill those rows.

The fp32 model: ``$NODULE_EDGE_ONNX``, else the bundled ``nodule_edge/assets/bundle/model.onnx``.
The INT8 model: ``$NODULE_EDGE_INT8``, else the bundle's ``model.int8.onnx`` beside the bundled fp32 model, else built here
from real LIDC patches when ``../shared/data/lidc_voi`` is present, else from seeded synthetic
patches (speed does not depend on the calibration ranges; accuracy is
``python -m benches.cpu_engines compare``'s job, harness in ``benches/cpu_engines.py``).

    pytest benches/bench_engines.py --benchmark-json out.json
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benches.cpu_engines import CANDIDATES, Candidate
from nodule_edge.export.int8 import build_cpu_engine
from nodule_edge.runtime.engines.base import CpuEngine

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NODULE_EDGE_DATA", REPO_ROOT.parent / "shared" / "data"))
BUNDLED_ONNX = REPO_ROOT / "nodule_edge" / "assets" / "bundle" / "model.onnx"
ROUNDS = {1: 10, 8: 3}


@pytest.fixture(scope="session")
def fp32_onnx() -> Path:
    env = os.environ.get("NODULE_EDGE_ONNX")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.fail(f"NODULE_EDGE_ONNX={env} does not exist")
        return path
    if BUNDLED_ONNX.is_file():
        return BUNDLED_ONNX
    pytest.skip(f"no ONNX model: set NODULE_EDGE_ONNX or export the bundle to {BUNDLED_ONNX}")


def _calibration_patches() -> np.ndarray:
    voi_dir = SHARED_DATA / "lidc_voi"
    if voi_dir.is_dir():
        from benches.cpu_engines import load_lidc_patches

        _, _, _, calibration = load_lidc_patches(voi_dir, REPO_ROOT / "cache", n_eval=0, n_calibration=32)
        return calibration
    return np.random.default_rng(0).random((8, 2, 64, 64, 64), dtype=np.float32)


@pytest.fixture(scope="session")
def int8_onnx(fp32_onnx, tmp_path_factory) -> Path:
    env = os.environ.get("NODULE_EDGE_INT8")
    if env:
        return Path(env)
    bundled = BUNDLED_ONNX.with_name("model.int8.onnx")
    if fp32_onnx == BUNDLED_ONNX and bundled.is_file():
        return bundled
    return build_cpu_engine(fp32_onnx, tmp_path_factory.mktemp("cpu_engine"), _calibration_patches())


@pytest.fixture(scope="session")
def bench_patches() -> np.ndarray:
    """Eight patch-like inputs (seeded): a bright blob on a noisy lung-window background."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 64)] * 3, indexing="ij"))
    blob = np.exp(-(grid**2).sum(0) / (2 * 0.25**2)).astype(np.float32)
    noise = rng.normal(0, 0.05, size=(8, 2, 64, 64, 64)).astype(np.float32)
    return np.clip(0.15 + 0.7 * blob + noise, 0, 1).astype(np.float32)


@pytest.fixture(scope="session")
def engines() -> dict[str, CpuEngine]:
    """Engines loaded once per candidate and shared by both batch sizes."""
    return {}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("candidate", CANDIDATES, ids=[c.name for c in CANDIDATES])
def test_cpu_engine(benchmark, candidate: Candidate, batch: int, fp32_onnx, int8_onnx, bench_patches, engines):
    """Latency of one candidate at one batch size (ms per call; per patch in extra_info)."""
    reason = candidate.unavailable_reason()
    if reason:
        pytest.skip(reason)
    if candidate.name not in engines:
        engines[candidate.name] = candidate.load(int8_onnx if candidate.artifact == "int8" else fp32_onnx)
    engine = engines[candidate.name]
    x = np.ascontiguousarray(bench_patches[:batch])
    benchmark.group = f"cpu engine, batch {batch}"
    benchmark.extra_info.update(
        {"candidate": candidate.name, "batch": batch, "backend": engine.backend, "precision": engine.precision}
    )
    benchmark.pedantic(engine.run, args=(x,), rounds=ROUNDS[batch], iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ms_per_patch_median"] = benchmark.stats.stats.median * 1000.0 / batch

"""Explanation cost: occlusion at its defaults against the Grad-CAM path, per nodule, same run.

The Grad-CAM path is the runtime's ordinary inference (the map comes with every answer), from a
LIDC VOI file to the outputs in memory. Occlusion is :func:`nodule_edge.runtime.occlusion.occlusion_map`
at its defaults on the same nodule with the default engine. Three real nodules by diameter
(small, median, large: the occlusion grid grows with the nodule box).
"""

from __future__ import annotations

import pytest

from benches.conftest import FULL, SHARED_DATA, engine_precision

ROUNDS = 5 if FULL else 3


@pytest.fixture(scope="module")
def inferer(bundle_dir):
    from nodule_edge.runtime import NoduleInferer

    return NoduleInferer(bundle_dir, top_k=0)


def _records():
    voi_dir = SHARED_DATA / "lidc_voi"
    if not (voi_dir / "manifest.csv").is_file():
        pytest.skip(f"LIDC VOIs not found at {voi_dir}")
    from nodule_edge.manifest import read_unsure_manifest

    records = sorted((r for r in read_unsure_manifest(voi_dir) if r.diameter_mm), key=lambda r: r.diameter_mm)
    return {
        "small": records[len(records) // 10],
        "median": records[len(records) // 2],
        "large": records[(9 * len(records)) // 10],
    }


@pytest.mark.parametrize("size", ["small", "median", "large"])
def test_gradcam_path(benchmark, inferer, size):
    """Inference with its Grad-CAM, VOI file to outputs (the reference of the ratio)."""
    rec = _records()[size]
    benchmark.pedantic(
        lambda: inferer.infer(rec.image_path, worlds=[rec.center_lps_mm]), rounds=ROUNDS, warmup_rounds=1
    )
    benchmark.extra_info["diameter_mm"] = rec.diameter_mm


@pytest.mark.parametrize("size", ["small", "median", "large"])
def test_occlusion(benchmark, inferer, size):
    """Occlusion at its defaults on the same nodule (its own first pass included)."""
    from nodule_edge.runtime.occlusion import occlusion_map

    rec = _records()[size]
    nodule = inferer.infer(rec.image_path, worlds=[rec.center_lps_mm]).nodules[0]
    result = benchmark.pedantic(
        lambda: occlusion_map(inferer.engine.run, nodule.patch, inferer.spec), rounds=ROUNDS, warmup_rounds=1
    )
    benchmark.extra_info.update(
        {
            # Occlusion runs batches through cpu-fast, whose precision the CPU decides (bf16 where
            # native, else f32): its ratio to the one-pass Grad-CAM path differs by precision
            # (about 12-17 bf16 on the AMX Xeon, 18-29 f32 on the AVX2 EPYC), so the gate keeps
            # a baseline per precision (benches/ratios.py).
            "precision": engine_precision(inferer.engine),
            "diameter_mm": rec.diameter_mm,
            "block": result.block,
            "stride": result.stride,
            "forward_passes": result.forward_passes,
        }
    )

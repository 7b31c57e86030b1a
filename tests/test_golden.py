"""Golden end-to-end regression: the shipped bundle on fixed inputs gives the recorded answers.

The goldens were produced by ``python tests/golden/regenerate.py`` with the shipped bundle and the
fp32 ONNX Runtime backend. A change that moves them is either a bug or a new model: regenerate
on purpose, and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def _load(name: str) -> dict:
    path = GOLDEN / name
    if not path.is_file():
        pytest.skip(f"golden file {path} missing")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def inferer():
    from nodule_edge.runtime import NoduleInferer
    from nodule_edge.runtime.bundle import default_bundle_path

    if not (default_bundle_path() / "manifest.json").is_file():
        pytest.skip("no shipped bundle")
    return NoduleInferer(backend="cpu")


def _compare(report_nodule, golden_nodule):
    assert report_nodule.malignancy_probability == pytest.approx(golden_nodule["malignancy_probability"], abs=2e-3)
    for name, value in golden_nodule["attributes"].items():
        assert report_nodule.attributes[name] == pytest.approx(value, abs=1e-2), name
    assert report_nodule.volume_mm3 == pytest.approx(golden_nodule["volume_mm3"], rel=0.03, abs=2.0)
    assert report_nodule.prediction.nodule_attention == pytest.approx(golden_nodule["nodule_attention"], abs=5e-3)
    assert report_nodule.prediction.trustworthy == golden_nodule["trustworthy"]
    assert [n.id for n in report_nodule.prediction.similar[:5]] == golden_nodule["similar_top5"]


def test_demo_study_golden(inferer, tmp_path):
    from nodule_edge.runtime.demo import write_demo_study

    golden = _load("demo.json")
    study, voxel = write_demo_study(tmp_path / "study")
    result = inferer.infer(study, voxels=[voxel])
    _compare(result.nodules[0], golden)


def test_real_voi_golden(inferer, lidc_voi_dir):
    from nodule_edge.manifest import read_unsure_manifest

    golden = _load("lidc_voi.json")
    records = {r.id: r for r in read_unsure_manifest(lidc_voi_dir)}
    for voi_id, expected in golden.items():
        rec = records[voi_id]
        result = inferer.infer(rec.image_path, worlds=[rec.center_lps_mm])
        _compare(result.nodules[0], expected)

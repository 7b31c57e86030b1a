"""The CPU engine comparison harness (``benches/cpu_engines.py``): report shape, INT8 build, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from benches.cpu_engines import compare_engines
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import EngineError
from nodule_edge.export.int8 import INT8_FILENAME, build_cpu_engine
from tests.export.conv_onnx import blob_patches, conv_model


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    onnx.save(conv_model(), str(path))
    return path


@pytest.fixture(scope="module")
def int8_path(fp32_path, tmp_path_factory) -> Path:
    return build_cpu_engine(fp32_path, tmp_path_factory.mktemp("engine"), blob_patches(8, seed=1))


@pytest.fixture(scope="module")
def eval_patches() -> np.ndarray:
    return blob_patches(6, seed=2)  # disjoint from the calibration seed


def test_compare_engines_report(fp32_path, int8_path, eval_patches):
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 0, 1, -1, 1])
    ratings = rng.uniform(1, 5, size=(6, len(ATTRIBUTE_NAMES)))
    ratings[2] = np.nan
    report = compare_engines(
        fp32_path,
        eval_patches,
        labels=labels,
        ratings=ratings,
        candidates=["ort-int8", "ortov-ep-int8"],
        int8_path=int8_path,
        batch=3,
        timing_rounds=1,
    )
    ref, q = report["candidates"]["ort-fp32"], report["candidates"]["ort-int8"]
    assert report["n"] == 6 and report["reference"] == "ort-fp32"
    assert ref["auc_delta"] == 0 and ref["attribute_mae_delta"] == 0 and ref["cam_pearson_min"] == pytest.approx(1.0)
    assert q["cam_pearson_min"] >= 0.99
    assert abs(q["attribute_mae_delta"]) <= 0.05
    assert q["b1_ratio"] > 0 and ref["b3_ratio"] == pytest.approx(1.0)
    if "ortov-ep-int8" in report["skipped"]:
        assert "onnxruntime-openvino" in report["skipped"]["ortov-ep-int8"]


def test_compare_builds_int8_when_not_given(fp32_path, eval_patches, tmp_path):
    report = compare_engines(
        fp32_path,
        eval_patches[:2],
        calibration_patches=blob_patches(2, seed=5),
        candidates=["ort-int8"],
        work_dir=tmp_path,
        batch=2,
    )
    assert (tmp_path / INT8_FILENAME).is_file()
    assert "auc" not in report["candidates"]["ort-int8"]  # no labels given


def test_unknown_candidate_is_refused(int8_path):
    with pytest.raises(EngineError, match="unknown CPU engine candidates"):
        compare_engines(int8_path, np.zeros((1, 2, 64, 64, 64), np.float32), candidates=["gpu-magic"])

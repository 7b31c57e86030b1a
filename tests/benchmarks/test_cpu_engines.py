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


def test_each_engine_is_compared_on_the_runtime_path(eval_patches):
    """A nodule-bounded model answers from its second pass, on the cube its first pass bounded."""
    import json

    from benches.cpu_engines import _run_all
    from nodule_edge.patch import DEFAULT_PATCH_SPEC

    size = DEFAULT_PATCH_SPEC.size
    z, y, x = np.mgrid[:size, :size, :size] - size / 2 + 0.5
    sphere = ((z**2 + y**2 + x**2) <= 6**2).astype(np.float32)  # a 3 mm nodule at the centre

    class RecordingEngine:
        metadata = {
            "patch_spec": DEFAULT_PATCH_SPEC.to_json(),
            "attribute_names": json.dumps(list(ATTRIBUTE_NAMES)),
            "output_names": json.dumps(["segmentation", "malignancy_probability"]),
            "input_name": "patch",
        }

        def __init__(self) -> None:
            self.inputs: list[np.ndarray] = []
            self.segmented: list[np.ndarray] = []

        def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
            self.inputs.append(patches.copy())
            n = len(patches)
            return {"segmentation": np.repeat(sphere[None], n, 0), "malignancy_probability": patches.mean((1, 2, 3, 4))}

        def segment(self, patches: np.ndarray) -> np.ndarray:
            self.segmented.append(patches.copy())
            return np.repeat(sphere[None], len(patches), 0)

    engine = RecordingEngine()
    patches = eval_patches.astype(np.float32)
    outputs = _run_all(engine, patches, batch=3)
    # Two batches: each a first pass through the engine's segmentation pass, then a full pass.
    assert len(engine.segmented) == 2 and len(engine.inputs) == 2
    first, second = engine.segmented[0], engine.inputs[0]
    np.testing.assert_array_equal(first, patches[:3])
    # The second pass read the bounded cube (air beyond the box), and its answer is reported.
    assert (second != first).any() and (second[:, :, 0] == second[0, 0, 0, 0, 0]).all()
    np.testing.assert_allclose(outputs["malignancy_probability"][:3], second.mean((1, 2, 3, 4)))

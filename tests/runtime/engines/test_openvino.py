"""OpenVINO and the CPU loader: the INT8 artifact on OpenVINO, load errors, telemetry masking."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from nodule_edge.errors import EngineError
from nodule_edge.export.int8 import build_cpu_engine
from nodule_edge.patch import DEFAULT_PATCH_SPEC
from nodule_edge.runtime.engines import openvino as ov_mod
from nodule_edge.runtime.engines.openvino import load_cpu_engine, openvino_available
from tests.export.conv_onnx import OUTPUTS, assert_close, blob_patches, conv_model


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    onnx.save(conv_model(), str(path))
    return path


@pytest.fixture(scope="module")
def int8_path(fp32_path, tmp_path_factory) -> Path:
    return build_cpu_engine(fp32_path, tmp_path_factory.mktemp("engine"), blob_patches(8, seed=1))


@pytest.mark.skipif(not openvino_available(), reason="openvino not installed (pip install 'nodule-edge[openvino]')")
def test_openvino_runs_the_same_artifact(fp32_path, int8_path):
    eval_patches = blob_patches(6, seed=2)
    engine = load_cpu_engine(int8_path, backend="openvino")
    assert engine.backend == "openvino"
    assert engine.metadata["cpu_engine"] == "int8-qdq"  # ONNX metadata reaches OpenVINO too
    assert engine.metadata["patch_spec"] == DEFAULT_PATCH_SPEC.to_json()
    out = engine.run(eval_patches)
    assert tuple(out) == OUTPUTS
    assert_close(out, load_cpu_engine(fp32_path, backend="onnxruntime").run(eval_patches))
    # bf16 for the fp32 remainder of the graph.
    out_bf16 = load_cpu_engine(int8_path, backend="openvino", precision="bf16").run(eval_patches[:1])
    assert np.isfinite(out_bf16["saliency"]).all()


def test_load_errors(tmp_path, int8_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_cpu_engine(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EngineError, match="cannot load"):
        load_cpu_engine(bad, backend="onnxruntime")
    with pytest.raises(EngineError, match="unknown CPU backend"):
        load_cpu_engine(int8_path, backend="tpu")  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="shape"):
        load_cpu_engine(int8_path, backend="onnxruntime").run(np.zeros((2, 64, 64, 64), np.float32))
    with pytest.raises(EngineError, match="unknown precision"):
        load_cpu_engine(int8_path, precision="fp8")  # type: ignore[arg-type]


def test_openvino_is_imported_with_its_telemetry_masked(monkeypatch):
    """The mask is in place while ``openvino`` imports, and lifted afterwards (README, Engines)."""
    seen = {}

    def fake_require(module, extra):
        seen["module"], seen["telemetry"] = module, sys.modules.get("openvino_telemetry", "absent")
        return object()

    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    monkeypatch.delitem(sys.modules, "openvino_telemetry", raising=False)
    monkeypatch.setattr(ov_mod, "require", fake_require)
    ov_mod.import_openvino()
    assert seen == {"module": "openvino", "telemetry": None}  # None: `import openvino_telemetry` fails
    assert "openvino_telemetry" not in sys.modules

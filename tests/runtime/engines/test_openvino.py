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


@pytest.mark.skipif(not openvino_available(), reason="openvino not installed (pip install 'nodule-edge[openvino]')")
def test_the_segmentation_pass_is_the_full_graphs_segmentation(tiny_bundle):
    """The runtime's first pass runs the exported graph cut to ``segmentation`` (README, Performance)."""
    from nodule_edge.runtime import load_bundle
    from nodule_edge.runtime.engines import create_engine

    x = np.random.default_rng(3).random((2, 2, 64, 64, 64), dtype=np.float32)
    exact = load_cpu_engine(tiny_bundle / "model.onnx", backend="openvino", precision="f32", segmentation_pass=True)
    assert exact._segment is not None
    full = exact.run(x)["segmentation"]
    np.testing.assert_allclose(exact.segment(x), full, atol=1e-5)
    # Without the cut, segment() runs the whole graph.
    plain = load_cpu_engine(tiny_bundle / "model.onnx", backend="openvino", precision="f32")
    assert plain._segment is None
    np.testing.assert_allclose(plain.segment(x), full, atol=1e-5)
    # The shipped engine compiles the cut in bf16, like its full graph, and checks the shape.
    fast = create_engine(load_bundle(tiny_bundle), "cpu-fast")
    np.testing.assert_allclose(fast.segment(x), fast.run(x)["segmentation"], atol=0.03)
    with pytest.raises(EngineError, match="expects patches of shape"):
        fast.segment(x[:, :1])


def test_without_a_segmentation_cut_the_engine_runs_the_whole_graph(fp32_path):
    """ONNX Runtime computes every node whatever outputs are fetched, so it keeps the default."""
    engine = load_cpu_engine(fp32_path, backend="onnxruntime", segmentation_pass=True)
    x = blob_patches(2, seed=4)
    np.testing.assert_array_equal(engine.segment(x), engine.run(x)["segmentation"])

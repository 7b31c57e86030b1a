"""The INT8 CPU artifact: QDQ build, metadata, closeness to fp32, errors.

The synthetic model (``tests/export/conv_onnx.py``) has the real interface and the real model's
shape of work in miniature. Loading the artifact on OpenVINO is tested with the runtime's engines
(``tests/runtime/engines/test_openvino.py``); comparing candidates with the benchmark harness
(``tests/benchmarks/test_cpu_engines.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto

from nodule_edge.errors import EngineError
from nodule_edge.export.int8 import INT8_FILENAME, build_cpu_engine, conv_nodes_to_exclude
from nodule_edge.runtime.engines.openvino import load_cpu_engine
from tests.export.conv_onnx import OUTPUTS, assert_close, blob_patches, conv_model


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


def test_build_writes_int8_qdq_with_metadata(fp32_path, int8_path):
    assert int8_path.name == INT8_FILENAME
    assert sorted(p.name for p in int8_path.parent.iterdir()) == [INT8_FILENAME]  # no temp leftovers
    model = onnx.load(str(int8_path))
    meta = {p.key: p.value for p in model.metadata_props}
    source = {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props}
    for key, value in source.items():
        assert meta[key] == value
    assert meta["cpu_engine"] == "int8-qdq"
    info = json.loads(meta["quantization"])
    assert info["calibration_patches"] == 8
    assert sorted(info["fp32_nodes"]) == ["map_conv", "stem_conv"]
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # The 16→16 convolution reads dequantised int8 weights; the stem reads its fp32 initialiser.
    weight_inputs = {n.name: n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    int8_weights = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT8}
    producers = {o: n for n in model.graph.node for o in n.output}
    block_w = producers[weight_inputs["block_conv"]]
    assert block_w.op_type == "DequantizeLinear" and block_w.input[0] in int8_weights
    assert weight_inputs["stem_conv"] == "w_stem"


def test_conv_exclusion_rule():
    assert sorted(conv_nodes_to_exclude(conv_model())) == ["map_conv", "stem_conv"]
    assert conv_nodes_to_exclude(conv_model(), min_channels=1) == []


def test_int8_outputs_close_to_fp32(fp32_path, int8_path, eval_patches):
    ref = load_cpu_engine(fp32_path, backend="onnxruntime").run(eval_patches)
    engine = load_cpu_engine(int8_path, backend="onnxruntime")
    assert engine.output_names == OUTPUTS
    assert engine.metadata["model_version"] == "tiny-conv-test"
    assert_close(engine.run(eval_patches), ref)


def test_batch_and_single_agree(int8_path, eval_patches):
    engine = load_cpu_engine(int8_path, backend="onnxruntime")
    batch = engine.run(eval_patches[:3])
    single = engine.run(eval_patches[1:2])
    np.testing.assert_allclose(single["saliency"][0], batch["saliency"][1], atol=1e-5)


def test_build_errors(fp32_path, tmp_path):
    good = blob_patches(1, seed=4)
    with pytest.raises(EngineError, match="calibration patches"):
        build_cpu_engine(fp32_path, tmp_path, None)
    with pytest.raises(EngineError, match="NaN"):
        build_cpu_engine(fp32_path, tmp_path, np.full_like(good, np.nan))
    with pytest.raises(EngineError, match="shape"):
        build_cpu_engine(fp32_path, tmp_path, good[0])
    with pytest.raises(EngineError, match="does not exist"):
        build_cpu_engine(tmp_path / "missing.onnx", tmp_path, good)
    with pytest.raises(EngineError, match="build method"):
        build_cpu_engine(fp32_path, tmp_path, good, method="fp16")  # type: ignore[arg-type]
    assert not (tmp_path / INT8_FILENAME).exists()

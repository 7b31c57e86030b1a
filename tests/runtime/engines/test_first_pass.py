"""A bundle's first-pass model (a box net): every CPU engine runs it as ``segment``, and refuses one
that does not belong to the model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from nodule_edge.errors import BundleError
from nodule_edge.patch import DEFAULT_PATCH_SPEC
from nodule_edge.runtime.bundle import load_bundle
from nodule_edge.runtime.engines import create_engine
from nodule_edge.runtime.engines.base import FIRST_PASS_FORMAT, ModelMetadata, check_first_pass
from nodule_edge.runtime.engines.openvino import openvino_available
from nodule_edge.train.first_pass import box_net_segmenter, load_box_net


def _patches(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.3, (n, 2, 64, 64, 64)).astype(np.float32)
    z, y, xx = np.mgrid[:64, :64, :64]
    x[:, :, (z - 32) ** 2 + (y - 30) ** 2 + (xx - 33) ** 2 < 49] += 0.6
    return x


@pytest.fixture(scope="module")
def box_net_reference(tiny_bundle_with_first_pass: Path) -> np.ndarray:
    net, _ = load_box_net(tiny_bundle_with_first_pass.parent / "box_net.safetensors")
    return box_net_segmenter(net)(_patches())


def test_the_bundle_lists_and_describes_its_first_pass(tiny_bundle_with_first_pass: Path) -> None:
    bundle = load_bundle(tiny_bundle_with_first_pass)
    assert bundle.path("first_pass") == tiny_bundle_with_first_pass / "first_pass.onnx"
    assert bundle.manifest["first_pass"] == {"network": "box_net", "artifact": "first_pass.onnx"}
    proto = onnx.load(str(bundle.path("first_pass")))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["format"] == FIRST_PASS_FORMAT
    assert meta["model_version"] == bundle.model_version
    assert [o.name for o in proto.graph.output] == ["segmentation"]
    assert "Resize" not in {n.op_type for n in proto.graph.node}  # the export's rewrites ran


@pytest.mark.parametrize(
    ("backend", "atol"),
    [
        ("cpu", 1e-5),
        pytest.param(
            "cpu-fast",
            0.03,  # bf16 on OpenVINO
            marks=pytest.mark.skipif(not openvino_available(), reason="openvino not installed"),
        ),
    ],
)
def test_segment_runs_the_box_net_not_the_models_segmentation(
    tiny_bundle_with_first_pass: Path, box_net_reference: np.ndarray, backend: str, atol: float
) -> None:
    engine = create_engine(load_bundle(tiny_bundle_with_first_pass), backend)
    x = _patches()
    first = engine.segment(x)
    assert first.shape == (2, 64, 64, 64)
    np.testing.assert_allclose(first, box_net_reference, atol=atol)
    own = engine.run(x)["segmentation"]
    assert np.abs(own - box_net_reference).max() > 10 * atol


def test_a_bundle_without_a_first_pass_segments_with_the_model(tiny_bundle: Path) -> None:
    engine = create_engine(load_bundle(tiny_bundle), "cpu")
    x = _patches(1)
    np.testing.assert_array_equal(engine.segment(x), engine.run(x)["segmentation"])


def _metadata() -> ModelMetadata:
    return ModelMetadata(DEFAULT_PATCH_SPEC, ("a",), ("segmentation",), "patch", "1.0+epoch12", {})


def _props(**changes: str) -> dict[str, str]:
    props = {
        "format": FIRST_PASS_FORMAT,
        "patch_spec": DEFAULT_PATCH_SPEC.to_json(),
        "output_names": json.dumps(["segmentation"]),
        "model_version": "1.0+epoch12",
    }
    return {**props, **changes}


def test_first_pass_metadata_must_belong_to_the_model() -> None:
    check_first_pass(_metadata(), _props(), Path("first_pass.onnx"))
    cases = {
        "is not a first-pass model": _props(format="nodule-edge-onnx-v1"),
        "belongs to model version '0.9'": _props(model_version="0.9"),
        "reads another patch": _props(patch_spec=replace(DEFAULT_PATCH_SPEC, spacing_mm=1.0).to_json()),
        "must output 'segmentation' alone": _props(output_names=json.dumps(["segmentation", "saliency"])),
        "malformed metadata": _props(patch_spec="{not json"),
    }
    for message, props in cases.items():
        with pytest.raises(BundleError, match=message):
            check_first_pass(_metadata(), props, Path("first_pass.onnx"))

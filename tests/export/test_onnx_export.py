"""ONNX export: parity with PyTorch, in-graph Grad-CAM vs autograd, metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from nodule_edge.export.onnx_export import OUTPUT_NAMES, build_export_module, export_onnx
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec
from nodule_edge.train.model import CollaborativeNet, ModelConfig
from nodule_edge.train.trainer import save_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(3)
    model = CollaborativeNet(ModelConfig()).eval()
    # Non-trivial heads: an untrained model's probability sits near 0.5 and hides CAM errors.
    # The shipped model carries the attribute skip (added by the head step): export it too.
    model.add_attribute_skip()
    with torch.no_grad():
        model.cls.weight.mul_(20)
        model.attr_skip.weight.normal_(0, 0.1)
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(
        root / "model.safetensors",
        model,
        {"epoch": 1, "config_sha256": "abc", "patch_spec": DEFAULT_PATCH_SPEC.to_json()},
    )
    result = export_onnx(root / "model.safetensors", root / "model.onnx", extra_metadata={"metrics": {"auc": 0.5}})
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    return model, result, session


def _autograd_cam(model: CollaborativeNet, x: torch.Tensor) -> torch.Tensor:
    """Reference Grad-CAM with torch.autograd at the fusion output (upsampled like the export).

    Computed in float64 so that ∂p/∂F does not underflow for confident predictions.
    """
    import copy

    model = copy.deepcopy(model).double()
    x = x.double()
    out = model(x)
    feats = out.features
    grads = torch.autograd.grad(out.malignancy_probability.sum(), feats)[0]
    weights = grads.mean(dim=(2, 3, 4), keepdim=True)
    p = out.malignancy_probability.detach().view(-1, 1, 1, 1, 1)
    raw = (p - 0.5) * (weights * feats).sum(1, keepdim=True)
    # Plain min-max (no clamp): the raw autograd map is tiny (p(1-p)/N) but exact in float64.
    low = raw.amin(dim=(1, 2, 3, 4), keepdim=True)
    high = raw.amax(dim=(1, 2, 3, 4), keepdim=True)
    cam = (raw - low) / (high - low)
    return (
        torch.nn.functional.interpolate(cam, size=(64, 64, 64), mode="trilinear", align_corners=False)[:, 0]
        .clamp(0, 1)
        .float()
    )


def _patches(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 2, 64, 64, 64), dtype=np.float32) * 0.3
    # A bright blob in the centre so the CAM has structure to find.
    z, y, xx = np.mgrid[:64, :64, :64]
    blob = ((z - 32) ** 2 + (y - 30) ** 2 + (xx - 34) ** 2) < 64
    x[:, :, blob] += 0.6
    return x


def test_outputs_match_pytorch_fp32(exported):
    model, result, session = exported
    x = _patches(0, 3)
    onnx_out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"patch": x})))
    with torch.no_grad():
        ref = build_export_module(model)(torch.from_numpy(x))
    assert tuple(onnx_out) == OUTPUT_NAMES
    for name, expected in zip(OUTPUT_NAMES, ref):
        np.testing.assert_allclose(onnx_out[name], expected.numpy(), atol=1e-4, err_msg=name)


def test_graph_cam_matches_autograd_gradcam(exported):
    model, _, session = exported
    x = _patches(1, 2)
    cam = session.run(["saliency"], {"patch": x})[0]
    ref = _autograd_cam(model, torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(cam, ref, atol=1e-4)
    assert cam.min() >= 0 and cam.max() <= 1


def test_dynamic_batch(exported):
    _, _, session = exported
    for n in (1, 5):
        prob = session.run(["malignancy_probability"], {"patch": _patches(2, n)})[0]
        assert prob.shape == (n,)


def test_graph_has_no_autograd_ops(exported):
    import onnx

    _, result, _ = exported
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert not any("Grad" in op for op in ops), ops
    # The decoder's and the Grad-CAM's trilinear upsamplings are matrices (graph_rewrites).
    assert "Resize" not in ops, ops


def test_metadata_is_self_describing(exported):
    _, result, session = exported
    meta = session.get_modelmeta().custom_metadata_map
    assert PatchSpec.from_json(meta["patch_spec"]) == DEFAULT_PATCH_SPEC
    assert json.loads(meta["attribute_names"])[0] == "subtlety"
    assert json.loads(meta["output_names"]) == list(OUTPUT_NAMES)
    assert json.loads(meta["metrics"]) == {"auc": 0.5}
    assert meta["config_sha256"] == "abc"
    assert len(meta["checkpoint_sha256"]) == 64


def test_a_checkpoint_from_before_the_nodule_box_exports_a_whole_cube_model(tmp_path):
    from nodule_edge.train.model import LEGACY_MODEL_CONFIG

    torch.manual_seed(0)
    model = CollaborativeNet(ModelConfig(**LEGACY_MODEL_CONFIG)).eval()
    save_checkpoint(tmp_path / "old.safetensors", model, {"epoch": 1})
    result = export_onnx(tmp_path / "old.safetensors", tmp_path / "old.onnx")
    spec = PatchSpec.from_json(result.metadata["patch_spec"])
    assert spec.nodule_box is None and spec.size == DEFAULT_PATCH_SPEC.size
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    seg = session.run(["segmentation"], {"patch": _patches(4, 1)})[0]
    assert seg.shape == (1, 64, 64, 64)  # the 16³ head, upsampled in the graph


def test_real_patch_parity(exported, lidc_voi_dir):
    from nodule_edge.manifest import read_unsure_manifest
    from nodule_edge.train.data import build_patch_cache

    model, _, session = exported
    records = read_unsure_manifest(lidc_voi_dir)[:2]
    x = build_patch_cache(records).images.astype(np.float32)
    onnx_out = session.run(None, {"patch": x})
    with torch.no_grad():
        ref = build_export_module(model)(torch.from_numpy(x))
    for name, got, expected in zip(OUTPUT_NAMES, onnx_out, ref):
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(
        session.run(["saliency"], {"patch": x})[0],
        _autograd_cam(model, torch.from_numpy(x)).detach().numpy(),
        atol=1e-4,
    )

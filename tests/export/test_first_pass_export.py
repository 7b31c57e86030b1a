"""``nodule-edge export`` with a box net: the bundle and the Triton repository carry the first pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner

from nodule_edge.cli import main
from nodule_edge.patch import DEFAULT_PATCH_SPEC
from nodule_edge.train.first_pass import box_net_segmenter, save_box_net
from nodule_edge.train.model import BoxNet, BoxNetConfig, CollaborativeNet
from nodule_edge.train.trainer import save_checkpoint


def test_export_writes_the_first_pass_into_the_bundle_and_the_triton_repository(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "ckpt.safetensors", CollaborativeNet(), {"epoch": 3, "patch_spec": DEFAULT_PATCH_SPEC.to_json()}
    )
    net = BoxNet(BoxNetConfig(widths=(4, 8, 8, 8))).eval()
    save_box_net(tmp_path / "box_net.safetensors", net, {})
    args = [
        "export",
        str(tmp_path / "ckpt.safetensors"),
        "--out",
        str(tmp_path / "bundle"),
        "--no-cpu-engine",
        "--first-pass",
        str(tmp_path / "box_net.safetensors"),
        "--triton",
        str(tmp_path / "triton"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    first_pass = tmp_path / "bundle" / "first_pass.onnx"
    x = np.random.default_rng(0).random((2, 2, 64, 64, 64), dtype=np.float32)
    exported = ort.InferenceSession(str(first_pass), providers=["CPUExecutionProvider"]).run(None, {"patch": x})[0]
    np.testing.assert_allclose(exported, box_net_segmenter(net)(x), atol=1e-5)
    for name in ("nodule_edge", "nodule_edge_first_pass"):
        assert (tmp_path / "triton" / name / "config.pbtxt").is_file(), name
        assert (tmp_path / "triton" / name / "1" / "model.onnx").is_file(), name
    assert 'name: "segmentation"' in (tmp_path / "triton" / "nodule_edge_first_pass" / "config.pbtxt").read_text()

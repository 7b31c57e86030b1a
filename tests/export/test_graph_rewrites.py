"""Graph rewrites of the exported model: same outputs, fewer slow nodes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nodule_edge.export.graph_rewrites import linear_interpolation_matrix, trilinear_resize_as_matmul


@pytest.mark.parametrize(("n_in", "n_out"), [(16, 64), (16, 32), (5, 7), (7, 3), (4, 4)])
def test_interpolation_matrix_is_pytorchs_linear_resize(n_in: int, n_out: int) -> None:
    eye = torch.eye(n_in)[:, None, :]  # n_in one-hot signals of length n_in
    expected = torch.nn.functional.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0]
    np.testing.assert_allclose(linear_interpolation_matrix(n_in, n_out), expected.numpy(), atol=1e-6)


class _Resizes(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        up = torch.nn.functional.interpolate(x, size=(12, 16, 20), mode="trilinear", align_corners=False)
        down = torch.nn.functional.interpolate(x, size=(3, 4, 5), mode="trilinear", align_corners=False)
        nearest = torch.nn.functional.interpolate(x, size=(12, 16, 20), mode="nearest")
        return up * 2, down, nearest


@pytest.fixture(scope="module")
def resize_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewrite") / "resizes.onnx"
    x = torch.rand(2, 3, 6, 8, 10)
    torch.onnx.export(
        _Resizes().eval(),
        (x,),
        str(path),
        input_names=["x"],
        output_names=["up", "down", "nearest"],
        opset_version=18,
        dynamo=True,
        external_data=False,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
    )
    return onnx.load(str(path))


def test_linear_resizes_become_matmuls_with_the_same_outputs(resize_graph) -> None:
    before = resize_graph.SerializeToString()
    rewritten = trilinear_resize_as_matmul(onnx.load_from_string(before))
    onnx.checker.check_model(rewritten)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Resize") == 1  # the nearest-neighbour resize is left alone
    assert ops.count("MatMul") == 6
    x = np.random.default_rng(0).random((3, 3, 6, 8, 10), dtype=np.float32)  # another batch size
    old = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    new = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(old, new, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_a_resize_without_static_sizes_stays(resize_graph) -> None:
    model = onnx.load_from_string(resize_graph.SerializeToString())
    for value in (*model.graph.output, *model.graph.value_info):
        value.type.tensor_type.ClearField("shape")
    # Without recorded shapes, inference cannot know the resized sizes of a computed "sizes" input.
    model.graph.input[0].type.tensor_type.ClearField("shape")
    rewritten = trilinear_resize_as_matmul(model)
    assert [n.op_type for n in rewritten.graph.node].count("Resize") == 3

"""A tiny ONNX model with the real nodule-edge interface, built with ``onnx.helper`` (no torch).

Input ``patch`` float32 ``[batch, 2, 64, 64, 64]``; outputs ``malignancy_probability [batch]``,
``attributes [batch, 6]``, ``segmentation`` and ``saliency [batch, 64, 64, 64]``,
``nodule_attention`` and ``background_attention [batch]``, ``embedding [batch, 64]``, plus the
metadata_props keys the runtime reads. It contains an ``InstanceNormalization`` node (what the
exporter turns a GroupNorm into at opset 18) so the FP32 layer selection has something to keep.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.patch import DEFAULT_PATCH_SPEC

__all__ = ["OUTPUT_SHAPES", "finish_model", "tiny_model", "write_tiny_onnx"]

EMBEDDING_DIM = 64
OUTPUT_SHAPES: dict[str, list[int | str]] = {
    "malignancy_probability": ["batch"],
    "attributes": ["batch", len(ATTRIBUTE_NAMES)],
    "segmentation": ["batch", 64, 64, 64],
    "saliency": ["batch", 64, 64, 64],
    "nodule_attention": ["batch"],
    "background_attention": ["batch"],
    "embedding": ["batch", EMBEDDING_DIM],
}


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name=name)


def tiny_model(seed: int = 0) -> onnx.ModelProto:
    """Build the model (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    inits = [
        _const("axes_all", np.array([1, 2, 3, 4], dtype=np.int64)),
        _const("axes_space", np.array([2, 3, 4], dtype=np.int64)),
        _const("axes_channel", np.array([1], dtype=np.int64)),
        _const("axes_map", np.array([1, 2, 3], dtype=np.int64)),
        _const("in_scale", np.array([1.0, 0.5], dtype=np.float32)),
        _const("in_bias", np.array([0.0, 0.1], dtype=np.float32)),
        _const("w_attr", rng.normal(size=(2, len(ATTRIBUTE_NAMES))).astype(np.float32)),
        _const("b_attr", np.full(len(ATTRIBUTE_NAMES), 3.0, dtype=np.float32)),
        _const("w_emb", rng.normal(size=(2, EMBEDDING_DIM)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["patch", "axes_all"], ["mean_all"], keepdims=0, name="node_ReduceMean_0"),
        helper.make_node("Sigmoid", ["mean_all"], ["malignancy_probability"], name="node_Sigmoid_1"),
        helper.make_node("ReduceMean", ["patch", "axes_space"], ["pooled"], keepdims=0, name="node_ReduceMean_2"),
        helper.make_node("MatMul", ["pooled", "w_attr"], ["attr_mm"], name="node_MatMul_3"),
        helper.make_node("Add", ["attr_mm", "b_attr"], ["attributes"], name="node_Add_4"),
        helper.make_node(
            "InstanceNormalization",
            ["patch", "in_scale", "in_bias"],
            ["normed"],
            epsilon=1e-5,
            name="node_InstanceNormalization_5",
        ),
        helper.make_node("ReduceMean", ["normed", "axes_channel"], ["seg_logit"], keepdims=0, name="node_ReduceMean_6"),
        helper.make_node("Sigmoid", ["seg_logit"], ["segmentation"], name="node_Sigmoid_7"),
        helper.make_node("ReduceMax", ["patch", "axes_channel"], ["saliency"], keepdims=0, name="node_ReduceMax_8"),
        helper.make_node(
            "ReduceMean", ["segmentation", "axes_map"], ["nodule_attention"], keepdims=0, name="node_ReduceMean_9"
        ),
        helper.make_node(
            "ReduceMean", ["saliency", "axes_map"], ["background_attention"], keepdims=0, name="node_ReduceMean_10"
        ),
        helper.make_node("MatMul", ["pooled", "w_emb"], ["emb_mm"], name="node_MatMul_11"),
        helper.make_node("Relu", ["emb_mm"], ["embedding"], name="node_Relu_12"),
    ]
    return finish_model(nodes, inits, OUTPUT_SHAPES, "tiny_nodule_edge", "tiny-test")


def write_tiny_onnx(path: str | Path, seed: int = 0) -> Path:
    """Write the model to ``path`` and return it."""
    path = Path(path)
    onnx.save(tiny_model(seed), str(path))
    return path


def finish_model(nodes: list, inits: list, output_shapes: dict, name: str, version: str) -> onnx.ModelProto:
    """Wrap nodes into an opset-18 model with the ``patch`` input and nodule-edge metadata, checked."""
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[helper.make_tensor_value_info("patch", TensorProto.FLOAT, ["batch", 2, 64, 64, 64])],
        outputs=[helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in output_shapes.items()],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="nodule-edge-tests")
    model.ir_version = 9
    helper.set_model_props(
        model,
        {
            "format": "nodule-edge-onnx-v1",
            "input_name": "patch",
            "patch_spec": DEFAULT_PATCH_SPEC.to_json(),
            "attribute_names": json.dumps(list(ATTRIBUTE_NAMES)),
            "output_names": json.dumps(list(output_shapes)),
            "model_version": version,
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model

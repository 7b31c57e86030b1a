"""Rewrites of the exported ONNX graph that keep its outputs and make the CPU engines faster.

Each rewrite takes and returns an ``onnx.ModelProto``; :func:`nodule_edge.export.onnx_export.export_onnx`
applies :data:`REWRITES` in order before it writes the file. Tests compare the outputs before and
after (``tests/export/test_graph_rewrites.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from nodule_edge.errors import require

__all__ = ["REWRITES", "linear_interpolation_matrix", "trilinear_resize_as_matmul"]

log = logging.getLogger(__name__)


def linear_interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_in, n_out]`` weights of 1-D linear resizing with half-pixel centres, clamped at the edges.

    ONNX ``Resize`` (``mode="linear"``, ``coordinate_transformation_mode="half_pixel"``) and
    PyTorch's ``interpolate(..., align_corners=False)`` resize this way: output ``i`` samples the
    input at ``(i + 0.5) · n_in / n_out − 0.5``, clamped to ``[0, n_in − 1]``.
    """
    matrix = np.zeros((n_in, n_out), np.float32)
    for i in range(n_out):
        x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        low = int(np.floor(x))
        weight = x - low
        matrix[low, i] += 1.0 - weight
        matrix[min(low + 1, n_in - 1), i] += weight
    return matrix


def _static_shape(shapes: dict[str, Any], name: str) -> list[int | str] | None:
    value = shapes.get(name)
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def trilinear_resize_as_matmul(model: Any) -> Any:
    """Replace every 3-D linear ``Resize`` with static spatial sizes by three ``MatMul``\\ s.

    Trilinear resizing is separable: one interpolation matrix per axis, applied along the last
    axis with a ``MatMul`` and brought there by a ``Transpose``. OpenVINO's CPU ``Interpolate``
    was the slowest node of the graph for its work: the Grad-CAM's 16³ → 64³ upsampling took 5.2
    of 44 ms of a one-thread pass, and both of the graph's resizes as matrices make a ``cpu-fast``
    pass 8 % faster (docs/measurements/runtime_path_latency.md). The outputs agree to float rounding.
    Other ``Resize`` nodes (other modes, coordinate rules, antialiasing, unknown sizes) stay.
    """
    onnx = require("onnx", "export")
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    nodes = []
    rewritten = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape_in = _static_shape(shapes, node.input[0]) if node.op_type == "Resize" else None
        shape_out = _static_shape(shapes, node.output[0]) if node.op_type == "Resize" else None
        if (
            node.op_type != "Resize"
            or attrs.get("mode", b"nearest") != b"linear"
            or attrs.get("coordinate_transformation_mode", b"half_pixel") != b"half_pixel"
            or attrs.get("antialias", 0) != 0
            or shape_in is None
            or shape_out is None
            or len(shape_in) != 5
            or len(shape_out) != 5
            or not all(isinstance(d, int) and d > 0 for d in (*shape_in[2:], *shape_out[2:]))
        ):
            nodes.append(node)
            continue
        name = node.name or node.output[0]
        # Axis order as the tensor goes: W (last), then H, then D, each brought last in turn.
        current = node.input[0]
        perms = ([0, 1, 2, 4, 3], [0, 1, 3, 4, 2], [0, 1, 4, 3, 2])
        for step, (axis, perm) in enumerate(zip((4, 3, 2), perms, strict=True)):
            matrix = numpy_helper.from_array(
                linear_interpolation_matrix(int(shape_in[axis]), int(shape_out[axis])), f"{name}/matrix{axis}"
            )
            model.graph.initializer.append(matrix)
            resized = f"{name}/resized{axis}"
            nodes.append(helper.make_node("MatMul", [current, matrix.name], [resized], name=f"{name}/matmul{axis}"))
            target = node.output[0] if step == 2 else f"{name}/transposed{axis}"
            nodes.append(helper.make_node("Transpose", [resized], [target], perm=perm, name=f"{name}/transpose{axis}"))
            current = target
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(_without_dead_nodes(nodes, {o.name for o in model.graph.output}))
    used = {name for n in model.graph.node for name in n.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    log.debug("replaced %d trilinear Resize node(s) with MatMuls", rewritten)
    return model


def _without_dead_nodes(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """``nodes`` less those whose outputs nothing reads (the replaced nodes' size computations)."""
    live = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(name in live for name in node.output):
            kept.append(node)
            live.update(name for name in node.input if name)
    return kept[::-1]


#: Applied to every exported graph, in order.
REWRITES = (trilinear_resize_as_matmul,)

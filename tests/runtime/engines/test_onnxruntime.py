"""ONNX Runtime session settings (the engines themselves: tests/runtime/engines/test_backends.py)."""

from __future__ import annotations

import pytest

from nodule_edge.errors import EngineError
from nodule_edge.runtime.engines.onnxruntime import session_options_for

ort = pytest.importorskip("onnxruntime")


def test_session_options():
    options = session_options_for(2)
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    quiet = session_options_for(1, optimization="basic", spinning=False)
    assert quiet.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options_for().intra_op_num_threads >= 1
    with pytest.raises(EngineError, match="optimisation level"):
        session_options_for(optimization="max")  # type: ignore[arg-type]

"""Inference engines: one :class:`Engine` interface over ONNX Runtime, OpenVINO and TensorRT.

One module per backend library (``onnxruntime``, ``openvino``, ``tensorrt``, the last with its
sidecar in ``tensorrt_sidecar``), each engine a subclass of
:class:`~nodule_edge.runtime.engines.base.Engine`, and one backend table
(:mod:`~nodule_edge.runtime.engines.backends`) that ``auto`` resolution, the CLI's ``--backend``
choices and the README read. Importing this package imports no engine library.

Example:
    >>> from nodule_edge.runtime import load_bundle
    >>> from nodule_edge.runtime.engines import create_engine
    >>> engine = create_engine(load_bundle(), "auto")  # doctest: +SKIP
    >>> engine.description  # doctest: +SKIP
    'cpu-fast (openvino)'
"""

from nodule_edge.runtime.engines.backends import (
    ALL_BACKENDS,
    BACKEND_TABLE,
    BACKENDS,
    BackendSpec,
    backend_table_markdown,
    create_engine,
)
from nodule_edge.runtime.engines.base import Engine, ModelMetadata, metadata_from_props, read_onnx_metadata

__all__ = [
    "ALL_BACKENDS",
    "BACKENDS",
    "BACKEND_TABLE",
    "BackendSpec",
    "Engine",
    "ModelMetadata",
    "backend_table_markdown",
    "create_engine",
    "metadata_from_props",
    "read_onnx_metadata",
]

"""Inference engines: one interface over ONNX Runtime (CPU, fast CPU, CUDA) and TensorRT.

The engine reads everything it needs from the artifact itself (ONNX ``metadata_props``): the
patch spec, attribute names, output names. Sessions are created once and reused; ``run`` is
thread-safe (ONNX Runtime's ``InferenceSession.run`` may be called concurrently).
"""

from __future__ import annotations

import abc
import contextlib
import importlib.metadata
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodule_edge.errors import BundleError, EngineError, MissingDependencyError
from nodule_edge.patch import PatchSpec
from nodule_edge.runtime.bundle import Bundle

__all__ = ["ALL_BACKENDS", "BACKENDS", "Engine", "OnnxEngine", "CpuFastEngine", "ModelMetadata", "read_onnx_metadata", "metadata_from_props", "create_engine"]

log = logging.getLogger(__name__)

#: Backends in the order ``auto`` tries them. ``cpu-int8`` is faster still without OpenVINO but
#: moves probabilities by up to 0.06 and can invert the (p − 0.5)-signed saliency near p = 0.5
#: (README, Performance), so it is used only when asked for.
BACKENDS: tuple[str, ...] = ("tensorrt", "cuda", "cpu-fast", "cpu")
ALL_BACKENDS: tuple[str, ...] = ("tensorrt", "cuda", "cpu-fast", "cpu-int8", "cpu")


@dataclass(frozen=True)
class ModelMetadata:
    """What the runtime needs to know about a model, read from the artifact."""

    patch_spec: PatchSpec
    attribute_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_name: str
    model_version: str
    raw: dict[str, str]


def read_onnx_metadata(session: "object") -> ModelMetadata:
    """Parse nodule-edge metadata from an ONNX Runtime session's model metadata."""
    return metadata_from_props(dict(session.get_modelmeta().custom_metadata_map))  # type: ignore[attr-defined]


def metadata_from_props(meta: dict[str, str]) -> ModelMetadata:
    """Parse nodule-edge metadata from an ONNX file's ``metadata_props``."""
    missing = [k for k in ("patch_spec", "attribute_names", "output_names", "input_name") if k not in meta]
    if missing:
        raise BundleError(f"model has no nodule-edge metadata {missing}: not exported by 'nodule-edge export'")
    try:
        return ModelMetadata(
            patch_spec=PatchSpec.from_json(meta["patch_spec"]),
            attribute_names=tuple(json.loads(meta["attribute_names"])),
            output_names=tuple(json.loads(meta["output_names"])),
            input_name=meta["input_name"],
            model_version=meta.get("model_version", "unknown"),
            raw=dict(meta),
        )
    except (ValueError, TypeError) as exc:
        raise BundleError(f"model metadata is malformed: {exc}") from exc


class Engine(abc.ABC):
    """Interface of every backend."""

    backend: str
    metadata: ModelMetadata
    providers: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        """Backend and what actually executes it, e.g. ``cpu-fast (openvino)``."""
        return f"{self.backend} ({self.providers[0]})" if self.providers else self.backend

    @abc.abstractmethod
    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``[N, C, S, S, S]`` float32; returns every output by name."""


class OnnxEngine(Engine):
    """An ONNX Runtime session (CPU, fast CPU artifact, or CUDA)."""

    def __init__(self, path: Path, backend: str, providers: Sequence[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise EngineError(f"cannot create ONNX Runtime session for {path} with {list(providers)}: {exc}") from exc
        self.providers = tuple(self._session.get_providers())
        # Trust what the session actually uses, not what was asked for.
        if providers[0] not in self.providers:
            raise EngineError(f"backend '{backend}' asked for {providers[0]}, but the session runs on {list(self.providers)}")
        self.backend = backend
        self.path = path
        self.metadata = read_onnx_metadata(self._session)
        shape = self._session.get_inputs()[0].shape
        log.info("engine %s: %s on %s", backend, path.name, self.providers[0])
        self._expected_shape = tuple(shape[1:])

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        if patches.ndim != 5 or tuple(patches.shape[1:]) != tuple(self._expected_shape):
            raise EngineError(f"engine expects patches of shape [N, {', '.join(map(str, self._expected_shape))}], got {list(patches.shape)}")
        outputs = self._session.run(list(self.metadata.output_names), {self.metadata.input_name: patches})
        return dict(zip(self.metadata.output_names, outputs))


class CpuFastEngine(Engine):
    """Fast CPU engines chosen by measurement (README, Performance).

    ``cpu-fast``: the fp32 graph compiled by OpenVINO with bf16 inference precision (needs the
    ``openvino`` extra; no measurable accuracy loss). ``cpu-int8``: the static INT8 artifact, on
    OpenVINO when installed, else ONNX Runtime.
    """

    def __init__(self, path: Path, backend: str, threads: int | None = None) -> None:
        from nodule_edge.export.cpu_engine import load_cpu_engine, openvino_available

        if backend == "cpu-fast":
            if not openvino_available():
                raise EngineError("backend 'cpu-fast' runs on OpenVINO, which is not installed (pip install 'nodule-edge[openvino]')")
            self._engine = load_cpu_engine(path, backend="openvino", threads=threads, precision="bf16")
        else:
            self._engine = load_cpu_engine(path, threads=threads)
        self.backend = backend
        self.path = path
        self.providers = (self._engine.backend,)
        self.metadata = metadata_from_props(self._engine.metadata)
        # One OpenVINO infer request is not re-entrant; ONNX Runtime sessions are.
        self._lock = threading.Lock() if self._engine.backend == "openvino" else contextlib.nullcontext()

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        size = self.metadata.patch_spec.size
        expected = (self.metadata.patch_spec.channels, size, size, size)
        if patches.ndim != 5 or tuple(patches.shape[1:]) != expected:
            raise EngineError(f"engine expects patches of shape [N, {', '.join(map(str, expected))}], got {list(patches.shape)}")
        with self._lock:
            return self._engine.run(patches)


#: Distributions of ONNX Runtime that ship the CUDA execution provider.
_CUDA_ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime-gpu",)


def _available_providers() -> list[str]:
    """ONNX Runtime's providers, or ``[]`` without importing it when no CUDA build is installed.

    ``auto`` asks this only to learn whether CUDA is there; on a CPU-only install importing
    onnxruntime for that would add about 20 MB to the resident set of a run that then executes
    on OpenVINO (tests/robustness/test_resources.py bounds the peak).
    """
    for name in _CUDA_ONNXRUNTIME_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        import onnxruntime as ort

        return list(ort.get_available_providers())
    return []


def _try_create(bundle: Bundle, backend: str, threads: int | None) -> Engine:
    if backend == "tensorrt":
        engine_path = bundle.path("tensorrt")
        if engine_path is None:
            raise EngineError("the bundle has no TensorRT engine (build one with 'nodule-edge export --tensorrt')")
        from nodule_edge.export.tensorrt import TensorRTEngine  # optional; needs the 'trt' extra

        return TensorRTEngine(engine_path, onnx_path=bundle.path("onnx_fp32"), onnx_sha256=bundle.sha256("onnx_fp32"))  # type: ignore[return-value]
    if backend == "cuda":
        if "CUDAExecutionProvider" not in _available_providers():
            raise EngineError("ONNX Runtime has no CUDA provider here (install nodule-edge[gpu] on a CUDA machine)")
        return OnnxEngine(_need(bundle, "onnx_fp32"), "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], threads)
    if backend == "cpu-fast":
        return CpuFastEngine(_need(bundle, "onnx_fp32"), "cpu-fast", threads)
    if backend == "cpu-int8":
        return CpuFastEngine(_need(bundle, "cpu_engine"), "cpu-int8", threads)
    if backend == "cpu":
        return OnnxEngine(_need(bundle, "onnx_fp32"), "cpu", ["CPUExecutionProvider"], threads)
    raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(('auto',) + ALL_BACKENDS)}")


def _need(bundle: Bundle, role: str) -> Path:
    path = bundle.path(role)
    if path is None:
        raise EngineError(f"the bundle {bundle.root} has no '{role}' artifact")
    return path


def create_engine(bundle: Bundle, backend: str = "auto", threads: int | None = None) -> Engine:
    """Create the engine for ``backend``, or the first that works in :data:`BACKENDS` order.

    Args:
        bundle: A verified bundle.
        backend: ``auto`` or one of :data:`BACKENDS`.
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice, or
            ``$NODULE_EDGE_THREADS``).
    """
    threads = threads or (int(os.environ["NODULE_EDGE_THREADS"]) if os.environ.get("NODULE_EDGE_THREADS") else None)
    if backend != "auto":
        return _try_create(bundle, backend, threads)
    reasons = []
    for candidate in BACKENDS:
        try:
            engine = _try_create(bundle, candidate, threads)
        except (EngineError, MissingDependencyError, ImportError) as exc:
            reasons.append(f"{candidate}: {exc}")
            log.debug("backend %s unavailable: %s", candidate, exc)
            continue
        log.info("backend auto-selected: %s (skipped: %s)", candidate, "; ".join(reasons) or "none")
        return engine
    raise EngineError("no inference backend could be created: " + "; ".join(reasons))

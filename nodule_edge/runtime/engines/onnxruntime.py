"""ONNX Runtime: the ``cpu`` backend (fp32, the reference and fallback) and the ``cuda`` backend.

Sessions are created once and reused; ``run`` is thread-safe (ONNX Runtime's
``InferenceSession.run`` may be called concurrently). ``onnxruntime`` itself is imported where a
session is made, not with this module: a run that executes on OpenVINO never needs it (about
20 MB resident).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nodule_edge.errors import EngineError
from nodule_edge.runtime.engines.base import (
    CpuEngine,
    Engine,
    ModelMetadata,
    check_first_pass,
    default_threads,
    need_artifact,
    read_onnx_metadata,
)

if TYPE_CHECKING:
    import onnxruntime as ort

    from nodule_edge.runtime.bundle import Bundle

__all__ = ["OnnxEngine", "available_providers", "load_first_pass", "load_ort_model", "session_options_for"]

log = logging.getLogger(__name__)

#: Distributions of ONNX Runtime that ship the CUDA execution provider.
CUDA_ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime-gpu",)

#: Provider lists per backend: the first one must be what the session really runs on.
_PROVIDERS = {"cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"), "cpu": ("CPUExecutionProvider",)}


class OnnxEngine(Engine):
    """An ONNX Runtime session (CPU, or CUDA).

    The providers reported are the ones the session actually uses, and a session that silently
    fell back from the asked-for provider (CUDA failing to start) is refused.
    """

    def __init__(
        self,
        path: Path,
        backend: str,
        providers: Sequence[str],
        threads: int | None = None,
        first_pass: Path | None = None,
    ) -> None:
        """Create the session.

        Args:
            path: The ONNX model.
            backend: Backend name recorded on the engine (``cpu`` or ``cuda``).
            providers: ONNX Runtime providers, the wanted one first.
            threads: Intra-op threads (default: ONNX Runtime's choice).
            first_pass: The bundle's first-pass model (``first_pass.onnx``), which
                :meth:`segment` then runs in a second session on the same providers.

        Raises:
            EngineError: A session cannot be created, or runs on another provider than asked.
            BundleError: The first-pass model does not belong to the model.
        """
        self._session = _session(path, backend, providers, threads)
        self.providers = tuple(self._session.get_providers())
        self.backend = backend
        self.path = path
        self.metadata = read_onnx_metadata(self._session)
        shape = self._session.get_inputs()[0].shape
        log.info("engine %s: %s on %s", backend, path.name, self.providers[0])
        self._expected_shape = tuple(shape[1:])
        if first_pass is not None:
            self._first_pass = load_first_pass(first_pass, self.metadata, backend, providers, threads)

    @classmethod
    def from_bundle(cls, bundle: Bundle, backend: str, threads: int | None = None) -> OnnxEngine:
        """The bundle's fp32 ONNX model on ONNX Runtime's CPU (``cpu``) or CUDA (``cuda``)
        provider, with the bundle's first-pass model when it has one."""
        return cls(
            need_artifact(bundle, "onnx_fp32"), backend, list(_PROVIDERS[backend]), threads, bundle.path("first_pass")
        )

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``[N, C, S, S, S]`` (cast to float32); returns every output by name.

        Raises:
            EngineError: The batch does not have the model's patch shape.
        """
        outputs = self._session.run(
            list(self.metadata.output_names), {self.metadata.input_name: self._checked(patches)}
        )
        return dict(zip(self.metadata.output_names, outputs, strict=True))

    def _checked(self, patches: np.ndarray) -> np.ndarray:
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        if patches.ndim != 5 or tuple(patches.shape[1:]) != tuple(self._expected_shape):
            raise EngineError(
                f"engine expects patches of shape [N, {', '.join(map(str, self._expected_shape))}], got {list(patches.shape)}"
            )
        return patches


def load_first_pass(
    path: Path, model: ModelMetadata, backend: str, providers: Sequence[str], threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A bundle's first-pass model in an ONNX Runtime session: ``patches -> segmentation``.

    Args:
        path: ``first_pass.onnx``.
        model: The collaborative model's metadata (the first pass must belong to it).
        backend: The engine's backend name, for messages.
        providers: ONNX Runtime providers, the wanted one first.
        threads: Intra-op threads (default: ONNX Runtime's choice).

    Raises:
        EngineError: The session cannot be created, or runs on another provider than asked.
        BundleError: The first-pass model does not belong to the model.
    """
    session = _session(path, backend, providers, threads)
    check_first_pass(model, dict(session.get_modelmeta().custom_metadata_map), path)
    input_name = session.get_inputs()[0].name
    size = model.patch_spec.size
    expected = (model.patch_spec.channels, size, size, size)

    def segment(patches: np.ndarray) -> np.ndarray:
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        if patches.ndim != 5 or tuple(patches.shape[1:]) != expected:
            raise EngineError(
                f"engine expects patches of shape [N, {', '.join(map(str, expected))}], got {list(patches.shape)}"
            )
        return np.asarray(session.run(["segmentation"], {input_name: patches})[0])

    return segment


def _session(path: Path, backend: str, providers: Sequence[str], threads: int | None) -> ort.InferenceSession:
    """An ONNX Runtime session on ``providers``, refused when it silently fell back to another."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise EngineError(f"cannot create ONNX Runtime session for {path} with {list(providers)}: {exc}") from exc
    # Trust what the session actually uses, not what was asked for.
    if providers[0] not in session.get_providers():
        raise EngineError(
            f"backend '{backend}' asked for {providers[0]}, but the session runs on {list(session.get_providers())}"
        )
    return session


def available_providers() -> list[str]:
    """ONNX Runtime's providers, or ``[]`` without importing it when no CUDA build is installed.

    ``auto`` asks this only to learn whether CUDA is there; on a CPU-only install importing
    onnxruntime for that would add about 20 MB to the resident set of a run that then executes
    on OpenVINO (tests/robustness/test_resources.py bounds the peak).
    """
    for name in CUDA_ONNXRUNTIME_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        import onnxruntime as ort

        return list(ort.get_available_providers())
    return []


def session_options_for(
    threads: int | None = None,
    *,
    optimization: Literal["basic", "extended", "all"] = "all",
    spinning: bool = True,
) -> ort.SessionOptions:
    """ONNX Runtime session options measured best for this model on a small CPU.

    Sequential execution (the graph is a chain of large convolutions, so parallel execution only
    adds contention), one intra-op thread per available core, ``ORT_ENABLE_ALL`` (its NCHWc and
    NHWC layout transformers and QDQ fusions are measured in ``benches/bench_engines.py``), the
    memory arena and memory patterns on (shapes repeat from call to call).

    Args:
        threads: Intra-op threads; default :func:`~nodule_edge.runtime.engines.base.default_threads`.
        optimization: Graph optimisation level.
        spinning: Let idle worker threads spin between operators. Turn it off on a machine
            shared with other busy processes.

    Returns:
        Options ready for ``onnxruntime.InferenceSession``.

    Raises:
        EngineError: Unknown optimisation level.
    """
    import onnxruntime as ort  # here, not at import: an OpenVINO-only run never needs it (~20 MB resident)

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise EngineError(f"unknown ONNX Runtime optimisation level {optimization!r}; expected one of {sorted(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def load_ort_model(
    path: Path, options: ort.SessionOptions, providers: Sequence[Any] = ("CPUExecutionProvider",)
) -> CpuEngine:
    """Load an ONNX model (fp32 or the INT8 artifact) into an ONNX Runtime session.

    Args:
        path: The model file.
        options: Session options, e.g. from :func:`session_options_for`.
        providers: ONNX Runtime providers (names, or ``(name, options)`` pairs).

    Returns:
        The loaded model (backend ``"onnxruntime"``, precision ``"f32"``).

    Raises:
        EngineError: ONNX Runtime cannot load the file.
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # ORT raises several pybind types for unreadable / invalid models
        raise EngineError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    names = tuple(o.name for o in session.get_outputs())
    input_name = session.get_inputs()[0].name
    metadata = dict(session.get_modelmeta().custom_metadata_map)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(list(names), {input_name: x}), strict=True))

    return CpuEngine(path, "onnxruntime", "f32", metadata, names, run)

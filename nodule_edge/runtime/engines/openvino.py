"""OpenVINO: the ``cpu-fast`` backend (the default on CPU) and the ``cpu-int8`` backend.

Measured on this project's 2-core AMD EPYC (README, "The fast CPU engine"; ``benches/
bench_engines.py``; ``python -m benches.cpu_engines compare|time``): the fp32 graph compiled by
OpenVINO with bf16 inference precision runs in about a third of fp32 ONNX Runtime's time with no
measurable accuracy change, so it is ``cpu-fast``. ``cpu-int8`` runs the static INT8 artifact
(``model.int8.onnx``, built by :mod:`nodule_edge.export.int8`) on OpenVINO when installed, else on
ONNX Runtime; it is faster still but moves probabilities (opt-in only).

OpenVINO is imported with its usage telemetry masked (:func:`import_openvino`): no engine makes a
network request (``tests/robustness/test_network.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nodule_edge.errors import EngineError, MissingDependencyError, require
from nodule_edge.runtime.engines.base import (
    CpuEngine,
    Engine,
    check_first_pass,
    default_threads,
    metadata_from_props,
    need_artifact,
)

if TYPE_CHECKING:
    from nodule_edge.runtime.bundle import Bundle

__all__ = ["CpuFastEngine", "import_openvino", "load_cpu_engine", "load_openvino_model", "openvino_available"]

log = logging.getLogger(__name__)

CpuBackend = Literal["auto", "onnxruntime", "openvino"]
Precision = Literal["auto", "f32", "bf16"]

#: Bundle artifact each backend of this module runs.
_ARTIFACTS = {"cpu-fast": "onnx_fp32", "cpu-int8": "cpu_engine"}


def import_openvino() -> Any:
    """``import openvino`` without OpenVINO's usage telemetry.

    ``import openvino`` imports its model-conversion tools, which start OpenVINO's telemetry
    (Google Analytics, on by default without a consent file) and send a session event from a
    background thread: a network request from a medical device that embeds this package. OpenVINO
    falls back to a no-op stub when ``openvino_telemetry`` cannot be imported, so the module is
    masked for the import (only if OpenVINO is not imported yet; README, Engines).

    Raises:
        MissingDependencyError: OpenVINO is not installed.
    """
    if "openvino" in sys.modules:
        return require("openvino", "openvino")
    masked = "openvino_telemetry" not in sys.modules
    if masked:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # ImportError on import
    try:
        return require("openvino", "openvino")
    finally:
        if masked and sys.modules.get("openvino_telemetry", 0) is None:
            del sys.modules["openvino_telemetry"]


def openvino_available() -> bool:
    """Whether the optional OpenVINO runtime can be imported (imports it, telemetry masked)."""
    try:
        import_openvino()
    except MissingDependencyError:
        return False
    return True


def load_openvino_model(
    path: Path, threads: int | None, precision: Precision, *, segmentation_pass: bool = False
) -> CpuEngine:
    """Compile an ONNX model (fp32 or INT8 QDQ) for OpenVINO's CPU plugin.

    Args:
        path: The model file.
        threads: Inference threads; default one per available core.
        precision: Precision of the layers left in floating point (``"auto"``: OpenVINO's choice).
        segmentation_pass: Also compile the graph cut to its ``segmentation`` output (OpenVINO
            drops every node that output does not need: the heads, the Grad-CAM and its
            upsampling), which :meth:`CpuEngine.segment` then runs. The runtime's first pass only
            needs the segmentation (README, Performance).

    Returns:
        The loaded model; its ``precision`` is what OpenVINO reports it compiled.

    Raises:
        EngineError: OpenVINO cannot read or compile the file.
        MissingDependencyError: OpenVINO is not installed.
    """
    ov = import_openvino()
    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads or default_threads(), "PERFORMANCE_HINT": "LATENCY"}
    if precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = precision
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", config)
        actual = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except RuntimeError as exc:
        raise EngineError(f"OpenVINO cannot load {path}: {exc}") from exc
    actual = "bf16" if "bf16" in actual or "bfloat16" in actual else "f32"
    # The ONNX frontend keeps metadata_props under rt_info["framework"].
    metadata: dict[str, str] = {}
    rt_info = model.get_rt_info()
    if "framework" in rt_info:
        for key in rt_info["framework"].keys():
            metadata[str(key)] = model.get_rt_info(["framework", str(key)]).astype(str)
    # A port may carry several tensor names once OpenVINO folds a Reshape into its producer
    # (get_any_name() then returns the inner one), so names come from the model's declared
    # outputs, matched to compiled ports by position.
    declared = set(json.loads(metadata["output_names"])) if "output_names" in metadata else set()
    names = tuple(next((n for n in sorted(o.get_names()) if n in declared), o.get_any_name()) for o in model.outputs)
    ports = list(compiled.outputs)
    input_name = compiled.inputs[0].get_any_name()
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({input_name: x}, share_outputs=False)
        return {name: np.asarray(result[port]) for name, port in zip(names, ports, strict=True)}

    segment = _compile_segmentation_pass(core, model, path, config, names) if segmentation_pass else None
    return CpuEngine(path, "openvino", actual, metadata, names, run, segment)


def _compile_segmentation_pass(
    core: Any, model: Any, path: Path, config: dict[str, Any], names: tuple[str, ...]
) -> Callable[[np.ndarray], np.ndarray] | None:
    """A copy of the read ``model`` with every result but ``segmentation`` removed, compiled alike.

    None when the model has no ``segmentation`` output (the caller then runs the whole graph).
    """
    if "segmentation" not in names:
        return None
    cut = model.clone()
    # Results in the same order as model.outputs, whose names were matched above.
    for name, result in zip(names, list(cut.get_results()), strict=True):
        if name != "segmentation":
            cut.remove_result(result)
    try:
        compiled = core.compile_model(cut, "CPU", config)
    except RuntimeError as exc:
        raise EngineError(f"OpenVINO cannot compile the segmentation pass of {path}: {exc}") from exc
    request = compiled.create_infer_request()
    input_name = compiled.inputs[0].get_any_name()

    def segment(x: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer({input_name: x}, share_outputs=False)[0])

    return segment


def load_cpu_engine(
    path: str | Path,
    *,
    backend: CpuBackend = "auto",
    threads: int | None = None,
    precision: Precision = "auto",
    optimization: Literal["basic", "extended", "all"] = "all",
    segmentation_pass: bool = False,
) -> CpuEngine:
    """Load an ONNX model (fp32 or the INT8 artifact) on a CPU library.

    Args:
        path: ``model.onnx`` or ``model.int8.onnx``.
        backend: ``"auto"`` uses OpenVINO when installed, else ONNX Runtime.
        threads: Inference threads; default one per available core.
        precision: OpenVINO only: precision of the layers left in floating point. ``"auto"`` is
            OpenVINO's own choice: bf16 on CPUs with native bf16 (avx512_bf16 or AMX), else f32
            (measured fastest here, with the accuracy in the README); ``"f32"`` forces fp32.
        optimization: ONNX Runtime only: graph optimisation level.
        segmentation_pass: OpenVINO only: also compile the graph cut to the segmentation, which
            :meth:`CpuEngine.segment` runs (ONNX Runtime computes every node whatever outputs
            are asked for, so there ``segment`` runs the whole graph).

    Returns:
        The loaded model.

    Raises:
        EngineError: Missing file, unknown backend or precision, or the library cannot load it.
    """
    from nodule_edge.runtime.engines.onnxruntime import load_ort_model, session_options_for

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"model file {path} does not exist")
    if precision not in ("auto", "f32", "bf16"):
        raise EngineError(f"unknown precision {precision!r}; expected 'auto', 'f32' or 'bf16'")
    if backend == "auto":
        backend = "openvino" if openvino_available() else "onnxruntime"
    if backend == "openvino":
        engine = load_openvino_model(path, threads, precision, segmentation_pass=segmentation_pass)
    elif backend == "onnxruntime":
        engine = load_ort_model(path, session_options_for(threads, optimization=optimization))
    else:
        raise EngineError(f"unknown CPU backend {backend!r}; expected 'auto', 'onnxruntime' or 'openvino'")
    log.info("loaded %s with %s (%s)", path.name, engine.backend, engine.precision)
    return engine


class CpuFastEngine(Engine):
    """Fast CPU engines chosen by measurement (README, Performance).

    ``cpu-fast``: the fp32 graph compiled by OpenVINO with bf16 inference precision (needs the
    ``openvino`` extra; no measurable accuracy loss). ``cpu-int8``: the static INT8 artifact, on
    OpenVINO when installed, else ONNX Runtime. ``run`` is thread-safe (one OpenVINO infer
    request is not re-entrant, so calls are serialised on it).
    """

    def __init__(self, path: Path, backend: str, threads: int | None = None, first_pass: Path | None = None) -> None:
        """Load the model.

        Args:
            path: ``model.onnx`` for ``cpu-fast``, ``model.int8.onnx`` for ``cpu-int8``.
            backend: ``cpu-fast`` or ``cpu-int8``.
            threads: Inference threads; default one per available core.
            first_pass: The bundle's first-pass model (``first_pass.onnx``), which
                :meth:`segment` then runs, on the same library and precision as the model.

        Raises:
            EngineError: OpenVINO missing for ``cpu-fast``, or a model cannot be loaded.
            BundleError: The first-pass model does not belong to the model.
        """
        if backend == "cpu-fast":
            if not openvino_available():
                raise EngineError(
                    "backend 'cpu-fast' runs on OpenVINO, which is not installed (pip install 'nodule-edge[openvino]')"
                )
            options: dict[str, Any] = {"backend": "openvino", "threads": threads, "precision": "bf16"}
        else:
            options = {"threads": threads}
        # Without a first-pass model the first pass is the graph cut to the segmentation.
        self._engine = load_cpu_engine(path, segmentation_pass=first_pass is None, **options)
        self.backend = backend
        self.path = path
        self.providers = (self._engine.backend,)
        self.metadata = metadata_from_props(self._engine.metadata)
        self._first: CpuEngine | None = None
        if first_pass is not None:
            # The fp32 box net also for cpu-int8: it is small, and its boxes decide the second pass.
            self._first = load_cpu_engine(first_pass, **{**options, "backend": self._engine.backend})
            check_first_pass(self.metadata, self._first.metadata, first_pass)
        # One OpenVINO infer request is not re-entrant; ONNX Runtime sessions are.
        self._lock = threading.Lock() if self._engine.backend == "openvino" else contextlib.nullcontext()

    @property
    def precision(self) -> str:
        """What the model's non-quantised layers run in: ``"bf16"``, or ``"f32"`` where the CPU has
        no native bf16 (no avx512_bf16 or AMX; OpenVINO then runs ``cpu-fast`` in f32)."""
        return self._engine.precision

    @classmethod
    def from_bundle(cls, bundle: Bundle, backend: str, threads: int | None = None) -> CpuFastEngine:
        """``cpu-fast`` on the bundle's fp32 model, ``cpu-int8`` on its INT8 artifact; either
        with the bundle's first-pass model when it has one."""
        return cls(need_artifact(bundle, _ARTIFACTS[backend]), backend, threads, bundle.path("first_pass"))

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``[N, C, S, S, S]`` (cast to float32); returns every output by name.

        Raises:
            EngineError: The batch does not have the model's patch shape, or the library failed.
        """
        patches = self._checked(patches)
        with self._lock:
            return self._engine.run(patches)

    def _checked(self, patches: np.ndarray) -> np.ndarray:
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        size = self.metadata.patch_spec.size
        expected = (self.metadata.patch_spec.channels, size, size, size)
        if patches.ndim != 5 or tuple(patches.shape[1:]) != expected:
            raise EngineError(
                f"engine expects patches of shape [N, {', '.join(map(str, expected))}], got {list(patches.shape)}"
            )
        return patches

    def segment(self, patches: np.ndarray) -> np.ndarray:
        """The first pass's segmentation (:meth:`Engine.segment`): the bundle's first-pass model
        when it has one, else the graph cut to the segmentation on OpenVINO.

        Raises:
            EngineError: The batch does not have the model's patch shape, or the library failed.
        """
        patches = self._checked(patches)
        with self._lock:
            if self._first is not None:
                return self._first.run(patches)["segmentation"]
            return self._engine.segment(patches)

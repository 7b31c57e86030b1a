"""The fast CPU engine: a static INT8 (QDQ) ONNX model that ONNX Runtime and OpenVINO both run.

Measured on this project's 2-core AMD EPYC (Zen 5: avx512_bf16 and avx512_vnni, no AMX) against
the fp32 ONNX Runtime session, the reference and fallback (README, "CPU engine"; ``benches/
bench_engines.py``; ``python -m nodule_edge.export.cpu_engine compare|time``):

* 3D convolutions are ~92 % of the fp32 time. ONNX Runtime's graph levels, thread counts and
  spinning barely move it (its NCHWc layout transformer is 2D-only); only lower precision helps.
* ORT's static INT8 QLinearConv (QDQ, fused at ``ORT_ENABLE_EXTENDED`` and above; at ``BASIC``
  the QDQ graph runs in fp32 and is no faster) makes the whole model ~3x cheaper (0.34x the fp32
  CPU time), but only once the 2-channel 7³ stem stays fp32: MLAS's INT8 im2col path is ~6x
  *slower* than fp32 there. Convolutions with fewer than 16 input or output channels therefore
  stay fp32 (:func:`conv_nodes_to_exclude`), and so does everything that is not a Conv (CAM
  arithmetic, normalisations, heads).
* OpenVINO (optional extra ``nodule-edge[openvino]``) runs the same QDQ file with oneDNN's VNNI
  kernels and, on CPUs with native bf16, the fp32 remainder in bf16: 0.24x the fp32 CPU time.

So one artifact, ``model.int8.onnx``, serves both backends: :func:`load_cpu_engine` uses
OpenVINO when it is installed and ONNX Runtime otherwise. The quantised file keeps the fp32
file's ``metadata_props`` (the runtime reads its patch spec and output names from the artifact)
and adds ``cpu_engine`` and ``quantization`` entries saying how it was made.

This module imports only numpy and onnxruntime at module level (``onnx`` for building and
``openvino`` are imported where needed), so the runtime may use :class:`CpuEngine` and
:func:`load_cpu_engine`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nodule_edge.errors import EngineError, MissingDependencyError, require
from nodule_edge.metrics import roc_auc

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "Backend",
    "BuildMethod",
    "CANDIDATES",
    "Candidate",
    "CpuEngine",
    "INT8_FILENAME",
    "build_cpu_engine",
    "compare_engines",
    "conv_nodes_to_exclude",
    "default_threads",
    "load_cpu_engine",
    "load_lidc_patches",
    "openvino_available",
    "session_options_for",
    "time_candidates",
]

log = logging.getLogger(__name__)

Backend = Literal["auto", "onnxruntime", "openvino"]
BuildMethod = Literal["int8"]
Precision = Literal["auto", "f32", "bf16"]

INT8_FILENAME = "model.int8.onnx"
INPUT_NAME = "patch"
# Convolutions with fewer channels than this (in or out, per group) stay fp32: MLAS's INT8
# im2col path is far slower than its fp32 one for the 2-channel 7³ stem (measured), and the
# single-channel CAM/segmentation convolutions are too small to gain anything.
MIN_QUANT_CHANNELS = 16
_CAL_SEED = 0


# --------------------------------------------------------------------------------------------
# Session settings and engines
# --------------------------------------------------------------------------------------------


def default_threads() -> int:
    """Cores this process may run on (the affinity mask, so containers and taskset are honoured)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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
        threads: Intra-op threads; default :func:`default_threads`.
        optimization: Graph optimisation level.
        spinning: Let idle worker threads spin between operators. Turn it off on a machine
            shared with other busy processes.

    Returns:
        Options ready for ``onnxruntime.InferenceSession``.
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


def _import_openvino() -> Any:
    """``import openvino`` without OpenVINO's usage telemetry.

    ``import openvino`` imports its model-conversion tools, which start OpenVINO's telemetry
    (Google Analytics, on by default without a consent file) and send a session event from a
    background thread: a network request from a medical device that embeds this package. OpenVINO
    falls back to a no-op stub when ``openvino_telemetry`` cannot be imported, so the module is
    masked for the import (only if OpenVINO is not imported yet; README, Engines).
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
    """Whether the optional OpenVINO runtime can be imported."""
    try:
        _import_openvino()
    except MissingDependencyError:
        return False
    return True


@dataclass
class CpuEngine:
    """A loaded CPU engine with one call for every backend.

    Not thread-safe for the OpenVINO backend (one infer request); create one engine per thread.

    Attributes:
        path: The model file.
        backend: ``"onnxruntime"`` or ``"openvino"``.
        precision: Precision the non-quantised layers run in (``"f32"`` or ``"bf16"``).
        metadata: The model's ``metadata_props``.
        output_names: Output names in model order.
    """

    path: Path
    backend: str
    precision: str
    metadata: dict[str, str]
    output_names: tuple[str, ...]
    _run: Any = field(repr=False)

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch of patches.

        Args:
            patches: float32 ``[N, 2, 64, 64, 64]`` in [0, 1].

        Returns:
            Every output by name (fresh arrays the caller owns).
        """
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        if patches.ndim != 5:
            raise EngineError(f"patches must be [N, C, S, S, S], got shape {patches.shape}")
        try:
            return self._run(patches)
        except Exception as exc:  # ORT's and OpenVINO's errors share no base class but Exception
            raise EngineError(f"{self.backend} failed on {self.path.name} with input {patches.shape}: {exc}") from exc


def _onnxruntime_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _load_ort(path: Path, options: ort.SessionOptions, providers: Sequence[Any] = ("CPUExecutionProvider",)) -> CpuEngine:
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


def _load_openvino(path: Path, threads: int | None, precision: Precision) -> CpuEngine:
    ov = _import_openvino()
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

    return CpuEngine(path, "openvino", actual, metadata, names, run)


def load_cpu_engine(
    path: str | Path,
    *,
    backend: Backend = "auto",
    threads: int | None = None,
    precision: Precision = "auto",
    optimization: Literal["basic", "extended", "all"] = "all",
) -> CpuEngine:
    """Load an ONNX model (fp32 or the INT8 artifact) as a CPU engine.

    Args:
        path: ``model.onnx`` or ``model.int8.onnx``.
        backend: ``"auto"`` uses OpenVINO when installed, else ONNX Runtime.
        threads: Inference threads; default one per available core.
        precision: OpenVINO only: precision of the layers left in floating point. ``"auto"`` is
            OpenVINO's own choice: bf16 on CPUs with native bf16 (avx512_bf16 or AMX), else f32
            (measured fastest here, with the accuracy in the README); ``"f32"`` forces fp32.
        optimization: ONNX Runtime only: graph optimisation level.

    Returns:
        The engine.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"model file {path} does not exist")
    if precision not in ("auto", "f32", "bf16"):
        raise EngineError(f"unknown precision {precision!r}; expected 'auto', 'f32' or 'bf16'")
    if backend == "auto":
        backend = "openvino" if openvino_available() else "onnxruntime"
    if backend == "openvino":
        engine = _load_openvino(path, threads, precision)
    elif backend == "onnxruntime":
        engine = _load_ort(path, session_options_for(threads, optimization=optimization))
    else:
        raise EngineError(f"unknown CPU backend {backend!r}; expected 'auto', 'onnxruntime' or 'openvino'")
    log.info("loaded %s with %s (%s)", path.name, engine.backend, engine.precision)
    return engine


# --------------------------------------------------------------------------------------------
# Building the INT8 artifact
# --------------------------------------------------------------------------------------------


def conv_nodes_to_exclude(model: Any, min_channels: int = MIN_QUANT_CHANNELS) -> list[str]:
    """Names of the Conv nodes that should stay fp32: fewer than ``min_channels`` in or out.

    Args:
        model: An ``onnx.ModelProto``.
        min_channels: Per-group channel threshold.
    """
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    excluded = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        shape = weights.get(node.input[1])
        if shape is None or shape[0] < min_channels or shape[1] < min_channels:
            excluded.append(node.name)
    return excluded


class _PatchReader:
    """Feeds calibration patches one at a time (batch 1, as the engine mostly runs)."""

    def __init__(self, patches: np.ndarray, input_name: str) -> None:
        self._patches = patches
        self._input_name = input_name
        self._iter: Iterator[int] = iter(range(len(patches)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = next(self._iter, None)
        if index is None:
            return None
        return {self._input_name: np.ascontiguousarray(self._patches[index : index + 1], dtype=np.float32)}

    def rewind(self) -> None:
        self._iter = iter(range(len(self._patches)))


def _check_calibration(patches: np.ndarray | None) -> np.ndarray:
    if patches is None:
        raise EngineError(
            "INT8 quantisation needs calibration patches (real patches, e.g. 32 LIDC patches from "
            "nodule_edge.train.data.build_patch_cache); random data gives wrong activation ranges"
        )
    patches = np.asarray(patches)
    if patches.ndim != 5 or len(patches) == 0:
        raise EngineError(f"calibration patches must be a non-empty [N, C, S, S, S] array, got shape {patches.shape}")
    if not np.isfinite(patches).all():
        raise EngineError("calibration patches contain NaN or infinite values")
    return patches


def build_cpu_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    calibration_patches: np.ndarray | None,
    method: BuildMethod = "int8",
    *,
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax",
    min_channels: int = MIN_QUANT_CHANNELS,
) -> Path:
    """Build the fast CPU engine from the fp32 export.

    ``"int8"``: static INT8 quantisation with ONNX Runtime in QDQ format (uint8 activations,
    per-channel int8 weights, only Conv with at least ``min_channels`` in and out channels), so
    the CAM arithmetic, normalisations and heads stay fp32. ONNX Runtime and OpenVINO both run
    the result.

    Args:
        onnx_path: The fp32 model from :func:`nodule_edge.export.onnx_export.export_onnx`.
        out_dir: Folder for ``model.int8.onnx`` (created; the file is replaced atomically).
        calibration_patches: Real patches ``[N, 2, 64, 64, 64]`` (float16 or float32); 32 suffice.
        method: Engine to build; only ``"int8"`` is offered (OpenVINO needs no other artifact).
        calibration_method: Activation range estimator. MinMax measured as accurate as the others.
        min_channels: Convolutions with fewer channels than this stay fp32.

    Returns:
        Path of the written artifact.

    Raises:
        EngineError: Missing model, unusable calibration patches, or the quantiser failed.
    """
    onnx = require("onnx", "export")
    quantization = require("onnxruntime.quantization", "export")
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from nodule_edge.export.onnx_export import file_sha256

    if method != "int8":
        raise EngineError(f"unknown CPU engine build method {method!r}; expected 'int8'")
    methods = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "percentile": quantization.CalibrationMethod.Percentile,
        "entropy": quantization.CalibrationMethod.Entropy,
    }
    if calibration_method not in methods:
        raise EngineError(f"unknown calibration method {calibration_method!r}; expected one of {sorted(methods)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EngineError(f"fp32 model {onnx_path} does not exist")
    patches = _check_calibration(calibration_patches)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / INT8_FILENAME

    source = onnx.load(str(onnx_path))
    metadata = {p.key: p.value for p in source.metadata_props}
    input_name = source.graph.input[0].name
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".cpu-engine-", dir=out_dir))
    try:
        prepared = work / "prepared.onnx"
        # Symbolic shape inference cannot follow the exported GroupNorm reshapes; ONNX shape
        # inference and ORT's basic graph clean-up (what the quantiser needs) still run.
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        excluded = conv_nodes_to_exclude(onnx.load(str(prepared)), min_channels)
        quantized = work / "quantized.onnx"
        quantization.quantize_static(
            str(prepared),
            str(quantized),
            _PatchReader(patches, input_name),
            quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=methods[calibration_method],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        metadata["cpu_engine"] = "int8-qdq"
        metadata["quantization"] = json.dumps(
            {
                "format": "QDQ",
                "activations": "uint8 per-tensor",
                "weights": "int8 per-channel",
                "op_types": ["Conv"],
                "fp32_nodes": excluded,
                "calibration_method": calibration_method,
                "calibration_patches": int(len(patches)),
                "onnxruntime": ort.__version__,
                "source_onnx_sha256": file_sha256(onnx_path),
            }
        )
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        tmp = target.with_name(target.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, target)
    except (EngineError, MissingDependencyError):
        raise
    except Exception as exc:  # the quantiser raises plain exceptions of many kinds
        raise EngineError(f"INT8 quantisation of {onnx_path} failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "built %s from %s in %.1f s (%d calibration patches, %d convs kept fp32)",
        target,
        onnx_path.name,
        time.perf_counter() - start,
        len(patches),
        len(excluded),
    )
    return target


# --------------------------------------------------------------------------------------------
# Side-by-side comparison
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way of running the model on the CPU.

    Attributes:
        name: Short name used in tables and benchmarks.
        artifact: ``"fp32"`` (the exported model) or ``"int8"`` (:func:`build_cpu_engine`).
        backend: ``"onnxruntime"``, ``"openvino"`` or ``"ort-openvino-ep"`` (ONNX Runtime's
            OpenVINO execution provider, from the ``onnxruntime-openvino`` wheel).
        precision: Floating-point precision hint (OpenVINO only).
        optimization: ONNX Runtime graph optimisation level.
        threads: Intra-op threads (None: one per core).
        spinning: ONNX Runtime worker-thread spinning.
    """

    name: str
    artifact: Literal["fp32", "int8"]
    backend: Literal["onnxruntime", "openvino", "ort-openvino-ep"]
    precision: Precision = "f32"
    optimization: Literal["basic", "extended", "all"] = "all"
    threads: int | None = None
    spinning: bool = True

    def unavailable_reason(self) -> str | None:
        """Why this candidate cannot run here, or None when it can."""
        if self.backend == "openvino" and not openvino_available():
            return "openvino is not installed (pip install 'nodule-edge[openvino]')"
        if self.backend == "ort-openvino-ep" and "OpenVINOExecutionProvider" not in _onnxruntime_providers():
            return "this onnxruntime has no OpenVINOExecutionProvider (needs the onnxruntime-openvino wheel, which replaces onnxruntime)"
        return None

    def load(self, model_path: str | Path) -> CpuEngine:
        """Load the candidate's engine from the artifact at ``model_path``."""
        if self.backend == "ort-openvino-ep":
            return _load_ort_openvino_ep(Path(model_path), self.threads, self.precision)
        if self.backend == "onnxruntime":
            options = session_options_for(self.threads, optimization=self.optimization, spinning=self.spinning)
            return _load_ort(Path(model_path), options)
        return load_cpu_engine(model_path, backend=self.backend, threads=self.threads, precision=self.precision)


def _load_ort_openvino_ep(path: Path, threads: int | None, precision: Precision) -> CpuEngine:
    provider_options: dict[str, str] = {"device_type": "CPU", "num_of_threads": str(threads or default_threads())}
    if precision == "bf16":
        provider_options["load_config"] = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})
    else:
        provider_options["precision"] = "FP32"
    engine = _load_ort(path, session_options_for(threads), [("OpenVINOExecutionProvider", provider_options), "CPUExecutionProvider"])
    engine.backend = "ort-openvino-ep"
    engine.precision = precision
    return engine


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("ort-fp32", "fp32", "onnxruntime"),
    Candidate("ort-fp32-basic", "fp32", "onnxruntime", optimization="basic"),
    Candidate("ort-fp32-extended", "fp32", "onnxruntime", optimization="extended"),
    Candidate("ort-fp32-1thread", "fp32", "onnxruntime", threads=1),
    Candidate("ort-fp32-nospin", "fp32", "onnxruntime", spinning=False),
    Candidate("ort-int8", "int8", "onnxruntime"),
    Candidate("ort-int8-extended", "int8", "onnxruntime", optimization="extended"),
    Candidate("openvino-fp32", "fp32", "openvino"),
    Candidate("openvino-bf16", "fp32", "openvino", precision="bf16"),
    Candidate("openvino-int8", "int8", "openvino"),
    Candidate("openvino-int8-bf16", "int8", "openvino", precision="bf16"),
    Candidate("ortov-ep-bf16", "fp32", "ort-openvino-ep", precision="bf16"),
    Candidate("ortov-ep-int8", "int8", "ort-openvino-ep"),
)
"""Every candidate the benchmark and :func:`compare_engines` know; the first is the reference."""

_REFERENCE = "ort-fp32"
_DEFAULT_COMPARE = (
    "ort-fp32",
    "ort-int8",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
    "openvino-int8-bf16",
    "ortov-ep-bf16",
    "ortov-ep-int8",
)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation; 1 where both rows are constant and equal, 0 where one is."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    flat_a, flat_b = (a * a).sum(axis=1) == 0, (b * b).sum(axis=1) == 0
    out = np.divide(num, den, out=np.zeros(len(a)), where=den > 0)
    out[flat_a & flat_b] = 1.0
    return out


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide((a * b).sum(axis=1), den, out=np.ones(len(a)), where=den > 0)


def _run_all(engine: CpuEngine, patches: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(patches), batch):
        out = engine.run(np.asarray(patches[start : start + batch], dtype=np.float32))
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


def _accuracy(
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: np.ndarray | None,
    ratings: np.ndarray | None,
) -> dict[str, float]:
    stats: dict[str, float] = {}
    if labels is not None:
        known = labels >= 0
        stats["auc"] = roc_auc(labels[known], outputs["malignancy_probability"][known])
        stats["auc_delta"] = stats["auc"] - roc_auc(labels[known], reference["malignancy_probability"][known])
    if ratings is not None:
        rated = np.isfinite(ratings).all(axis=1)
        mae = float(np.abs(outputs["attributes"][rated] - ratings[rated]).mean())
        ref_mae = float(np.abs(reference["attributes"][rated] - ratings[rated]).mean())
        stats["attribute_mae"] = mae
        stats["attribute_mae_delta"] = mae - ref_mae
    cam = _pearson_rows(outputs["saliency"], reference["saliency"])
    stats["cam_pearson_mean"] = float(cam.mean())
    stats["cam_pearson_min"] = float(cam.min())
    stats["malignancy_max_abs"] = float(np.abs(outputs["malignancy_probability"] - reference["malignancy_probability"]).max())
    stats["attributes_max_abs"] = float(np.abs(outputs["attributes"] - reference["attributes"]).max())
    seg, ref_seg = outputs["segmentation"] >= 0.5, reference["segmentation"] >= 0.5
    inter = (seg & ref_seg).reshape(len(seg), -1).sum(axis=1)
    total = seg.reshape(len(seg), -1).sum(axis=1) + ref_seg.reshape(len(seg), -1).sum(axis=1)
    stats["segmentation_dice_vs_ref_min"] = float(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0).min())
    for name in ("nodule_attention", "background_attention"):
        stats[f"{name}_max_abs"] = float(np.abs(outputs[name] - reference[name]).max())
    stats["embedding_cosine_min"] = float(_cosine_rows(outputs["embedding"], reference["embedding"]).min())
    return stats


def _time_round_robin(engines: dict[str, CpuEngine], patches: np.ndarray, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median and minimum ms per patch, candidates interleaved so background load hits all alike."""
    x = np.ascontiguousarray(patches[:batch], dtype=np.float32)
    if len(x) < batch:
        x = np.concatenate([x] * (batch // len(x) + 1))[:batch]
    for engine in engines.values():
        for _ in range(2):
            engine.run(x)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.run(x)
            times[name].append((time.perf_counter() - start) * 1000.0 / batch)
    return {name: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v))} for name, v in times.items()}


def _timing_table(engines: dict[str, CpuEngine], patches: np.ndarray, batches: Iterable[int], rounds: int) -> dict[str, dict[str, float]]:
    """``b{N}_median_ms``, ``b{N}_min_ms`` (per patch) and ``b{N}_ratio`` (to the reference) per engine."""
    table: dict[str, dict[str, float]] = {name: {} for name in engines}
    for size in batches:
        timings = _time_round_robin(engines, patches, size, rounds)
        ref_ms = timings[_REFERENCE]["median_ms"]
        for name, t in timings.items():
            table[name][f"b{size}_median_ms"] = t["median_ms"]
            table[name][f"b{size}_min_ms"] = t["min_ms"]
            table[name][f"b{size}_ratio"] = t["median_ms"] / ref_ms
    return table


def time_candidates(
    onnx_path: str | Path,
    int8_path: str | Path,
    candidates: Iterable[str] | None = None,
    batches: Sequence[int] = (1, 8),
    rounds: int = 10,
) -> dict[str, Any]:
    """Latency of candidates, interleaved round by round, with ratios to ``ort-fp32``.

    Args:
        onnx_path: The fp32 model.
        int8_path: The INT8 model from :func:`build_cpu_engine`.
        candidates: Names from :data:`CANDIDATES` (default: all); unavailable ones are skipped.
        batches: Batch sizes to time.
        rounds: Rounds per batch size.

    Returns:
        ``{"reference": ..., "candidates": {name: {"b1_median_ms": ..., "b1_min_ms": ...,
        "b1_ratio": ...}}, "skipped": {name: reason}}``, times in ms per patch.
    """
    by_name = {c.name: c for c in CANDIDATES}
    names = [_REFERENCE] + [n for n in (candidates or by_name) if n != _REFERENCE]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise EngineError(f"unknown CPU engine candidates {unknown}; known: {sorted(by_name)}")
    skipped = {n: reason for n in names if (reason := by_name[n].unavailable_reason())}
    artifacts = {"fp32": Path(onnx_path), "int8": Path(int8_path)}
    engines = {n: by_name[n].load(artifacts[by_name[n].artifact]) for n in names if n not in skipped}
    patches = np.random.default_rng(_CAL_SEED).random((max(batches), 2, 64, 64, 64), dtype=np.float32)
    return {"reference": _REFERENCE, "candidates": _timing_table(engines, patches, batches, rounds), "skipped": skipped}


def compare_engines(
    onnx_path: str | Path,
    patches: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    ratings: np.ndarray | None = None,
    calibration_patches: np.ndarray | None = None,
    candidates: Iterable[str] = _DEFAULT_COMPARE,
    int8_path: str | Path | None = None,
    work_dir: str | Path | None = None,
    batch: int = 8,
    timing_rounds: int = 0,
) -> dict[str, Any]:
    """Compare CPU engines with the fp32 ONNX Runtime reference on the same patches.

    Accuracy: AUC and attribute MAE (vs reader means) and their change from the reference;
    per-patch Pearson correlation of the saliency (CAM) maps with the reference; largest absolute
    changes of the other outputs; segmentation Dice vs the reference at 0.5; embedding cosine.
    Timing (``timing_rounds`` > 0): ms per patch at batch 1 and ``batch``, all candidates
    interleaved round by round so a busy machine slows them alike (read the ratios).

    Args:
        onnx_path: The fp32 model.
        patches: Evaluation patches ``[N, 2, 64, 64, 64]``.
        labels: Binary labels per patch (-1 = unknown), for AUC.
        ratings: Reader-mean ratings ``[N, 6]`` on the 1–5 scale (NaN rows = unknown), for MAE.
        calibration_patches: Patches for building the INT8 model (disjoint from ``patches``);
            needed unless ``int8_path`` is given or no INT8 candidate is asked for.
        candidates: Names from :data:`CANDIDATES`; unavailable ones are reported as skipped.
        int8_path: An already built INT8 model to use instead of building one.
        work_dir: Where to build the INT8 model (default: a temporary folder).
        batch: Batch size for the accuracy runs and the batched timing.
        timing_rounds: Interleaved timing rounds per batch size (0: no timing).

    Returns:
        ``{"reference": name, "n": count, "candidates": {name: stats}, "skipped": {name: reason}}``.
    """
    by_name = {c.name: c for c in CANDIDATES}
    names = [_REFERENCE] + [n for n in candidates if n != _REFERENCE]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise EngineError(f"unknown CPU engine candidates {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in names]
    skipped = {c.name: reason for c in chosen if (reason := c.unavailable_reason())}
    chosen = [c for c in chosen if c.name not in skipped]
    if labels is not None:
        labels = np.asarray(labels)
    if ratings is not None:
        ratings = np.asarray(ratings, dtype=np.float64)

    tmp_dir = None
    artifacts: dict[str, Path] = {"fp32": Path(onnx_path)}
    try:
        if any(c.artifact == "int8" for c in chosen):
            if int8_path is not None:
                artifacts["int8"] = Path(int8_path)
            else:
                if work_dir is None:
                    tmp_dir = tempfile.mkdtemp(prefix="nodule-edge-cpu-engine-")
                    work_dir = tmp_dir
                artifacts["int8"] = build_cpu_engine(onnx_path, work_dir, calibration_patches)
        engines = {c.name: c.load(artifacts[c.artifact]) for c in chosen}
        reference = _run_all(engines[_REFERENCE], patches, batch)
        results: dict[str, dict[str, float]] = {}
        for name, engine in engines.items():
            outputs = reference if name == _REFERENCE else _run_all(engine, patches, batch)
            results[name] = _accuracy(outputs, reference, labels, ratings)
            log.info("%s: %s", name, json.dumps({k: round(v, 4) for k, v in results[name].items()}))
        if timing_rounds > 0:
            for name, timing in _timing_table(engines, patches, sorted({1, batch}), timing_rounds).items():
                results[name].update(timing)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"reference": _REFERENCE, "n": int(len(patches)), "candidates": results, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# Real LIDC patches and the command line
# --------------------------------------------------------------------------------------------


def load_lidc_patches(
    voi_dir: str | Path,
    cache_dir: str | Path | None,
    n_eval: int = 150,
    n_calibration: int = 32,
    seed: int = _CAL_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint evaluation and calibration patches from the LIDC VOIs, split by patient.

    Evaluation nodules have a proxy label (mean malignancy ≠ 3), so AUC uses all of them;
    calibration nodules come from other patients. Needs the training extra's data module
    (SimpleITK) but not torch.

    Returns:
        ``(eval_patches, labels int, ratings float [n, 6], calibration_patches)``; patches stay
        float16 as cached (engines and the calibration reader convert batch by batch).
    """
    from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

    records = read_unsure_manifest(voi_dir)
    cache = build_patch_cache(records, cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    patients = sorted({r.patient_id for r in records})
    rng.shuffle(patients)
    eval_idx: list[int] = []
    cal_idx: list[int] = []
    cal_patients: set[str] = set()
    by_patient: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_patient.setdefault(rec.patient_id, []).append(i)
    for patient in patients:
        idx = by_patient[patient]
        if len(cal_idx) < n_calibration:
            cal_idx.extend(idx)
            cal_patients.add(patient)
        elif len(eval_idx) < n_eval:
            eval_idx.extend(i for i in idx if records[i].label is not None)
    eval_idx, cal_idx = eval_idx[:n_eval], cal_idx[:n_calibration]
    if len(eval_idx) < n_eval:
        raise EngineError(f"only {len(eval_idx)} labelled nodules available for evaluation in {voi_dir}, asked for {n_eval}")
    labels = np.array([records[i].label for i in eval_idx], dtype=np.int64)
    ratings = np.array([records[i].ratings if records[i].ratings is not None else (np.nan,) * 6 for i in eval_idx], dtype=np.float64)
    return cache.images[eval_idx], labels, ratings, cache.images[cal_idx]


def _format_table(report: dict[str, Any]) -> str:
    cols = [
        ("b1_median_ms", "b1 ms", "{:.1f}"),
        ("b1_ratio", "b1 ×fp32", "{:.2f}"),
        ("b8_median_ms", "b8 ms/patch", "{:.1f}"),
        ("b8_ratio", "b8 ×fp32", "{:.2f}"),
        ("auc_delta", "ΔAUC", "{:+.4f}"),
        ("attribute_mae_delta", "ΔMAE", "{:+.4f}"),
        ("cam_pearson_mean", "CAM r mean", "{:.4f}"),
        ("cam_pearson_min", "CAM r min", "{:.4f}"),
        ("malignancy_max_abs", "max|Δp|", "{:.4f}"),
        ("embedding_cosine_min", "emb cos min", "{:.4f}"),
    ]
    lines = ["| candidate | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, stats in report["candidates"].items():
        cells = [fmt.format(stats[key]) if key in stats else "–" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in report["skipped"].items():
        lines.append(f"| {name} | skipped: {reason} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nodule_edge.export.cpu_engine {build,compare} ...``."""
    parser = argparse.ArgumentParser(prog="python -m nodule_edge.export.cpu_engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "compare", "time"):
        p = sub.add_parser(name)
        p.add_argument("onnx", type=Path, help="the fp32 model.onnx")
        p.add_argument("--voi-dir", type=Path, default=Path("../shared/data/lidc_voi"), help="LIDC VOI folder")
        p.add_argument("--cache-dir", type=Path, default=Path("cache"), help="patch cache folder")
        p.add_argument("--calibration", type=int, default=32, help="calibration patches")
        p.add_argument("-v", "--verbose", action="store_true")
    sub.choices["build"].add_argument("out_dir", type=Path)
    cmp = sub.choices["compare"]
    cmp.add_argument("-n", type=int, default=150, help="evaluation patches (labelled)")
    cmp.add_argument("--int8", type=Path, default=None, help="use this INT8 model instead of building one")
    cmp.add_argument("--work-dir", type=Path, default=None, help="keep the built INT8 model here")
    cmp.add_argument("--candidates", default=",".join(_DEFAULT_COMPARE), help="comma-separated candidate names")
    cmp.add_argument("--timing-rounds", type=int, default=10, help="interleaved timing rounds (0: accuracy only)")
    cmp.add_argument("--json", type=Path, default=None, help="also write the report here")
    timing = sub.choices["time"]
    timing.add_argument("--int8", type=Path, required=True, help="the INT8 model (from 'build')")
    timing.add_argument("--candidates", default=",".join(c.name for c in CANDIDATES), help="comma-separated candidate names")
    timing.add_argument("--rounds", type=int, default=10, help="interleaved rounds per batch size")
    timing.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = parser.parse_args(argv)
    if args.command == "time":
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        report = time_candidates(
            args.onnx, args.int8, [c for c in args.candidates.split(",") if c], [int(b) for b in args.batches.split(",")], args.rounds
        )
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    patches, labels, ratings, calibration = load_lidc_patches(
        args.voi_dir, args.cache_dir, n_eval=getattr(args, "n", 0) or 0, n_calibration=args.calibration
    )
    if args.command == "build":
        sys.stdout.write(f"{build_cpu_engine(args.onnx, args.out_dir, calibration)}\n")
        return 0
    report = compare_engines(
        args.onnx,
        patches,
        labels=labels,
        ratings=ratings,
        calibration_patches=calibration,
        candidates=[c for c in args.candidates.split(",") if c],
        int8_path=args.int8,
        work_dir=args.work_dir,
        timing_rounds=args.timing_rounds,
    )
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, args.json)
    sys.stdout.write(_format_table(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

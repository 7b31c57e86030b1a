"""TensorRT engines: build a serialized FP16 engine from the ONNX model, and load it safely.

.. warning::
   Engine building and engine execution have NOT been executed on any machine in this project:
   no machine here has a GPU or loadable TensorRT libraries. The TensorRT and CUDA calls below are
   written against the documented TensorRT 10 Python API (``tensorrt`` 10.x) and the NVIDIA
   ``cuda-python`` runtime bindings, and are exercised here only against a stand-in module in the
   unit tests. The GPU test (``pytest -m gpu``) builds and runs a real engine where a GPU exists.

What the build does (:func:`build_engine`):

* parses the ONNX file with ``trt.OnnxParser`` (native InstanceNormalization layers);
* enables FP16 and keeps the normalisation layers in FP32 with per-layer precision constraints
  (``layer.precision`` and ``set_output_type``) under ``OBEY_PRECISION_CONSTRAINTS``: GroupNorm and
  InstanceNorm statistics computed in FP16 drift or overflow, a documented TensorRT problem. The
  layers are chosen by :func:`select_fp32_layers` from their TensorRT layer type
  (``NORMALIZATION``) and from their names (the affine ``Add`` that the exporter names
  ``..group_norm``, ``InstanceNormalization`` plugin layers, decomposed norms under a ``norm``
  module path);
* adds one optimisation profile for the input's batch dimension (default min 1, opt 4, max 16);
* reads and updates a timing cache so rebuilds on the same machine are fast;
* writes the engine and a JSON sidecar (``<engine>.json``) atomically. The sidecar records the
  TensorRT version, GPU name, compute capability, the ONNX file's sha256, the engine's own
  sha256 and the ONNX metadata (patch spec, output names) the runtime needs.

Loading (:func:`load_engine`) compares that sidecar with the running machine and refuses a
mismatched engine with one message that lists every difference and how to rebuild; a TensorRT
engine only runs on the TensorRT version and GPU it was built for. :class:`TensorRTEngine` is the
runtime's ``tensorrt`` backend on top of it, and :func:`build_engine_for_bundle` adds an engine to
a model bundle (``nodule-edge export --tensorrt``).

Requirements: TensorRT 10 (``pip install 'nodule-edge[trt]'``). TensorRT 11 removed weak typing
(``BuilderFlag.FP16`` and per-layer precision); with it only ``fp16=False`` builds work, and an FP16
build stops with an :class:`~nodule_edge.errors.EngineError` saying so. Device queries, memory
and streams use NVIDIA's ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` in older
releases) rather than torch, cupy or pycuda: it is NVIDIA's own binding, used by the TensorRT
samples, and keeps torch out of the runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from nodule_edge.errors import ConfigError, EngineError, MissingDependencyError, OutputError, require

__all__ = [
    "MAX_PROFILE_BATCH",
    "ENGINE_SIDECAR_FORMAT",
    "REBUILD_HINT",
    "DEFAULT_FP32_LAYER_TYPES",
    "DEFAULT_FP32_NAME_PATTERNS",
    "TrtBuildSettings",
    "EngineEnvironment",
    "EngineSidecar",
    "sidecar_path_for",
    "select_fp32_layers",
    "engine_mismatches",
    "check_engine_compatibility",
    "current_environment",
    "build_engine",
    "load_engine",
    "TrtExecutor",
    "TensorRTEngine",
    "build_engine_for_bundle",
]

log = logging.getLogger(__name__)

MAX_PROFILE_BATCH = 16
"""Largest batch an optimisation profile may allow (the runtime never batches more patches)."""

ENGINE_SIDECAR_FORMAT = "nodule-edge-tensorrt-engine-v1"
REBUILD_HINT = "rebuild with: nodule-edge export --tensorrt ... on this machine"

DEFAULT_FP32_LAYER_TYPES: tuple[str, ...] = ("NORMALIZATION",)
"""TensorRT layer types always kept in FP32 (GroupNorm/InstanceNorm/LayerNorm become these)."""

DEFAULT_FP32_NAME_PATTERNS: tuple[str, ...] = (
    # ONNX op names and the torch exporter's node names: "node_InstanceNormalization_18",
    # "node_group_norm" (the affine Add of a decomposed GroupNorm), "InstanceNormalization_TRT".
    r"(group|instance|layer|batch)_?norm",
    # Decomposed norms under a module called norm/norm1/gn: "/encoder/norm1/ReduceMean".
    r"(^|[/._])(norm|gn)\d*([/._:]|$)",
)
"""Case-insensitive regular expressions on layer names; a match keeps that layer in FP32."""

_TRT_MIN_MAJOR = 10
_LAST_WEAKLY_TYPED_MAJOR = 10
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CC = re.compile(r"^\d+\.\d+$")
_LAYER_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*$")


# --------------------------------------------------------------------------------------------
# Pure logic (no TensorRT needed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtBuildSettings:
    """How to build an engine.

    Attributes:
        fp16: Allow FP16 kernels (normalisation layers are still kept in FP32).
        fp32_layer_types: TensorRT ``LayerType`` names whose layers always run in FP32.
        fp32_name_patterns: Case-insensitive regexes; layers whose name matches run in FP32.
        precision_constraints: ``"obey"`` fails the build if an FP32 layer has no FP32 kernel;
            ``"prefer"`` only warns.
        min_batch: Smallest batch of the optimisation profile.
        opt_batch: Batch the kernels are tuned for.
        max_batch: Largest batch of the optimisation profile (at most ``MAX_PROFILE_BATCH``).
        input_name: The network input whose first dimension is the batch.
        workspace_bytes: Limit of TensorRT's workspace memory pool.
        timing_cache_path: Timing cache to read and update; ``None`` puts it beside the engine as
            ``<engine>.timing-cache``.
        use_timing_cache: Set to ``False`` to build without reading or writing a timing cache.
    """

    fp16: bool = True
    fp32_layer_types: tuple[str, ...] = DEFAULT_FP32_LAYER_TYPES
    fp32_name_patterns: tuple[str, ...] = DEFAULT_FP32_NAME_PATTERNS
    precision_constraints: str = "obey"
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = MAX_PROFILE_BATCH
    input_name: str = "patch"
    workspace_bytes: int = 1 << 30
    timing_cache_path: Path | None = None
    use_timing_cache: bool = True

    def __post_init__(self) -> None:
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in batches):
            raise ConfigError(f"optimisation profile batches must be integers, got min/opt/max = {batches}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch <= MAX_PROFILE_BATCH:
            raise ConfigError(
                f"optimisation profile needs 1 <= min <= opt <= max <= {MAX_PROFILE_BATCH}, "
                f"got min={self.min_batch}, opt={self.opt_batch}, max={self.max_batch}"
            )
        if self.precision_constraints not in ("obey", "prefer"):
            raise ConfigError(f"precision_constraints must be 'obey' or 'prefer', got {self.precision_constraints!r}")
        if not isinstance(self.workspace_bytes, int) or self.workspace_bytes <= 0:
            raise ConfigError(f"workspace_bytes must be a positive integer, got {self.workspace_bytes!r}")
        if not self.input_name:
            raise ConfigError("input_name must not be empty")
        for layer_type in self.fp32_layer_types:
            if not _LAYER_TYPE.match(str(layer_type)):
                raise ConfigError(f"fp32_layer_types entry {layer_type!r} is not a TensorRT LayerType name such as 'NORMALIZATION'")
        for pattern in self.fp32_name_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"fp32_name_patterns entry {pattern!r} is not a valid regular expression: {exc}") from exc
        if self.timing_cache_path is not None:
            object.__setattr__(self, "timing_cache_path", Path(self.timing_cache_path))

    @property
    def profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the optimisation profile."""
        return (self.min_batch, self.opt_batch, self.max_batch)


@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine is tied to: the TensorRT version and the GPU.

    Attributes:
        tensorrt_version: ``tensorrt.__version__``, e.g. ``"10.3.0"``.
        gpu_name: CUDA device name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        compute_capability: ``"major.minor"``, e.g. ``"9.0"``.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class EngineSidecar:
    """The JSON written next to an engine (``<engine>.json``): what it was built for and from.

    Attributes:
        tensorrt_version: TensorRT version that built the engine.
        gpu_name: GPU the engine was built on.
        compute_capability: That GPU's compute capability, ``"major.minor"``.
        onnx_sha256: sha256 of the ONNX file the engine was built from.
        engine_sha256: sha256 of the serialized engine file.
        precision: ``"fp16"`` (with FP32 normalisation) or ``"fp32"``.
        input_name: The batched network input.
        profile: (min, opt, max) batch of the optimisation profile.
        fp32_layers: Names of the layers constrained to FP32.
        onnx_file: File name (not path) of the ONNX model, for messages.
        created_utc: ISO-8601 build time.
        nodule_edge_version: Package version that built the engine.
        onnx_metadata: The ONNX model's ``metadata_props`` (patch spec, output names, ...), so
            the runtime can describe the engine without opening the ONNX file.
        format: Sidecar format tag.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    engine_sha256: str
    precision: str
    input_name: str
    profile: tuple[int, int, int]
    fp32_layers: tuple[str, ...] = ()
    onnx_file: str = ""
    created_utc: str = ""
    nodule_edge_version: str = ""
    onnx_metadata: dict[str, str] = field(default_factory=dict, hash=False)
    format: str = ENGINE_SIDECAR_FORMAT

    @property
    def environment(self) -> EngineEnvironment:
        """The environment the engine was built in."""
        return EngineEnvironment(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "format": self.format,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "onnx_sha256": self.onnx_sha256,
            "engine_sha256": self.engine_sha256,
            "precision": self.precision,
            "input_name": self.input_name,
            "profile": {"min": self.profile[0], "opt": self.profile[1], "max": self.profile[2]},
            "fp32_layers": list(self.fp32_layers),
            "onnx_file": self.onnx_file,
            "created_utc": self.created_utc,
            "nodule_edge_version": self.nodule_edge_version,
            "onnx_metadata": dict(self.onnx_metadata),
        }

    def to_json(self) -> str:
        """Indented, key-sorted JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "sidecar") -> EngineSidecar:
        """Validate and build from a parsed JSON object.

        Raises:
            EngineError: Unknown format, missing or malformed field (named in the message).
        """
        if not isinstance(data, dict):
            raise EngineError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != ENGINE_SIDECAR_FORMAT:
            raise EngineError(f"{source}: unknown engine sidecar format {data.get('format')!r}, expected {ENGINE_SIDECAR_FORMAT!r}; {REBUILD_HINT}")

        def text(key: str, required: bool = True) -> str:
            value = data.get(key, None if required else "")
            if not isinstance(value, str) or (required and not value):
                raise EngineError(f"{source}: field {key!r} must be a non-empty string, got {value!r}")
            return value

        for key in ("onnx_sha256", "engine_sha256"):
            if not _HEX64.match(text(key)):
                raise EngineError(f"{source}: field {key!r} is not a sha256 hex digest: {data[key]!r}")
        if not _CC.match(text("compute_capability")):
            raise EngineError(f"{source}: field 'compute_capability' must look like '8.6', got {data['compute_capability']!r}")
        if text("precision") not in ("fp16", "fp32"):
            raise EngineError(f"{source}: field 'precision' must be 'fp16' or 'fp32', got {data['precision']!r}")
        profile = data.get("profile")
        if not isinstance(profile, dict) or not all(isinstance(profile.get(k), int) for k in ("min", "opt", "max")):
            raise EngineError(f"{source}: field 'profile' must be {{'min': int, 'opt': int, 'max': int}}, got {profile!r}")
        layers = data.get("fp32_layers", [])
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise EngineError(f"{source}: field 'fp32_layers' must be a list of layer names")
        metadata = data.get("onnx_metadata", {})
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise EngineError(f"{source}: field 'onnx_metadata' must map strings to strings")
        return cls(
            tensorrt_version=text("tensorrt_version"),
            gpu_name=text("gpu_name"),
            compute_capability=text("compute_capability"),
            onnx_sha256=text("onnx_sha256"),
            engine_sha256=text("engine_sha256"),
            precision=text("precision"),
            input_name=text("input_name"),
            profile=(profile["min"], profile["opt"], profile["max"]),
            fp32_layers=tuple(layers),
            onnx_file=text("onnx_file", required=False),
            created_utc=text("created_utc", required=False),
            nodule_edge_version=text("nodule_edge_version", required=False),
            onnx_metadata=dict(metadata),
        )

    @classmethod
    def from_json(cls, text: str, source: str = "sidecar") -> EngineSidecar:
        """Parse sidecar JSON text.

        Raises:
            EngineError: Not JSON, or not a valid sidecar.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EngineError(f"{source} is not valid JSON: {exc}; {REBUILD_HINT}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def read(cls, path: str | Path) -> EngineSidecar:
        """Read a sidecar file.

        Raises:
            EngineError: Missing, unreadable or invalid sidecar.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise EngineError(f"engine sidecar {path} is missing, so the engine's TensorRT version, GPU and model cannot be checked; {REBUILD_HINT}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise EngineError(f"engine sidecar {path} cannot be read: {exc}") from exc
        return cls.from_json(text, str(path))

    def write(self, path: str | Path) -> Path:
        """Write the sidecar atomically (temp file + ``os.replace``).

        Raises:
            OutputError: The file cannot be written; nothing partial is left.
        """
        path = Path(path)
        _atomic_write_bytes(path, self.to_json().encode("utf-8"))
        return path


def sidecar_path_for(engine_path: str | Path) -> Path:
    """The sidecar of an engine: ``model.plan`` → ``model.plan.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def _timing_cache_path_for(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".timing-cache")


def _short_type(layer_type: Any) -> str:
    # Accepts "NORMALIZATION", "LayerType.NORMALIZATION" or a tensorrt.LayerType member.
    name = getattr(layer_type, "name", None)
    return str(name if isinstance(name, str) else layer_type).rsplit(".", 1)[-1].upper()


def select_fp32_layers(
    layers: Iterable[tuple[str, Any]],
    layer_types: Sequence[str] = DEFAULT_FP32_LAYER_TYPES,
    name_patterns: Sequence[str] = DEFAULT_FP32_NAME_PATTERNS,
) -> list[str]:
    """Pick the layers to keep in FP32 in an FP16 engine.

    Args:
        layers: ``(layer name, layer type)`` pairs in network order; the type may be a
            ``tensorrt.LayerType`` member or its name (``"NORMALIZATION"``,
            ``"LayerType.NORMALIZATION"``).
        layer_types: Layer types that are always kept in FP32.
        name_patterns: Case-insensitive regexes searched in the layer name.

    Returns:
        Names of the selected layers, in network order, without duplicates.
    """
    wanted = {_short_type(t) for t in layer_types}
    compiled = [re.compile(p, re.IGNORECASE) for p in name_patterns]
    selected: list[str] = []
    seen: set[str] = set()
    for name, layer_type in layers:
        if name in seen:
            continue
        if _short_type(layer_type) in wanted or any(p.search(name) for p in compiled):
            selected.append(name)
            seen.add(name)
    return selected


def engine_mismatches(sidecar: EngineSidecar, current: EngineEnvironment, onnx_sha256: str | None = None) -> list[str]:
    """Every way an engine does not fit this machine (and model), one phrase each.

    Args:
        sidecar: What the engine was built for.
        current: This machine's TensorRT and GPU.
        onnx_sha256: sha256 of the ONNX model the engine must come from; ``None`` skips the check.

    Returns:
        Human-readable differences; empty when the engine fits.
    """
    problems: list[str] = []
    if sidecar.tensorrt_version != current.tensorrt_version:
        problems.append(f"TensorRT version: engine built with {sidecar.tensorrt_version}, this machine has {current.tensorrt_version}")
    if sidecar.gpu_name != current.gpu_name:
        problems.append(f"GPU: engine built on {sidecar.gpu_name!r}, this machine has {current.gpu_name!r}")
    if sidecar.compute_capability != current.compute_capability:
        problems.append(f"compute capability: engine built for {sidecar.compute_capability}, this GPU is {current.compute_capability}")
    if onnx_sha256 is not None and sidecar.onnx_sha256 != onnx_sha256.lower():
        problems.append(f"ONNX model: engine built from sha256 {sidecar.onnx_sha256[:12]}…, the model in use is {onnx_sha256.lower()[:12]}…")
    return problems


def check_engine_compatibility(
    sidecar: EngineSidecar,
    current: EngineEnvironment,
    onnx_sha256: str | None = None,
    engine_path: str | Path | None = None,
) -> None:
    """Refuse an engine built for another TensorRT version, GPU or model.

    Args:
        sidecar: What the engine was built for.
        current: This machine's TensorRT and GPU (see :func:`current_environment`).
        onnx_sha256: sha256 of the ONNX model the engine must come from; ``None`` skips the check.
        engine_path: Engine file, named in the message.

    Raises:
        EngineError: Listing every mismatch, with the rebuild command.
    """
    problems = engine_mismatches(sidecar, current, onnx_sha256)
    if problems:
        what = f"TensorRT engine {engine_path}" if engine_path is not None else "TensorRT engine"
        raise EngineError(
            f"{what} does not match this machine: {'; '.join(problems)}. "
            f"An engine only runs with the TensorRT version, GPU and model it was built for; {REBUILD_HINT}"
        )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc}") from exc


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------
# TensorRT / CUDA glue (needs a GPU; see the module warning)
# --------------------------------------------------------------------------------------------


def _import_tensorrt() -> Any:
    trt = require("tensorrt", "trt")
    major = _major(trt.__version__)
    if major < _TRT_MIN_MAJOR:
        raise EngineError(f"TensorRT {trt.__version__} is too old: nodule-edge needs TensorRT >= {_TRT_MIN_MAJOR} (pip install 'nodule-edge[trt]')")
    return trt


def _major(version: str) -> int:
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return 0


def _cudart() -> Any:
    import importlib

    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        pass
    try:
        return require("cuda.cudart", "trt")
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"'cuda-python' is needed for TensorRT engines but is not installed: pip install cuda-python ({exc})") from exc


def _cuda_call(cudart: Any, result: Any, what: str) -> Any:
    # cuda-python returns (error, *values) from every call.
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA {what} failed: {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def current_environment(device: int = 0) -> EngineEnvironment:
    """This machine's TensorRT version and the name and compute capability of a CUDA device.

    Args:
        device: CUDA device ordinal.

    Raises:
        MissingDependencyError: ``tensorrt`` or ``cuda-python`` is not installed.
        EngineError: No such CUDA device, or the CUDA runtime fails.
    """
    trt = require("tensorrt", "trt")
    cudart = _cudart()
    count = _cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not 0 <= device < int(count):
        raise EngineError(f"CUDA device {device} does not exist (this machine has {count})")
    props = _cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\x00", 1)[0].decode("utf-8", "replace")
    return EngineEnvironment(
        tensorrt_version=str(trt.__version__),
        gpu_name=str(name).strip(),
        compute_capability=f"{int(props.major)}.{int(props.minor)}",
    )


def _onnx_metadata(onnx_path: Path) -> dict[str, str]:
    onnx = require("onnx", "export")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise EngineError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    return {p.key: p.value for p in model.metadata_props}


def _make_logger(trt: Any) -> Any:
    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        """Routes TensorRT messages to this module's logger."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                log.error("TensorRT: %s", msg)
            elif severity == trt.Logger.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == trt.Logger.INFO:
                log.info("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    native = getattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM", None)
    if native is not None:
        # Native INormalizationLayer instead of the InstanceNormalization plugin, so the layer
        # can be constrained to FP32 (and no cuDNN plugin is needed).
        parser.set_flag(native)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        shown = "; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {shown or 'no error reported'}")
    return parser


def _input_tail(network: Any, input_name: str, onnx_path: Path) -> tuple[int, ...]:
    names = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        names.append(tensor.name)
        if tensor.name == input_name:
            shape = tuple(int(d) for d in tensor.shape)
            if not shape or shape[0] != -1:
                raise EngineError(f"{onnx_path}: input {input_name!r} has shape {shape}; its first (batch) dimension must be dynamic")
            if any(d < 0 for d in shape[1:]):
                raise EngineError(f"{onnx_path}: input {input_name!r} has shape {shape}; only the batch dimension may be dynamic")
            return shape[1:]
    raise EngineError(f"{onnx_path}: no network input named {input_name!r} (inputs: {', '.join(names) or 'none'})")


_FLOAT_DTYPE_NAMES = ("FLOAT", "HALF", "BF16")


def _apply_fp32_constraints(trt: Any, network: Any, settings: TrtBuildSettings) -> list[str]:
    float_types = {getattr(trt.DataType, n) for n in _FLOAT_DTYPE_NAMES if hasattr(trt.DataType, n)}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    candidates = []
    for layer in layers:
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        # Integer/shape layers cannot take an FP32 constraint (OBEY would fail the build).
        if outputs and all(out.dtype in float_types for out in outputs):
            candidates.append(layer)
    chosen = set(select_fp32_layers(((layer.name, layer.type) for layer in candidates), settings.fp32_layer_types, settings.fp32_name_patterns))
    kept: list[str] = []
    for layer in candidates:
        if layer.name not in chosen:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if layer.type == trt.LayerType.NORMALIZATION:
            try:
                # network.get_layer returns the base ILayer; down-cast to reach compute_precision.
                layer.__class__ = trt.INormalizationLayer
                layer.compute_precision = trt.float32
            except (AttributeError, TypeError) as exc:  # pragma: no cover - depends on the TRT build
                log.debug("cannot set compute_precision on %s: %s", layer.name, exc)
        kept.append(layer.name)
    return kept


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    settings: TrtBuildSettings | None = None,
    *,
    device: int = 0,
) -> EngineSidecar:
    """Build a serialized TensorRT engine from the ONNX model and write it with its sidecar.

    NOT EXECUTED on any machine of this project (no GPU); see the module docstring.

    Args:
        onnx_path: The exported ONNX model (input ``patch`` with a dynamic batch dimension).
        engine_path: Where to write the engine (e.g. ``model.plan``); the sidecar goes to
            ``<engine_path>.json``.
        settings: Build settings; the defaults are FP16 with FP32 normalisation, batch 1/4/16.
        device: CUDA device to build on.

    Returns:
        The sidecar that was written.

    Raises:
        MissingDependencyError: ``tensorrt`` or ``cuda-python`` is not installed.
        EngineError: Parsing or building failed, or FP16 was asked of TensorRT >= 11.
        OutputError: The engine, sidecar or timing cache cannot be written.
    """
    settings = settings or TrtBuildSettings()
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path)
    trt = _import_tensorrt()
    if settings.fp16 and _major(trt.__version__) > _LAST_WEAKLY_TYPED_MAJOR:
        raise EngineError(
            f"TensorRT {trt.__version__} removed weak typing (BuilderFlag.FP16 and per-layer precision), "
            f"so it cannot build the FP16 engine with FP32 normalisation: install TensorRT 10 "
            f"(pip install 'tensorrt>=10,<11') or build with fp16=False"
        )
    if not onnx_path.is_file():
        raise EngineError(f"ONNX model {onnx_path} does not exist")
    cudart = _cudart()
    _cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
    env = current_environment(device)
    onnx_sha256 = _sha256_file(onnx_path)
    onnx_metadata = _onnx_metadata(onnx_path)

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch: no creation flags.
    network = builder.create_network(0)
    _parser = _parse_onnx(trt, network, logger, onnx_path)  # must outlive the build
    tail = _input_tail(network, settings.input_name, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    fp32_layers: list[str] = []
    if settings.fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("GPU %s has no fast FP16; the FP16 engine may be slower than FP32", env.gpu_name)
        config.set_flag(trt.BuilderFlag.FP16)
        fp32_layers = _apply_fp32_constraints(trt, network, settings)
        flag = trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS if settings.precision_constraints == "obey" else trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS
        config.set_flag(flag)
        log.info("keeping %d layer(s) in FP32: %s", len(fp32_layers), ", ".join(fp32_layers[:10]) + (" …" if len(fp32_layers) > 10 else ""))
        if not fp32_layers:
            log.warning("FP16 build of %s found no normalisation layer to keep in FP32", onnx_path)

    profile = builder.create_optimization_profile()
    profile.set_shape(
        settings.input_name,
        (settings.min_batch, *tail),
        (settings.opt_batch, *tail),
        (settings.max_batch, *tail),
    )
    config.add_optimization_profile(profile)

    cache_path = None
    if settings.use_timing_cache:
        cache_path = settings.timing_cache_path or _timing_cache_path_for(engine_path)
        blob = b""
        if cache_path.is_file():
            blob = cache_path.read_bytes()
            log.info("using timing cache %s (%d bytes)", cache_path, len(blob))
        cache = config.create_timing_cache(blob)
        if cache is None and blob:
            log.warning("timing cache %s is unusable (other TensorRT version?); starting a new one", cache_path)
            cache = config.create_timing_cache(b"")
        # ignore_mismatch=False: a cache from another GPU/TensorRT must not steer tactic choice.
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s was made on another GPU or TensorRT; starting a new one", cache_path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building TensorRT %s engine for %s on %s (profile %s)", "FP16" if settings.fp16 else "FP32", onnx_path.name, env.gpu_name, settings.profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT messages logged above)")
    data = bytes(memoryview(serialized))

    if cache_path is not None:
        _atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    from nodule_edge import __version__

    sidecar = EngineSidecar(
        tensorrt_version=env.tensorrt_version,
        gpu_name=env.gpu_name,
        compute_capability=env.compute_capability,
        onnx_sha256=onnx_sha256,
        engine_sha256=_sha256_bytes(data),
        precision="fp16" if settings.fp16 else "fp32",
        input_name=settings.input_name,
        profile=settings.profile,
        fp32_layers=tuple(fp32_layers),
        onnx_file=onnx_path.name,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        nodule_edge_version=__version__,
        onnx_metadata=onnx_metadata,
    )
    # Engine first: a crash in between leaves an engine whose sha256 does not match the old
    # sidecar, which load_engine refuses.
    _atomic_write_bytes(engine_path, data)
    sidecar.write(sidecar_path_for(engine_path))
    log.info("wrote %s (%.1f MB) and %s", engine_path, len(data) / 1e6, sidecar_path_for(engine_path).name)
    return sidecar


def load_engine(engine_path: str | Path, onnx_sha256: str | None = None, *, device: int = 0) -> TrtExecutor:
    """Check an engine against this machine and its model, then deserialize it for inference.

    NOT EXECUTED on any machine of this project (no GPU); see the module docstring.

    Args:
        engine_path: The engine file; its sidecar ``<engine_path>.json`` must be beside it.
        onnx_sha256: sha256 of the ONNX model the engine must have been built from (from the
            bundle manifest); ``None`` skips that check.
        device: CUDA device to run on.

    Returns:
        An executor bound to ``device``.

    Raises:
        EngineError: Missing/invalid sidecar, engine file changed since it was built, TensorRT
            version/GPU/compute capability/model mismatch (with the rebuild command), or
            deserialization failure.
        MissingDependencyError: ``tensorrt`` or ``cuda-python`` is not installed.
    """
    engine_path = Path(engine_path)
    sidecar = EngineSidecar.read(sidecar_path_for(engine_path))
    try:
        data = engine_path.read_bytes()
    except OSError as exc:
        raise EngineError(f"TensorRT engine {engine_path} cannot be read: {exc}; {REBUILD_HINT}") from exc
    digest = _sha256_bytes(data)
    if digest != sidecar.engine_sha256:
        raise EngineError(
            f"TensorRT engine {engine_path} has sha256 {digest[:12]}…, its sidecar says {sidecar.engine_sha256[:12]}…: "
            f"the engine was replaced or corrupted; {REBUILD_HINT}"
        )
    _import_tensorrt()
    check_engine_compatibility(sidecar, current_environment(device), onnx_sha256, engine_path)
    return TrtExecutor(data, sidecar, device=device)


class TrtExecutor:
    """Runs a deserialized engine on one CUDA device (TensorRT 10 named-tensor API).

    Device buffers are allocated once for the profile's largest batch; :meth:`run` splits larger
    inputs into chunks. Not thread-safe: use one executor per thread.

    NOT EXECUTED on any machine of this project (no GPU); see the module docstring.
    """

    def __init__(self, engine_bytes: bytes, sidecar: EngineSidecar, device: int = 0) -> None:
        """Deserialize an engine (use :func:`load_engine`, which checks it first).

        Raises:
            EngineError: The engine cannot be deserialized or has an unsupported I/O layout.
        """
        trt = _import_tensorrt()
        self._trt = trt
        self._cudart = cudart = _cudart()
        self.sidecar = sidecar
        self._buffers: dict[str, int] = {}
        self._stream: Any = None
        _cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self._runtime = trt.Runtime(_make_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize the engine (built with TensorRT {sidecar.tensorrt_version}); {REBUILD_HINT}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")

        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [sidecar.input_name]:
            raise EngineError(f"engine inputs are {inputs}, expected exactly [{sidecar.input_name!r}]")
        self.input_name = sidecar.input_name
        self.output_names: tuple[str, ...] = tuple(n for n in names if n not in inputs)
        min_shape, _, max_shape = self._engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch = int(min_shape[0])
        self.max_batch = int(max_shape[0])
        self.input_tail: tuple[int, ...] = tuple(int(d) for d in max_shape[1:])
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}

        self._stream = _cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        try:
            for name in names:
                shape = tuple(int(d) for d in (max_shape if name == self.input_name else self._engine.get_tensor_shape(name)))
                if name != self.input_name:
                    if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
                        raise EngineError(f"engine output {name!r} has shape {shape}; expected a dynamic batch dimension and fixed others")
                    shape = (self.max_batch, *shape[1:])
                nbytes = max(1, math.prod(shape) * self._dtypes[name].itemsize)
                ptr = _cuda_call(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {name}")
                self._buffers[name] = int(ptr)
                if not self._context.set_tensor_address(name, int(ptr)):
                    raise EngineError(f"TensorRT refused the device address of tensor {name!r}")
        except Exception:
            self.close()
            raise

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run the engine on a batch of patches.

        Args:
            patches: float32 ``[N, *input_tail]`` (``[N, 2, 64, 64, 64]`` for nodule-edge);
                ``N`` larger than the profile's maximum is split into chunks.

        Returns:
            Output name → host array with the batch dimension first.

        Raises:
            EngineError: Wrong input shape, closed executor, or a TensorRT/CUDA failure.
        """
        if self._stream is None:
            raise EngineError("this TensorRT executor is closed")
        patches = np.ascontiguousarray(patches, dtype=self._dtypes[self.input_name])
        if patches.ndim != 1 + len(self.input_tail) or patches.shape[1:] != self.input_tail or patches.shape[0] < 1:
            raise EngineError(f"engine input {self.input_name!r} needs shape [N>=1, {', '.join(map(str, self.input_tail))}], got {list(patches.shape)}")
        chunks = [self._run_chunk(patches[i : i + self.max_batch]) for i in range(0, patches.shape[0], self.max_batch)]
        if len(chunks) == 1:
            return chunks[0]
        return {name: np.concatenate([c[name] for c in chunks], axis=0) for name in self.output_names}

    def _run_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self._cudart
        chunk = np.ascontiguousarray(chunk)
        if chunk.shape[0] < self.min_batch:
            raise EngineError(f"batch of {chunk.shape[0]} is below the engine profile's minimum {self.min_batch}")
        if not self._context.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise EngineError(f"TensorRT rejected input shape {list(chunk.shape)} for {self.input_name!r}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_call(cudart, cudart.cudaMemcpyAsync(self._buffers[self.input_name], chunk.ctypes.data, chunk.nbytes, h2d, self._stream), "cudaMemcpyAsync (input)")
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT messages logged above)")
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            host = np.empty(shape, dtype=self._dtypes[name])
            if host.nbytes:
                _cuda_call(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name], host.nbytes, d2h, self._stream), f"cudaMemcpyAsync ({name})")
            outputs[name] = host
        # The host arrays (and `chunk`) must stay alive until the copies finish.
        _cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream (idempotent)."""
        cudart = self._cudart
        for name, ptr in list(self._buffers.items()):
            err = cudart.cudaFree(ptr)[0]
            if err != cudart.cudaError_t.cudaSuccess:
                log.warning("cudaFree for %s failed: %s", name, err)
        self._buffers.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = None

    def __enter__(self) -> TrtExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Runtime and bundle integration
# --------------------------------------------------------------------------------------------


class TensorRTEngine:
    """The runtime's ``tensorrt`` backend (same interface as ``nodule_edge.runtime.engine.Engine``).

    Checks the engine against this machine and the bundle's ONNX model, then runs it; ``run`` is
    serialised with a lock so one engine can be shared between threads.

    NOT EXECUTED on any machine of this project (no GPU); see the module docstring.
    """

    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, onnx_path: str | Path | None = None, onnx_sha256: str | None = None, device: int = 0) -> None:
        """Load and check an engine.

        Args:
            engine_path: The engine file (its sidecar ``.json`` beside it).
            onnx_path: The ONNX model it was built from; only read when the sidecar carries no
                ONNX metadata.
            onnx_sha256: sha256 the engine's source model must have (from the bundle manifest).
            device: CUDA device.

        Raises:
            EngineError: See :func:`load_engine`; also when the model metadata is unavailable.
            MissingDependencyError: ``tensorrt`` or ``cuda-python`` is not installed.
        """
        from types import SimpleNamespace

        from nodule_edge.runtime.engine import read_onnx_metadata

        self.path = Path(engine_path)
        self._executor = load_engine(self.path, onnx_sha256, device=device)
        sidecar = self._executor.sidecar
        meta = dict(sidecar.onnx_metadata)
        if not meta and onnx_path is not None:
            meta = _onnx_metadata(Path(onnx_path))
        if not meta:
            raise EngineError(f"TensorRT engine {self.path} carries no model metadata and no ONNX model was given; {REBUILD_HINT}")
        # read_onnx_metadata takes an ONNX Runtime session; hand it the same metadata map.
        self.metadata = read_onnx_metadata(SimpleNamespace(get_modelmeta=lambda: SimpleNamespace(custom_metadata_map=meta)))
        missing = [n for n in self.metadata.output_names if n not in self._executor.output_names]
        if missing or self.metadata.input_name != self._executor.input_name:
            raise EngineError(f"TensorRT engine {self.path} does not have the model's tensors (missing outputs {missing}, input {self._executor.input_name!r}); {REBUILD_HINT}")
        self.providers: tuple[str, ...] = (f"TensorRT {sidecar.tensorrt_version} ({sidecar.precision})",)
        self._lock = threading.Lock()

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``[N, C, S, S, S]`` float32; returns every output by name."""
        with self._lock:
            outputs = self._executor.run(patches)
        return {name: outputs[name] for name in self.metadata.output_names}

    def close(self) -> None:
        """Free the GPU resources."""
        self._executor.close()


def _default_cache_dir() -> Path:
    env = os.environ.get("NODULE_EDGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "nodule-edge"


def build_engine_for_bundle(
    bundle_dir: str | Path,
    settings: TrtBuildSettings | None = None,
    *,
    device: int = 0,
    timing_cache_dir: str | Path | None = None,
    engine_name: str = "model.plan",
) -> Path:
    """Build the TensorRT engine for a bundle's ONNX model and add it to the bundle.

    The engine and its sidecar are written into the bundle, which gets the artifact role
    ``tensorrt`` and a rewritten manifest. The timing cache stays outside the bundle (it is
    machine-specific): in ``timing_cache_dir`` or ``$NODULE_EDGE_CACHE``,
    ``$XDG_CACHE_HOME/nodule-edge``, ``~/.cache/nodule-edge``.

    NOT EXECUTED on any machine of this project (no GPU); see the module docstring.

    Args:
        bundle_dir: A bundle written by ``nodule-edge export``.
        settings: Build settings (their ``timing_cache_path`` wins over ``timing_cache_dir``).
        device: CUDA device to build on.
        timing_cache_dir: Folder of the timing cache.
        engine_name: File name of the engine inside the bundle.

    Returns:
        The engine's path.

    Raises:
        BundleError: The bundle is missing, modified or has no ONNX model.
        EngineError, MissingDependencyError, OutputError: See :func:`build_engine`.
    """
    from nodule_edge.errors import BundleError
    from nodule_edge.runtime.bundle import load_bundle, write_manifest

    bundle = load_bundle(bundle_dir)
    onnx_path = bundle.path("onnx_fp32")
    if onnx_path is None:
        raise BundleError(f"bundle {bundle.root} has no 'onnx_fp32' model to build a TensorRT engine from")
    settings = settings or TrtBuildSettings()
    if settings.use_timing_cache and settings.timing_cache_path is None:
        env = current_environment(device)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{env.gpu_name}-sm{env.compute_capability}-trt{env.tensorrt_version}").strip("-")
        cache_dir = Path(timing_cache_dir) if timing_cache_dir is not None else _default_cache_dir()
        settings = replace(settings, timing_cache_path=cache_dir / f"{slug}.timing-cache")
    engine_path = bundle.root / engine_name
    sidecar = build_engine(onnx_path, engine_path, settings, device=device)
    manifest = bundle.manifest
    artifacts = {**manifest.get("artifacts", {}), "tensorrt": engine_name}
    extra = {k: v for k, v in manifest.items() if k not in ("format", "artifacts", "files")}
    extra["tensorrt"] = {
        "tensorrt_version": sidecar.tensorrt_version,
        "gpu_name": sidecar.gpu_name,
        "compute_capability": sidecar.compute_capability,
        "precision": sidecar.precision,
        "profile": list(sidecar.profile),
    }
    write_manifest(bundle.root, artifacts, extra)
    load_bundle(bundle.root)
    return engine_path

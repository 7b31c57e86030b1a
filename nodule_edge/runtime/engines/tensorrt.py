"""TensorRT engines at run time: check a plan's sidecar against this machine, then execute it.

.. warning::
   Loading and running an engine have NOT been tried on any machine in this project: no machine here has a
   GPU or loadable TensorRT libraries. The TensorRT and CUDA calls below are written against
   the documented TensorRT 10 Python API (``tensorrt`` 10.x) and the NVIDIA ``cuda-python``
   runtime bindings, and are exercised in the unit tests only against a stand-in module. The GPU
   test (``pytest -m gpu``) builds and runs a real engine where a GPU exists.

A TensorRT engine only runs on the TensorRT version and GPU it was built for. The builder
(:mod:`nodule_edge.export.tensorrt`, ``nodule-edge export --tensorrt``) writes a JSON sidecar
(``<engine>.json``, :class:`EngineSidecar`) recording the TensorRT version, GPU name, compute
capability, the ONNX file's sha256, the engine's own sha256 and the ONNX metadata (patch spec,
output names) the runtime needs. :func:`load_engine` compares that sidecar with the running
machine and refuses a mismatched engine with one message that lists every difference and how to
rebuild; :class:`TrtExecutor` runs it, and :class:`TensorRTEngine` is the runtime's ``tensorrt``
backend on top of both.

Requirements: TensorRT 10 (``pip install 'nodule-edge[trt]'``). Device queries, memory and streams
use NVIDIA's ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases)
rather than torch, cupy or pycuda: it is NVIDIA's own binding, used by the TensorRT samples, and
keeps torch out of the runtime. :func:`import_tensorrt`, :func:`cuda_runtime`, :func:`cuda_call`,
:func:`trt_logger` and :func:`onnx_metadata_props` are shared with the builder.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodule_edge._files import sha256_bytes, write_text_atomic
from nodule_edge.errors import EngineError, MissingDependencyError, OutputError, require
from nodule_edge.runtime.engines.base import Engine, metadata_from_props, need_artifact

if TYPE_CHECKING:
    from nodule_edge.runtime.bundle import Bundle

__all__ = [
    "ENGINE_SIDECAR_FORMAT",
    "REBUILD_HINT",
    "EngineEnvironment",
    "EngineSidecar",
    "TensorRTEngine",
    "TrtExecutor",
    "check_engine_compatibility",
    "current_environment",
    "engine_mismatches",
    "load_engine",
    "sidecar_path_for",
]

log = logging.getLogger(__name__)

ENGINE_SIDECAR_FORMAT = "nodule-edge-tensorrt-engine-v1"
REBUILD_HINT = "rebuild with: nodule-edge export --tensorrt ... on this machine"

TRT_MIN_MAJOR = 10
"""Oldest TensorRT major version the runtime and the builder accept."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CC = re.compile(r"^\d+\.\d+$")


# --------------------------------------------------------------------------------------------
# Sidecar and compatibility (no TensorRT needed)
# --------------------------------------------------------------------------------------------


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
        """Write the sidecar atomically (:func:`nodule_edge._files.write_text_atomic`), creating its folder.

        Raises:
            OutputError: The file cannot be written; nothing partial is left.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc}") from exc
        return write_text_atomic(path, self.to_json())



def sidecar_path_for(engine_path: str | Path) -> Path:
    """The sidecar of an engine: ``model.plan`` → ``model.plan.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


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


# --------------------------------------------------------------------------------------------
# TensorRT / CUDA glue, shared with the builder (needs a GPU; see the module warning)
# --------------------------------------------------------------------------------------------


def import_tensorrt() -> Any:
    """``import tensorrt``, refusing versions older than :data:`TRT_MIN_MAJOR`.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        EngineError: TensorRT is too old.
    """
    trt = require("tensorrt", "trt")
    major = major_version(trt.__version__)
    if major < TRT_MIN_MAJOR:
        raise EngineError(f"TensorRT {trt.__version__} is too old: nodule-edge needs TensorRT >= {TRT_MIN_MAJOR} (pip install 'nodule-edge[trt]')")
    return trt


def major_version(version: str) -> int:
    """Major number of a version string (0 when it does not start with one)."""
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return 0


def cuda_runtime() -> Any:
    """NVIDIA's CUDA runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart``).

    Raises:
        MissingDependencyError: ``cuda-python`` is not installed.
    """
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        pass
    try:
        return require("cuda.cudart", "trt")
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"'cuda-python' is needed for TensorRT engines but is not installed: pip install cuda-python ({exc})") from exc


def cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap a cuda-python result ``(error, *values)``: the value(s), or EngineError naming ``what``."""
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
    cudart = cuda_runtime()
    count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not 0 <= device < int(count):
        raise EngineError(f"CUDA device {device} does not exist (this machine has {count})")
    props = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\x00", 1)[0].decode("utf-8", "replace")
    return EngineEnvironment(
        tensorrt_version=str(trt.__version__),
        gpu_name=str(name).strip(),
        compute_capability=f"{int(props.major)}.{int(props.minor)}",
    )


def onnx_metadata_props(onnx_path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (needs the ``onnx`` package; weights are not loaded).

    Raises:
        EngineError: The file is not a readable ONNX model.
    """
    onnx = require("onnx", "export")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise EngineError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    return {p.key: p.value for p in model.metadata_props}


def trt_logger(trt: Any) -> Any:
    """A ``tensorrt.ILogger`` that routes TensorRT's messages to this module's logger."""

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


# --------------------------------------------------------------------------------------------
# Loading and executing
# --------------------------------------------------------------------------------------------


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
    digest = sha256_bytes(data)
    if digest != sidecar.engine_sha256:
        raise EngineError(
            f"TensorRT engine {engine_path} has sha256 {digest[:12]}…, its sidecar says {sidecar.engine_sha256[:12]}…: "
            f"the engine was replaced or corrupted; {REBUILD_HINT}"
        )
    import_tensorrt()
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
        trt = import_tensorrt()
        self._trt = trt
        self.cuda_runtime = cudart = cuda_runtime()
        self.sidecar = sidecar
        self._buffers: dict[str, int] = {}
        self._stream: Any = None
        cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self._runtime = trt.Runtime(trt_logger(trt))
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

        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        try:
            for name in names:
                shape = tuple(int(d) for d in (max_shape if name == self.input_name else self._engine.get_tensor_shape(name)))
                if name != self.input_name:
                    if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
                        raise EngineError(f"engine output {name!r} has shape {shape}; expected a dynamic batch dimension and fixed others")
                    shape = (self.max_batch, *shape[1:])
                nbytes = max(1, math.prod(shape) * self._dtypes[name].itemsize)
                ptr = cuda_call(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {name}")
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
        cudart = self.cuda_runtime
        chunk = np.ascontiguousarray(chunk)
        if chunk.shape[0] < self.min_batch:
            raise EngineError(f"batch of {chunk.shape[0]} is below the engine profile's minimum {self.min_batch}")
        if not self._context.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise EngineError(f"TensorRT rejected input shape {list(chunk.shape)} for {self.input_name!r}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart, cudart.cudaMemcpyAsync(self._buffers[self.input_name], chunk.ctypes.data, chunk.nbytes, h2d, self._stream), "cudaMemcpyAsync (input)")
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT messages logged above)")
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            host = np.empty(shape, dtype=self._dtypes[name])
            if host.nbytes:
                cuda_call(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name], host.nbytes, d2h, self._stream), f"cudaMemcpyAsync ({name})")
            outputs[name] = host
        # The host arrays (and `chunk`) must stay alive until the copies finish.
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream (idempotent)."""
        cudart = self.cuda_runtime
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
# The runtime backend
# --------------------------------------------------------------------------------------------


class TensorRTEngine(Engine):
    """The runtime's ``tensorrt`` backend.

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
        self.path = Path(engine_path)
        self._executor = load_engine(self.path, onnx_sha256, device=device)
        sidecar = self._executor.sidecar
        meta = dict(sidecar.onnx_metadata)
        if not meta and onnx_path is not None:
            meta = onnx_metadata_props(Path(onnx_path))
        if not meta:
            raise EngineError(f"TensorRT engine {self.path} carries no model metadata and no ONNX model was given; {REBUILD_HINT}")
        self.metadata = metadata_from_props(meta)
        missing = [n for n in self.metadata.output_names if n not in self._executor.output_names]
        if missing or self.metadata.input_name != self._executor.input_name:
            raise EngineError(f"TensorRT engine {self.path} does not have the model's tensors (missing outputs {missing}, input {self._executor.input_name!r}); {REBUILD_HINT}")
        self.providers: tuple[str, ...] = (f"TensorRT {sidecar.tensorrt_version} ({sidecar.precision})",)
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Bundle, backend: str = "tensorrt", threads: int | None = None) -> TensorRTEngine:
        """The bundle's TensorRT plan, checked against the bundle's ONNX model (``threads`` is unused)."""
        return cls(need_artifact(bundle, "tensorrt"), onnx_path=bundle.path("onnx_fp32"), onnx_sha256=bundle.sha256("onnx_fp32"))

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``[N, C, S, S, S]`` float32; returns every output by name."""
        with self._lock:
            outputs = self._executor.run(patches)
        return {name: outputs[name] for name in self.metadata.output_names}

    def close(self) -> None:
        """Free the GPU resources."""
        self._executor.close()


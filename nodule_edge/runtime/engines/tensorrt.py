"""TensorRT engines at run time: check a plan's sidecar against this machine, then execute it.

.. warning::
   Loading and running an engine have NOT been tried on any machine in this project: no machine here has a
   GPU or loadable TensorRT libraries. The TensorRT and CUDA calls below are written against
   the documented TensorRT 10 Python API (``tensorrt`` 10.x) and the NVIDIA ``cuda-python``
   runtime bindings, and are exercised in the unit tests only against a stand-in module. The GPU
   test (``pytest -m gpu``) builds and runs a real engine where a GPU exists.

A TensorRT engine only runs on the TensorRT version and GPU it was built for. The builder
(:mod:`nodule_edge.export.tensorrt`, ``nodule-edge export --tensorrt``) writes a JSON sidecar beside
it (:mod:`nodule_edge.runtime.engines.tensorrt_sidecar`). :func:`load_engine` compares that sidecar
with the running machine and refuses a mismatched engine with one message that lists every
difference and how to rebuild; :class:`TrtExecutor` runs it, and :class:`TensorRTEngine` is the
runtime's ``tensorrt`` backend on top of both.

Requirements: TensorRT 10 (``pip install 'nodule-edge[trt]'``). Device queries, memory and streams
use NVIDIA's ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases)
rather than torch, cupy or pycuda: it is NVIDIA's own binding, used by the TensorRT samples, and
keeps torch out of the runtime. :func:`import_tensorrt`, :func:`cuda_runtime`, :func:`cuda_call`,
:func:`trt_logger` and :func:`onnx_metadata_props` are shared with the builder.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodule_edge._files import sha256_bytes
from nodule_edge.errors import EngineError, MissingDependencyError, require
from nodule_edge.runtime.engines.base import Engine, metadata_from_props, need_artifact
from nodule_edge.runtime.engines.tensorrt_sidecar import (
    REBUILD_HINT,
    EngineEnvironment,
    EngineSidecar,
    check_engine_compatibility,
    sidecar_path_for,
)

if TYPE_CHECKING:
    from nodule_edge.runtime.bundle import Bundle

__all__ = ["TensorRTEngine", "TrtExecutor", "current_environment", "load_engine"]

log = logging.getLogger(__name__)

TRT_MIN_MAJOR = 10
"""Oldest TensorRT major version the runtime and the builder accept."""


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
        raise EngineError(
            f"TensorRT {trt.__version__} is too old: nodule-edge needs TensorRT >= {TRT_MIN_MAJOR} (pip install 'nodule-edge[trt]')"
        )
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
        raise MissingDependencyError(
            f"'cuda-python' is needed for TensorRT engines but is not installed: pip install cuda-python ({exc})"
        ) from exc


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

    class _Logger(trt.ILogger):
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
            raise EngineError(
                f"TensorRT could not deserialize the engine (built with TensorRT {sidecar.tensorrt_version}); {REBUILD_HINT}"
            )
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
                shape = tuple(
                    int(d) for d in (max_shape if name == self.input_name else self._engine.get_tensor_shape(name))
                )
                if name != self.input_name:
                    if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
                        raise EngineError(
                            f"engine output {name!r} has shape {shape}; expected a dynamic batch dimension and fixed others"
                        )
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
            raise EngineError(
                f"engine input {self.input_name!r} needs shape [N>=1, {', '.join(map(str, self.input_tail))}], got {list(patches.shape)}"
            )
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
        cuda_call(
            cudart,
            cudart.cudaMemcpyAsync(self._buffers[self.input_name], chunk.ctypes.data, chunk.nbytes, h2d, self._stream),
            "cudaMemcpyAsync (input)",
        )
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT messages logged above)")
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            host = np.empty(shape, dtype=self._dtypes[name])
            if host.nbytes:
                cuda_call(
                    cudart,
                    cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name], host.nbytes, d2h, self._stream),
                    f"cudaMemcpyAsync ({name})",
                )
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

    def __init__(
        self,
        engine_path: str | Path,
        onnx_path: str | Path | None = None,
        onnx_sha256: str | None = None,
        device: int = 0,
    ) -> None:
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
            raise EngineError(
                f"TensorRT engine {self.path} carries no model metadata and no ONNX model was given; {REBUILD_HINT}"
            )
        self.metadata = metadata_from_props(meta)
        missing = [n for n in self.metadata.output_names if n not in self._executor.output_names]
        if missing or self.metadata.input_name != self._executor.input_name:
            raise EngineError(
                f"TensorRT engine {self.path} does not have the model's tensors (missing outputs {missing}, input {self._executor.input_name!r}); {REBUILD_HINT}"
            )
        self.providers: tuple[str, ...] = (f"TensorRT {sidecar.tensorrt_version} ({sidecar.precision})",)
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Bundle, backend: str = "tensorrt", threads: int | None = None) -> TensorRTEngine:
        """The bundle's TensorRT plan, checked against the bundle's ONNX model (``threads`` is unused).

        A bundle's first-pass model (``first_pass.onnx``) runs on ONNX Runtime beside it (CUDA
        provider where installed, else CPU): no plan is built for it yet.
        """
        engine = cls(
            need_artifact(bundle, "tensorrt"),
            onnx_path=bundle.path("onnx_fp32"),
            onnx_sha256=bundle.sha256("onnx_fp32"),
        )
        first_pass = bundle.path("first_pass")
        if first_pass is not None:
            from nodule_edge.runtime.engines.onnxruntime import available_providers, load_first_pass

            cuda = "CUDAExecutionProvider" in available_providers()
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            engine._first_pass = load_first_pass(first_pass, engine.metadata, "tensorrt", providers)
        return engine

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``[N, C, S, S, S]`` float32; returns every output by name."""
        with self._lock:
            outputs = self._executor.run(patches)
        return {name: outputs[name] for name in self.metadata.output_names}

    def close(self) -> None:
        """Free the GPU resources."""
        self._executor.close()

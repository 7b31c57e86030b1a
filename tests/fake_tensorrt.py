"""A stand-in ``tensorrt`` module and CUDA runtime for the TensorRT tests (no GPU needed).

``FakeTrt`` is the slice of the TensorRT 10 Python API that the builder
(:mod:`nodule_edge.export.tensorrt`) uses; it records the calls. ``fake_cudart`` answers the
device queries of :mod:`nodule_edge.runtime.engines.tensorrt`. Tests install them with
``monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt())`` and
``monkeypatch.setattr(trt_runtime, "cuda_runtime", lambda: fake_cudart())``; the builder reaches
the CUDA runtime through that module, so one patch serves both.
"""

from __future__ import annotations

import enum
import hashlib
import types
from dataclasses import replace
from pathlib import Path

from nodule_edge.runtime.engines.tensorrt_sidecar import EngineSidecar

__all__ = ["SHA_A", "SHA_B", "FakeConfig", "FakeDataType", "FakeTrt", "fake_cudart", "make_sidecar", "sha_of"]

SHA_A = "a" * 64
SHA_B = "b" * 64


def sha_of(path: Path) -> str:
    """sha256 hex digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_sidecar(**changes: object) -> EngineSidecar:
    """A valid sidecar (TensorRT 10.3.0 on an NVIDIA L4), with ``changes`` applied."""
    base = EngineSidecar(
        tensorrt_version="10.3.0",
        gpu_name="NVIDIA L4",
        compute_capability="8.9",
        onnx_sha256=SHA_A,
        engine_sha256=SHA_B,
        precision="fp16",
        input_name="patch",
        profile=(1, 4, 16),
        fp32_layers=("node_InstanceNormalization_18", "node_group_norm"),
        onnx_file="model.onnx",
        created_utc="2026-01-01T00:00:00+00:00",
        nodule_edge_version="0.1.0",
    )
    return replace(base, **changes)


class _LayerType(enum.Enum):
    CONVOLUTION = 1
    NORMALIZATION = 2
    ELEMENTWISE = 3
    SHUFFLE = 4
    SHAPE = 5
    REDUCE = 6


class FakeDataType(enum.Enum):
    FLOAT = 1
    HALF = 2
    INT64 = 3


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: FakeDataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class _Layer:
    def __init__(self, name: str, layer_type: _LayerType, dtype: FakeDataType = FakeDataType.FLOAT) -> None:
        self.name, self.type = name, layer_type
        self._outputs = [_Tensor(name + "_out", (-1,), dtype)]
        self.precision = None
        self.output_types: dict[int, FakeDataType] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, i: int) -> _Tensor:
        return self._outputs[i]

    def set_output_type(self, i: int, dtype: FakeDataType) -> None:
        self.output_types[i] = dtype


class _NormLayer(_Layer):
    compute_precision = None


class _Network:
    def __init__(self) -> None:
        self.layers: list[_Layer] = []
        self.inputs: list[_Tensor] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> _Layer:
        return self.layers[i]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]


class _Cache:
    def __init__(self, blob: bytes) -> None:
        self.blob = bytes(blob)

    def serialize(self) -> bytes:
        return self.blob + b"+timings"


class FakeConfig:
    accept_next_cache = True  # set_timing_cache returns False for a cache from another device

    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.pools: dict[str, int] = {}
        self.profiles: list[_Profile] = []
        self.cache: _Cache | None = None
        self.cache_blobs: list[bytes] = []
        self.ignore_mismatch: bool | None = None
        self.accept_cache = FakeConfig.accept_next_cache

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: _Profile) -> None:
        self.profiles.append(profile)

    def create_timing_cache(self, blob: bytes) -> _Cache:
        self.cache_blobs.append(bytes(blob))
        return _Cache(blob)

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        if not self.accept_cache:
            self.accept_cache = True
            return False
        self.cache, self.ignore_mismatch = cache, ignore_mismatch
        return True

    def get_timing_cache(self) -> _Cache | None:
        return self.cache


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeTrt(types.ModuleType):
    """The slice of the TensorRT 10 Python API that build_engine uses."""

    def __init__(self, version: str = "10.3.0", parse_ok: bool = True, build_ok: bool = True) -> None:
        super().__init__("tensorrt")
        fake = self
        self.__version__ = version
        self.LayerType = _LayerType
        self.DataType = FakeDataType
        self.float32 = FakeDataType.FLOAT
        self.INormalizationLayer = _NormLayer
        self.BuilderFlag = types.SimpleNamespace(
            FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY", PREFER_PRECISION_CONSTRAINTS="PREFER"
        )
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.OnnxParserFlag = types.SimpleNamespace(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM")
        self.networks: list[_Network] = []
        self.configs: list[FakeConfig] = []
        self.network_flags: list[int] = []
        self.parser_flags: list[str] = []
        self.engine_bytes = b"SERIALIZED-ENGINE-" + version.encode()

        class ILogger:
            def __init__(self) -> None:
                pass

        class Logger(ILogger):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: ILogger) -> None:
                assert isinstance(logger, ILogger)

            def create_network(self, flags: int) -> _Network:
                fake.network_flags.append(flags)
                fake.networks.append(_Network())
                return fake.networks[-1]

            def create_builder_config(self) -> FakeConfig:
                fake.configs.append(FakeConfig())
                return fake.configs[-1]

            def create_optimization_profile(self) -> _Profile:
                return _Profile()

            def build_serialized_network(self, network: _Network, config: FakeConfig) -> bytes | None:
                return fake.engine_bytes if build_ok else None

        class OnnxParser:
            def __init__(self, network: _Network, logger: ILogger) -> None:
                self.network = network
                self.num_errors = 0 if parse_ok else 2

            def set_flag(self, flag: str) -> None:
                fake.parser_flags.append(flag)

            def parse_from_file(self, path: str) -> bool:
                assert Path(path).is_file()
                if not parse_ok:
                    return False
                net = self.network
                net.inputs = [_Tensor("patch", (-1, 2, 64, 64, 64), FakeDataType.FLOAT)]
                net.layers = [
                    _Layer("node_Conv_39", _LayerType.CONVOLUTION),
                    _Layer("node_Reshape_11", _LayerType.SHUFFLE),
                    _NormLayer("node_InstanceNormalization_5", _LayerType.NORMALIZATION),
                    _Layer("node_Mul_28", _LayerType.ELEMENTWISE),
                    _Layer("node_group_norm", _LayerType.ELEMENTWISE),
                    # An integer shape computation named after the norm: must not be constrained.
                    _Layer("node_group_norm_shape", _LayerType.SHAPE, FakeDataType.INT64),
                    _Layer("node_ReduceMean_0", _LayerType.REDUCE),
                ]
                return True

            def get_error(self, i: int) -> str:
                return f"In node {i}: UNSUPPORTED_NODE: Foo{i}"

        self.ILogger, self.Logger, self.Builder, self.OnnxParser = ILogger, Logger, Builder, OnnxParser


def fake_cudart(gpu_name: bytes = b"Fake GPU 9000", cc: tuple[int, int] = (8, 9)) -> types.SimpleNamespace:
    ok = 0
    props = types.SimpleNamespace(name=gpu_name + b"\x00\x00\x00", major=cc[0], minor=cc[1])
    return types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=ok),
        cudaSetDevice=lambda device: (ok,),
        cudaGetDeviceCount=lambda: (ok, 1),
        cudaGetDeviceProperties=lambda device: (ok, props),
    )

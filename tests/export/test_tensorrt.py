"""TensorRT export: settings, sidecar, compatibility check, FP32 layer choice, build glue.

No machine of this project has TensorRT or a GPU. The build glue is exercised against a stand-in
``tensorrt`` module (``_FakeTrt``) that records the calls; it checks this module's logic (flags,
profile, FP32 constraints, timing cache, atomic writes), not TensorRT's behaviour. The ``gpu``
test builds and runs a real engine and is skipped without TensorRT and a CUDA device.
"""

from __future__ import annotations

import enum
import hashlib
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import nodule_edge.export.tensorrt as trt_mod
from nodule_edge.errors import ConfigError, EngineError, MissingDependencyError
from nodule_edge.export.tensorrt import (
    REBUILD_HINT,
    EngineEnvironment,
    EngineSidecar,
    TrtBuildSettings,
    build_engine,
    check_engine_compatibility,
    current_environment,
    engine_mismatches,
    load_engine,
    select_fp32_layers,
    sidecar_path_for,
)
from tests.export.tiny_onnx import write_tiny_onnx

SHA_A = "a" * 64
SHA_B = "b" * 64


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecar(**changes: object) -> EngineSidecar:
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


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_default_settings_are_fp16_with_batch_profile_1_4_16() -> None:
    s = TrtBuildSettings()
    assert s.fp16 and s.profile == (1, 4, 16)
    assert "NORMALIZATION" in s.fp32_layer_types
    assert s.precision_constraints == "obey"


@pytest.mark.parametrize("profile", [(1, 1, 1), (1, 4, 16), (16, 16, 16), (2, 3, 5)])
def test_valid_profiles_accepted(profile: tuple[int, int, int]) -> None:
    assert TrtBuildSettings(min_batch=profile[0], opt_batch=profile[1], max_batch=profile[2]).profile == profile


@pytest.mark.parametrize("profile", [(0, 4, 16), (5, 4, 16), (1, 8, 4), (1, 4, 17), (1, 1, 0), (-1, 1, 1)])
def test_invalid_profiles_rejected_with_values_named(profile: tuple[int, int, int]) -> None:
    with pytest.raises(ConfigError) as err:
        TrtBuildSettings(min_batch=profile[0], opt_batch=profile[1], max_batch=profile[2])
    assert f"min={profile[0]}, opt={profile[1]}, max={profile[2]}" in str(err.value)
    assert "<= 16" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"precision_constraints": "sometimes"}, "precision_constraints"),
        ({"workspace_bytes": 0}, "workspace_bytes"),
        ({"fp32_name_patterns": ("(unclosed",)}, "(unclosed"),
        ({"fp32_layer_types": ("normalization layer",)}, "normalization layer"),
        ({"input_name": ""}, "input_name"),
        ({"min_batch": 1.5}, "integers"),
    ],
)
def test_other_invalid_settings_rejected(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        TrtBuildSettings(**changes)  # type: ignore[arg-type]
    assert fragment in str(err.value)


# ---------------------------------------------------------------------------------------------
# Sidecar
# ---------------------------------------------------------------------------------------------


def test_sidecar_json_round_trip() -> None:
    sidecar = _sidecar()
    assert EngineSidecar.from_json(sidecar.to_json()) == sidecar


def test_sidecar_file_round_trip_is_atomic(tmp_path: Path) -> None:
    sidecar = _sidecar()
    path = sidecar.write(tmp_path / "sub" / "model.plan.json")
    assert EngineSidecar.read(path) == sidecar
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.plan.json"]  # no temp file left


def test_sidecar_path_is_engine_name_plus_json(tmp_path: Path) -> None:
    assert sidecar_path_for(tmp_path / "model.plan") == tmp_path / "model.plan.json"


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.pop("gpu_name"), "gpu_name"),
        (lambda d: d.update(onnx_sha256="xyz"), "onnx_sha256"),
        (lambda d: d.update(compute_capability="sm_89"), "compute_capability"),
        (lambda d: d.update(format="something-else"), "unknown engine sidecar format"),
        (lambda d: d.update(profile=[1, 4, 16]), "profile"),
        (lambda d: d.update(precision="int8"), "precision"),
    ],
)
def test_malformed_sidecar_rejected_naming_the_field(mutate, fragment: str) -> None:  # type: ignore[no-untyped-def]
    data = _sidecar().to_dict()
    mutate(data)
    with pytest.raises(EngineError) as err:
        EngineSidecar.from_dict(data, "x.plan.json")
    assert fragment in str(err.value) and "x.plan.json" in str(err.value)


def test_sidecar_that_is_not_json_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.plan.json"
    path.write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        EngineSidecar.read(path)


# ---------------------------------------------------------------------------------------------
# Compatibility check
# ---------------------------------------------------------------------------------------------

_ENV = EngineEnvironment(tensorrt_version="10.3.0", gpu_name="NVIDIA L4", compute_capability="8.9")


def test_matching_engine_passes() -> None:
    check_engine_compatibility(_sidecar(), _ENV, SHA_A)
    check_engine_compatibility(_sidecar(), _ENV, None)
    assert engine_mismatches(_sidecar(), _ENV, SHA_A.upper()) == []


@pytest.mark.parametrize(
    ("env", "onnx_sha", "expected"),
    [
        (replace(_ENV, tensorrt_version="10.5.0"), SHA_A, ["TensorRT version", "10.3.0", "10.5.0"]),
        (replace(_ENV, gpu_name="NVIDIA A100-SXM4-40GB"), SHA_A, ["GPU", "NVIDIA L4", "NVIDIA A100-SXM4-40GB"]),
        (replace(_ENV, compute_capability="8.0"), SHA_A, ["compute capability", "8.9", "8.0"]),
        (_ENV, "c" * 64, ["ONNX model", "aaaaaaaaaaaa", "cccccccccccc"]),
    ],
    ids=["tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256"],
)
def test_each_mismatch_is_reported_with_rebuild_hint(env: EngineEnvironment, onnx_sha: str, expected: list[str]) -> None:
    with pytest.raises(EngineError) as err:
        check_engine_compatibility(_sidecar(), env, onnx_sha, engine_path="bundle/model.plan")
    message = str(err.value)
    for fragment in expected:
        assert fragment in message
    assert "bundle/model.plan" in message
    assert "rebuild with: nodule-edge export --tensorrt" in message
    assert len(engine_mismatches(_sidecar(), env, onnx_sha)) == 1


def test_all_mismatches_listed_together() -> None:
    env = EngineEnvironment("10.5.0", "NVIDIA T4", "7.5")
    problems = engine_mismatches(_sidecar(), env, "c" * 64)
    assert [p.split(":")[0] for p in problems] == ["TensorRT version", "GPU", "compute capability", "ONNX model"]


# ---------------------------------------------------------------------------------------------
# FP32 layer selection
# ---------------------------------------------------------------------------------------------

# What TensorRT's parser makes of a torch GroupNorm exported at opset 18 (Reshape →
# InstanceNormalization → Reshape → Mul → Add named after the module's op), plus other layers.
_LAYERS = [
    ("node_Conv_39", "CONVOLUTION"),
    ("node_Reshape_11", "SHUFFLE"),
    ("node_InstanceNormalization_18", "NORMALIZATION"),
    ("node_Reshape_20", "SHUFFLE"),
    ("node_Mul_28", "ELEMENTWISE"),
    ("node_group_norm", "ELEMENTWISE"),
    ("node_relu", "ACTIVATION"),
    ("node_mean", "REDUCE"),
    ("/encoder/norm1/ReduceMean", "REDUCE"),
    ("/encoder/normalizer_conv/Conv", "CONVOLUTION"),
    ("node_GroupNormalization_3", "PLUGIN_V3"),
    ("node_layer_norm_2", "ELEMENTWISE"),
    ("abnormal_gate", "ELEMENTWISE"),
]


def test_fp32_selection_keeps_norm_layers_only() -> None:
    assert select_fp32_layers(_LAYERS) == [
        "node_InstanceNormalization_18",
        "node_group_norm",
        "/encoder/norm1/ReduceMean",
        "node_GroupNormalization_3",
        "node_layer_norm_2",
    ]


def test_fp32_selection_by_type_alone_and_type_spellings() -> None:
    class _LayerType(enum.Enum):
        NORMALIZATION = 1
        CONVOLUTION = 2

    layers = [("a", "LayerType.NORMALIZATION"), ("b", _LayerType.NORMALIZATION), ("c", _LayerType.CONVOLUTION), ("d", "normalization")]
    assert select_fp32_layers(layers, name_patterns=()) == ["a", "b", "d"]


def test_fp32_selection_custom_rules_and_no_duplicates() -> None:
    layers = [("x/softmax", "SOFTMAX"), ("x/softmax", "SOFTMAX"), ("node_group_norm", "ELEMENTWISE")]
    assert select_fp32_layers(layers, layer_types=("SOFTMAX",), name_patterns=()) == ["x/softmax"]
    assert select_fp32_layers(layers, layer_types=(), name_patterns=()) == []


# ---------------------------------------------------------------------------------------------
# Missing TensorRT
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tensorrt`` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_build_without_tensorrt_raises_install_hint(no_tensorrt: None, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(MissingDependencyError) as err:
        build_engine(onnx_path, tmp_path / "model.plan")
    assert "pip install 'nodule-edge[trt]'" in str(err.value)
    assert not (tmp_path / "model.plan").exists()


def test_environment_query_without_tensorrt_raises_install_hint(no_tensorrt: None) -> None:
    with pytest.raises(MissingDependencyError, match=r"nodule-edge\[trt\]"):
        current_environment()


def test_load_without_tensorrt_raises_install_hint(no_tensorrt: None, tmp_path: Path) -> None:
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    _sidecar(engine_sha256=_sha(engine)).write(sidecar_path_for(engine))
    with pytest.raises(MissingDependencyError, match=r"nodule-edge\[trt\]"):
        load_engine(engine)


def test_load_refuses_engine_without_sidecar(tmp_path: Path) -> None:
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    with pytest.raises(EngineError) as err:
        load_engine(engine)
    assert "sidecar" in str(err.value) and REBUILD_HINT in str(err.value)


def test_load_refuses_engine_replaced_after_build(tmp_path: Path) -> None:
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    _sidecar(engine_sha256=_sha(engine)).write(sidecar_path_for(engine))
    engine.write_bytes(b"another engine")
    with pytest.raises(EngineError, match="replaced or corrupted"):
        load_engine(engine)


# ---------------------------------------------------------------------------------------------
# Build glue against a stand-in TensorRT (records calls; no GPU)
# ---------------------------------------------------------------------------------------------


class _LayerType(enum.Enum):
    CONVOLUTION = 1
    NORMALIZATION = 2
    ELEMENTWISE = 3
    SHUFFLE = 4
    SHAPE = 5
    REDUCE = 6


class _DataType(enum.Enum):
    FLOAT = 1
    HALF = 2
    INT64 = 3


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: _DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class _Layer:
    def __init__(self, name: str, layer_type: _LayerType, dtype: _DataType = _DataType.FLOAT) -> None:
        self.name, self.type = name, layer_type
        self._outputs = [_Tensor(name + "_out", (-1,), dtype)]
        self.precision = None
        self.output_types: dict[int, _DataType] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, i: int) -> _Tensor:
        return self._outputs[i]

    def set_output_type(self, i: int, dtype: _DataType) -> None:
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


class _Config:
    accept_next_cache = True  # set_timing_cache returns False for a cache from another device

    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.pools: dict[str, int] = {}
        self.profiles: list[_Profile] = []
        self.cache: _Cache | None = None
        self.cache_blobs: list[bytes] = []
        self.ignore_mismatch: bool | None = None
        self.accept_cache = _Config.accept_next_cache

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


class _FakeTrt(types.ModuleType):
    """The slice of the TensorRT 10 Python API that build_engine uses."""

    def __init__(self, version: str = "10.3.0", parse_ok: bool = True, build_ok: bool = True) -> None:
        super().__init__("tensorrt")
        fake = self
        self.__version__ = version
        self.LayerType = _LayerType
        self.DataType = _DataType
        self.float32 = _DataType.FLOAT
        self.INormalizationLayer = _NormLayer
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY", PREFER_PRECISION_CONSTRAINTS="PREFER")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.OnnxParserFlag = types.SimpleNamespace(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM")
        self.networks: list[_Network] = []
        self.configs: list[_Config] = []
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

            def create_builder_config(self) -> _Config:
                fake.configs.append(_Config())
                return fake.configs[-1]

            def create_optimization_profile(self) -> _Profile:
                return _Profile()

            def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
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
                net.inputs = [_Tensor("patch", (-1, 2, 64, 64, 64), _DataType.FLOAT)]
                net.layers = [
                    _Layer("node_Conv_39", _LayerType.CONVOLUTION),
                    _Layer("node_Reshape_11", _LayerType.SHUFFLE),
                    _NormLayer("node_InstanceNormalization_5", _LayerType.NORMALIZATION),
                    _Layer("node_Mul_28", _LayerType.ELEMENTWISE),
                    _Layer("node_group_norm", _LayerType.ELEMENTWISE),
                    # An integer shape computation named after the norm: must not be constrained.
                    _Layer("node_group_norm_shape", _LayerType.SHAPE, _DataType.INT64),
                    _Layer("node_ReduceMean_0", _LayerType.REDUCE),
                ]
                return True

            def get_error(self, i: int) -> str:
                return f"In node {i}: UNSUPPORTED_NODE: Foo{i}"

        self.ILogger, self.Logger, self.Builder, self.OnnxParser = ILogger, Logger, Builder, OnnxParser


def _fake_cudart(gpu_name: bytes = b"Fake GPU 9000", cc: tuple[int, int] = (8, 9)) -> types.SimpleNamespace:
    ok = 0
    props = types.SimpleNamespace(name=gpu_name + b"\x00\x00\x00", major=cc[0], minor=cc[1])
    return types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=ok),
        cudaSetDevice=lambda device: (ok,),
        cudaGetDeviceCount=lambda: (ok, 1),
        cudaGetDeviceProperties=lambda device: (ok, props),
    )


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> _FakeTrt:
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "_cudart", lambda: _fake_cudart())
    return fake


def test_fake_build_sets_fp16_fp32_norms_profile_and_writes_engine_and_sidecar(fake_trt: _FakeTrt, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "out" / "model.plan"
    sidecar = build_engine(onnx_path, engine)

    assert engine.read_bytes() == fake_trt.engine_bytes
    assert EngineSidecar.read(sidecar_path_for(engine)) == sidecar
    assert sidecar.tensorrt_version == "10.3.0"
    assert sidecar.gpu_name == "Fake GPU 9000"
    assert sidecar.compute_capability == "8.9"
    assert sidecar.onnx_sha256 == _sha(onnx_path)
    assert sidecar.engine_sha256 == hashlib.sha256(fake_trt.engine_bytes).hexdigest()
    assert sidecar.precision == "fp16" and sidecar.profile == (1, 4, 16) and sidecar.onnx_file == "model.onnx"
    assert sidecar.fp32_layers == ("node_InstanceNormalization_5", "node_group_norm")
    assert sidecar.onnx_metadata["input_name"] == "patch" and "patch_spec" in sidecar.onnx_metadata

    assert fake_trt.network_flags == [0]
    assert fake_trt.parser_flags == ["NATIVE_INSTANCENORM"]
    config = fake_trt.configs[0]
    assert {"FP16", "OBEY"} <= config.flags and "PREFER" not in config.flags
    assert config.pools == {"WORKSPACE": 1 << 30}
    tail = (2, 64, 64, 64)
    assert [p.shapes for p in config.profiles] == [{"patch": ((1, *tail), (4, *tail), (16, *tail))}]

    layers = {layer.name: layer for layer in fake_trt.networks[0].layers}
    for name in ("node_InstanceNormalization_5", "node_group_norm"):
        assert layers[name].precision is _DataType.FLOAT and layers[name].output_types == {0: _DataType.FLOAT}
    assert layers["node_InstanceNormalization_5"].compute_precision is _DataType.FLOAT
    for name in ("node_Conv_39", "node_Mul_28", "node_group_norm_shape", "node_ReduceMean_0"):
        assert layers[name].precision is None and layers[name].output_types == {}
    assert sorted(p.name for p in engine.parent.iterdir()) == ["model.plan", "model.plan.json", "model.plan.timing-cache"]


def test_fake_build_reuses_and_updates_timing_cache(fake_trt: _FakeTrt, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    cache = tmp_path / "caches" / "trt.cache"
    settings = TrtBuildSettings(timing_cache_path=cache, precision_constraints="prefer", min_batch=2, opt_batch=8, max_batch=8)
    build_engine(onnx_path, tmp_path / "a.plan", settings)
    assert fake_trt.configs[0].cache_blobs == [b""]
    assert cache.read_bytes() == b"+timings"
    sidecar = build_engine(onnx_path, tmp_path / "b.plan", settings)
    assert fake_trt.configs[1].cache_blobs == [b"+timings"]
    assert fake_trt.configs[1].ignore_mismatch is False
    assert cache.read_bytes() == b"+timings+timings"
    assert "PREFER" in fake_trt.configs[1].flags and "OBEY" not in fake_trt.configs[1].flags
    assert sidecar.profile == (2, 8, 8)


def test_fake_build_replaces_timing_cache_from_another_device(fake_trt: _FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"from-another-gpu")
    monkeypatch.setattr(_Config, "accept_next_cache", False)
    build_engine(onnx_path, tmp_path / "m.plan", TrtBuildSettings(timing_cache_path=cache))
    assert fake_trt.configs[0].cache_blobs == [b"from-another-gpu", b""]
    assert cache.read_bytes() == b"+timings"


def test_fake_fp32_build_sets_no_precision_constraints(fake_trt: _FakeTrt, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    sidecar = build_engine(onnx_path, tmp_path / "m.plan", TrtBuildSettings(fp16=False, use_timing_cache=False))
    assert sidecar.precision == "fp32" and sidecar.fp32_layers == ()
    assert fake_trt.configs[0].flags == set()
    assert all(layer.precision is None for layer in fake_trt.networks[0].layers)
    assert not (tmp_path / "m.plan.timing-cache").exists()


def test_fake_tensorrt_11_refuses_fp16_but_builds_fp32(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTrt(version="11.4.0"))
    monkeypatch.setattr(trt_mod, "_cudart", lambda: _fake_cudart())
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match=r"TensorRT 11\.4\.0 removed weak typing.*tensorrt>=10,<11"):
        build_engine(onnx_path, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()
    assert build_engine(onnx_path, tmp_path / "m.plan", TrtBuildSettings(fp16=False)).tensorrt_version == "11.4.0"


def test_fake_parse_failure_lists_parser_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTrt(parse_ok=False))
    monkeypatch.setattr(trt_mod, "_cudart", lambda: _fake_cudart())
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match=r"cannot parse .*UNSUPPORTED_NODE: Foo0.*Foo1"):
        build_engine(onnx_path, tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == [onnx_path]


def test_fake_build_failure_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTrt(build_ok=False))
    monkeypatch.setattr(trt_mod, "_cudart", lambda: _fake_cudart())
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match="failed to build"):
        build_engine(onnx_path, tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == [onnx_path]


def test_fake_load_checks_sidecar_against_this_machine(fake_trt: _FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.plan"
    sidecar = build_engine(onnx_path, engine)
    made: list[tuple[bytes, EngineSidecar, int]] = []
    monkeypatch.setattr(trt_mod, "TrtExecutor", lambda data, sc, device: made.append((data, sc, device)) or "executor")

    assert load_engine(engine, _sha(onnx_path)) == "executor"
    assert made == [(fake_trt.engine_bytes, sidecar, 0)]

    with pytest.raises(EngineError, match="ONNX model: engine built from sha256"):
        load_engine(engine, "0" * 64)
    monkeypatch.setattr(trt_mod, "_cudart", lambda: _fake_cudart(gpu_name=b"Other GPU", cc=(9, 0)))
    with pytest.raises(EngineError) as err:
        load_engine(engine, _sha(onnx_path))
    message = str(err.value)
    assert "'Fake GPU 9000'" in message and "'Other GPU'" in message and "8.9" in message and "9.0" in message
    assert "rebuild with: nodule-edge export --tensorrt" in message
    assert len(made) == 1


class _StubExecutor:
    input_name = "patch"
    output_names = ("embedding", "malignancy_probability", "attributes", "segmentation", "saliency", "nodule_attention", "background_attention", "extra")

    def __init__(self, sidecar: EngineSidecar) -> None:
        self.sidecar = sidecar
        self.closed = False

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.full(len(patches), i, dtype=np.float32) for i, name in enumerate(self.output_names)}

    def close(self) -> None:
        self.closed = True


def test_runtime_engine_reads_metadata_from_sidecar_and_orders_outputs(fake_trt: _FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine_path = tmp_path / "model.plan"
    build_engine(onnx_path, engine_path)
    monkeypatch.setattr(trt_mod, "TrtExecutor", lambda data, sc, device: _StubExecutor(sc))
    engine = trt_mod.TensorRTEngine(engine_path, onnx_sha256=_sha(onnx_path))
    assert engine.backend == "tensorrt" and engine.providers[0].startswith("TensorRT 10.3.0")
    assert engine.metadata.input_name == "patch"
    assert engine.metadata.output_names[0] == "malignancy_probability"
    out = engine.run(np.zeros((3, 2, 64, 64, 64), np.float32))
    assert list(out) == list(engine.metadata.output_names)  # model order, no extra outputs
    assert out["embedding"].tolist() == [0.0, 0.0, 0.0] and out["attributes"].tolist() == [2.0] * 3


def test_runtime_engine_refuses_engine_without_model_outputs(fake_trt: _FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine_path = tmp_path / "model.plan"
    build_engine(onnx_path, engine_path)

    class _Short(_StubExecutor):
        output_names = ("malignancy_probability",)

    monkeypatch.setattr(trt_mod, "TrtExecutor", lambda data, sc, device: _Short(sc))
    with pytest.raises(EngineError, match="missing outputs"):
        trt_mod.TensorRTEngine(engine_path)


def test_fake_build_for_bundle_adds_engine_to_manifest(fake_trt: _FakeTrt, tmp_path: Path) -> None:
    from nodule_edge.runtime.bundle import load_bundle, write_manifest

    root = tmp_path / "bundle"
    root.mkdir()
    write_tiny_onnx(root / "model.onnx")
    write_manifest(root, {"onnx_fp32": "model.onnx"}, {"model_version": "tiny"})
    engine = trt_mod.build_engine_for_bundle(root, timing_cache_dir=tmp_path / "cache")

    assert engine == root / "model.plan"
    bundle = load_bundle(root)  # every file listed and verified
    assert bundle.path("tensorrt") == engine and bundle.path("onnx_fp32") == root / "model.onnx"
    assert bundle.model_version == "tiny"
    assert bundle.manifest["tensorrt"]["gpu_name"] == "Fake GPU 9000"
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "model.onnx", "model.plan", "model.plan.json"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["Fake-GPU-9000-sm8.9-trt10.3.0.timing-cache"]


# ---------------------------------------------------------------------------------------------
# Real TensorRT on a GPU
# ---------------------------------------------------------------------------------------------


def _need_real_gpu() -> None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the libraries failing to load
        pytest.skip(f"TensorRT is not usable here: {exc}")
    try:
        trt_mod._cudart()
        current_environment(0)
    except Exception as exc:
        pytest.skip(f"no CUDA device usable through cuda-python: {exc}")


@pytest.mark.gpu
@pytest.mark.slow
def test_real_engine_builds_runs_and_matches_onnxruntime(tmp_path: Path) -> None:
    _need_real_gpu()
    import onnxruntime as ort

    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.plan"
    sidecar = build_engine(onnx_path, engine)
    assert "node_InstanceNormalization_5" in sidecar.fp32_layers
    assert (tmp_path / "model.plan.timing-cache").stat().st_size > 0

    x = np.random.default_rng(0).random((20, 2, 64, 64, 64), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"patch": x})))
    with load_engine(engine, _sha(onnx_path)) as executor:
        got = executor.run(x)  # 20 > 16: two chunks
        single = executor.run(x[:1])
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape and got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], value, rtol=2e-2, atol=2e-2, err_msg=name)
        np.testing.assert_allclose(single[name], value[:1], rtol=2e-2, atol=2e-2, err_msg=name)

    runtime_engine = trt_mod.TensorRTEngine(engine, onnx_sha256=_sha(onnx_path))
    try:
        via_runtime = runtime_engine.run(x[:5])
    finally:
        runtime_engine.close()
    assert list(via_runtime) == list(expected)
    np.testing.assert_allclose(via_runtime["attributes"], expected["attributes"][:5], rtol=2e-2, atol=2e-2)

    replace(sidecar, gpu_name=sidecar.gpu_name + " (other)").write(sidecar_path_for(engine))
    with pytest.raises(EngineError, match="rebuild with"):
        load_engine(engine)

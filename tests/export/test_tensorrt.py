"""TensorRT plan building: settings, FP32 layer choice, build glue, bundle integration.

No machine of this project has TensorRT or a GPU. The build glue is exercised against a stand-in
``tensorrt`` module (``tests/fake_tensorrt.py``) that records the calls; it checks this module's
logic (flags, profile, FP32 constraints, timing cache, atomic writes), not TensorRT's behaviour.
The ``gpu`` test builds and runs a real engine and is skipped without TensorRT and a CUDA device.
Loading, the sidecar and its checks are tested in ``tests/runtime/engines/test_tensorrt.py``.
"""

from __future__ import annotations

import enum
import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nodule_edge.errors import ConfigError, EngineError, MissingDependencyError
from nodule_edge.export.tensorrt import TrtBuildSettings, build_engine, build_engine_for_bundle, select_fp32_layers
from nodule_edge.runtime.engines import tensorrt as trt_runtime
from nodule_edge.runtime.engines.tensorrt import TensorRTEngine, current_environment, load_engine
from nodule_edge.runtime.engines.tensorrt_sidecar import EngineSidecar, sidecar_path_for
from tests.export.tiny_onnx import write_tiny_onnx
from tests.fake_tensorrt import FakeConfig, FakeDataType, FakeTrt, fake_cudart, sha_of


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tensorrt`` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTrt:
    fake = FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_runtime, "cuda_runtime", lambda: fake_cudart())
    return fake


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

    layers = [
        ("a", "LayerType.NORMALIZATION"),
        ("b", _LayerType.NORMALIZATION),
        ("c", _LayerType.CONVOLUTION),
        ("d", "normalization"),
    ]
    assert select_fp32_layers(layers, name_patterns=()) == ["a", "b", "d"]


def test_fp32_selection_custom_rules_and_no_duplicates() -> None:
    layers = [("x/softmax", "SOFTMAX"), ("x/softmax", "SOFTMAX"), ("node_group_norm", "ELEMENTWISE")]
    assert select_fp32_layers(layers, layer_types=("SOFTMAX",), name_patterns=()) == ["x/softmax"]
    assert select_fp32_layers(layers, layer_types=(), name_patterns=()) == []


# ---------------------------------------------------------------------------------------------
# Missing TensorRT
# ---------------------------------------------------------------------------------------------


def test_build_without_tensorrt_raises_install_hint(no_tensorrt: None, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(MissingDependencyError) as err:
        build_engine(onnx_path, tmp_path / "model.plan")
    assert "pip install 'nodule-edge[trt]'" in str(err.value)
    assert not (tmp_path / "model.plan").exists()


# ---------------------------------------------------------------------------------------------
# Build glue against a stand-in TensorRT (records calls; no GPU)
# ---------------------------------------------------------------------------------------------


def test_fake_build_sets_fp16_fp32_norms_profile_and_writes_engine_and_sidecar(
    fake_trt: FakeTrt, tmp_path: Path
) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "out" / "model.plan"
    sidecar = build_engine(onnx_path, engine)

    assert engine.read_bytes() == fake_trt.engine_bytes
    assert EngineSidecar.read(sidecar_path_for(engine)) == sidecar
    assert sidecar.tensorrt_version == "10.3.0"
    assert sidecar.gpu_name == "Fake GPU 9000"
    assert sidecar.compute_capability == "8.9"
    assert sidecar.onnx_sha256 == sha_of(onnx_path)
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
        assert layers[name].precision is FakeDataType.FLOAT and layers[name].output_types == {0: FakeDataType.FLOAT}
    assert layers["node_InstanceNormalization_5"].compute_precision is FakeDataType.FLOAT
    for name in ("node_Conv_39", "node_Mul_28", "node_group_norm_shape", "node_ReduceMean_0"):
        assert layers[name].precision is None and layers[name].output_types == {}
    assert sorted(p.name for p in engine.parent.iterdir()) == [
        "model.plan",
        "model.plan.json",
        "model.plan.timing-cache",
    ]


def test_fake_build_reuses_and_updates_timing_cache(fake_trt: FakeTrt, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    cache = tmp_path / "caches" / "trt.cache"
    settings = TrtBuildSettings(
        timing_cache_path=cache, precision_constraints="prefer", min_batch=2, opt_batch=8, max_batch=8
    )
    build_engine(onnx_path, tmp_path / "a.plan", settings)
    assert fake_trt.configs[0].cache_blobs == [b""]
    assert cache.read_bytes() == b"+timings"
    sidecar = build_engine(onnx_path, tmp_path / "b.plan", settings)
    assert fake_trt.configs[1].cache_blobs == [b"+timings"]
    assert fake_trt.configs[1].ignore_mismatch is False
    assert cache.read_bytes() == b"+timings+timings"
    assert "PREFER" in fake_trt.configs[1].flags and "OBEY" not in fake_trt.configs[1].flags
    assert sidecar.profile == (2, 8, 8)


def test_fake_build_replaces_timing_cache_from_another_device(
    fake_trt: FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"from-another-gpu")
    monkeypatch.setattr(FakeConfig, "accept_next_cache", False)
    build_engine(onnx_path, tmp_path / "m.plan", TrtBuildSettings(timing_cache_path=cache))
    assert fake_trt.configs[0].cache_blobs == [b"from-another-gpu", b""]
    assert cache.read_bytes() == b"+timings"


def test_fake_fp32_build_sets_no_precision_constraints(fake_trt: FakeTrt, tmp_path: Path) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    sidecar = build_engine(onnx_path, tmp_path / "m.plan", TrtBuildSettings(fp16=False, use_timing_cache=False))
    assert sidecar.precision == "fp32" and sidecar.fp32_layers == ()
    assert fake_trt.configs[0].flags == set()
    assert all(layer.precision is None for layer in fake_trt.networks[0].layers)
    assert not (tmp_path / "m.plan.timing-cache").exists()


def test_fake_tensorrt_11_refuses_fp16_but_builds_fp32(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(version="11.4.0"))
    monkeypatch.setattr(trt_runtime, "cuda_runtime", lambda: fake_cudart())
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match=r"TensorRT 11\.4\.0 removed weak typing.*tensorrt>=10,<11"):
        build_engine(onnx_path, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()
    assert build_engine(onnx_path, tmp_path / "m.plan", TrtBuildSettings(fp16=False)).tensorrt_version == "11.4.0"


def test_fake_parse_failure_lists_parser_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(parse_ok=False))
    monkeypatch.setattr(trt_runtime, "cuda_runtime", lambda: fake_cudart())
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match=r"cannot parse .*UNSUPPORTED_NODE: Foo0.*Foo1"):
        build_engine(onnx_path, tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == [onnx_path]


def test_fake_build_failure_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(build_ok=False))
    monkeypatch.setattr(trt_runtime, "cuda_runtime", lambda: fake_cudart())
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(EngineError, match="failed to build"):
        build_engine(onnx_path, tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == [onnx_path]


def test_fake_build_for_bundle_adds_engine_to_manifest(fake_trt: FakeTrt, tmp_path: Path) -> None:
    from nodule_edge.runtime.bundle import load_bundle, write_manifest

    root = tmp_path / "bundle"
    root.mkdir()
    write_tiny_onnx(root / "model.onnx")
    write_manifest(root, {"onnx_fp32": "model.onnx"}, {"model_version": "tiny"})
    engine = build_engine_for_bundle(root, timing_cache_dir=tmp_path / "cache")

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
        import tensorrt  # noqa: F401 - only whether it imports
    except Exception as exc:  # ImportError, or the libraries failing to load
        pytest.skip(f"TensorRT is not usable here: {exc}")
    try:
        trt_runtime.cuda_runtime()
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
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"patch": x}), strict=True))
    with load_engine(engine, sha_of(onnx_path)) as executor:
        got = executor.run(x)  # 20 > 16: two chunks
        single = executor.run(x[:1])
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape and got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], value, rtol=2e-2, atol=2e-2, err_msg=name)
        np.testing.assert_allclose(single[name], value[:1], rtol=2e-2, atol=2e-2, err_msg=name)

    runtime_engine = TensorRTEngine(engine, onnx_sha256=sha_of(onnx_path))
    try:
        via_runtime = runtime_engine.run(x[:5])
    finally:
        runtime_engine.close()
    assert list(via_runtime) == list(expected)
    np.testing.assert_allclose(via_runtime["attributes"], expected["attributes"][:5], rtol=2e-2, atol=2e-2)

    replace(sidecar, gpu_name=sidecar.gpu_name + " (other)").write(sidecar_path_for(engine))
    with pytest.raises(EngineError, match="rebuild with"):
        load_engine(engine)

"""TensorRT at run time: the sidecar, the compatibility check, loading, and the ``tensorrt`` backend.

No machine of this project has TensorRT or a GPU. Engines are built against a stand-in
``tensorrt`` module (``tests/fake_tensorrt.py``) and loading stops at a stub executor; the real
engine is built and run by the ``gpu`` test in ``tests/export/test_tensorrt.py``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nodule_edge.errors import EngineError, MissingDependencyError
from nodule_edge.export.tensorrt import build_engine
from nodule_edge.runtime.engines import tensorrt as trt_runtime
from nodule_edge.runtime.engines.base import Engine
from nodule_edge.runtime.engines.tensorrt import TensorRTEngine, current_environment, load_engine
from nodule_edge.runtime.engines.tensorrt_sidecar import (
    REBUILD_HINT,
    EngineEnvironment,
    EngineSidecar,
    check_engine_compatibility,
    engine_mismatches,
    sidecar_path_for,
)
from tests.export.tiny_onnx import write_tiny_onnx
from tests.fake_tensorrt import SHA_A, FakeTrt, fake_cudart, make_sidecar, sha_of


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
# Sidecar
# ---------------------------------------------------------------------------------------------


def test_sidecar_json_round_trip() -> None:
    sidecar = make_sidecar()
    assert EngineSidecar.from_json(sidecar.to_json()) == sidecar


def test_sidecar_file_round_trip_is_atomic(tmp_path: Path) -> None:
    sidecar = make_sidecar()
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
    data = make_sidecar().to_dict()
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
    check_engine_compatibility(make_sidecar(), _ENV, SHA_A)
    check_engine_compatibility(make_sidecar(), _ENV, None)
    assert engine_mismatches(make_sidecar(), _ENV, SHA_A.upper()) == []


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
def test_each_mismatch_is_reported_with_rebuild_hint(
    env: EngineEnvironment, onnx_sha: str, expected: list[str]
) -> None:
    with pytest.raises(EngineError) as err:
        check_engine_compatibility(make_sidecar(), env, onnx_sha, engine_path="bundle/model.plan")
    message = str(err.value)
    for fragment in expected:
        assert fragment in message
    assert "bundle/model.plan" in message
    assert "rebuild with: nodule-edge export --tensorrt" in message
    assert len(engine_mismatches(make_sidecar(), env, onnx_sha)) == 1


def test_all_mismatches_listed_together() -> None:
    env = EngineEnvironment("10.5.0", "NVIDIA T4", "7.5")
    problems = engine_mismatches(make_sidecar(), env, "c" * 64)
    assert [p.split(":")[0] for p in problems] == ["TensorRT version", "GPU", "compute capability", "ONNX model"]


# ---------------------------------------------------------------------------------------------
# Missing TensorRT
# ---------------------------------------------------------------------------------------------


def test_environment_query_without_tensorrt_raises_install_hint(no_tensorrt: None) -> None:
    with pytest.raises(MissingDependencyError, match=r"nodule-edge\[trt\]"):
        current_environment()


def test_load_without_tensorrt_raises_install_hint(no_tensorrt: None, tmp_path: Path) -> None:
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    make_sidecar(engine_sha256=sha_of(engine)).write(sidecar_path_for(engine))
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
    make_sidecar(engine_sha256=sha_of(engine)).write(sidecar_path_for(engine))
    engine.write_bytes(b"another engine")
    with pytest.raises(EngineError, match="replaced or corrupted"):
        load_engine(engine)


# ---------------------------------------------------------------------------------------------
# Build glue against a stand-in TensorRT (records calls; no GPU)
# ---------------------------------------------------------------------------------------------


def test_fake_load_checks_sidecar_against_this_machine(
    fake_trt: FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.plan"
    sidecar = build_engine(onnx_path, engine)
    made: list[tuple[bytes, EngineSidecar, int]] = []
    monkeypatch.setattr(
        trt_runtime, "TrtExecutor", lambda data, sc, device: made.append((data, sc, device)) or "executor"
    )

    assert load_engine(engine, sha_of(onnx_path)) == "executor"
    assert made == [(fake_trt.engine_bytes, sidecar, 0)]

    with pytest.raises(EngineError, match="ONNX model: engine built from sha256"):
        load_engine(engine, "0" * 64)
    monkeypatch.setattr(trt_runtime, "cuda_runtime", lambda: fake_cudart(gpu_name=b"Other GPU", cc=(9, 0)))
    with pytest.raises(EngineError) as err:
        load_engine(engine, sha_of(onnx_path))
    message = str(err.value)
    assert "'Fake GPU 9000'" in message and "'Other GPU'" in message and "8.9" in message and "9.0" in message
    assert "rebuild with: nodule-edge export --tensorrt" in message
    assert len(made) == 1


class _StubExecutor:
    input_name = "patch"
    output_names = (
        "embedding",
        "malignancy_probability",
        "attributes",
        "segmentation",
        "saliency",
        "nodule_attention",
        "background_attention",
        "extra",
    )

    def __init__(self, sidecar: EngineSidecar) -> None:
        self.sidecar = sidecar
        self.closed = False

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.full(len(patches), i, dtype=np.float32) for i, name in enumerate(self.output_names)}

    def close(self) -> None:
        self.closed = True


def test_runtime_engine_reads_metadata_from_sidecar_and_orders_outputs(
    fake_trt: FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine_path = tmp_path / "model.plan"
    build_engine(onnx_path, engine_path)
    monkeypatch.setattr(trt_runtime, "TrtExecutor", lambda data, sc, device: _StubExecutor(sc))
    engine = TensorRTEngine(engine_path, onnx_sha256=sha_of(onnx_path))
    assert isinstance(engine, Engine) and engine.description.startswith("tensorrt (TensorRT 10.3.0")
    assert engine.backend == "tensorrt" and engine.providers[0].startswith("TensorRT 10.3.0")
    assert engine.metadata.input_name == "patch"
    assert engine.metadata.output_names[0] == "malignancy_probability"
    out = engine.run(np.zeros((3, 2, 64, 64, 64), np.float32))
    assert list(out) == list(engine.metadata.output_names)  # model order, no extra outputs
    assert out["embedding"].tolist() == [0.0, 0.0, 0.0] and out["attributes"].tolist() == [2.0] * 3


def test_runtime_engine_refuses_engine_without_model_outputs(
    fake_trt: FakeTrt, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    onnx_path = write_tiny_onnx(tmp_path / "model.onnx")
    engine_path = tmp_path / "model.plan"
    build_engine(onnx_path, engine_path)

    class _Short(_StubExecutor):
        output_names = ("malignancy_probability",)

    monkeypatch.setattr(trt_runtime, "TrtExecutor", lambda data, sc, device: _Short(sc))
    with pytest.raises(EngineError, match="missing outputs"):
        TensorRTEngine(engine_path)

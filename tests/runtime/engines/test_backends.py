"""The backend table and engines: backend selection, honest provider reporting, input validation, README table."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import EngineError, MissingDependencyError
from nodule_edge.patch import DEFAULT_PATCH_SPEC
from nodule_edge.runtime.bundle import load_bundle
from nodule_edge.runtime.engines import BACKENDS, create_engine
from nodule_edge.runtime.engines import onnxruntime as ort_engines
from nodule_edge.runtime.engines.onnxruntime import OnnxEngine
from nodule_edge.runtime.engines.openvino import openvino_available

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def cpu_engine(bundle) -> OnnxEngine:
    return create_engine(bundle, "cpu", threads=1)


def test_auto_picks_a_cpu_backend_and_logs_why(bundle, caplog):
    with caplog.at_level(logging.DEBUG, logger="nodule_edge.runtime.engines.backends"):
        engine = create_engine(bundle, "auto", threads=1)
    expected = "cpu-fast" if openvino_available() else "cpu"
    if "CUDAExecutionProvider" in ort.get_available_providers():  # pragma: no cover - GPU machines
        pytest.skip("this machine has CUDA; auto would pick it")
    assert engine.backend == expected
    assert engine.providers[0] == ("openvino" if expected == "cpu-fast" else "CPUExecutionProvider")
    chosen = [r for r in caplog.records if "auto-selected" in r.getMessage()]
    assert len(chosen) == 1 and chosen[0].levelno == logging.INFO
    message = chosen[0].getMessage()
    assert f"auto-selected: {expected}" in message
    # The log says why each faster backend was skipped.
    assert "tensorrt:" in message and "cuda:" in message


def test_int8_is_never_auto_selected(bundle):
    from nodule_edge.runtime.engines import ALL_BACKENDS

    assert "cpu-int8" in ALL_BACKENDS and "cpu-int8" not in BACKENDS


def test_backends_are_tried_fastest_first():
    assert BACKENDS == ("tensorrt", "cuda", "cpu-fast", "cpu")


def test_forcing_cuda_without_a_gpu_is_a_clear_error(bundle):
    if "CUDAExecutionProvider" in ort.get_available_providers():  # pragma: no cover
        pytest.skip("this machine has CUDA")
    with pytest.raises((EngineError, MissingDependencyError)) as info:
        create_engine(bundle, "cuda")
    assert "CUDA" in str(info.value)
    assert "nodule-edge[gpu]" in str(info.value)  # tells the user what to install


def test_forcing_tensorrt_is_a_clear_error(bundle):
    with pytest.raises((EngineError, MissingDependencyError)) as info:
        create_engine(bundle, "tensorrt")
    assert "TensorRT" in str(info.value) or "tensorrt" in str(info.value)


def test_unknown_backend_lists_the_choices(bundle):
    with pytest.raises(EngineError, match="'npu'.*auto.*cpu"):
        create_engine(bundle, "npu")


def test_providers_are_what_the_session_reports(cpu_engine):
    assert cpu_engine.providers == tuple(cpu_engine._session.get_providers())
    assert cpu_engine.backend == "cpu"


def test_a_silent_provider_fallback_is_refused(bundle, monkeypatch):
    """ONNX Runtime quietly falls back to CPU when CUDA cannot start: that must not pass as 'cuda'."""
    monkeypatch.setattr(ort_engines, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    class CpuOnlySession:
        def __init__(self, path, sess_options=None, providers=None):
            self.asked = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", CpuOnlySession)
    with pytest.raises(EngineError, match=r"asked for CUDAExecutionProvider.*runs on \['CPUExecutionProvider'\]"):
        create_engine(bundle, "cuda")


def test_metadata_comes_from_the_artifact(cpu_engine, bundle):
    meta = cpu_engine.metadata
    assert meta.patch_spec == DEFAULT_PATCH_SPEC
    assert meta.attribute_names == ATTRIBUTE_NAMES
    assert set(meta.output_names) >= {"malignancy_probability", "attributes", "segmentation", "saliency", "embedding"}
    assert meta.model_version == bundle.model_version


def test_run_returns_every_output_with_the_documented_shapes(cpu_engine):
    patches = np.random.default_rng(0).random((2, 2, 64, 64, 64), dtype=np.float32)
    out = cpu_engine.run(patches)
    assert set(out) == set(cpu_engine.metadata.output_names)
    assert out["malignancy_probability"].shape == (2,)
    assert out["attributes"].shape == (2, 6)
    assert out["segmentation"].shape == out["saliency"].shape == (2, 64, 64, 64)
    assert out["nodule_attention"].shape == out["background_attention"].shape == (2,)
    assert out["embedding"].ndim == 2 and out["embedding"].shape[0] == 2
    assert np.all((out["saliency"] >= 0) & (out["saliency"] <= 1 + 1e-6))


@pytest.mark.parametrize(
    "shape",
    [(2, 64, 64, 64), (1, 1, 64, 64, 64), (1, 2, 32, 32, 32), (1, 2, 64, 64, 63), (2, 64, 64, 64, 2)],
)
def test_wrong_patch_shape_is_an_engine_error(cpu_engine, shape):
    with pytest.raises(EngineError) as info:
        cpu_engine.run(np.zeros(shape, np.float32))
    assert str(list(shape)) in str(info.value)
    assert "2, 64, 64, 64" in str(info.value)


def test_float64_input_is_accepted(cpu_engine):
    out = cpu_engine.run(np.full((1, 2, 64, 64, 64), 0.5, dtype=np.float64))
    assert out["malignancy_probability"].dtype == np.float32


def test_threads_env_var_is_honoured(bundle, monkeypatch):
    seen = {}
    real = OnnxEngine.__init__

    def spy(self, path, backend, providers, threads=None, first_pass=None):
        seen["threads"] = threads
        real(self, path, backend, providers, threads, first_pass)

    monkeypatch.setattr(OnnxEngine, "__init__", spy)
    monkeypatch.setenv("NODULE_EDGE_THREADS", "1")
    create_engine(bundle, "cpu")
    assert seen["threads"] == 1


def test_cpu_fast_runs_without_importing_onnxruntime(tiny_bundle):
    """On a CPU-only install, auto must not import onnxruntime just to look for CUDA (~20 MB resident)."""
    import importlib.metadata
    import subprocess
    import sys

    if not openvino_available():
        pytest.skip("needs the openvino extra (cpu-fast)")
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
        pytest.skip("onnxruntime-gpu is installed: auto must import it to look for CUDA")
    except importlib.metadata.PackageNotFoundError:
        pass
    code = (
        "import sys, numpy as np\n"
        "from nodule_edge.runtime.bundle import load_bundle\n"
        "from nodule_edge.runtime.engines import create_engine\n"
        f"engine = create_engine(load_bundle({str(tiny_bundle)!r}), 'auto', threads=1)\n"
        "engine.run(np.zeros((1, 2, 64, 64, 64), np.float32))\n"
        "print(engine.backend, 'onnxruntime' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cpu-fast", "False"]


def test_cuda_is_looked_for_only_where_a_cuda_build_is_installed(monkeypatch):
    import importlib.metadata

    def no_gpu_build(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_gpu_build)
    assert ort_engines.available_providers() == []
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: object())
    assert ort_engines.available_providers() == list(ort.get_available_providers())


# ---------------------------------------------------------------------------------------------
# The one backend table: engines, CLI choices and README agree with it
# ---------------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[3] / "README.md"


def test_every_backend_names_an_engine_subclass():
    import importlib

    from nodule_edge.runtime.engines import BACKEND_TABLE, Engine

    for spec in BACKEND_TABLE:
        module = importlib.import_module(f"nodule_edge.runtime.engines.{spec.module}")
        assert issubclass(getattr(module, spec.engine_class), Engine), spec.name


def test_readme_backend_table_is_generated_from_the_backend_table():
    """Regenerate with ``python -m nodule_edge.runtime.engines`` (between the README's markers)."""
    from nodule_edge.runtime.engines import backend_table_markdown

    text = README.read_text(encoding="utf-8")
    start = text.index("-->\n", text.index("<!-- backend-table:")) + len("-->\n")
    end = text.index("<!-- /backend-table -->")
    assert text[start:end] == backend_table_markdown()
    assert f"`--backend auto` tries {', '.join(BACKENDS)} in that order" in " ".join(text.split())


def test_cli_backend_choices_are_the_backend_table():
    from nodule_edge.cli._common import _BACKEND_CHOICE
    from nodule_edge.runtime.engines import ALL_BACKENDS

    assert tuple(_BACKEND_CHOICE.choices) == ("auto", *ALL_BACKENDS)


def test_cpu_fast_says_it_runs_bf16_exactly_where_the_cpu_has_native_bf16(tiny_bundle):
    """The CI gate keys the fast engine's ratio by this (benches/ratios.py)."""
    if not openvino_available():
        pytest.skip("needs the openvino extra (cpu-fast)")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    engine = create_engine(load_bundle(tiny_bundle), "cpu-fast", threads=1)
    assert engine.precision == ("bf16" if native else "f32")

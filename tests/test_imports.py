"""Import hygiene: the runtime and the top-level package stay free of torch (and onnxruntime).

Each check runs in a fresh interpreter, because the test session itself imports torch to build
the tiny bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str, env_bundle: str | None = None) -> dict:
    import os

    env = dict(os.environ)
    env.pop("NODULE_EDGE_BUNDLE", None)
    if env_bundle is not None:
        env["NODULE_EDGE_BUNDLE"] = env_bundle
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_top_level_package_imports_neither_torch_nor_onnxruntime():
    loaded = _run(
        """
        import json, sys
        import nodule_edge
        nodule_edge.build_patch, nodule_edge.PatchSpec, nodule_edge.ATTRIBUTE_NAMES
        print(json.dumps({m: m in sys.modules for m in ("torch", "onnxruntime", "onnx", "hnswlib")}))
        """
    )
    assert loaded == {"torch": False, "onnxruntime": False, "onnx": False, "hnswlib": False}


def test_runtime_index_and_cli_import_without_torch():
    loaded = _run(
        """
        import json, sys
        import nodule_edge.runtime, nodule_edge.index, nodule_edge.cli
        import nodule_edge.runtime.outputs, nodule_edge.runtime.evaluate, nodule_edge.runtime.demo
        print(json.dumps({m: m in sys.modules for m in ("torch", "nodule_edge.train", "nodule_edge.export")}))
        """
    )
    assert loaded == {"torch": False, "nodule_edge.train": False, "nodule_edge.export": False}


def test_runtime_and_index_modules_import_neither_export_train_nor_torch():
    """Every module of the runtime and the index, imported in one fresh interpreter (issue 12)."""
    loaded = _run(
        """
        import importlib, json, pkgutil, sys
        import nodule_edge.index, nodule_edge.runtime
        names = []
        for package in (nodule_edge.runtime, nodule_edge.index):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                if info.name.rsplit(".", 1)[-1] != "__main__":  # a __main__ runs a command
                    importlib.import_module(info.name)
                    names.append(info.name)
        banned = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "nodule_edge.export", "nodule_edge.train")))
        print(json.dumps({"modules": names, "banned": banned}))
        """
    )
    assert (
        "nodule_edge.runtime.engines.tensorrt" in loaded["modules"] and "nodule_edge.index.store" in loaded["modules"]
    )
    assert loaded["banned"] == []


def test_inferer_construction_and_inference_do_not_import_torch(tiny_bundle, tmp_path):
    loaded = _run(
        f"""
        import json, sys
        from nodule_edge.runtime import NoduleInferer
        from nodule_edge.runtime.demo import write_demo_study
        inferer = NoduleInferer({str(tiny_bundle)!r}, top_k=3)
        # Construction really loaded the engine and the index (not a lazy stub).
        # (OpenVINO runs need no onnxruntime: auto imports it only where a CUDA build is installed.)
        engine_module = "openvino" if inferer.engine.backend == "cpu-fast" else "onnxruntime"
        assert engine_module in sys.modules and inferer.index is not None
        folder, voxel = write_demo_study({str(tmp_path / "study")!r})
        result = inferer.infer(folder, voxels=[voxel])
        print(json.dumps({{"torch": "torch" in sys.modules, "train": "nodule_edge.train" in sys.modules,
                           "n": len(result.nodules)}}))
        """
    )
    assert loaded == {"torch": False, "train": False, "n": 1}


def test_the_infer_command_never_imports_simpleitk(tmp_path):
    """`nodule-edge infer` on a DICOM study runs without SimpleITK (issue 14: its import is about a
    third of the peak memory, and its library once hung a run at exit): numpy resampling,
    components and NIfTI writing. On the real chest study when it is there, else the demo study."""
    from tests.conftest import SHARED_DATA

    study = SHARED_DATA / "dicom" / "chest_ricord_jpeg_lossless"
    xyz = "256,256,128"
    if not study.is_dir():
        from nodule_edge.runtime.demo import write_demo_study

        study, voxel = write_demo_study(tmp_path / "demo")
        xyz = ",".join(str(v) for v in voxel)
    out = tmp_path / "out"
    loaded = _run(
        f"""
        import json, sys
        from nodule_edge.cli import main
        main(["infer", {str(study)!r}, "--xyz", {xyz!r}, "--out", {str(out)!r}], standalone_mode=False)
        print(json.dumps({{"SimpleITK": "SimpleITK" in sys.modules, "itk": any(m.startswith("SimpleITK") for m in sys.modules)}}))
        """
    )
    assert (out / "report.json").is_file() and (out / "nodule0_segmentation.nii.gz").is_file()
    assert loaded == {"SimpleITK": False, "itk": False}


def test_the_infer_command_on_the_jpeg2000_study_never_imports_simpleitk(tmp_path):
    """With imagecodecs installed, the real JPEG 2000 study decodes through OpenJPEG in imagecodecs,
    not GDCM: `nodule-edge infer` on it loads no SimpleITK either (issue 14)."""
    import importlib.util

    import pytest

    from tests.conftest import SHARED_DATA

    study = SHARED_DATA / "dicom" / "siemens_j2k_20_slices"
    if not study.is_dir():
        pytest.skip(f"the real JPEG 2000 study is not at {study}")
    if importlib.util.find_spec("imagecodecs") is None:
        pytest.skip("imagecodecs is not installed (the imagecodecs extra): GDCM decodes JPEG 2000")
    out = tmp_path / "out"
    loaded = _run(
        f"""
        import json, sys
        from nodule_edge.cli import main
        main(["infer", {str(study)!r}, "--xyz", "256,300,10", "--out", {str(out)!r}], standalone_mode=False)
        print(json.dumps({{"SimpleITK": "SimpleITK" in sys.modules, "itk": any(m.startswith("SimpleITK") for m in sys.modules)}}))
        """
    )
    assert (out / "report.json").is_file() and (out / "nodule0_segmentation.nii.gz").is_file()
    assert loaded == {"SimpleITK": False, "itk": False}

"""Tampered bundles and corrupted or truncated indexes: a clean error, no output, no crash.

Each case goes through the embedding API (``NoduleInferer``) and through ``nodule-edge infer``,
whose answer must be one line on stderr, the error's exit code, and no output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodule_edge.cli import main
from nodule_edge.errors import BundleError, EngineError, IndexError_, NoduleEdgeError
from nodule_edge.index import AttributeIndex
from nodule_edge.runtime import NoduleInferer
from nodule_edge.runtime.bundle import load_bundle, write_manifest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target


def resign(bundle: Path) -> None:
    """Rewrite manifest.json over the bundle's current files, as an attacker with write access could."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    extra = {k: v for k, v in manifest.items() if k not in ("format", "artifacts", "files")}
    (bundle / "manifest.json").unlink()
    write_manifest(bundle, manifest["artifacts"], extra)


def reseal_index(index_dir: Path) -> None:
    """Rewrite the index's own checksums over its current files."""
    path = index_dir / "checksums.json"
    payload = json.loads(path.read_text())
    payload["files"] = {name: hashlib.sha256((index_dir / name).read_bytes()).hexdigest() for name in payload["files"]}
    path.write_text(json.dumps(payload))


def infer_cli(bundle: Path, demo_study, tmp_path: Path):
    folder, (x, y, z) = demo_study
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(out), "--bundle", str(bundle)]
    )
    return result, out


def assert_refused(result, out: Path, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


# ------------------------------------------------------------------------------ bundle


def test_untouched_copy_is_accepted(bundle_copy):
    assert load_bundle(bundle_copy).model_version


@pytest.mark.parametrize("victim", ["model.onnx", "index/index.bin", "index_thumbnails.npy"])
def test_one_changed_byte_is_refused(bundle_copy, demo_study, tmp_path, victim):
    path = bundle_copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        NoduleInferer(bundle_copy)
    result, out = infer_cli(bundle_copy, demo_study, tmp_path)
    assert_refused(result, out, 4, victim, "modified or corrupted")


@pytest.mark.parametrize("victim", ["model.onnx", "index/entries.json", "index_thumbnail_ids.txt"])
def test_missing_file_is_refused(bundle_copy, demo_study, tmp_path, victim):
    (bundle_copy / victim).unlink()
    with pytest.raises(BundleError, match="missing"):
        NoduleInferer(bundle_copy)
    result, out = infer_cli(bundle_copy, demo_study, tmp_path)
    assert_refused(result, out, 4, victim, "missing")


@pytest.mark.parametrize("extra", ["evil.onnx", "index/extra.bin", "sitecustomize.py"])
def test_extra_file_is_refused(bundle_copy, demo_study, tmp_path, extra):
    (bundle_copy / extra).write_bytes(b"not listed")
    with pytest.raises(BundleError, match="does not list"):
        NoduleInferer(bundle_copy)
    result, out = infer_cli(bundle_copy, demo_study, tmp_path)
    assert_refused(result, out, 4, extra)


def test_tampered_manifest_is_refused(bundle_copy, demo_study, tmp_path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = "0" * 64
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    result, out = infer_cli(bundle_copy, demo_study, tmp_path)
    assert_refused(result, out, 4, "model.onnx")
    (bundle_copy / "manifest.json").write_text("{not json")
    result, out = infer_cli(bundle_copy, demo_study, tmp_path)
    assert_refused(result, out, 4, "manifest.json")


def test_resigned_truncated_model_is_an_engine_error(bundle_copy, demo_study, tmp_path):
    """Checksums can be forged by whoever can write the folder; the engine must still fail cleanly."""
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    resign(bundle_copy)
    load_bundle(bundle_copy)  # the forged manifest verifies
    with pytest.raises(EngineError, match="model.onnx"):
        NoduleInferer(bundle_copy, backend="cpu")
    result, out = infer_cli(bundle_copy, demo_study, tmp_path)
    assert result.exit_code in (EngineError.exit_code, BundleError.exit_code)
    assert_refused(result, out, result.exit_code, "model.onnx")


def test_resigned_model_without_metadata_is_refused(bundle_copy, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle_copy / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(bundle_copy / "model.onnx"))
    resign(bundle_copy)
    with pytest.raises(BundleError, match="metadata"):
        NoduleInferer(bundle_copy, backend="cpu")


# ------------------------------------------------------------------------------- index


def _index_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(tiny_bundle / "index", target)
    return target


@pytest.mark.parametrize("victim", ["index.bin", "vectors.npy", "entries.json"])
@pytest.mark.parametrize("damage", ["truncate", "empty", "flip"])
def test_corrupted_index_is_an_index_error(tiny_bundle, tmp_path, victim, damage):
    index = _index_copy(tiny_bundle, tmp_path)
    path = index / victim
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "empty": b"", "flip": data[:-1] + bytes([data[-1] ^ 0xFF])}[damage]
    )
    with pytest.raises(IndexError_, match=victim):
        AttributeIndex.load(index)
    result = CliRunner().invoke(main, ["index", "query", str(index), "--attributes", "3,3,3,3,3,3"])
    assert result.exit_code == IndexError_.exit_code and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("victim", ["index.bin", "vectors.npy", "entries.json"])
def test_truncated_index_with_forged_checksums_fails_cleanly(tiny_bundle, tmp_path, victim):
    """Past the checksum check, each reader must still refuse bad bytes without crashing the process.

    Runs in a subprocess: a native reader (hnswlib) that crashed would take the test run down.
    """
    index = _index_copy(tiny_bundle, tmp_path)
    path = index / victim
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) * 2 // 3)])
    reseal_index(index)
    code = textwrap.dedent(
        f"""
        from nodule_edge.errors import IndexError_
        from nodule_edge.index import AttributeIndex
        try:
            AttributeIndex.load({str(index)!r})
        except IndexError_ as exc:
            print("IndexError_:", exc)
        else:
            print("loaded")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"crashed with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("IndexError_:"), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_resigned_bundle_with_a_corrupt_index(bundle_copy, demo_study, tmp_path):
    """The bundle manifest is forged over a damaged index: the index's own checksums still catch it."""
    path = bundle_copy / "index" / "vectors.npy"
    path.write_bytes(path.read_bytes()[:-8])
    resign(bundle_copy)
    with pytest.raises(IndexError_, match="vectors.npy"):
        NoduleInferer(bundle_copy, backend="cpu")
    result, out = infer_cli(bundle_copy, demo_study, tmp_path)
    assert_refused(result, out, IndexError_.exit_code, "vectors.npy")


def test_thumbnails_that_are_not_an_array_are_refused(bundle_copy):
    """index_thumbnails.npy is loaded without pickle: a pickled object file must not be unpickled."""
    import pickle

    (bundle_copy / "index_thumbnails.npy").write_bytes(pickle.dumps({"a": 1}))
    resign(bundle_copy)
    with pytest.raises(NoduleEdgeError):
        NoduleInferer(bundle_copy, backend="cpu")


def test_pickled_object_array_is_never_unpickled(bundle_copy, tmp_path):
    import numpy as np

    marker = tmp_path / "pwned"
    np.save(bundle_copy / "index_thumbnails.npy", np.array([_Evil(str(marker))], dtype=object), allow_pickle=True)
    resign(bundle_copy)
    with pytest.raises(NoduleEdgeError):
        NoduleInferer(bundle_copy, backend="cpu")
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))

"""Bundles: verified file by file; tampered, incomplete or padded bundles are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from nodule_edge.errors import BundleError
from nodule_edge.runtime.bundle import load_bundle, write_manifest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target


def test_valid_bundle_loads(bundle_copy):
    bundle = load_bundle(bundle_copy)
    assert bundle.path("onnx_fp32").is_file()
    assert bundle.path("index").is_dir()
    assert len(bundle.sha256("onnx_fp32")) == 64


def test_changed_byte_is_refused(bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx has sha256"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "index_thumbnails.npy").unlink()
    with pytest.raises(BundleError, match="index_thumbnails.npy is missing"):
        load_bundle(bundle_copy)


def test_extra_file_is_refused(bundle_copy):
    (bundle_copy / "index" / "injected.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="does not list: index/injected.bin"):
        load_bundle(bundle_copy)


def test_missing_manifest_and_folder(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(bundle_copy)


def test_malformed_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BundleError, match="unknown bundle format"):
        load_bundle(bundle_copy)


def test_write_manifest_rejects_dangling_artifact(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(BundleError, match="does not exist"):
        write_manifest(tmp_path, {"onnx_fp32": "model.onnx"})

"""Model bundles: the artifacts the runtime loads, verified file by file against a manifest.

A bundle is a folder with ``manifest.json`` listing every file and its sha256, the ONNX model(s)
(which carry their own metadata: patch spec, attribute names, versions), optional TensorRT
engines, and the similar-nodule index. Loading verifies every checksum and refuses missing,
changed or unlisted files. Nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodule_edge._files import sha256_file, write_text_atomic
from nodule_edge.errors import BundleError

__all__ = ["Bundle", "BUNDLE_FORMAT", "default_bundle_path", "load_bundle", "write_manifest"]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "nodule-edge-bundle-v1"
MANIFEST = "manifest.json"


def default_bundle_path() -> Path:
    """``$NODULE_EDGE_BUNDLE`` if set, else the bundle shipped inside the package."""
    env = os.environ.get("NODULE_EDGE_BUNDLE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "assets" / "bundle"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: paths and manifest only; the artifacts load where they are used.

    :func:`load_bundle` reads ``manifest.json`` and hashes every file against it up front; the
    ONNX models, the index and the thumbnails are read later by the engine and the inferer.

    Example:
        >>> from nodule_edge.runtime.bundle import load_bundle
        >>> bundle = load_bundle()  # the shipped bundle, every sha256 checked
        >>> bundle.path("onnx_fp32").name
        'model.onnx'

    Attributes:
        root: Bundle folder.
        manifest: Parsed ``manifest.json``.
        files: Verified relative path → sha256.
    """

    root: Path
    manifest: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def path(self, role: str) -> Path | None:
        """Path of an artifact by role (``onnx_fp32``, ``cpu_engine``, ``tensorrt``, ``index``)."""
        rel = self.manifest.get("artifacts", {}).get(role)
        return self.root / rel if rel else None

    def sha256(self, role: str) -> str | None:
        """Recorded sha256 of a single-file artifact."""
        rel = self.manifest.get("artifacts", {}).get(role)
        return self.files.get(rel) if rel else None

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("model_version", "unknown"))


def _listed_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def write_manifest(root: str | Path, artifacts: dict[str, str], extra: dict[str, Any] | None = None) -> Path:
    """Hash every file under ``root`` and write ``manifest.json`` atomically.

    Args:
        root: Bundle folder (all files in it are listed).
        artifacts: Role → relative path (a file, or a folder for the index).
        extra: More manifest fields (model_version, index_kind, metrics...).
    """
    root = Path(root)
    files = {rel: sha256_file(root / rel) for rel in sorted(_listed_files(root) - {MANIFEST})}
    for role, rel in artifacts.items():
        if not (root / rel).exists():
            raise BundleError(f"artifact '{role}' points to {root / rel}, which does not exist")
    manifest = {"format": BUNDLE_FORMAT, **(extra or {}), "artifacts": artifacts, "files": files}
    return write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def load_bundle(root: str | Path | None = None) -> Bundle:
    """Verify and load a bundle.

    Raises:
        BundleError: The folder or manifest is missing or malformed, a listed file is missing or
            its sha256 differs, or a file is present that the manifest does not list.
    """
    root = Path(root) if root is not None else default_bundle_path()
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"model bundle {root} does not exist (build one with 'nodule-edge export')")
    if not manifest_path.is_file():
        raise BundleError(f"model bundle {root} has no {MANIFEST}: incomplete bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{manifest_path}: unknown bundle format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {BUNDLE_FORMAT!r}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{manifest_path}: no 'files' checksums listed")
    for rel, expected in files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"bundle file {path} has sha256 {actual[:16]}…, manifest says {str(expected)[:16]}…: the bundle was modified or corrupted"
            )
    extra = sorted(_listed_files(root) - set(files) - {MANIFEST})
    if extra:
        raise BundleError(f"bundle {root} contains files its manifest does not list: {', '.join(extra[:5])}")
    log.debug("bundle %s verified (%d files)", root, len(files))
    return Bundle(root=root, manifest=manifest, files=dict(files))

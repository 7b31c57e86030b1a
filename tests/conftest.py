"""Shared fixtures: where the real data lives, and skips with a reason when it is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodule_edge.data_paths import data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = data_dir(REPO_ROOT)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set NODULE_EDGE_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def lidc_voi_dir() -> Path:
    """The 679 LIDC-IDRI nodule VOIs with manifest.csv."""
    return _need(SHARED_DATA / "lidc_voi")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """The real DICOM series for the runtime."""
    return _need(SHARED_DATA / "dicom")


def make_voi_dir(root: Path, n: int = 6, seed: int = 0) -> Path:
    """A small synthetic VOI folder in the lidc_voi layout: bright spheres in lung-like air.

    Half the nodules are large and lobulated (rated malignant), half small and round (benign).
    """
    import numpy as np
    import SimpleITK as sitk

    from nodule_edge.attributes import ATTRIBUTE_NAMES

    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(exist_ok=True)
    header = ["voi_id", "patient_id", "center_x_mm", "center_y_mm", "center_z_mm", "diameter_mm"] + [
        f"{a}_mean" for a in ATTRIBUTE_NAMES
    ]
    rows = []
    for i in range(n):
        malignant = i % 2 == 0
        radius = 6.0 if malignant else 3.0
        size = (40, 40, 16)  # x, y, z voxels
        spacing = (0.8, 0.8, 2.0)
        z, y, x = np.mgrid[: size[2], : size[1], : size[0]]
        centre_idx = np.array([20, 20, 8])
        d = np.sqrt(
            ((x - centre_idx[0]) * spacing[0]) ** 2
            + ((y - centre_idx[1]) * spacing[1]) ** 2
            + ((z - centre_idx[2]) * spacing[2]) ** 2
        )
        mask = d <= radius
        hu = rng.normal(-850, 30, mask.shape)
        hu[mask] = rng.normal(30, 10, mask.sum())
        image = sitk.GetImageFromArray(hu.astype(np.int16))
        image.SetSpacing(spacing)
        origin = np.array([-50.0 + 3 * i, 20.0, -100.0 - i])
        image.SetOrigin(tuple(origin))
        m = sitk.GetImageFromArray(mask.astype(np.uint8))
        m.CopyInformation(image)
        voi = f"SYN-{i:04d}_R_1"
        sitk.WriteImage(image, str(root / "image" / f"{voi}.nii.gz"))
        sitk.WriteImage(m, str(root / "mask" / f"{voi}.nii.gz"))
        centre = origin + centre_idx * np.array(spacing)
        ratings = [4.5, 2.5, 2.0, 3.5, 3.0, 4.5] if malignant else [3.0, 4.5, 4.5, 1.5, 1.0, 1.5]
        rows.append([voi, f"SYN-{i // 2:04d}", *centre.round(4), 2 * radius, *ratings])
    import csv

    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def synthetic_voi_dir(tmp_path_factory) -> Path:
    """Six synthetic nodules (three patients) in the lidc_voi layout."""
    return make_voi_dir(tmp_path_factory.mktemp("voi"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, synthetic_voi_dir) -> Path:
    """A complete bundle from a seeded untrained model (needs the export extra)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from nodule_edge.export.bundle_builder import build_bundle
    from nodule_edge.patch import DEFAULT_PATCH_SPEC
    from nodule_edge.train.model import CollaborativeNet
    from nodule_edge.train.trainer import save_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bundle")
    # The spec the trainer records: the runtime runs this bundle's model in two passes.
    save_checkpoint(
        root / "ckpt.safetensors", CollaborativeNet(), {"epoch": 0, "patch_spec": DEFAULT_PATCH_SPEC.to_json()}
    )
    return build_bundle(
        root / "ckpt.safetensors", root / "bundle", index_manifest_dir=synthetic_voi_dir, cpu_engine=False
    )


def _bundle_with_box_net(root: Path, voi_dir: Path, **meta: object) -> Path:
    """A bundle of a seeded untrained model with a seeded untrained box net as its first pass;
    ``meta`` joins the checkpoint's sidecar."""
    import torch

    from nodule_edge.export.bundle_builder import build_bundle
    from nodule_edge.patch import DEFAULT_PATCH_SPEC
    from nodule_edge.train.first_pass import save_box_net
    from nodule_edge.train.model import BoxNet, BoxNetConfig, CollaborativeNet
    from nodule_edge.train.trainer import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(
        root / "ckpt.safetensors",
        CollaborativeNet(),
        {"epoch": 0, "patch_spec": DEFAULT_PATCH_SPEC.to_json(), **meta},
    )
    net = BoxNet(BoxNetConfig(widths=(4, 8, 8, 8)))
    with torch.no_grad():  # not the decoder's "no nodule" start: a map with structure to compare
        net.seg_head.out.bias.zero_()
    save_box_net(root / "box_net.safetensors", net.eval(), {"note": "seeded, untrained"})
    return build_bundle(
        root / "ckpt.safetensors",
        root / "bundle",
        index_manifest_dir=voi_dir,
        cpu_engine=False,
        first_pass=root / "box_net.safetensors",
    )


@pytest.fixture(scope="session")
def tiny_bundle_with_first_pass(tmp_path_factory, synthetic_voi_dir) -> Path:
    """:func:`tiny_bundle`'s model with a seeded untrained box net as its first pass."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    return _bundle_with_box_net(tmp_path_factory.mktemp("bundle_first_pass"), synthetic_voi_dir)


@pytest.fixture(scope="session")
def tiny_bundle_with_outline_term(tmp_path_factory, synthetic_voi_dir) -> Path:
    """:func:`tiny_bundle_with_first_pass` with an outline term in the checkpoint (``[head]
    outline_statistics``: the head step's ``classifier_refit.outline_head``)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from nodule_edge.outline import OutlineHead

    head = OutlineHead(weights=(0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0), bias=-6.0)  # log volume: ~55 mm3 -> 0
    return _bundle_with_box_net(
        tmp_path_factory.mktemp("bundle_outline"),
        synthetic_voi_dir,
        classifier_refit={"method": "debugged", "outline_head": json.loads(head.to_json())},
    )


def _has_cuda() -> bool:
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return True
    except ImportError:
        pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a CUDA device is visible; elsewhere they skip with the reason."""
    if any("gpu" in item.keywords for item in items) and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to onnxruntime or torch)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_study(tmp_path_factory) -> tuple[Path, tuple[int, int, int]]:
    """The synthetic demo DICOM study (48 slices) and its nodule voxel; treat it as read-only."""
    from nodule_edge.runtime.demo import write_demo_study

    return write_demo_study(tmp_path_factory.mktemp("demo") / "study")


def _break_voi_dir(src: Path, dst: Path, *, outside: str | None = None, bad_mask: str | None = None) -> Path:
    import csv
    import shutil

    shutil.copytree(src, dst)
    manifest = dst / "manifest.csv"
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if outside is not None and outside not in {r["voi_id"] for r in rows}:
        raise KeyError(f"no row {outside!r} in {manifest}")
    for row in rows:
        if row["voi_id"] == outside:
            row["center_x_mm"] = str(float(row["center_x_mm"]) + 100.0)
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if bad_mask is not None:
        (dst / "mask" / f"{bad_mask}.nii.gz").write_bytes(b"not a nifti file")
    return dst


@pytest.fixture(scope="session")
def break_voi_dir():
    """``break_voi_dir(src, dst, outside=voi_id, bad_mask=voi_id)``: a broken copy of a VOI folder.

    Row ``outside`` gets its centre moved 100 mm in x, off its 32 mm wide synthetic VOI (as the
    LIDC row whose recorded centre lay 33 mm outside its VOI, issue 14); ``bad_mask``'s mask file
    is replaced by bytes no reader accepts. For the per-row error tests of ``evaluate``.
    """
    return _break_voi_dir

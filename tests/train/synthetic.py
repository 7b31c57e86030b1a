"""Synthetic training data: small NIfTI VOIs of bright spheres in air, with masks and a manifest.

The layout is that of ``../shared/data/lidc_voi`` (``manifest.csv``, ``image/``, ``mask/``), so the
real readers, the shared patch builder and the trainer run unchanged on it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nodule_edge.attributes import ATTRIBUTE_NAMES

# Reader-mean malignancy per synthetic nodule: both classes and one exact 3 (no proxy label).
MALIGNANCY_MEANS = (1.5, 4.5, 2.0, 4.0, 3.0, 1.25, 4.75, 2.5, 3.5, 1.0, 5.0, 2.25)
VOLUME_SIZE_XYZ = (40, 40, 20)
VOLUME_SPACING_MM = (1.0, 1.0, 2.0)


def write_voi_dir(
    root: Path,
    n_nodules: int = 12,
    n_patients: int = 6,
    seed: int = 0,
    missing_masks: tuple[int, ...] = (),
    unrated: tuple[int, ...] = (),
) -> Path:
    """Write ``n_nodules`` VOIs (bright spheres in air, radius growing with malignancy).

    Args:
        root: Folder to create.
        n_nodules: Number of VOIs.
        n_patients: Nodules are assigned to patients round-robin by ``i % n_patients``.
        seed: Noise and origin seed.
        missing_masks: Indices written without a mask file.
        unrated: Indices written with empty rating columns.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(parents=True, exist_ok=True)
    nx, ny, nz = VOLUME_SIZE_XYZ
    sx, sy, sz = VOLUME_SPACING_MM
    rows = []
    for i in range(n_nodules):
        malignancy = MALIGNANCY_MEANS[i % len(MALIGNANCY_MEANS)]
        radius_mm = 2.0 + 1.5 * malignancy
        origin = (float(rng.uniform(-100, 100)), float(rng.uniform(-100, 100)), float(rng.uniform(-200, 0)))
        z, y, x = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
        cx, cy, cz = (nx - 1) * sx / 2, (ny - 1) * sy / 2, (nz - 1) * sz / 2
        inside = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius_mm**2
        hu = np.where(inside, 40.0, -1000.0) + rng.normal(0, 10, inside.shape)
        voi_id = f"SYN-{i:03d}"
        for sub, array, pixel in (
            ("image", hu.astype(np.int16), sitk.sitkInt16),
            ("mask", inside.astype(np.uint8), sitk.sitkUInt8),
        ):
            if sub == "mask" and i in missing_masks:
                continue
            img = sitk.GetImageFromArray(array)
            img = sitk.Cast(img, pixel)
            img.SetSpacing(VOLUME_SPACING_MM)
            img.SetOrigin(origin)
            sitk.WriteImage(img, str(root / sub / f"{voi_id}.nii.gz"))
        center = (origin[0] + cx, origin[1] + cy, origin[2] + cz)
        row = {
            "voi_id": voi_id,
            "patient_id": f"SYN-PATIENT-{i % n_patients:02d}",
            "center_x_mm": f"{center[0]:.4f}",
            "center_y_mm": f"{center[1]:.4f}",
            "center_z_mm": f"{center[2]:.4f}",
            "diameter_mm": f"{2 * radius_mm:.3f}",
        }
        for name in ATTRIBUTE_NAMES:
            value = malignancy if name == "malignancy" else float(1 + (i + len(name)) % 5)
            row[f"{name}_mean"] = "" if i in unrated else f"{value}"
        rows.append(row)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_tiny_config(
    path: Path,
    voi_dir: Path,
    output_dir: Path,
    cache_dir: Path,
    *,
    model: str = "",
    loss: str = "",
    train: str = "",
    cv: str = "",
    first_pass: str = "",
) -> Path:
    """A TOML config for a seconds-long run on the synthetic VOIs (extra lines per section)."""
    path.write_text(
        f"""name = "tiny"
output_dir = "{output_dir.as_posix()}"

[data]
voi_dir = "{voi_dir.as_posix()}"
cache_dir = "{cache_dir.as_posix()}"

[model]
{model}

[loss]
{loss}

[train]
epochs = 1
batch_sure = 2
batch_unsure = 2
max_steps_per_epoch = 1
patience = 5
seed = 0
{train}

[first_pass]
# The shipped first pass is a box net: a seconds-long one here.
epochs = 1
widths = [8, 8, 8, 8]
batch = 2
{first_pass}

[cv]
folds = 3
run_folds = [0]
val_fraction = 0.5
final = false
{cv}
"""
    )
    return path

"""The bundled demo study: a plainly labelled SYNTHETIC chest phantom written as real DICOM.

No patient data ships with nodule-edge. The demo generates, deterministically, a small CT series
(uncompressed, Explicit VR Little Endian, CT Image Storage) of a chest-like phantom: body, two
lungs with parenchymal texture, vessels and one lobulated, spiculated solid nodule, and returns
the nodule's voxel location, so ``nodule-edge demo`` exercises the full DICOM path.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

__all__ = ["write_demo_study", "demo_volume", "DEMO_NODULE_VOXEL"]

_SIZE = 192  # pixels per row/column
_PIXEL_MM = 0.7
_SLICES = 48
_SLICE_MM = 1.25
#: Nodule centre as (column, row, slice).
DEMO_NODULE_VOXEL = (62, 90, 24)


def demo_volume(seed: int = 7) -> np.ndarray:
    """The phantom in HU as int16 ``[slice, row, column]``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        np.arange(_SLICES) * _SLICE_MM, np.arange(_SIZE) * _PIXEL_MM, np.arange(_SIZE) * _PIXEL_MM, indexing="ij"
    )
    cy = cx = _SIZE * _PIXEL_MM / 2
    hu = np.full(z.shape, -1000.0)
    body = ((x - cx) / 62) ** 2 + ((y - cy) / 48) ** 2 <= 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((x - cx - side * 30) / 24) ** 2 + ((y - cy + 2) / 36) ** 2 <= 1
        hu[lung] = -850.0
    texture = rng.normal(0, 25, hu.shape)
    hu += np.where(hu < -500, texture, texture * 0.4)
    # Vessels: thin tubes running through the lungs.
    for k in range(6):
        px, py = cx + (-1) ** k * (18 + 4 * k), cy - 20 + 7 * k
        r = np.hypot(x - px - 0.15 * (z - 30), y - py)
        hu[(r < 1.2 + 0.2 * (k % 3)) & (hu < -500)] = 30.0
    # The nodule: a lobulated sphere with spicules, centred at DEMO_NODULE_VOXEL.
    nc, nr, ns = DEMO_NODULE_VOXEL
    ncx, ncy, ncz = nc * _PIXEL_MM, nr * _PIXEL_MM, ns * _SLICE_MM
    dx, dy, dz = x - ncx, y - ncy, z - ncz
    r = np.sqrt(dx**2 + dy**2 + dz**2)
    theta = np.arctan2(dy, dx)
    phi = np.arccos(np.clip(dz / np.maximum(r, 1e-6), -1, 1))
    radius = 6.0 + 0.8 * np.sin(3 * theta) * np.sin(2 * phi)
    hu[r <= radius] = 35.0 + np.asarray(rng.normal(0, 10, hu.shape))[r <= radius]
    for t in np.linspace(0, 2 * np.pi, 9, endpoint=False):
        direction = np.array([np.cos(t), np.sin(t), 0.3 * np.sin(2 * t)])
        direction /= np.linalg.norm(direction)
        along = dx * direction[0] + dy * direction[1] + dz * direction[2]
        perp = np.sqrt(np.maximum(r**2 - along**2, 0))
        hu[(along > 0) & (along < radius + 5) & (perp < 0.6)] = 0.0
    return np.clip(hu, -1024, 3071).astype(np.int16)


def write_demo_study(folder: str | Path) -> tuple[Path, tuple[int, int, int]]:
    """Write the phantom as a DICOM series into ``folder``; returns it and the nodule voxel."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = demo_volume()
    study_uid = generate_uid(entropy_srcs=["nodule-edge-demo-study"])
    series_uid = generate_uid(entropy_srcs=["nodule-edge-demo-series"])
    frame_uid = generate_uid(entropy_srcs=["nodule-edge-demo-frame"])
    today = _dt.date(2026, 1, 1).strftime("%Y%m%d")
    for k in range(_SLICES):
        sop_uid = generate_uid(entropy_srcs=["nodule-edge-demo", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "SYNTHETIC^PHANTOM"
        ds.PatientID = "SYNTHETIC-DEMO"
        ds.StudyDate = ds.SeriesDate = today
        ds.SeriesDescription = "SYNTHETIC PHANTOM - not patient data (nodule-edge demo)"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * _SLICE_MM]
        ds.PixelSpacing = [_PIXEL_MM, _PIXEL_MM]
        ds.SliceThickness = _SLICE_MM
        ds.Rows = ds.Columns = _SIZE
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = volume[k].tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    del pydicom
    return folder, DEMO_NODULE_VOXEL

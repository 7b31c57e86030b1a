"""Synthetic CT series written with pydicom, for the study front-end tests and benchmarks.

The phantom is deterministic (no noise): a smooth HU field with structure on every axis (so an
interpolation or orientation mistake shows up in the patch) plus a dense sphere for the
"nodule". :class:`SyntheticSeries` keeps the exact HU volume and geometry that were written, so a
test can compare what the reader returns against ground truth built without the reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)

__all__ = [
    "AXIAL",
    "PATIENT_NAME",
    "PATIENT_ID",
    "SyntheticSeries",
    "phantom_hu",
    "write_series",
    "write_mr_series",
    "write_non_dicom_files",
]

# Deliberately recognisable, so tests can assert they never reach a log record or an error.
PATIENT_NAME = "Doe^Jane^Synthetic"
PATIENT_ID = "SYNTH-PID-0042"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# pydicom cannot encode JPEG Lossless; libjpeg-turbo (through imagecodecs) can. The predictor
# of process 14 differs from selection value 1 on purpose, so both syntaxes are exercised.
_JPEG_LOSSLESS_PREDICTOR = {JPEGLosslessSV1: 1, JPEGLossless: 6}


@dataclass
class SyntheticSeries:
    """What :func:`write_series` wrote: files, the exact HU volume and its geometry.

    Attributes:
        folder: Folder the files were written to.
        paths: Written files in slice order (ascending along the slice normal), skipped ones absent.
        series_uid: SeriesInstanceUID.
        hu: Float32 HU volume ``[slice, row, col]`` of every lattice slice, skipped ones included.
        origin: LPS position of voxel (0, 0, 0).
        spacing: (column spacing, row spacing, slice spacing) in mm.
        direction: 3x3 matrix whose columns are the row, column and slice-normal directions.
        sop_uids: SOPInstanceUID per lattice slice.
        instance_numbers: InstanceNumber per lattice slice.
    """

    folder: Path
    paths: list[Path]
    series_uid: str
    hu: np.ndarray
    origin: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray
    sop_uids: list[str] = field(default_factory=list)
    instance_numbers: list[int] = field(default_factory=list)

    def image(self) -> sitk.Image:
        """The whole ground-truth volume as a SimpleITK HU image with LPS geometry."""
        img = sitk.GetImageFromArray(self.hu.astype(np.float32))
        img.SetOrigin(tuple(float(v) for v in self.origin))
        img.SetSpacing(tuple(float(v) for v in self.spacing))
        img.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return img

    def voxel_to_world(self, xyz: Sequence[float]) -> np.ndarray:
        """LPS position of a (column, row, slice) voxel on the written lattice."""
        return self.origin + self.direction @ (np.asarray(xyz, dtype=np.float64) * np.asarray(self.spacing))

    @property
    def center_world(self) -> np.ndarray:
        """LPS position of the lattice centre voxel."""
        n = np.asarray(self.hu.shape[::-1], dtype=np.float64)
        return self.voxel_to_world((n - 1) / 2.0)


def phantom_hu(world_lps: np.ndarray, nodule_center: Sequence[float] | None = None) -> np.ndarray:
    """Deterministic HU field evaluated at LPS points ``[..., 3]`` (lung-like background + sphere)."""
    x, y, z = world_lps[..., 0], world_lps[..., 1], world_lps[..., 2]
    hu = -800.0 + 150.0 * np.sin(x / 7.0) + 120.0 * np.cos(y / 5.0) + 100.0 * np.sin(z / 4.0 + 0.3) + 2.0 * x - 1.5 * z
    if nodule_center is not None:
        r = np.linalg.norm(world_lps - np.asarray(nodule_center, dtype=np.float64), axis=-1)
        hu = np.where(r < 6.0, 40.0 + 3.0 * r, hu)
    return hu


def _base_dataset(
    *,
    sop_class: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    modality: str | None,
    description: str,
    image_type: Sequence[str],
    rows: int,
    cols: int,
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    if modality is not None:
        ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.StudyDate = "20240101"
    ds.SeriesDescription = description
    ds.SeriesNumber = 2
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    # DICOM PixelSpacing is (between rows, between columns) = (y, x).
    ds.PixelSpacing = [f"{pixel_spacing[1]:g}", f"{pixel_spacing[0]:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _ds_str(values: Sequence[float]) -> list[str]:
    # DS values are limited to 16 characters.
    return [f"{v:.10g}"[:16] for v in values]


def write_series(
    folder: Path,
    *,
    n_slices: int = 40,
    rows: int = 64,
    cols: int = 64,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_spacing: float = 1.0,
    origin: Sequence[float] = (-20.0, -25.0, -60.0),
    orientation: Sequence[float] = AXIAL,
    series_uid: str | None = None,
    study_uid: str | None = None,
    modality: str | None = "CT",
    sop_class: str = CTImageStorage,
    description: str = "SYNTHETIC CHEST",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    transfer_syntax: str = ExplicitVRLittleEndian,
    slope: float = 1.0,
    intercept: float = -1024.0,
    skip: Sequence[int] = (),
    tilt_deg: float = 0.0,
    orientation_of: Callable[[int], Sequence[float]] | None = None,
    nodule_center: Sequence[float] | None = None,
    name_pattern: str = "IM{index:04d}",
    shuffle_seed: int | None = 0,
    preamble: bool = True,
    include_rescale: bool = True,
    unsigned_bits: int | None = None,
) -> SyntheticSeries:
    """Write one synthetic single-frame CT (or other) series.

    Args:
        folder: Destination folder (created).
        n_slices: Lattice slices, including any in ``skip``.
        rows: Rows per slice.
        cols: Columns per slice.
        pixel_spacing: (x, y) = (column, row) spacing in mm.
        slice_spacing: Distance between consecutive slices along the normal in mm.
        origin: LPS position of the first slice's first pixel.
        orientation: ImageOrientationPatient (row cosines, column cosines).
        series_uid: SeriesInstanceUID (generated when None).
        study_uid: StudyInstanceUID (generated when None).
        modality: Modality tag value, or None to leave the tag out.
        sop_class: SOPClassUID.
        description: SeriesDescription.
        image_type: ImageType values.
        transfer_syntax: Transfer syntax; compressed ones are encoded with ``Dataset.compress``.
        slope: RescaleSlope.
        intercept: RescaleIntercept.
        skip: Lattice slice indices not written (gaps).
        tilt_deg: Shear the stack: each slice is shifted along the column direction by
            ``slice_spacing * tan(tilt)`` as a gantry-tilted acquisition is.
        orientation_of: Per-slice ImageOrientationPatient override (mixed orientation).
        nodule_center: LPS centre of the dense sphere (the volume centre when None).
        name_pattern: File name pattern, formatted with ``index`` (write order, shuffled).
        shuffle_seed: Seed for the order files are named in, so names carry no slice order;
            None keeps slice order.
        preamble: False strips the 128-byte preamble and "DICM" prefix from each file.
        include_rescale: False leaves out RescaleSlope/RescaleIntercept.
        unsigned_bits: Store unsigned values with this BitsStored (clipped to its range)
            instead of 16-bit two's complement.

    Returns:
        The written series with its ground truth.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    iop = np.asarray(orientation, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    direction = np.column_stack([row_dir, col_dir, normal])
    origin_v = np.asarray(origin, dtype=np.float64)
    spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]), float(slice_spacing))

    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # [row, col]
    if nodule_center is None:
        nodule_center = origin_v + direction @ (
            np.array([(cols - 1) / 2, (rows - 1) / 2, (n_slices - 1) / 2]) * np.asarray(spacing)
        )
    shift = slice_spacing * math.tan(math.radians(tilt_deg))

    low, high = (0, 2**unsigned_bits - 1) if unsigned_bits else (-32768, 32767)
    raw_volume = np.empty((n_slices, rows, cols), dtype=np.uint16 if unsigned_bits else np.int16)
    for k in range(n_slices):
        pos = origin_v + normal * (k * slice_spacing) + col_dir * (k * shift)
        world = pos + ii[..., None] * spacing[0] * row_dir + jj[..., None] * spacing[1] * col_dir
        hu = phantom_hu(world, nodule_center)
        raw_volume[k] = np.clip(np.round((hu - intercept) / slope), low, high).astype(raw_volume.dtype)
    hu_volume = (raw_volume.astype(np.float64) * slope + intercept).astype(np.float32)

    order = list(range(n_slices))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    file_index = {k: i for i, k in enumerate(order)}

    sop_uids = [generate_uid() for _ in range(n_slices)]
    instance_numbers = [k + 1 for k in range(n_slices)]
    paths: list[Path] = []
    for k in range(n_slices):
        if k in skip:
            continue
        ds = _base_dataset(
            sop_class=sop_class,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            modality=modality,
            description=description,
            image_type=image_type,
            rows=rows,
            cols=cols,
            pixel_spacing=(spacing[0], spacing[1]),
            slice_thickness=slice_spacing,
        )
        if unsigned_bits:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = unsigned_bits, unsigned_bits - 1, 0
        ds.SOPInstanceUID = sop_uids[k]
        ds.InstanceNumber = instance_numbers[k]
        pos = origin_v + normal * (k * slice_spacing) + col_dir * (k * shift)
        ds.ImagePositionPatient = _ds_str(pos)
        ds.ImageOrientationPatient = _ds_str(orientation_of(k) if orientation_of else iop)
        if tilt_deg:
            ds.GantryDetectorTilt = f"{tilt_deg:g}"
        if include_rescale:
            ds.RescaleIntercept = f"{intercept:g}"
            ds.RescaleSlope = f"{slope:g}"
        ds.PixelData = raw_volume[k].tobytes()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        # Compressed syntaxes start uncompressed; Dataset.compress sets their UID.
        implicit = transfer_syntax == ImplicitVRLittleEndian
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
        ds.file_meta = meta
        if transfer_syntax in _JPEG_LOSSLESS_PREDICTOR:
            ds.PixelData = encapsulate(
                [_jpeg_lossless(raw_volume[k], int(ds.BitsStored), _JPEG_LOSSLESS_PREDICTOR[transfer_syntax])]
            )
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            meta.TransferSyntaxUID = transfer_syntax
        elif transfer_syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            ds.compress(transfer_syntax, generate_instance_uid=False)

        path = folder / name_pattern.format(index=file_index[k])
        ds.save_as(path, enforce_file_format=True)
        if not preamble:
            data = path.read_bytes()
            path.write_bytes(data[132:])
        paths.append(path)

    return SyntheticSeries(
        folder=folder,
        paths=paths,
        series_uid=str(series_uid),
        hu=hu_volume,
        origin=origin_v,
        spacing=spacing,
        direction=direction,
        sop_uids=[str(u) for u in sop_uids],
        instance_numbers=instance_numbers,
    )


def _jpeg_lossless(stored: np.ndarray, bits_stored: int, predictor: int) -> bytes:
    """One JPEG Lossless (process 14) frame; two's complement is encoded as its bit pattern."""
    import imagecodecs

    return imagecodecs.jpeg8_encode(
        stored.view(np.uint16), lossless=True, predictor=predictor, bitspersample=bits_stored
    )


def write_mr_series(folder: Path, **kwargs) -> SyntheticSeries:
    """An MR series with the same phantom (for the "not CT" error)."""
    kwargs.setdefault("modality", "MR")
    kwargs.setdefault("sop_class", MRImageStorage)
    kwargs.setdefault("description", "T1 AXIAL")
    kwargs.setdefault("include_rescale", False)
    return write_series(folder, **kwargs)


def write_non_dicom_files(folder: Path) -> list[Path]:
    """Files a study folder often carries besides DICOM: notes, images, an index, junk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "README.txt": b"exported from PACS\n",
        "thumbnail.png": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "empty.dcm": b"",
        ".DS_Store": bytes(range(256)),
        # Starts like a preamble-less DICOM element (group 0x0008) but is garbage.
        "looks_like_dicom": b"\x08\x00\x05\x00" + bytes(range(200)),
    }
    paths = []
    for name, data in files.items():
        p = folder / name
        p.write_bytes(data)
        paths.append(p)
    return paths

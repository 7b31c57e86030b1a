"""Open a CT study and read the model patch around a nodule, touching only the slices it needs.

:func:`open_study` takes a folder of DICOM files or a single volume file (NIfTI, MetaImage, NRRD)
and returns a :class:`Study`: headers and geometry only, cheap to keep. Pixels are read on demand
by :meth:`Study.read_roi` (one nodule) and :meth:`Study.build_patches` (several nodules, each slice
decoded once): the 32 mm cube plus an interpolation margin, never the whole series.

Coordinates:
    * voxel ``(x, y, z)`` = zero-based (column, row, slice); slices are ordered by ascending
      position along the slice normal (``row direction × column direction`` for DICOM, the third
      direction column for volume files). Fractional values are allowed.
    * world = patient LPS millimetres (DICOM's frame; SimpleITK converts NIfTI's RAS on read).
    * Voxel ↔ world follows the slices' own positions, so a study with a gap still maps each
      slice index to where that slice really is.

Pixels come back as :class:`~nodule_edge.volume.Volume` objects (numpy voxels with their LPS
geometry): a DICOM study is read, resampled and written without SimpleITK, which is imported only
to read volume files (see :mod:`nodule_edge._sitk`).

Geometry rules (DICOM): mixed orientation, gantry tilt, a single slice or a stack shorter than
``min_extent_mm`` refuse the study at open time (:class:`GeometryError`). Missing slices, uneven
spacing or conflicting duplicates are noted at open time (logged warning, ``geometry_notes``) and
refused only when they fall inside the slab a cube needs.

Thread safety: a :class:`Study` is immutable after :func:`open_study`; each read opens its own
files, so :meth:`Study.read_roi` and :meth:`Study.build_patches` may run from several threads.

The lattice geometry (grids, slab checks, orientation) is in :mod:`.study_geometry`, the readers
of DICOM slices, volume files and arrays in :mod:`.study_sources`.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nodule_edge._sitk import simpleitk
from nodule_edge.errors import CoordinateError, GeometryError, StudyError
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, build_patch, patch_bounds_lps
from nodule_edge.runtime.dicom import (
    VOLUME_SUFFIXES,
    DicomSeries,
    SliceHeader,
    load_series,
)
from nodule_edge.runtime.study_geometry import (
    GridGeometry,
    as_points,
    check_slab,
    fmt,
    irregularities,
    orientation_code,
    readonly,
    slice_index,
    slice_position,
)
from nodule_edge.runtime.study_sources import ArraySource, DicomSource, PixelSource, VolumeSource
from nodule_edge.volume import Volume, float3, int3

__all__ = [
    "VOLUME_SUFFIXES",
    "GridGeometry",
    "Study",
    "open_study",
    "study_from_image",
]

logger = logging.getLogger(__name__)

_COORD_EPS = 1e-6


@dataclass(frozen=True, eq=False)
class Study:
    """An opened CT study: headers and geometry, pixels read on demand.

    Create with :func:`open_study` (or :func:`study_from_image`). Immutable and thread-safe.

    What loads when: opening reads the headers only (every DICOM file's tags up to the pixel
    data, or the volume file's header) and checks the geometry. Pixels load lazily and are not
    kept: each :meth:`read_roi` or :meth:`build_patches` call decodes just the slices its cubes
    need, cropped in-plane (MetaImage and NRRD files stream just that region; a compressed NIfTI
    is read whole and cropped). Only :func:`study_from_image` holds voxels, its one copy of the
    image.

    Example:
        >>> from nodule_edge.runtime import open_study
        >>> study = open_study("scans/patient-042/")  # doctest: +SKIP
        >>> study  # doctest: +SKIP
        Study(kind='dicom', series_uid='1.2.840...', size=(512, 512, 301), spacing_mm=(0.703, 0.703, 1.0), orientation='LPS', path='scans/patient-042')
        >>> study.read_roi((-61.5, 23.0, -140.2))  # one nodule's region, in HU  # doctest: +SKIP
        >>> patches = study.build_patches([(-61.5, 23.0, -140.2), (48.0, 10.5, -95.0)])  # doctest: +SKIP
        >>> patches.shape  # doctest: +SKIP
        (2, 2, 64, 64, 64)

    Attributes:
        path: The folder or volume file it was opened from (None for an in-memory image).
        kind: ``"dicom"`` or ``"volume"``.
        series_uid: SeriesInstanceUID (None for volume files).
        series_description: SeriesDescription, or None.
        modality: Modality tag ("CT"), None when absent or for volume files.
        size: Voxels (columns, rows, slices).
        spacing_mm: (x, y, z) spacing; z is the median distance between slice positions.
        origin: LPS position (mm) of voxel (0, 0, 0), i.e. the first slice's ImagePositionPatient.
        direction: 3×3 matrix (read-only) whose columns are the column-index, row-index and
            slice directions in LPS.
        transfer_syntax: Transfer syntax UID of the slices (the most common one), None for volume files.
        transfer_syntax_name: Its name, None for volume files.
        geometry_notes: Irregularities found at open time (gaps, uneven spacing, conflicting
            duplicates); empty for a clean series.
        slice_thickness_mm: Median SliceThickness tag, None when absent or for volume files.
        contrast_agent: ContrastBolusAgent tag, None when absent or for volume files.
        convolution_kernel: ConvolutionKernel tag, None when absent or for volume files.
    """

    path: Path | None
    kind: Literal["dicom", "volume"]
    series_uid: str | None
    series_description: str | None
    modality: str | None
    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    transfer_syntax: str | None
    transfer_syntax_name: str | None
    geometry_notes: tuple[str, ...]
    slice_thickness_mm: float | None
    contrast_agent: str | None
    convolution_kernel: str | None
    _positions: np.ndarray = field(repr=False)
    _steps: np.ndarray = field(repr=False)  # position along the normal per slice, ascending
    _references: tuple[tuple[str, int | None], ...] | None = field(repr=False)
    _conflicts: frozenset[int] = field(repr=False)
    _source: PixelSource = field(repr=False)
    _regular: bool = field(repr=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def _from_dicom(cls, path: Path, series: DicomSeries) -> Study:
        from pydicom.uid import UID

        positions = readonly(series.positions)
        d = positions @ series.normal
        steps = np.diff(d)
        nominal = float(np.median(steps))
        notes = irregularities(d, nominal, series.conflicts)
        for note in notes:
            logger.warning("series %s: %s", series.series_uid, note)
        sx, sy = series.pixel_spacing_xy
        first = series.slices[0]
        return cls(
            path=path,
            kind="dicom",
            series_uid=series.series_uid,
            series_description=series.description,
            modality=series.modality,
            size=(first.cols, first.rows, len(series.slices)),
            spacing_mm=(sx, sy, nominal),
            origin=float3(positions[0]),
            direction=readonly(np.column_stack([series.row_dir, series.col_dir, series.normal])),
            transfer_syntax=series.transfer_syntax_uid,
            transfer_syntax_name=UID(series.transfer_syntax_uid).name,
            geometry_notes=tuple(notes),
            slice_thickness_mm=series.slice_thickness_mm,
            contrast_agent=series.contrast_agent,
            convolution_kernel=series.convolution_kernel,
            _positions=positions,
            _steps=readonly(d),
            _references=tuple((h.sop_instance_uid, h.instance_number) for h in series.slices),
            _conflicts=series.conflicts,
            _source=DicomSource(series.slices),
            _regular=not notes,
        )

    @classmethod
    def _from_volume(cls, path: Path) -> Study:
        sitk = simpleitk()  # NIfTI, MetaImage and NRRD headers (the one reader of them here)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise StudyError(f"cannot read volume file {path}: {exc}") from exc
        if reader.GetDimension() != 3:
            raise GeometryError(f"{path} is a {reader.GetDimension()}-D image; a 3-D CT volume is needed")
        if reader.GetNumberOfComponents() != 1:
            raise StudyError(
                f"{path} has {reader.GetNumberOfComponents()} components per voxel; a scalar CT volume is needed"
            )
        size = int3(reader.GetSize())
        spacing = float3(reader.GetSpacing())
        origin = np.asarray(reader.GetOrigin(), dtype=np.float64)
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
        if min(size) < 1 or min(spacing) <= 0:
            raise GeometryError(f"{path} has size {size} and spacing {spacing}; both must be positive")
        return cls._volume(path, size, spacing, origin, direction, VolumeSource(str(path)))

    @classmethod
    def _volume(
        cls,
        path: Path | None,
        size: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: np.ndarray,
        direction: np.ndarray,
        source: PixelSource,
    ) -> Study:
        normal = direction[:, 2]
        positions = origin + np.outer(np.arange(size[2]) * spacing[2], normal)
        return cls(
            path=path,
            kind="volume",
            series_uid=None,
            series_description=None,
            modality=None,
            size=size,
            spacing_mm=spacing,
            origin=float3(origin),
            direction=readonly(direction),
            transfer_syntax=None,
            transfer_syntax_name=None,
            geometry_notes=(),
            slice_thickness_mm=None,
            contrast_agent=None,
            convolution_kernel=None,
            _positions=readonly(positions),
            _steps=readonly(positions @ normal),
            _references=None,
            _conflicts=frozenset(),
            _source=source,
            _regular=True,
        )

    # ---------------------------------------------------------------- properties
    @property
    def n_slices(self) -> int:
        """Number of slices (distinct positions along the normal)."""
        return self.size[2]

    @property
    def slices(self) -> tuple[SliceHeader, ...]:
        """The DICOM slice headers in slice order (index ``k`` is voxel z = k); empty for volume files.

        One header per slice position: of duplicate copies, and of conflicting instances at one
        position, the first in (position, InstanceNumber) order.
        """
        source = self._source
        return source.slices if isinstance(source, DicomSource) else ()

    @property
    def orientation(self) -> str:
        """Where the column, row and slice axes point (``"LPS"`` for a usual axial series; see :func:`.study_geometry.orientation_code`)."""
        return orientation_code(self.direction)

    def __repr__(self) -> str:
        return (
            f"Study(kind={self.kind!r}, series_uid={self.series_uid!r}, size={self.size}, "
            f"spacing_mm={tuple(round(v, 4) for v in self.spacing_mm)}, orientation={self.orientation!r}, "
            f"path={str(self.path) if self.path else None!r})"
        )

    # ---------------------------------------------------------------- coordinates
    def _voxel_to_world(self, v: np.ndarray) -> np.ndarray:
        sx, sy, _ = self.spacing_mm
        row, col = self.direction[:, 0], self.direction[:, 1]
        return (
            slice_position(self._positions, v[:, 2], self.spacing_mm[2], self.direction[:, 2])
            + np.outer(v[:, 0] * sx, row)
            + np.outer(v[:, 1] * sy, col)
        )

    def _world_to_voxel(self, p: np.ndarray) -> np.ndarray:
        sx, sy, _ = self.spacing_mm
        row, col, normal = self.direction[:, 0], self.direction[:, 1], self.direction[:, 2]
        k = slice_index(self._steps, p @ normal, self.spacing_mm[2])
        rel = p - slice_position(self._positions, k, self.spacing_mm[2], normal)
        return np.column_stack([rel @ row / sx, rel @ col / sy, k])

    def _check_voxels(self, v: np.ndarray) -> None:
        size = np.asarray(self.size, dtype=np.float64)
        for point in v:
            if np.any(point < -_COORD_EPS):
                raise CoordinateError(
                    f"voxel coordinate {fmt(point)} is negative; voxel indices are zero-based "
                    f"(column, row, slice) inside the volume of size {self.size}"
                )
            if np.any(point > size - 1 + _COORD_EPS):
                raise CoordinateError(
                    f"voxel coordinate {fmt(point)} is outside the volume of size {self.size} "
                    f"(valid 0…{fmt(size - 1)} per axis)"
                )

    def _world_extent(self) -> tuple[np.ndarray, np.ndarray]:
        size = np.asarray(self.size, dtype=np.float64)
        corners = np.asarray(list(itertools.product(*[(-0.5, s - 0.5) for s in size])))
        w = self._voxel_to_world(corners)
        return w.min(axis=0), w.max(axis=0)

    def _check_world(self, p: np.ndarray) -> np.ndarray:
        v = self._world_to_voxel(p)
        size = np.asarray(self.size, dtype=np.float64)
        bad = np.any((v < -0.5 - _COORD_EPS) | (v > size - 0.5 + _COORD_EPS), axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            lo, hi = self._world_extent()
            raise CoordinateError(
                f"LPS point {fmt(p[i])} mm is outside the volume: it falls at voxel {fmt(v[i])} "
                f"of a volume of size {self.size}; the volume spans LPS "
                f"x {lo[0]:.1f}…{hi[0]:.1f}, y {lo[1]:.1f}…{hi[1]:.1f}, z {lo[2]:.1f}…{hi[2]:.1f} mm"
            )
        return v

    def fraction_outside(self, points_lps_mm) -> float:
        """Fraction of LPS points (``[n, 3]`` mm) that fall outside the scanned volume."""
        p = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
        if not len(p):
            return 0.0
        v = self._world_to_voxel(p)
        size = np.asarray(self.size, dtype=np.float64)
        outside = np.any((v < -0.5 - _COORD_EPS) | (v > size - 0.5 + _COORD_EPS), axis=1)
        return float(outside.mean())

    def voxel_to_world(self, xyz) -> np.ndarray:
        """Voxel (column, row, slice) → LPS mm.

        Args:
            xyz: Three numbers or an N×3 array; zero-based, fractional allowed.

        Returns:
            LPS position(s), shape (3,) or (N, 3).

        Raises:
            CoordinateError: Malformed, non-finite, negative, or beyond ``size - 1``.
        """
        v, single = as_points(xyz, "voxel coordinate")
        self._check_voxels(v)
        w = self._voxel_to_world(v)
        return w[0] if single else w

    def world_to_voxel(self, lps) -> np.ndarray:
        """LPS mm → continuous voxel (column, row, slice).

        Args:
            lps: Three numbers or an N×3 array, patient LPS millimetres.

        Returns:
            Voxel coordinate(s), shape (3,) or (N, 3).

        Raises:
            CoordinateError: Malformed, non-finite, or outside the volume (beyond half a voxel
                past the first/last voxel centre).
        """
        p, single = as_points(lps, "LPS point")
        v = self._check_world(p)
        return v[0] if single else v

    def slice_reference(self, k: float) -> tuple[str, int | None] | None:
        """The DICOM instance of slice ``k`` (rounded to the nearest slice).

        Args:
            k: Slice index (voxel z).

        Returns:
            ``(SOPInstanceUID, InstanceNumber)`` for DICOM studies, None for volume files.

        Raises:
            CoordinateError: ``k`` is not a finite number inside ``0 … n_slices - 1``.
        """
        try:
            kf = float(k)
        except (TypeError, ValueError) as exc:
            raise CoordinateError(f"slice index {k!r} is not a number") from exc
        if not np.isfinite(kf) or kf < -0.5 or kf > self.n_slices - 0.5:
            raise CoordinateError(f"slice index {k!r} is outside 0…{self.n_slices - 1}")
        if self._references is None:
            return None
        return self._references[min(max(int(round(kf)), 0), self.n_slices - 1)]

    # ---------------------------------------------------------------- ROI geometry
    def _roi_box(self, center: np.ndarray, spec: PatchSpec) -> tuple[np.ndarray, np.ndarray]:
        lo_w, hi_w = patch_bounds_lps(center, spec)
        corners = np.asarray(list(itertools.product(*zip(lo_w, hi_w, strict=True))), dtype=np.float64)
        v = self._world_to_voxel(corners)
        # Linear needs the bracketing voxels; B-spline's prefilter reaches further.
        margin = 3 if spec.interpolation == "bspline" else 1
        top = np.asarray(self.size) - 1
        lo = np.clip(np.floor(v.min(axis=0)).astype(int) - margin, 0, top)
        hi = np.clip(np.ceil(v.max(axis=0)).astype(int) + margin, 0, top)
        return lo, hi

    def _grid(self, lo: np.ndarray, hi: np.ndarray) -> GridGeometry:
        k0, k1 = int(lo[2]), int(hi[2])
        sx, sy, nominal = self.spacing_mm
        sz = (self._steps[k1] - self._steps[k0]) / (k1 - k0) if k1 > k0 else nominal
        origin = self._positions[k0] + lo[0] * sx * self.direction[:, 0] + lo[1] * sy * self.direction[:, 1]
        return GridGeometry(
            size=int3(hi - lo + 1),
            spacing_mm=(float(sx), float(sy), float(sz)),
            origin=float3(origin),
            direction=tuple(float(v) for v in self.direction.ravel()),
            index_offset=int3(lo),
        )

    def _plan(self, center: np.ndarray, spec: PatchSpec) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._roi_box(center, spec)
        check_slab(
            self._steps,
            self._conflicts,
            self.spacing_mm[2],
            int(lo[2]),
            int(hi[2]),
            f"the cube around LPS {fmt(center)} mm",
        )
        return lo, hi

    def reference_geometry(self, center_lps_mm=None, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> GridGeometry:
        """The grid to resample model outputs back onto.

        Args:
            center_lps_mm: With a nodule centre: the ROI sub-lattice :meth:`read_roi` returns for
                it (exact for any series whose slab passed the checks). Without: the full study
                grid (origin at the first slice, z spacing fitted to the first and last slice).
            spec: Patch definition (sets the ROI extent).

        Returns:
            The grid; ``index_offset`` places it in the study's voxel grid.

        Raises:
            GeometryError: Full grid asked for a series with gaps or uneven spacing (use the
                ROI form), or the ROI's slab is irregular.
            CoordinateError: Bad centre.
        """
        if center_lps_mm is not None:
            p, _ = as_points(center_lps_mm, "nodule centre")
            self._check_world(p[:1])
            return self._grid(*self._plan(p[0], spec))
        if not self._regular:
            raise GeometryError(
                "the study's slices are not a uniform lattice (" + "; ".join(self.geometry_notes) + "); "
                "ask for the ROI grid of a nodule instead"
            )
        return self._grid(np.zeros(3, dtype=int), np.asarray(self.size) - 1)

    # ---------------------------------------------------------------- pixels
    def _image(self, block: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Volume:
        return Volume(block, self._grid(lo, hi))

    def read_roi(self, center_lps_mm, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> Volume:
        """Read the region a nodule's cube needs, in HU.

        Only the slices spanning the cube (plus an interpolation margin) are decoded, cropped to
        the cube's in-plane extent. ``nodule_edge.patch.build_patch(roi, center, spec)`` equals the
        patch built from the whole volume.

        Args:
            center_lps_mm: Nodule centre, LPS mm.
            spec: Patch definition.

        Returns:
            float32 HU ``[z, y, x]`` on the study's LPS lattice (its grid is
            :meth:`reference_geometry` with the same centre); ``.to_sitk()`` makes it a
            SimpleITK image.

        Raises:
            CoordinateError: Centre malformed or outside the volume.
            GeometryError: Gap, uneven spacing or conflicting duplicate inside the cube's slab.
            StudyError: A needed slice cannot be decoded (the message names the file).
        """
        p, single = as_points(center_lps_mm, "nodule centre")
        if not single:
            raise CoordinateError(f"read_roi takes one centre, got {p.shape[0]}; use build_patches")
        self._check_world(p)
        lo, hi = self._plan(p[0], spec)
        block = self._source.read(
            list(range(int(lo[2]), int(hi[2]) + 1)), (int(lo[1]), int(hi[1]) + 1), (int(lo[0]), int(hi[0]) + 1)
        )
        return self._image(block, lo, hi)

    def build_patches(self, centers_lps, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> np.ndarray:
        """Model input for several nodules, decoding each needed slice once.

        Args:
            centers_lps: N×3 (or 3) nodule centres, LPS mm.
            spec: Patch definition.

        Returns:
            float32 ``[N, C, size, size, size]`` in [0, 1] (see :func:`nodule_edge.patch.build_patch`).

        Raises:
            CoordinateError: A centre is malformed or outside the volume.
            GeometryError: A cube's slab has a gap, uneven spacing or conflicting duplicates.
            StudyError: A needed slice cannot be decoded.
        """
        p, _ = as_points(centers_lps, "nodule centre") if np.size(centers_lps) else (np.zeros((0, 3)), False)
        out = np.empty((p.shape[0], spec.channels, spec.size, spec.size, spec.size), dtype=np.float32)
        if p.shape[0] == 0:
            return out
        self._check_world(p)
        boxes = [self._plan(c, spec) for c in p]
        lows = np.min([lo for lo, _ in boxes], axis=0)
        highs = np.max([hi for _, hi in boxes], axis=0)
        needed = sorted({k for lo, hi in boxes for k in range(int(lo[2]), int(hi[2]) + 1)})
        block = self._source.read(needed, (int(lows[1]), int(highs[1]) + 1), (int(lows[0]), int(highs[0]) + 1))
        row_of = {k: i for i, k in enumerate(needed)}
        for i, (c, (lo, hi)) in enumerate(zip(p, boxes, strict=True)):
            sub = block[
                [row_of[k] for k in range(int(lo[2]), int(hi[2]) + 1)],
                int(lo[1] - lows[1]) : int(hi[1] - lows[1]) + 1,
                int(lo[0] - lows[0]) : int(hi[0] - lows[0]) + 1,
            ]
            out[i] = build_patch(self._image(np.ascontiguousarray(sub), lo, hi), c, spec)
        return out


def study_from_image(image: Volume | Any) -> Study:
    """Wrap an in-memory HU image as a :class:`Study` (kind ``"volume"``, no path).

    Args:
        image: 3-D HU image with LPS geometry: a :class:`~nodule_edge.volume.Volume` or a scalar
            SimpleITK image. Its voxels are copied once (as float32).

    Returns:
        The study; reads crop from the copied array.

    Raises:
        GeometryError: Not a 3-D scalar image, non-positive spacing, or a singular direction.
    """
    try:
        volume = Volume.from_sitk(image) if not isinstance(image, Volume) else image
    except ValueError as exc:
        raise GeometryError(str(exc)) from exc
    size = tuple(int(v) for v in volume.size)
    spacing = tuple(float(v) for v in volume.spacing_mm)
    direction = np.asarray(volume.direction, dtype=np.float64)
    if len(spacing) != 3 or min(spacing) <= 0 or not all(np.isfinite(spacing)):
        raise GeometryError(f"image spacing {spacing} must be three positive numbers")
    if direction.size != 9 or not np.isfinite(direction).all() or abs(np.linalg.det(direction.reshape(3, 3))) < 1e-6:
        raise GeometryError(f"image direction {tuple(direction.tolist())} is not a 3x3 matrix of independent axes")
    origin = np.asarray(volume.origin, dtype=np.float64)
    if origin.shape != (3,) or not np.isfinite(origin).all():
        raise GeometryError(f"image origin {tuple(origin.tolist())} must be three finite numbers")
    hu = np.array(volume.array, dtype=np.float32)
    hu.flags.writeable = False
    return Study._volume(
        None,
        int3(size),
        float3(spacing),
        origin,
        direction.reshape(3, 3),
        ArraySource(hu),
    )


def open_study(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    *,
    min_extent_mm: float | None = None,
) -> Study:
    """Open a CT study: a folder of DICOM files or one volume file. Reads headers only.

    Args:
        path: Folder of DICOM files (any nesting and file names; other files are ignored) or a
            volume file (.nii, .nii.gz, .mha, .mhd, .nrrd, .nhdr) in HU, read with SimpleITK
            (NIfTI RAS is converted to LPS).
        series_uid: SeriesInstanceUID to open when the folder holds several CT series.
        min_extent_mm: Minimum coverage of a DICOM series along the slice normal; defaults to
            the model's cube (32 mm). Volume files are taken as they are (training VOIs are short
            and are padded by the patch builder).

    Returns:
        The study, headers only.

    Raises:
        StudyError: Path missing, no DICOM, no CT series (naming the modality found), unreadable
            volume file, undecodable transfer syntax.
        SeriesSelectionError: Several CT series and no ``series_uid``, or ``series_uid`` absent.
        GeometryError: Single slice or too short a stack, mixed orientation, gantry tilt.
    """
    p = Path(path)
    if not p.exists():
        raise StudyError(f"study path {p} does not exist")
    if p.is_dir():
        extent = DEFAULT_PATCH_SPEC.extent_mm if min_extent_mm is None else float(min_extent_mm)
        series = load_series(p, series_uid, min_extent_mm=extent)
        study = Study._from_dicom(p, series)
    elif p.name.lower().endswith(VOLUME_SUFFIXES):
        if series_uid is not None:
            raise StudyError(f"series_uid {series_uid!r} was given but {p} is a volume file, not a DICOM folder")
        study = Study._from_volume(p)
    else:
        with open(p, "rb") as fh:
            is_dicom = fh.read(132)[128:132] == b"DICM"
        if is_dicom:
            raise StudyError(f"{p} is a single DICOM file; pass the folder that holds the whole series")
        raise StudyError(f"{p} is neither a folder of DICOM files nor a volume file ({', '.join(VOLUME_SUFFIXES)})")
    logger.info(
        "opened %s study %s: %d slices, size %s, spacing %s mm",
        study.kind,
        study.series_uid or p.name,
        study.n_slices,
        study.size,
        tuple(round(v, 4) for v in study.spacing_mm),
    )
    return study

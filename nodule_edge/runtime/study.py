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

Geometry rules (DICOM): mixed orientation, gantry tilt, a single slice or a stack shorter than
``min_extent_mm`` refuse the study at open time (:class:`GeometryError`). Missing slices, uneven
spacing or conflicting duplicates are noted at open time (logged warning, ``geometry_notes``) and
refused only when they fall inside the slab a cube needs.

Thread safety: a :class:`Study` is immutable after :func:`open_study`; each read opens its own
files, so :meth:`Study.read_roi` and :meth:`Study.build_patches` may run from several threads.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
import SimpleITK as sitk

from nodule_edge.errors import CoordinateError, GeometryError, StudyError
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, build_patch, patch_bounds_lps
from nodule_edge.runtime.dicom import (
    VOLUME_SUFFIXES,
    DicomSeries,
    SliceHeader,
    decode_slices,
    load_series,
)

__all__ = [
    "VOLUME_SUFFIXES",
    "GridGeometry",
    "Study",
    "open_study",
    "study_from_image",
]

logger = logging.getLogger(__name__)

# A step this much larger than the series' median step means missing slices.
_GAP_FACTOR = 1.5
# Slices inside a cube's slab may sit this far (fraction of the step) off a uniform lattice.
_UNIFORM_TOL_FRACTION = 0.05
_COORD_EPS = 1e-6


@dataclass(frozen=True)
class GridGeometry:
    """A voxel grid without pixels: enough to resample onto it.

    Attributes:
        size: Voxels (columns, rows, slices).
        spacing_mm: (x, y, z) spacing in mm.
        origin: LPS position of voxel (0, 0, 0) in mm.
        direction: 3×3 direction matrix flattened row-major (SimpleITK's convention; the columns
            are the column-index, row-index and slice directions).
        index_offset: Voxel index, in the study's own grid, of this grid's voxel (0, 0, 0).
    """

    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    index_offset: tuple[int, int, int] = (0, 0, 0)

    def to_image(self, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
        """Allocate an empty (zero) image on this grid, e.g. as a ``sitk.Resample`` reference."""
        img = sitk.Image([int(v) for v in self.size], pixel_id)
        self.apply_to(img)
        return img

    def apply_to(self, image: sitk.Image) -> None:
        """Stamp origin, spacing and direction onto an image of this grid's size."""
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing_mm))
        image.SetDirection(tuple(float(v) for v in self.direction))


class _PixelSource(Protocol):
    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """float32 HU ``[len(slices), rows, cols]`` for half-open row/column ranges."""
        ...


# Slices decoded per call: whole slices are decoded (compressed data cannot be cropped first), so
# this bounds the transient memory (32 × 512² float32 = 32 MiB) when many are needed.
_DECODE_CHUNK = 32
# Threads a decode is split across (the edge target has 2 cores; libjpeg-turbo and GDCM release the GIL).
_DECODE_THREADS = 2


def _decode_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(_DECODE_THREADS, cores))


@dataclass(frozen=True)
class _DicomSource:
    slices: tuple[SliceHeader, ...]

    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        out = np.empty((len(slices), rows[1] - rows[0], cols[1] - cols[0]), dtype=np.float32)
        threads = _decode_threads()
        for i in range(0, len(slices), _DECODE_CHUNK):
            chunk = [self.slices[k] for k in slices[i : i + _DECODE_CHUNK]]
            out[i : i + len(chunk)] = decode_slices(chunk, rows, cols, threads=threads)
        return out


@dataclass(frozen=True)
class _VolumeSource:
    path: str

    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        k0, k1 = min(slices), max(slices)
        reader = sitk.ImageFileReader()
        reader.SetFileName(self.path)
        # MetaImage/NRRD stream just this region; compressed NIfTI is read whole, then cropped.
        reader.SetExtractIndex([cols[0], rows[0], k0])
        reader.SetExtractSize([cols[1] - cols[0], rows[1] - rows[0], k1 - k0 + 1])
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise StudyError(f"cannot read voxels of {self.path}: {exc}") from exc
        arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
        return arr[[k - k0 for k in slices]]


@dataclass(frozen=True)
class _ArraySource:
    hu: np.ndarray  # [slice, row, col], read-only

    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        return np.array(self.hu[list(slices), rows[0] : rows[1], cols[0] : cols[1]], dtype=np.float32)


def _fmt(arr: np.ndarray | Sequence[float]) -> str:
    a = np.asarray(arr, dtype=np.float64)
    return np.array2string(a, precision=3, separator=", ", threshold=12, suppress_small=True)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.flags.writeable = False
    return a


def _as_points(value, what: str) -> tuple[np.ndarray, bool]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CoordinateError(f"{what} {value!r} is not a list of numbers: {exc}") from exc
    if arr.shape == (3,):
        single = True
        arr = arr[None, :]
    elif arr.ndim == 2 and arr.shape[1] == 3:
        single = False
    else:
        raise CoordinateError(f"{what} must be 3 numbers (x, y, z) or an N×3 array, got shape {arr.shape}: {value!r}")
    if not np.all(np.isfinite(arr)):
        raise CoordinateError(f"{what} {_fmt(arr if not single else arr[0])} is not finite")
    return arr, single


@dataclass(frozen=True, eq=False)
class Study:
    """An opened CT study: headers and geometry, pixels read on demand.

    Create with :func:`open_study`. Immutable and thread-safe.

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
    _source: _PixelSource = field(repr=False)
    _regular: bool = field(repr=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def _from_dicom(cls, path: Path, series: DicomSeries) -> "Study":
        from pydicom.uid import UID

        positions = _readonly(series.positions)
        d = positions @ series.normal
        steps = np.diff(d)
        nominal = float(np.median(steps))
        notes = _irregularities(d, nominal, series.conflicts)
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
            origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
            direction=_readonly(np.column_stack([series.row_dir, series.col_dir, series.normal])),
            transfer_syntax=series.transfer_syntax_uid,
            transfer_syntax_name=UID(series.transfer_syntax_uid).name,
            geometry_notes=tuple(notes),
            slice_thickness_mm=series.slice_thickness_mm,
            contrast_agent=series.contrast_agent,
            convolution_kernel=series.convolution_kernel,
            _positions=positions,
            _steps=_readonly(d),
            _references=tuple((h.sop_instance_uid, h.instance_number) for h in series.slices),
            _conflicts=series.conflicts,
            _source=_DicomSource(series.slices),
            _regular=not notes,
        )

    @classmethod
    def _from_volume(cls, path: Path) -> "Study":
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
        size = tuple(int(v) for v in reader.GetSize())
        spacing = tuple(float(v) for v in reader.GetSpacing())
        origin = np.asarray(reader.GetOrigin(), dtype=np.float64)
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
        if min(size) < 1 or min(spacing) <= 0:
            raise GeometryError(f"{path} has size {size} and spacing {spacing}; both must be positive")
        return cls._volume(path, size, spacing, origin, direction, _VolumeSource(str(path)))  # type: ignore[arg-type]

    @classmethod
    def _volume(
        cls,
        path: Path | None,
        size: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: np.ndarray,
        direction: np.ndarray,
        source: _PixelSource,
    ) -> "Study":
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
            origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
            direction=_readonly(direction),
            transfer_syntax=None,
            transfer_syntax_name=None,
            geometry_notes=(),
            slice_thickness_mm=None,
            contrast_agent=None,
            convolution_kernel=None,
            _positions=_readonly(positions),
            _steps=_readonly(positions @ normal),
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
        return source.slices if isinstance(source, _DicomSource) else ()

    def __repr__(self) -> str:
        return (
            f"Study(kind={self.kind!r}, series_uid={self.series_uid!r}, size={self.size}, "
            f"spacing_mm={tuple(round(v, 4) for v in self.spacing_mm)}, "
            f"path={str(self.path) if self.path else None!r})"
        )

    # ---------------------------------------------------------------- coordinates
    def _slice_coord(self, along: np.ndarray) -> np.ndarray:
        d = self._steps
        if d.size == 1:
            return (along - d[0]) / self.spacing_mm[2]
        k = np.interp(along, d, np.arange(d.size, dtype=np.float64))
        lo, hi = along < d[0], along > d[-1]
        k[lo] = (along[lo] - d[0]) / (d[1] - d[0])
        k[hi] = d.size - 1 + (along[hi] - d[-1]) / (d[-1] - d[-2])
        return k

    def _slice_position(self, k: np.ndarray) -> np.ndarray:
        p = self._positions
        n = p.shape[0]
        if n == 1:
            return p[0] + np.outer(k * self.spacing_mm[2], self.direction[:, 2])
        idx = np.arange(n, dtype=np.float64)
        out = np.column_stack([np.interp(k, idx, p[:, a]) for a in range(3)])
        lo, hi = k < 0, k > n - 1
        out[lo] = p[0] + np.outer(k[lo], p[1] - p[0])
        out[hi] = p[-1] + np.outer(k[hi] - (n - 1), p[-1] - p[-2])
        return out

    def _voxel_to_world(self, v: np.ndarray) -> np.ndarray:
        sx, sy, _ = self.spacing_mm
        row, col = self.direction[:, 0], self.direction[:, 1]
        return self._slice_position(v[:, 2]) + np.outer(v[:, 0] * sx, row) + np.outer(v[:, 1] * sy, col)

    def _world_to_voxel(self, p: np.ndarray) -> np.ndarray:
        sx, sy, _ = self.spacing_mm
        row, col, normal = self.direction[:, 0], self.direction[:, 1], self.direction[:, 2]
        k = self._slice_coord(p @ normal)
        rel = p - self._slice_position(k)
        return np.column_stack([rel @ row / sx, rel @ col / sy, k])

    def _check_voxels(self, v: np.ndarray) -> None:
        size = np.asarray(self.size, dtype=np.float64)
        for point in v:
            if np.any(point < -_COORD_EPS):
                raise CoordinateError(
                    f"voxel coordinate {_fmt(point)} is negative; voxel indices are zero-based "
                    f"(column, row, slice) inside the volume of size {self.size}"
                )
            if np.any(point > size - 1 + _COORD_EPS):
                raise CoordinateError(
                    f"voxel coordinate {_fmt(point)} is outside the volume of size {self.size} "
                    f"(valid 0…{_fmt(size - 1)} per axis)"
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
                f"LPS point {_fmt(p[i])} mm is outside the volume: it falls at voxel {_fmt(v[i])} "
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
        v, single = _as_points(xyz, "voxel coordinate")
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
        p, single = _as_points(lps, "LPS point")
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
        corners = np.asarray(list(itertools.product(*zip(lo_w, hi_w))), dtype=np.float64)
        v = self._world_to_voxel(corners)
        # Linear needs the bracketing voxels; B-spline's prefilter reaches further.
        margin = 3 if spec.interpolation == "bspline" else 1
        top = np.asarray(self.size) - 1
        lo = np.clip(np.floor(v.min(axis=0)).astype(int) - margin, 0, top)
        hi = np.clip(np.ceil(v.max(axis=0)).astype(int) + margin, 0, top)
        return lo, hi

    def _check_slab(self, k0: int, k1: int, center: np.ndarray) -> None:
        where = f"the cube around LPS {_fmt(center)} mm"
        bad = sorted(k for k in self._conflicts if k0 <= k <= k1)
        if bad:
            raise GeometryError(
                f"different images share slice position {self._steps[bad[0]]:.2f} mm (slice {bad[0]}) inside "
                f"{where}; remove the duplicate instances"
            )
        if k1 <= k0:
            return
        d = self._steps[k0 : k1 + 1]
        steps = np.diff(d)
        nominal = self.spacing_mm[2]
        gaps = np.flatnonzero(steps > _GAP_FACTOR * nominal)
        if gaps.size:
            g = int(gaps[0])
            raise GeometryError(
                f"missing slices inside {where}: no slice between {d[g]:.2f} and {d[g + 1]:.2f} mm along the "
                f"slice normal (slices {k0 + g} and {k0 + g + 1}, a {steps[g]:.2f} mm step where the series "
                f"steps {nominal:.3g} mm)"
            )
        local = (d[-1] - d[0]) / (k1 - k0)
        dev = np.abs(d - (d[0] + local * np.arange(d.size)))
        if dev.max() > _UNIFORM_TOL_FRACTION * local:
            raise GeometryError(
                f"uneven slice spacing inside {where}: steps range {steps.min():.3f}…{steps.max():.3f} mm "
                f"between slices {k0} and {k1}"
            )

    def _grid(self, lo: np.ndarray, hi: np.ndarray) -> GridGeometry:
        k0, k1 = int(lo[2]), int(hi[2])
        sx, sy, nominal = self.spacing_mm
        sz = (self._steps[k1] - self._steps[k0]) / (k1 - k0) if k1 > k0 else nominal
        origin = (
            self._positions[k0]
            + lo[0] * sx * self.direction[:, 0]
            + lo[1] * sy * self.direction[:, 1]
        )
        return GridGeometry(
            size=tuple(int(v) for v in (hi - lo + 1)),  # type: ignore[arg-type]
            spacing_mm=(float(sx), float(sy), float(sz)),
            origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in self.direction.ravel()),
            index_offset=tuple(int(v) for v in lo),  # type: ignore[arg-type]
        )

    def _plan(self, center: np.ndarray, spec: PatchSpec) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._roi_box(center, spec)
        self._check_slab(int(lo[2]), int(hi[2]), center)
        return lo, hi

    def reference_geometry(
        self, center_lps_mm=None, spec: PatchSpec = DEFAULT_PATCH_SPEC
    ) -> GridGeometry:
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
            p, _ = _as_points(center_lps_mm, "nodule centre")
            self._check_world(p[:1])
            return self._grid(*self._plan(p[0], spec))
        if not self._regular:
            raise GeometryError(
                "the study's slices are not a uniform lattice (" + "; ".join(self.geometry_notes) + "); "
                "ask for the ROI grid of a nodule instead"
            )
        return self._grid(np.zeros(3, dtype=int), np.asarray(self.size) - 1)

    # ---------------------------------------------------------------- pixels
    def _image(self, block: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(block)
        self._grid(lo, hi).apply_to(img)
        return img

    def read_roi(self, center_lps_mm, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> sitk.Image:
        """Read the region a nodule's cube needs, in HU.

        Only the slices spanning the cube (plus an interpolation margin) are decoded, cropped to
        the cube's in-plane extent. ``nodule_edge.patch.build_patch(roi, center, spec)`` equals the
        patch built from the whole volume.

        Args:
            center_lps_mm: Nodule centre, LPS mm.
            spec: Patch definition.

        Returns:
            float32 SimpleITK image in HU with the study's LPS geometry (see
            :meth:`reference_geometry` with the same centre).

        Raises:
            CoordinateError: Centre malformed or outside the volume.
            GeometryError: Gap, uneven spacing or conflicting duplicate inside the cube's slab.
            StudyError: A needed slice cannot be decoded (the message names the file).
        """
        p, single = _as_points(center_lps_mm, "nodule centre")
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
        p, _ = _as_points(centers_lps, "nodule centre") if np.size(centers_lps) else (np.zeros((0, 3)), False)
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
        for i, (c, (lo, hi)) in enumerate(zip(p, boxes)):
            sub = block[
                [row_of[k] for k in range(int(lo[2]), int(hi[2]) + 1)],
                int(lo[1] - lows[1]) : int(hi[1] - lows[1]) + 1,
                int(lo[0] - lows[0]) : int(hi[0] - lows[0]) + 1,
            ]
            out[i] = build_patch(self._image(np.ascontiguousarray(sub), lo, hi), c, spec)
        return out


def _irregularities(d: np.ndarray, nominal: float, conflicts: frozenset[int]) -> list[str]:
    notes = []
    steps = np.diff(d)
    for g in np.flatnonzero(steps > _GAP_FACTOR * nominal):
        notes.append(
            f"missing slices between {d[g]:.2f} and {d[g + 1]:.2f} mm along the slice normal "
            f"(slices {g} and {g + 1}, step {steps[g]:.2f} mm vs {nominal:.3g} mm); a nodule cube that "
            "overlaps them will be refused"
        )
    uneven = (np.abs(steps - nominal) > _UNIFORM_TOL_FRACTION * nominal) & (steps <= _GAP_FACTOR * nominal)
    if uneven.any():
        notes.append(
            f"uneven slice spacing ({int(uneven.sum())} steps off the median {nominal:.3g} mm, range "
            f"{steps.min():.3f}…{steps.max():.3f} mm)"
        )
    for k in sorted(conflicts):
        notes.append(f"different images share slice position {d[k]:.2f} mm (slice {k})")
    return notes


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def study_from_image(image: sitk.Image) -> Study:
    """Wrap an in-memory HU image as a :class:`Study` (kind ``"volume"``, no path).

    Args:
        image: 3-D scalar SimpleITK image in HU with LPS geometry. Its voxels are copied once.

    Returns:
        The study; reads crop from the copied array.

    Raises:
        GeometryError: Not a 3-D scalar image, or non-positive spacing.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError(
            f"expected a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    size = tuple(int(v) for v in image.GetSize())
    spacing = tuple(float(v) for v in image.GetSpacing())
    if min(spacing) <= 0:
        raise GeometryError(f"image spacing {spacing} must be positive")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    hu.flags.writeable = False
    return Study._volume(
        None,
        size,  # type: ignore[arg-type]
        spacing,  # type: ignore[arg-type]
        np.asarray(image.GetOrigin(), dtype=np.float64),
        np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        _ArraySource(hu),
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
    elif _is_volume_file(p):
        if series_uid is not None:
            raise StudyError(f"series_uid {series_uid!r} was given but {p} is a volume file, not a DICOM folder")
        study = Study._from_volume(p)
    else:
        with open(p, "rb") as fh:
            is_dicom = fh.read(132)[128:132] == b"DICM"
        if is_dicom:
            raise StudyError(f"{p} is a single DICOM file; pass the folder that holds the whole series")
        raise StudyError(
            f"{p} is neither a folder of DICOM files nor a volume file ({', '.join(VOLUME_SUFFIXES)})"
        )
    logger.info(
        "opened %s study %s: %d slices, size %s, spacing %s mm",
        study.kind, study.series_uid or p.name, study.n_slices, study.size,
        tuple(round(v, 4) for v in study.spacing_mm),
    )
    return study

"""Choose the CT series of a scanned folder and validate its slice stack.

Files are grouped by SeriesInstanceUID and classified (:mod:`.headers`), and exactly one
single-frame CT image series is chosen. Its slices are ordered along the slice normal and checked
for what would make a 3-D cube wrong (mixed orientation, mixed in-plane geometry, gantry tilt,
too short a stack). Gaps and uneven spacing are recorded here but judged per cube by
:mod:`nodule_edge.runtime.study`, so a gap far from the nodule does not refuse the study.

Duplicates (two files at the same position along the normal): copies of the same
SOPInstanceUID are dropped with a warning. Different instances at the same position are kept as
one slice marked *conflicting*; a cube that needs that slice is refused, because which of the
two images is right cannot be known from the headers.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from nodule_edge.errors import GeometryError, MissingDependencyError, SeriesSelectionError, StudyError
from nodule_edge.runtime.dicom.headers import FileInfo, FolderScan, SliceHeader, scan_folder

__all__ = [
    "DicomSeries",
    "SeriesSummary",
    "list_series",
    "load_series",
]

logger = logging.getLogger(__name__)

_DUPLICATE_TOL_MM = 0.01
_ORIENTATION_TOL = 1e-3
_ORTHONORMAL_TOL = 1e-2
# Lateral drift of slice positions (as a fraction of the in-plane pixel size) beyond which the
# stack is sheared, i.e. acquired with gantry tilt.
_TILT_TOL_FRACTION = 0.1


@dataclass(frozen=True)
class SeriesSummary:
    """One image series found in a folder, as listed to the user.

    Attributes:
        series_uid: SeriesInstanceUID (or a synthetic ``unknown:…`` key when the files have none).
        description: SeriesDescription, or None.
        modality: Modality tag value, or None when absent.
        n_files: Files (slices) in the series.
        slice_thickness_mm: Median SliceThickness tag, or None.
        slice_spacing_mm: Median distance between slice positions along the normal, or None.
        usable: True for a single-frame CT image series that can be opened.
        reason: Why it is not usable (empty when usable).
    """

    series_uid: str
    description: str | None
    modality: str | None
    n_files: int
    slice_thickness_mm: float | None
    slice_spacing_mm: float | None
    usable: bool
    reason: str = ""

    def describe(self) -> str:
        """One line for error messages and listings."""
        thick = f"{self.slice_thickness_mm:g} mm thick" if self.slice_thickness_mm else "thickness unknown"
        step = f", {self.slice_spacing_mm:.3g} mm apart" if self.slice_spacing_mm else ""
        desc = repr(self.description) if self.description else "(no description)"
        extra = f" [{self.reason}]" if self.reason else ""
        return f"{self.series_uid}  {desc}  {self.n_files} slices, {thick}{step}{extra}"


@dataclass(frozen=True)
class DicomSeries:
    """A validated CT series: slices in order along the normal, one entry per position.

    Holds headers only: no pixel data is read here. Pixels are decoded lazily, and only for the
    slices and rows a nodule's cube needs (:func:`~nodule_edge.runtime.dicom.decode.decode_slices`).

    Example:
        >>> from nodule_edge.runtime.dicom import load_series
        >>> series = load_series("study/", min_extent_mm=20.0)  # doctest: +SKIP
        >>> len(series.slices), series.pixel_spacing_xy  # doctest: +SKIP
        (255, (0.7, 0.7))

    Attributes:
        folder: Folder the series was found in.
        series_uid: SeriesInstanceUID (or synthetic key).
        description: SeriesDescription, or None.
        modality: Modality tag value, or None when the tag is absent.
        slices: Headers in ascending order along the slice normal.
        positions: ImagePositionPatient per slice, ``[n, 3]`` LPS mm.
        row_dir: Unit LPS direction of increasing column index.
        col_dir: Unit LPS direction of increasing row index.
        normal: ``row_dir × col_dir``; slices ascend along it.
        pixel_spacing_xy: (column spacing, row spacing) in mm.
        conflicts: Slice indices where different instances share the position.
        transfer_syntax_uid: Most common transfer syntax of the slices.
        slice_thickness_mm: Median SliceThickness tag of the slices, or None when absent.
        contrast_agent: ContrastBolusAgent of the first slice that has one, or None.
        convolution_kernel: ConvolutionKernel of the first slice, or None.
    """

    folder: Path
    series_uid: str
    description: str | None
    modality: str | None
    slices: tuple[SliceHeader, ...]
    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    pixel_spacing_xy: tuple[float, float]
    conflicts: frozenset[int] = field(default_factory=frozenset)
    transfer_syntax_uid: str = ""
    slice_thickness_mm: float | None = None
    contrast_agent: str | None = None
    convolution_kernel: str | None = None


def _median_spacing(infos: list[FileInfo]) -> float | None:
    geo = [i for i in infos if i.iop is not None and i.ipp is not None]
    if len(geo) < 2:
        return None
    iop = np.asarray(geo[0].iop)
    normal = np.cross(iop[:3], iop[3:])
    d = np.unique(np.round(np.asarray([i.ipp for i in geo]) @ normal, 3))
    return float(np.median(np.diff(d))) if d.size > 1 else None


def _summaries(scan: FolderScan) -> list[SeriesSummary]:
    groups: dict[tuple[str, str], list[FileInfo]] = defaultdict(list)
    for info in scan.files:
        if info.kind in ("ct", "derived", "other", "multiframe", "no_geometry"):
            groups[(info.series_key, info.kind)].append(info)
    reasons = {
        "derived": "derived / secondary capture",
        "other": "not CT",
        "multiframe": "multi-frame (enhanced) CT is not supported",
        "no_geometry": "no ImageOrientationPatient/ImagePositionPatient",
    }
    out = []
    for (key, kind), infos in groups.items():
        thick = [i.slice_thickness for i in infos if i.slice_thickness]
        out.append(
            SeriesSummary(
                series_uid=key,
                description=infos[0].description,
                modality=infos[0].modality,
                n_files=len(infos),
                slice_thickness_mm=float(np.median(thick)) if thick else None,
                slice_spacing_mm=_median_spacing(infos),
                usable=kind == "ct",
                reason=reasons.get(kind, ""),
            )
        )
    out.sort(key=lambda s: (not s.usable, s.series_uid))
    return out


def list_series(folder: str | os.PathLike[str]) -> list[SeriesSummary]:
    """List the image series in a folder (header scan only), usable CT series first.

    Args:
        folder: Folder of DICOM files, any nesting.

    Returns:
        One summary per (series, kind); localizers and non-image objects are not listed.
    """
    return _summaries(scan_folder(Path(folder)))


def _nothing_found(scan: FolderScan) -> StudyError:
    folder = scan.folder
    if scan.n_files == 0:
        return StudyError(f"no files in {folder}")
    if not scan.files:
        msg = f"no DICOM files among the {scan.n_files} files in {folder}"
        if scan.unreadable:
            msg += f" ({len(scan.unreadable)} unreadable DICOM files, e.g. {scan.unreadable[0]})"
        if scan.volume_files:
            msg += f"; to read a volume file pass it directly, e.g. {scan.volume_files[0]}"
        return StudyError(msg)
    kinds = Counter(i.kind for i in scan.files)
    other = Counter(i.label for i in scan.files if i.kind == "other")
    found = []
    if other:
        found.append("image series of modality " + ", ".join(f"{m} ({n} files)" for m, n in sorted(other.items())))
    for kind, what in (
        ("localizer", "localizer/scout images"),
        ("no_geometry", "images without position/orientation (scout-like)"),
        ("derived", "derived/secondary-capture images"),
        ("multiframe", "multi-frame (enhanced) CT images, not supported"),
    ):
        if kinds[kind]:
            found.append(f"{kinds[kind]} {what}")
    non_image = Counter(i.label for i in scan.files if i.kind == "non_image")
    if non_image:
        found.append("non-image objects " + ", ".join(f"{m} ({n})" for m, n in sorted(non_image.items())))
    if other and not any(k in kinds for k in ("localizer", "derived", "multiframe", "no_geometry")):
        modalities = ", ".join(sorted(other))
        return StudyError(f"{folder} holds no CT series, only modality {modalities}; nodule-edge reads CT only")
    return StudyError(f"no CT image series in {folder}; found: " + "; ".join(found))


def _select(scan: FolderScan, series_uid: str | None) -> tuple[str, list[FileInfo]]:
    ct: dict[str, list[FileInfo]] = defaultdict(list)
    derived: dict[str, list[FileInfo]] = defaultdict(list)
    for info in scan.files:
        if info.kind == "ct":
            ct[info.series_key].append(info)
        elif info.kind == "derived" and info.header is not None:
            derived[info.series_key].append(info)

    if series_uid is not None:
        if series_uid in ct:
            return series_uid, ct[series_uid]
        if series_uid in derived:
            logger.warning("series %s is derived/secondary capture; reading it because it was asked for", series_uid)
            return series_uid, derived[series_uid]
        listing = "\n  ".join(s.describe() for s in _summaries(scan)) or "(no image series)"
        raise SeriesSelectionError(
            f"series {series_uid!r} is not among the CT series in {scan.folder}; available:\n  {listing}"
        )
    if not ct:
        raise _nothing_found(scan)
    if len(ct) > 1:
        multi = {k: v for k, v in ct.items() if len(v) > 1}
        if multi and len(multi) < len(ct):
            for key in set(ct) - set(multi):
                logger.info("ignoring single-image series %s (scout-like) next to volumetric series", key)
            ct = defaultdict(list, multi)
    if len(ct) > 1:
        listing = "\n  ".join(s.describe() for s in _summaries(scan) if s.usable and s.series_uid in ct)
        raise SeriesSelectionError(
            f"{len(ct)} CT series in {scan.folder}; choose one with series_uid (--series-uid):\n  {listing}"
        )
    key = next(iter(ct))
    return key, ct[key]


def _check_decodable(uid: str, series_uid: str) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    name = UID(uid).name
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise StudyError(f"series {series_uid}: transfer syntax {name} ({uid}) cannot be decoded") from exc
    if not decoder.is_available:
        raise MissingDependencyError(
            f"series {series_uid} is encoded as {name} ({uid}); decoding it needs one of: "
            + "; ".join(decoder.missing_dependencies)
        )


def _numbers(values: Iterable[float]) -> str:
    """``[1, 0, 0, 0, 1, 0]``: numbers as a reader writes them, not as numpy reprs them."""
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _orientation(infos: list[FileInfo], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iops = np.asarray([i.iop for i in infos], dtype=np.float64)
    ref = iops[0]
    off = np.abs(iops - ref).max(axis=1) > _ORIENTATION_TOL
    if off.any():
        counts = Counter(tuple(np.round(v, 4)) for v in iops)
        listing = "; ".join(f"{n} slices with {_numbers(o)}" for o, n in counts.most_common())
        raise GeometryError(
            f"series {key} mixes slice orientations (ImageOrientationPatient): {listing}; "
            "a single stack is needed for the 32 mm cube"
        )
    row, col = ref[:3], ref[3:]
    if (
        abs(np.linalg.norm(row) - 1) > _ORTHONORMAL_TOL
        or abs(np.linalg.norm(col) - 1) > _ORTHONORMAL_TOL
        or abs(float(row @ col)) > _ORTHONORMAL_TOL
    ):
        raise GeometryError(
            f"series {key}: ImageOrientationPatient {_numbers(ref)} is not two orthogonal unit vectors ({infos[0].path})"
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _stack(folder: Path, key: str, infos: list[FileInfo], min_extent_mm: float) -> DicomSeries:
    for info in infos:
        if info.problem:
            raise GeometryError(f"series {key}: {info.problem}")
    first = infos[0]
    if len(infos) == 1:
        raise GeometryError(
            f"series {key} has a single slice ({first.path}); a 3-D series of at least "
            f"{min_extent_mm:g} mm along the slice normal is needed for the nodule cube"
        )
    matrices = Counter((i.header.rows, i.header.cols) for i in infos)  # type: ignore[union-attr]
    spacings = Counter(tuple(round(v, 5) for v in i.pixel_spacing) for i in infos)  # type: ignore[union-attr]
    if len(matrices) > 1 or len(spacings) > 1:
        raise GeometryError(
            f"series {key} mixes in-plane geometry: matrices {dict(matrices)}, PixelSpacing {dict(spacings)}"
        )
    n_rows, n_cols = next(iter(matrices))
    if n_rows == 0 or n_cols == 0:
        raise StudyError(f"series {key}: Rows {n_rows} x Columns {n_cols} of {first.path} is an empty image matrix")
    row, col, normal = _orientation(infos, key)
    ps = first.pixel_spacing
    if ps is None or min(ps) <= 0:
        raise GeometryError(f"series {key}: PixelSpacing {ps} of {first.path} must be positive")

    positions = np.asarray([i.ipp for i in infos], dtype=np.float64)
    d = positions @ normal
    numbers = [i.header.instance_number or 0 for i in infos]  # type: ignore[union-attr]
    order = sorted(range(len(infos)), key=lambda j: (d[j], numbers[j]))

    kept: list[int] = []
    conflicts: set[int] = set()
    copies = 0
    for j in order:
        if kept and abs(d[j] - d[kept[-1]]) < _DUPLICATE_TOL_MM:
            a, b = cast(SliceHeader, infos[kept[-1]].header), cast(SliceHeader, infos[j].header)
            if a.sop_instance_uid and a.sop_instance_uid == b.sop_instance_uid:
                copies += 1
                continue
            conflicts.add(len(kept) - 1)
            logger.warning(
                "series %s: %s and %s are different instances at the same position %.3f mm along the "
                "slice normal; a cube that needs this slice will be refused",
                key,
                a.path,
                b.path,
                d[j],
            )
            continue
        kept.append(j)
    if copies:
        logger.warning("series %s: ignored %d duplicate copies of the same SOP instances", key, copies)

    headers = tuple(cast(SliceHeader, infos[j].header) for j in kept)  # every CT file with geometry has one
    positions = positions[kept]
    d = d[kept]
    if len(kept) == 1:
        raise GeometryError(
            f"series {key} has a single distinct slice position ({len(infos)} files at {d[0]:.2f} mm); "
            "a 3-D series is needed for the nodule cube"
        )

    # Gantry tilt shears the stack: positions step sideways as well as along the normal.
    rel = positions - positions[0]
    lateral = rel - np.outer(rel @ normal, normal)
    drift = float(np.linalg.norm(lateral, axis=1).max())
    if drift > _TILT_TOL_FRACTION * min(ps):
        along = float(d[-1] - d[0])
        angle = float(np.degrees(np.arctan2(float(np.linalg.norm(lateral[-1])), along)))
        tag = f", GantryDetectorTilt {first.gantry_tilt:g}°" if first.gantry_tilt else ""
        raise GeometryError(
            f"series {key}: slice positions step {angle:.2f}° off the slice normal (gantry tilt{tag}); "
            f"positions drift {drift:.2f} mm sideways, so the volume is sheared and the 32 mm cube "
            "would be wrong. Resample the series to an orthogonal grid first"
        )

    steps = np.diff(d)
    nominal = float(np.median(steps))
    coverage = float(d[-1] - d[0]) + nominal
    if coverage < min_extent_mm:
        raise GeometryError(
            f"series {key} has {len(kept)} slices covering {coverage:.1f} mm along the slice normal; "
            f"at least {min_extent_mm:g} mm are needed for the nodule cube"
        )

    syntaxes = Counter(h.transfer_syntax_uid for h in headers)
    for uid in syntaxes:
        _check_decodable(uid, key)
    if len(syntaxes) > 1:
        logger.info("series %s mixes transfer syntaxes %s", key, dict(syntaxes))
    if first.modality is None:
        logger.warning(
            "series %s has no Modality tag; reading it as CT because it carries a CT SOP class or "
            "rescale and position tags",
            key,
        )
    return DicomSeries(
        folder=folder,
        series_uid=key,
        description=first.description,
        modality=first.modality,
        slices=headers,
        positions=positions,
        row_dir=row,
        col_dir=col,
        normal=normal,
        pixel_spacing_xy=(float(ps[1]), float(ps[0])),
        conflicts=frozenset(conflicts),
        transfer_syntax_uid=syntaxes.most_common(1)[0][0],
        slice_thickness_mm=float(np.median(thick))
        if (thick := [i.slice_thickness for i in infos if i.slice_thickness])
        else None,
        contrast_agent=next((i.contrast_agent for i in infos if i.contrast_agent), None),
        convolution_kernel=first.convolution_kernel,
    )


def load_series(folder: str | os.PathLike[str], series_uid: str | None = None, *, min_extent_mm: float) -> DicomSeries:
    """Scan a folder's headers, choose the CT series and validate its slice stack.

    Args:
        folder: Folder of DICOM files (any nesting and names; other files are ignored).
        series_uid: SeriesInstanceUID to read when the folder holds several CT series.
        min_extent_mm: Minimum coverage along the slice normal.

    Returns:
        The validated series (headers only).

    Raises:
        StudyError: No DICOM, no CT series (the message names what was found), undecodable
            transfer syntax.
        SeriesSelectionError: Several CT series and none chosen, or ``series_uid`` absent.
        GeometryError: Single slice, too short, mixed orientation or in-plane geometry, tilt.
    """
    folder = Path(folder)
    scan = scan_folder(folder)
    if scan.unreadable:
        logger.warning("%d unreadable DICOM files in %s were skipped", len(scan.unreadable), folder)
    key, infos = _select(scan, series_uid)
    if key.startswith("unknown:"):
        logger.warning("files without SeriesInstanceUID in %s are grouped as series %s", folder, key)
    return _stack(folder, key, infos, min_extent_mm)

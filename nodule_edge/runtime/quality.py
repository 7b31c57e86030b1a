"""Quality flags: how far a prediction can be trusted, judged against the training data.

A flag never changes a prediction; it tells the user that the input lies outside what the model
was trained on (slice spacing or thickness, in-plane spacing, nodule size, HU calibration), that
the 32 mm cube is partly outside the scan, that no nodule was found at the point or it does not
fit the cube, that the series was contrast-enhanced, or that the model's attention was off the
nodule. The thresholds are the training data's own ranges, measured at export
(:func:`training_ranges_from_voi_dir`) and stored in the bundle's ``manifest.json`` under
``training_data``; a bundle without them gets only the checks that need no range. The flag codes
are listed in the README ("Quality flags").

Example:
    >>> result = inferer.infer("study/", voxels=[(120, 88, 54)])
    >>> [f.code for f in result.quality_flags + result.nodules[0].quality_flags]
    ['slice_thickness_outside_training', 'contrast_agent']
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nodule_edge.errors import BundleError
from nodule_edge.patch import PatchSpec
from nodule_edge.runtime.measure import largest_central_component

__all__ = [
    "FLAG_CODES",
    "QualityFlag",
    "TrainingRanges",
    "nodule_flags",
    "study_flags",
    "training_ranges_from_voi_dir",
]

log = logging.getLogger(__name__)

#: Every flag code and what it means (the README's table is this one).
FLAG_CODES: dict[str, str] = {
    "slice_spacing_outside_training": "distance between slices outside the training data's range",
    "slice_thickness_outside_training": "SliceThickness outside the training data's slice-spacing range (the training VOIs record spacing, not thickness)",
    "in_plane_spacing_outside_training": "pixel spacing outside the training data's range",
    "irregular_slice_geometry": "gaps, uneven spacing or conflicting duplicate slices in the series",
    "modality_missing": "the series has no Modality tag; it was read as CT",
    "contrast_agent": "the header records a contrast agent (ContrastBolusAgent)",
    "cube_outside_scan": "part of the 32 mm cube lies outside the scanned volume and was filled with air",
    "no_nodule_found": "the segmentation found no nodule at the point, or one smaller than any training nodule",
    "no_nodule_at_point": "the segmented finding does not reach the given point (farther from it than any training nodule was from its recorded centre)",
    "nodule_exceeds_cube": "the segmentation reaches the faces of the 32 mm cube: the finding is larger than the cube or not a nodule",
    "nodule_volume_outside_training": "segmented volume outside the training nodules' range",
    "lung_hu_outside_training": "darkest voxels of the cube unlike the training VOIs' (no aerated lung around the point, or HU rescale missing)",
    "attention_off_nodule": "Grad-CAM attention is not higher inside the nodule than outside",
    "explanations_disagree": "Grad-CAM and occlusion rank the cube's voxels too differently (infer --explain gradcam,occlusion)",
}


@dataclass(frozen=True)
class QualityFlag:
    """One finding about the input or the output.

    Attributes:
        code: One of :data:`FLAG_CODES`.
        message: One sentence for a person, with the value and the training range.
        value: The measured value (number or text), or None.
    """

    code: str
    message: str
    value: float | str | None = None

    def to_json(self) -> dict[str, Any]:
        value = round(self.value, 4) if isinstance(self.value, float) else self.value
        return {**asdict(self), "value": value}


@dataclass(frozen=True)
class TrainingRanges:
    """The training data's ranges the checks compare with (``manifest.json`` → ``training_data``).

    Attributes:
        source: What they were measured on (folder name and nodule count).
        in_plane_spacing_mm: (min, max) pixel spacing.
        slice_spacing_mm: (min, max) distance between slices.
        nodule_volume_mm3: (min, max) reference-mask volume.
        lung_hu_p1: (min, max) over VOIs of each VOI's 1st-percentile HU.
        center_to_mask_mm: (min, max) distance from a nodule's recorded centre to its mask.
    """

    source: str
    in_plane_spacing_mm: tuple[float, float]
    slice_spacing_mm: tuple[float, float]
    nodule_volume_mm3: tuple[float, float]
    lung_hu_p1: tuple[float, float]
    center_to_mask_mm: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> TrainingRanges | None:
        """Parse the manifest section; None when absent (older bundles)."""
        if data is None:
            return None
        try:
            pairs = {name: (float(data[name][0]), float(data[name][1])) for name in _RANGE_NAMES}
            return cls(source=str(data.get("source", "")), **pairs)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"bundle manifest 'training_data' is malformed ({exc}): {dict(data)!r}") from exc


_RANGE_NAMES = ("in_plane_spacing_mm", "slice_spacing_mm", "nodule_volume_mm3", "lung_hu_p1", "center_to_mask_mm")


def _outside(value: float, bounds: tuple[float, float], tolerance: float = 0.0) -> bool:
    lo, hi = bounds
    return value < lo * (1 - tolerance) or value > hi * (1 + tolerance)


def _range(bounds: tuple[float, float], unit: str) -> str:
    return f"{bounds[0]:.3g}–{bounds[1]:.3g}{unit}"


# A spacing within 2 % of the training range counts as inside: DICOM rounds spacings.
_SPACING_TOLERANCE = 0.02


def study_flags(study: Any, ranges: TrainingRanges | None) -> list[QualityFlag]:
    """Flags about the series itself (same for every nodule of a study)."""
    flags: list[QualityFlag] = []
    sx, sy, sz = (float(v) for v in study.spacing_mm)
    if ranges is not None:
        if _outside(sz, ranges.slice_spacing_mm, _SPACING_TOLERANCE):
            flags.append(
                QualityFlag(
                    "slice_spacing_outside_training",
                    f"slices are {sz:.3g} mm apart; the training data's range is {_range(ranges.slice_spacing_mm, ' mm')}",
                    sz,
                )
            )
        thickness = study.slice_thickness_mm
        if thickness is not None and _outside(float(thickness), ranges.slice_spacing_mm, _SPACING_TOLERANCE):
            flags.append(
                QualityFlag(
                    "slice_thickness_outside_training",
                    f"slices are {thickness:.3g} mm thick; the training slices were {_range(ranges.slice_spacing_mm, ' mm')} apart (thickness is not recorded in the training data)",
                    float(thickness),
                )
            )
        for value in {sx, sy}:
            if _outside(value, ranges.in_plane_spacing_mm, _SPACING_TOLERANCE):
                flags.append(
                    QualityFlag(
                        "in_plane_spacing_outside_training",
                        f"pixels are {value:.3g} mm; the training data's range is {_range(ranges.in_plane_spacing_mm, ' mm')}",
                        value,
                    )
                )
                break
    if study.geometry_notes:
        flags.append(
            QualityFlag("irregular_slice_geometry", "; ".join(study.geometry_notes), len(study.geometry_notes))
        )
    if study.kind == "dicom" and study.modality is None:
        flags.append(
            QualityFlag(
                "modality_missing",
                "the series has no Modality tag; it was read as CT because of its SOP class or rescale tags",
            )
        )
    if study.contrast_agent:
        flags.append(
            QualityFlag(
                "contrast_agent",
                f"the header records a contrast agent ({study.contrast_agent!r}); enhancing nodules and vessels read brighter than on non-contrast CT",
                study.contrast_agent,
            )
        )
    return flags


def nodule_flags(
    study: Any,
    center_lps_mm: Any,
    patch: np.ndarray,
    segmentation: np.ndarray,
    volume_mm3: float,
    first_pass_found_nodule: bool,
    trustworthy: bool,
    spec: PatchSpec,
    ranges: TrainingRanges | None,
    *,
    component: np.ndarray | None = None,
) -> list[QualityFlag]:
    """Flags about one nodule's cube and outputs.

    Args:
        study: The opened study.
        center_lps_mm: Cube centre.
        patch: The whole-cube model input ``[C, S, S, S]`` (channel 0 is the lung window).
        segmentation: Segmentation probabilities ``[S, S, S]``.
        volume_mm3: Volume of the segmented nodule.
        first_pass_found_nodule: Whether the nodule-bounded model's first pass found a nodule.
        trustworthy: The Grad-CAM check's verdict.
        spec: The model's patch spec.
        ranges: Training ranges, or None.
        component: The nodule's connected component the measurements were taken on, when the
            caller has it (else found here from ``segmentation``).
    """
    flags: list[QualityFlag] = []
    outside = study.fraction_outside(_cube_points(center_lps_mm, spec))
    if outside > 0:
        flags.append(
            QualityFlag(
                "cube_outside_scan",
                f"{outside:.0%} of the 32 mm cube lies outside the scan and was read as air ({spec.outside_hu:g} HU)",
                outside,
            )
        )
    min_volume = ranges.nodule_volume_mm3[0] if ranges is not None else 0.0
    mask = segmentation >= (spec.nodule_box.threshold if spec.nodule_box is not None else 0.5)
    if not first_pass_found_nodule or volume_mm3 <= 0 or volume_mm3 < min_volume:
        found = (
            "nothing reached the segmentation threshold"
            if not first_pass_found_nodule or volume_mm3 <= 0
            else f"the segmented nodule is {volume_mm3:.0f} mm³, smaller than any training nodule ({min_volume:.0f} mm³)"
        )
        flags.append(
            QualityFlag(
                "no_nodule_found",
                f"no nodule found at this point: {found}; the probability describes the cube, not a nodule",
                volume_mm3,
            )
        )
    if ranges is not None and mask.any():
        # The patch grid's centre falls between voxels: half a voxel diagonal is the closest a
        # segmented voxel can be.
        reach = _distance_to_mask_mm(mask, spec.spacing_mm) - math.sqrt(3) * spec.spacing_mm / 2
        if reach > ranges.center_to_mask_mm[1]:
            flags.append(
                QualityFlag(
                    "no_nodule_at_point",
                    f"the segmented finding is {reach:.1f} mm from the given point; every training nodule reached to within {ranges.center_to_mask_mm[1]:.1f} mm of its recorded centre (a vessel or other structure nearby, not a nodule at the point?)",
                    reach,
                )
            )
    # The nodule's own component (the one volume and diameter are measured on): a stray blob
    # elsewhere in the cube touching a face says nothing about the nodule.
    if component is None:
        component = largest_central_component(mask) if mask.any() else mask
    faces = _face_fraction(component) if component.any() else 0.0
    if faces > 0:
        shown = f"{faces:.1%}" if faces >= 0.001 else "under 0.1%"
        flags.append(
            QualityFlag(
                "nodule_exceeds_cube",
                f"the segmented nodule reaches the cube's faces ({shown} of them): the finding extends beyond the 32 mm cube (a mass, consolidation or vessel rather than a nodule?)",
                faces,
            )
        )
    if ranges is not None and volume_mm3 > ranges.nodule_volume_mm3[1]:
        flags.append(
            QualityFlag(
                "nodule_volume_outside_training",
                f"segmented volume {volume_mm3:.0f} mm³ exceeds the largest training nodule ({ranges.nodule_volume_mm3[1]:.0f} mm³)",
                volume_mm3,
            )
        )
    if ranges is not None and patch.shape[0] >= 1:
        low, high = spec.windows[0]
        hu_p1 = float(np.percentile(patch[0], 1)) * (high - low) + low
        if hu_p1 > ranges.lung_hu_p1[1]:
            flags.append(
                QualityFlag(
                    "lung_hu_outside_training",
                    f"the darkest 1% of the cube reads {hu_p1:.0f} HU or more; in the training VOIs it was at most {ranges.lung_hu_p1[1]:.0f} HU (no aerated lung around the point, or a missing HU rescale)",
                    hu_p1,
                )
            )
    if not trustworthy:
        flags.append(
            QualityFlag(
                "attention_off_nodule",
                "Grad-CAM attention is not higher inside the segmented nodule than around it: review the saliency map",
            )
        )
    return flags


def _cube_points(center_lps_mm: Any, spec: PatchSpec, step: int = 4) -> np.ndarray:
    """Every ``step``-th voxel centre of the cube, LPS mm (16³ points at the default spec)."""
    offsets = (np.arange(0, spec.size, step) - (spec.size - 1) / 2.0) * spec.spacing_mm
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3)
    return np.asarray(center_lps_mm, dtype=np.float64) + grid


def _distance_to_mask_mm(mask: np.ndarray, spacing_mm: float) -> float:
    """Distance from the cube's centre to the nearest voxel of a non-empty mask."""
    centre = (np.asarray(mask.shape, dtype=np.float64) - 1) / 2
    return float(np.sqrt(((np.argwhere(mask) - centre) ** 2).sum(axis=1)).min()) * spacing_mm


def _face_fraction(mask: np.ndarray) -> float:
    """Fraction of the cube's face voxels inside the mask."""
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    return float(sum(int(f.sum()) for f in faces)) / float(sum(f.size for f in faces))


def training_ranges_from_voi_dir(voi_dir: str | Path, progress: Callable[[str], None] | None = None) -> TrainingRanges:
    """Measure the ranges of a VOI folder (lidc_voi layout): spacings, mask volumes, lung HU.

    Reads every VOI's header, mask and image once (about 20 s for the 679 LIDC VOIs).

    Raises:
        DataError: The manifest or a volume cannot be read.
    """
    from nodule_edge._sitk import simpleitk
    from nodule_edge.errors import DataError
    from nodule_edge.manifest import read_unsure_manifest

    sitk = simpleitk()  # the VOIs are NIfTI files

    records = read_unsure_manifest(voi_dir)
    in_plane, slices, volumes, hu_p1, reach = [], [], [], [], []
    for rec in records:
        try:
            image = sitk.ReadImage(str(rec.image_path))
        except RuntimeError as exc:
            raise DataError(f"cannot read {rec.image_path}: {exc}") from exc
        sx, sy, sz = image.GetSpacing()
        in_plane += [sx, sy]
        slices.append(sz)
        hu_p1.append(float(np.percentile(sitk.GetArrayViewFromImage(image), 1)))
        if rec.mask_path is not None:
            try:
                mask = sitk.GetArrayFromImage(sitk.ReadImage(str(rec.mask_path)))  # a copy: the image is a temporary
            except RuntimeError as exc:
                raise DataError(f"cannot read {rec.mask_path}: {exc}") from exc
            inside = np.argwhere(mask > 0)[:, ::-1].astype(np.float64)  # (x, y, z) indices
            if not len(inside):
                raise DataError(f"mask {rec.mask_path} is empty")
            volumes.append(float(len(inside)) * sx * sy * sz)
            centre = np.asarray(image.TransformPhysicalPointToContinuousIndex(rec.center_lps_mm))
            reach.append(float(np.sqrt((((inside - centre) * np.asarray([sx, sy, sz])) ** 2).sum(axis=1)).min()))
    if not volumes:
        raise DataError(f"{voi_dir} has no masks: nodule volumes cannot be measured")
    ranges = TrainingRanges(
        source=f"{Path(voi_dir).name}: {len(records)} nodules",
        in_plane_spacing_mm=(min(in_plane), max(in_plane)),
        slice_spacing_mm=(min(slices), max(slices)),
        nodule_volume_mm3=(min(volumes), max(volumes)),
        lung_hu_p1=(min(hu_p1), max(hu_p1)),
        center_to_mask_mm=(min(reach), max(reach)),
    )
    if progress:
        progress(
            f"training ranges from {ranges.source}: "
            + ", ".join(f"{k} {v[0]:.4g}–{v[1]:.4g}" for k, v in ranges.to_json().items() if isinstance(v, list))
        )
    if not all(math.isfinite(v) for name in _RANGE_NAMES for v in getattr(ranges, name)):
        raise DataError(f"{voi_dir}: non-finite training ranges {ranges}")
    return ranges

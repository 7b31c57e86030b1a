"""The model patch: one definition shared by training, export and the runtime.

Per Zhang et al. the model reads a 32 mm cube centred on the nodule, resampled to 0.5 mm isotropic
(64³ voxels) with two channels: a lung window and a mediastinal window, each clipped and scaled to
[0, 1]. The cube is laid out on patient axes (LPS), so the array order is ``[channel, S, P, L]``
(z, y, x) whatever the scan's own orientation. Voxels outside the scanned volume take
``outside_hu`` before windowing, identically for DICOM studies, volume files and training VOIs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import SimpleITK as sitk

__all__ = [
    "PatchSpec",
    "DEFAULT_PATCH_SPEC",
    "build_patch",
    "resample_hu",
    "resample_mask",
    "window_channels",
    "patch_grid",
    "patch_bounds_lps",
]

Interpolation = Literal["linear", "bspline", "nearest"]
_SITK_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}


@dataclass(frozen=True)
class PatchSpec:
    """Geometry and intensity definition of the model input.

    Attributes:
        size: Voxels along each axis of the cube.
        spacing_mm: Isotropic voxel spacing of the cube in millimetres.
        windows: One ``(low, high)`` HU window per channel; values are clipped and scaled to [0, 1].
        interpolation: Resampling interpolator (chosen by measurement, see README).
        outside_hu: HU assigned to cube voxels outside the scanned volume (air).
    """

    size: int = 64
    spacing_mm: float = 0.5
    windows: tuple[tuple[float, float], ...] = field(
        default=((-1000.0, 400.0), (-160.0, 240.0))
    )
    interpolation: Interpolation = "linear"
    outside_hu: float = -1000.0

    def __post_init__(self) -> None:
        if self.size <= 0 or self.spacing_mm <= 0:
            raise ValueError(f"PatchSpec size and spacing must be positive, got {self.size}, {self.spacing_mm}")
        if self.interpolation not in _SITK_INTERPOLATORS:
            raise ValueError(
                f"PatchSpec interpolation must be one of {sorted(_SITK_INTERPOLATORS)}, got {self.interpolation!r}"
            )
        for low, high in self.windows:
            if not high > low:
                raise ValueError(f"PatchSpec window must have high > low, got ({low}, {high})")

    @property
    def extent_mm(self) -> float:
        """Edge length of the cube in millimetres."""
        return self.size * self.spacing_mm

    @property
    def channels(self) -> int:
        """Number of input channels (one per window)."""
        return len(self.windows)

    def to_json(self) -> str:
        """Serialise for artifact metadata."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PatchSpec":
        """Inverse of :meth:`to_json`; rejects unknown keys."""
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown PatchSpec keys {sorted(unknown)}")
        data["windows"] = tuple(tuple(float(v) for v in w) for w in data.get("windows", ()))
        return cls(**data)


DEFAULT_PATCH_SPEC = PatchSpec()


def patch_grid(center_lps_mm: np.ndarray | tuple[float, float, float], spec: PatchSpec = DEFAULT_PATCH_SPEC) -> sitk.Image:
    """The cube's voxel grid as an (empty) SimpleITK image: LPS axes, centred on the point."""
    center = np.asarray(center_lps_mm, dtype=np.float64)
    origin = center - (spec.size / 2.0 - 0.5) * spec.spacing_mm
    grid = sitk.Image([spec.size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spec.spacing_mm] * 3)
    grid.SetOrigin(tuple(float(v) for v in origin))
    grid.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return grid


def patch_bounds_lps(
    center_lps_mm: np.ndarray | tuple[float, float, float],
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
    margin_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """World-space (LPS) axis-aligned bounds of the cube's voxel centres, widened by ``margin_mm``."""
    center = np.asarray(center_lps_mm, dtype=np.float64)
    half = (spec.size / 2.0 - 0.5) * spec.spacing_mm + margin_mm
    return center - half, center + half


def resample_hu(
    image: sitk.Image,
    center_lps_mm: np.ndarray | tuple[float, float, float],
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
) -> np.ndarray:
    """Resample a HU image (any geometry) onto the cube; returns float32 ``[z, y, x]`` HU."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    resampled = sitk.Resample(
        image,
        patch_grid(center_lps_mm, spec),
        sitk.Transform(),
        _SITK_INTERPOLATORS[spec.interpolation],
        float(spec.outside_hu),
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled)


def resample_mask(
    mask: sitk.Image,
    center_lps_mm: np.ndarray | tuple[float, float, float],
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
) -> np.ndarray:
    """Fraction of each cube voxel inside a binary mask: float32 ``[z, y, x]`` in [0, 1].

    Linear resampling of the 0/1 mask gives partial-volume fractions (a soft target for training,
    thresholded at 0.5 for Dice); voxels outside the mask's volume are 0.
    """
    soft = resample_hu(mask, center_lps_mm, replace(spec, interpolation="linear", outside_hu=0.0))
    return np.clip(soft, 0.0, 1.0)


def window_channels(hu: np.ndarray, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> np.ndarray:
    """Apply the spec's HU windows: ``[..., z, y, x]`` HU → ``[..., C, z, y, x]`` in [0, 1]."""
    hu = np.asarray(hu, dtype=np.float32)
    channels = [
        np.clip((hu - low) / (high - low), 0.0, 1.0, dtype=np.float32) for low, high in spec.windows
    ]
    return np.stack(channels, axis=-4)


def build_patch(
    image: sitk.Image,
    center_lps_mm: np.ndarray | tuple[float, float, float],
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
) -> np.ndarray:
    """Build the model input for one nodule.

    Args:
        image: CT in Hounsfield units with correct LPS geometry (origin, spacing, direction). A
            region of interest is enough as long as it covers the cube; voxels the image does not
            cover get ``spec.outside_hu``.
        center_lps_mm: Nodule centre in patient LPS millimetres.
        spec: Patch definition.

    Returns:
        float32 array ``[C, size, size, size]`` with values in [0, 1].
    """
    return window_channels(resample_hu(image, center_lps_mm, spec), spec)

"""The model patch: one definition shared by training, export and the runtime.

Per Zhang et al. the model reads a 32 mm cube centred on the nodule, resampled to 0.5 mm isotropic
(64³ voxels) with two channels: a lung window and a mediastinal window, each clipped and scaled to
[0, 1]. The cube is laid out on patient axes (LPS), so the array order is ``[channel, S, P, L]``
(z, y, x) whatever the scan's own orientation. Voxels outside the scanned volume take
``outside_hu`` before windowing, identically for DICOM studies, volume files and training VOIs.

Nodule-bounded input (:class:`NoduleBox`): the LIDC training VOIs are tight crops (their z extent
ends at the nodule's last slice for 369 of 679, in-plane they end 2.5–16 mm beyond its outline), so
where the air begins tells a model the nodule's size, while a full study at run time has lung
there. The model therefore reads a cube in which everything outside the box of the nodule plus
fixed margins is air, in training (box of the reference mask) and at run time (box of the model's
own first-pass segmentation) alike: the same input distribution on both paths, and context beyond
the box cannot move the prediction (README, "The model and its patch").

Images are :class:`~nodule_edge.volume.Volume` objects (numpy voxels with their LPS geometry);
the functions that take one also take a SimpleITK image (the training data reads NIfTI VOIs with
SimpleITK). Resampling is :func:`nodule_edge.volume.resample`, SimpleITK's ``Resample`` to float
precision without importing it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from nodule_edge.components import nearest_component_bounds
from nodule_edge.volume import Grid, Interpolation, Volume, as_volume, resample

__all__ = [
    "NoduleBox",
    "PatchSpec",
    "DEFAULT_PATCH_SPEC",
    "build_patch",
    "resample_hu",
    "resample_mask",
    "window_channels",
    "patch_grid",
    "patch_bounds_lps",
    "nodule_extent",
    "box_keep_mask",
    "box_index_slices",
    "bound_to_nodule",
    "run_nodule_bounded_with_input",
    "run_nodule_bounded",
    "Extent",
    "FinishStep",
]

_INTERPOLATIONS = ("bspline", "linear", "nearest")

#: Index bounds ``(low, high)`` (inclusive, z/y/x) of a nodule on the patch grid, None for none found.
Extent = tuple[np.ndarray, np.ndarray] | None

#: A last step of the runtime path: ``(first-pass segmentation, whole cubes, the nodules' extents,
#: second-pass outputs) -> outputs``.
FinishStep = Callable[[np.ndarray, np.ndarray, list[Extent], dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class NoduleBox:
    """The nodule-bounded input rule: keep the nodule's box plus margins, air elsewhere.

    Margins come from the training VOIs (``../shared/data/lidc_voi``, measured on all 679): in z the
    crop ends at the nodule's last slice for 54 % of them (0 mm), in-plane at least 2.5 mm and for
    95 % at least 4 mm beyond the outline. Training draws each side's margin from
    ``[margin, margin + jitter]`` (never inside the nodule); the runtime uses the middle of that
    range, so a segmentation that is off by up to ``jitter / 2`` still gives a training-like box.

    Attributes:
        margin_mm: Margin beyond the nodule's extent along (z, y, x) of the cube.
        jitter_mm: Width of the training margin range.
        threshold: Segmentation probability at which a voxel belongs to the nodule.
    """

    margin_mm: tuple[float, float, float] = (0.0, 4.0, 4.0)
    jitter_mm: float = 2.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if len(self.margin_mm) != 3 or min(self.margin_mm) < 0 or self.jitter_mm < 0:
            raise ValueError(
                f"NoduleBox margins must be three values >= 0 and jitter >= 0, got {self.margin_mm}, {self.jitter_mm}"
            )
        if not 0 < self.threshold < 1:
            raise ValueError(f"NoduleBox threshold must lie in (0, 1), got {self.threshold}")

    def runtime_margin_mm(self) -> tuple[float, float, float]:
        """Margins the runtime applies: the middle of the training range."""
        z, y, x = (m + self.jitter_mm / 2 for m in self.margin_mm)
        return (z, y, x)


@dataclass(frozen=True)
class PatchSpec:
    """Geometry and intensity definition of the model input (the one definition; ONNX metadata
    carries it to the runtime, which reads it from the artifact).

    Example:
        >>> from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec
        >>> PatchSpec.from_json(DEFAULT_PATCH_SPEC.to_json()) == DEFAULT_PATCH_SPEC
        True

    Attributes:
        size: Voxels along each axis of the cube.
        spacing_mm: Isotropic voxel spacing of the cube in millimetres.
        windows: One ``(low, high)`` HU window per channel; values are clipped and scaled to [0, 1].
        interpolation: Resampling interpolator (chosen by measurement, see README).
        outside_hu: HU assigned to cube voxels outside the scanned volume (air).
        nodule_box: The nodule-bounded input rule, or None for a model that reads the whole cube
            (models exported before the rule existed).
    """

    size: int = 64
    spacing_mm: float = 0.5
    windows: tuple[tuple[float, float], ...] = field(default=((-1000.0, 400.0), (-160.0, 240.0)))
    interpolation: Interpolation = "linear"
    outside_hu: float = -1000.0
    nodule_box: NoduleBox | None = None

    def __post_init__(self) -> None:
        if self.size <= 0 or self.spacing_mm <= 0:
            raise ValueError(f"PatchSpec size and spacing must be positive, got {self.size}, {self.spacing_mm}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"PatchSpec interpolation must be one of {list(_INTERPOLATIONS)}, got {self.interpolation!r}"
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
    def from_json(cls, text: str) -> PatchSpec:
        """Inverse of :meth:`to_json`; rejects unknown keys."""
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown PatchSpec keys {sorted(unknown)}")
        data["windows"] = tuple(tuple(float(v) for v in w) for w in data.get("windows", ()))
        box = data.get("nodule_box")
        if box is not None:
            unknown = set(box) - set(NoduleBox.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown NoduleBox keys {sorted(unknown)}")
            box["margin_mm"] = tuple(float(v) for v in box.get("margin_mm", NoduleBox.margin_mm))
            data["nodule_box"] = NoduleBox(**box)
        return cls(**data)


#: The model input of this version: the 32 mm cube, bounded to the nodule (README, "The model").
DEFAULT_PATCH_SPEC = PatchSpec(nodule_box=NoduleBox())


def patch_grid(center_lps_mm: np.ndarray | tuple[float, float, float], spec: PatchSpec = DEFAULT_PATCH_SPEC) -> Grid:
    """The cube's voxel grid: LPS axes, centred on the point."""
    center = np.asarray(center_lps_mm, dtype=np.float64)
    origin = center - (spec.size / 2.0 - 0.5) * spec.spacing_mm
    return Grid(
        size=(spec.size, spec.size, spec.size),
        spacing_mm=(spec.spacing_mm, spec.spacing_mm, spec.spacing_mm),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


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
    image: Volume | Any,
    center_lps_mm: np.ndarray | tuple[float, float, float],
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
) -> np.ndarray:
    """Resample a HU image (any geometry; a :class:`~nodule_edge.volume.Volume` or a 3-D SimpleITK
    image) onto the cube; returns float32 ``[z, y, x]`` HU.

    The voxels are taken as float32 first (as ``sitk.Cast(image, sitk.sitkFloat32)``); voxels of
    the cube outside the image get ``spec.outside_hu``.
    """
    volume = as_volume(image)
    voxels = np.asarray(volume.array, dtype=np.float32)
    return resample(Volume(voxels, volume.grid), patch_grid(center_lps_mm, spec), spec.interpolation, spec.outside_hu)


def resample_mask(
    mask: Volume | Any,
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
    channels = [np.clip((hu - low) / (high - low), 0.0, 1.0, dtype=np.float32) for low, high in spec.windows]
    return np.stack(channels, axis=-4)


def build_patch(
    image: Volume | Any,
    center_lps_mm: np.ndarray | tuple[float, float, float],
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
) -> np.ndarray:
    """Build the model input for one nodule.

    Args:
        image: CT in Hounsfield units with correct LPS geometry (origin, spacing, direction): a
            :class:`~nodule_edge.volume.Volume` or a 3-D SimpleITK image. A region of interest is
            enough as long as it covers the cube; voxels the image does not cover get
            ``spec.outside_hu``.
        center_lps_mm: Nodule centre in patient LPS millimetres.
        spec: Patch definition.

    Returns:
        float32 array ``[C, size, size, size]`` with values in [0, 1].
    """
    return window_channels(resample_hu(image, center_lps_mm, spec), spec)


def nodule_extent(segmentation: np.ndarray, threshold: float = 0.5) -> Extent:
    """Index bounds ``(low, high)`` (inclusive, z/y/x) of the nodule in a cube-sized probability map.

    The nodule is the connected component (26-connectivity) at ``threshold`` that holds the cube's
    centre, or else the one nearest to it: a vessel or a second nodule elsewhere in the cube does
    not widen the box. Returns None when nothing reaches the threshold.
    """
    seg = np.asarray(segmentation)
    # The runs of the mask carry the bounds: no voxel is labelled, and only the box around the
    # foreground is searched (docs/measurements/runtime_path_latency.md).
    return nearest_component_bounds(seg >= threshold, (np.asarray(seg.shape) - 1) / 2.0, fully_connected=True)


def box_keep_mask(
    shape: tuple[int, int, int], low: np.ndarray, high: np.ndarray, margin_voxels: np.ndarray
) -> np.ndarray:
    """Boolean ``[z, y, x]`` mask of the voxels inside ``[low − margin, high + margin]`` per axis."""
    keep = np.zeros(shape, dtype=bool)
    keep[box_index_slices(shape, low, high, margin_voxels)] = True
    return keep


def box_index_slices(
    shape: tuple[int, ...], low: np.ndarray, high: np.ndarray, margin_voxels: np.ndarray
) -> tuple[slice, slice, slice]:
    """The voxels inside ``[low − margin, high + margin]`` per axis, as one slice per axis (``[z, y, x]``).

    Voxel indices count as inside within 1e-6 of either end (fractional margins in voxels).
    """
    slices = []
    for axis in range(3):
        first = max(0, math.ceil(low[axis] - margin_voxels[axis] - 1e-6))
        last = min(shape[axis] - 1, math.floor(high[axis] + margin_voxels[axis] + 1e-6))
        slices.append(slice(first, max(first, last + 1)))
    return slices[0], slices[1], slices[2]


def bound_to_nodule(
    patch: np.ndarray, segmentation: np.ndarray, spec: PatchSpec = DEFAULT_PATCH_SPEC
) -> tuple[np.ndarray, bool]:
    """Apply the spec's nodule box (runtime margins) to a windowed patch ``[C, S, S, S]``.

    Voxels outside the box take the windowed value of ``spec.outside_hu`` (air), exactly as the
    training VOIs are padded.

    Returns:
        The bounded patch and whether a nodule was found; without one (empty segmentation) the
        patch comes back unchanged, and the caller should say so.
    """
    box = spec.nodule_box
    if box is None:
        return patch, True
    return _bound_to_extent(patch, nodule_extent(segmentation, box.threshold), spec)


def _bound_to_extent(patch: np.ndarray, extent: Extent, spec: PatchSpec) -> tuple[np.ndarray, bool]:
    """:func:`bound_to_nodule` for a nodule extent already found (``spec`` has a nodule box)."""
    box = spec.nodule_box
    if box is None or extent is None:
        return patch, box is None
    margin = np.asarray(box.runtime_margin_mm()) / spec.spacing_mm
    outside = window_channels(np.full((1, 1, 1), spec.outside_hu, np.float32), spec)[:, 0, 0, 0]
    bounded = np.empty_like(patch)
    bounded[...] = outside.astype(patch.dtype)[:, None, None, None]
    # The box is a rectangle of whole voxels: copying it is a
    # fraction of the cost of a voxel-wise select over the cube.
    keep = box_index_slices(patch.shape[-3:], extent[0], extent[1], margin)
    bounded[(slice(None), *keep)] = patch[(slice(None), *keep)]
    return bounded, True


def run_nodule_bounded(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    patches: np.ndarray,
    spec: PatchSpec,
    *,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    finish: FinishStep | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The runtime's model path: first pass on whole cubes, box of its segmentation, second pass.

    ``run`` maps patches ``[N, C, S, S, S]`` to the model's named outputs (``segmentation`` on the
    patch grid among them). Without a nodule box in the spec this is one pass. Where the first
    pass finds no nodule the second pass reads the whole cube again.

    Args:
        run: The model, every output.
        patches: Whole cubes ``[N, C, S, S, S]``.
        spec: The model's patch spec; its nodule box decides whether there is a first pass.
        segment: The first pass, ``patches -> segmentation [N, S, S, S]``: an engine's
            :meth:`~nodule_edge.runtime.engines.Engine.segment`, which computes the segmentation
            without the rest of the graph. None: ``run(patches)["segmentation"]``.
        finish: Called with the first pass's segmentation ``[N, S, S, S]``, the whole cubes, the
            nodules' extents (:func:`nodule_extent`, as the boxes were drawn) and the second
            pass's outputs; returns the outputs (the outline term,
            :func:`nodule_edge.outline.outline_step`). Not called without a nodule box.

    Returns:
        The second pass's outputs and, per patch, whether the first pass found a nodule.
    """
    outputs, found, _ = run_nodule_bounded_with_input(run, patches, spec, segment=segment, finish=finish)
    return outputs, found


def run_nodule_bounded_with_input(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    patches: np.ndarray,
    spec: PatchSpec,
    *,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    finish: FinishStep | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """:func:`run_nodule_bounded`, also returning the cubes the answering pass read.

    Explanations perturb exactly that input (occlusion, deletion curves, Captum maps): the
    nodule-bounded cubes, or the whole cubes without a nodule box.
    """
    if spec.nodule_box is None:
        return run(patches), np.ones(len(patches), bool), patches
    segmentation = segment(patches) if segment is not None else run(patches)["segmentation"]
    bounded = np.empty_like(patches)
    found = np.zeros(len(patches), bool)
    extents = [nodule_extent(s, spec.nodule_box.threshold) for s in segmentation]
    for i, patch in enumerate(patches):
        bounded[i], found[i] = _bound_to_extent(patch, extents[i], spec)
    outputs = run(bounded)
    return (outputs if finish is None else finish(segmentation, patches, extents, outputs)), found, bounded

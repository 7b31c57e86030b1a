"""Outline statistics: radiomics of the runtime's first-pass outline, read by the malignancy head.

The runtime's first pass (the box net) outlines the nodule on the whole cube to draw its box. That
outline agrees with the readers' more closely than the second pass's own segmentation (log volume
r = 0.983 against 0.973 on the 581 labelled held-out nodules of the shipped CV), and seven
classic measurements of it rank the nodules about as well as the whole network does
(docs/cv/README.md, item 15). With ``[head] outline_statistics`` the head step fits a linear term
on them beside the network's classifier: ``z = z_network + weights · statistics + bias``
(:class:`OutlineHead`). They are computed from what the runtime already has after its first pass
(the probability map and the windowed whole cube), by this one function in training and at run
time.

Example:
    >>> import numpy as np
    >>> from nodule_edge.outline import OUTLINE_FEATURE_NAMES, outline_statistics
    >>> z, y, x = np.mgrid[:64, :64, :64]
    >>> seg = (((z - 32) ** 2 + (y - 32) ** 2 + (x - 32) ** 2) <= 10**2).astype(np.float32)
    >>> patch = np.stack([0.6 * seg, 0.5 * seg])  # lung window: -160 HU inside, air outside
    >>> stats = dict(zip(OUTLINE_FEATURE_NAMES, outline_statistics(seg, patch)))
    >>> round(float(np.exp(stats["log_feret_mm"])), 1), round(float(stats["hu_mean"]))
    (10.5, -160)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from nodule_edge.patch import DEFAULT_PATCH_SPEC, Extent, FinishStep, PatchSpec, nodule_extent

__all__ = [
    "OUTLINE_FEATURE_NAMES",
    "OUTLINE_MEASUREMENTS",
    "OutlineHead",
    "outline_measurements",
    "outline_statistics",
    "outline_statistics_batch",
    "outline_step",
    "runtime_finish",
]

#: The statistics, in the order :func:`outline_statistics` returns them.
OUTLINE_FEATURE_NAMES: tuple[str, ...] = (
    "log_feret_mm",  # largest in-plane extent (32 directions, per slice), log mm
    "log_volume_mm3",
    "hu_mean",  # HU from the lung window channel (clipped at its ends)
    "hu_sd",
    "hu_p90",
    "solid_fraction",  # share of the outline above -300 HU
    "compactness",  # 36 pi V^2 / A^3, A counted in exposed voxel faces (1 for a ball, less when rough)
)

#: The statistics as a reader reads them, in :data:`OUTLINE_FEATURE_NAMES` order: name, meaning,
#: UCUM unit, and whether the statistic is the natural log of the value (Feret and volume are fitted
#: as logs). :func:`outline_measurements` converts; the DICOM SR reports these.
OUTLINE_MEASUREMENTS: tuple[tuple[str, str, str, bool], ...] = (
    ("feret_mm", "Feret diameter", "mm", True),
    ("volume_mm3", "Volume", "mm3", True),
    ("hu_mean", "Mean attenuation", "[hnsf'U]", False),
    ("hu_sd", "Attenuation standard deviation", "[hnsf'U]", False),
    ("hu_p90", "Attenuation 90th percentile", "[hnsf'U]", False),
    ("solid_fraction", "Solid fraction", "1", False),
    ("compactness", "Compactness", "1", False),
)

#: Solid tissue begins here (HU); ground glass lies below it.
SOLID_HU = -300.0

_ANGLES = np.linspace(0.0, np.pi, 32, endpoint=False)
_DIRECTIONS = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)  # [32, (y, x)]


def outline_statistics(segmentation: np.ndarray, patch: np.ndarray, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> np.ndarray:
    """:data:`OUTLINE_FEATURE_NAMES` of the nodule in a first-pass probability map.

    The nodule: the voxels at or above the spec's nodule-box threshold inside the box of the
    component the runtime's box is drawn around (:func:`nodule_edge.patch.nodule_extent`). HU are
    read back from the patch's first (lung) window channel.

    Args:
        segmentation: ``[S, S, S]`` probabilities on the patch grid (the first pass's output).
        patch: ``[C, S, S, S]`` the whole windowed cube the first pass read.
        spec: The model's patch spec (voxel size, windows, threshold).

    Returns:
        ``float64 [7]``; where nothing reaches the threshold, the values of half a voxel of air.
    """
    seg = np.asarray(segmentation)
    return _statistics_in_extent(seg, patch, nodule_extent(seg, _threshold(spec)), spec)


def outline_measurements(statistics: np.ndarray) -> dict[str, float]:
    """One nodule's :func:`outline_statistics` in natural units, keyed by :data:`OUTLINE_MEASUREMENTS` names.

    Raises:
        ValueError: ``statistics`` is not one value per :data:`OUTLINE_FEATURE_NAMES` entry.
    """
    values = np.asarray(statistics, np.float64)
    if values.shape != (len(OUTLINE_MEASUREMENTS),):
        raise ValueError(f"outline statistics must be {len(OUTLINE_MEASUREMENTS)} values, got shape {values.shape}")
    return {
        name: float(np.exp(v) if is_log else v)
        for (name, _, _, is_log), v in zip(OUTLINE_MEASUREMENTS, values, strict=True)
    }


def _threshold(spec: PatchSpec) -> float:
    return spec.nodule_box.threshold if spec.nodule_box is not None else 0.5


def _statistics_in_extent(seg: np.ndarray, patch: np.ndarray, extent: Extent, spec: PatchSpec) -> np.ndarray:
    """:func:`outline_statistics` of the nodule whose extent (:func:`nodule_extent`) is known."""
    threshold = _threshold(spec)
    low, high = spec.windows[0]
    voxel = spec.spacing_mm
    if extent is None:
        return np.array([np.log(voxel / 2), np.log(voxel**3 / 2), low, 0.0, low, 0.0, 0.0])
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(extent[0], extent[1], strict=True))
    inside = seg[box] >= threshold
    hu = low + (high - low) * np.asarray(patch[0][box], np.float64)[inside]
    volume = inside.sum() * voxel**3
    # A projection's extremes lie on the in-plane boundary: project only the voxels with an
    # in-plane neighbour outside (a large nodule's 70k voxels are a few thousand of those).
    ring = np.pad(inside, ((0, 0), (1, 1), (1, 1)))
    interior = ring[:, :-2, 1:-1] & ring[:, 2:, 1:-1] & ring[:, 1:-1, :-2] & ring[:, 1:-1, 2:]
    points = np.argwhere(inside & ~interior)  # z-sorted (C order)
    projected = points[:, 1:].astype(np.float64) @ _DIRECTIONS.T
    starts = np.flatnonzero(np.r_[True, points[1:, 0] != points[:-1, 0]])
    spread = np.maximum.reduceat(projected, starts, axis=0) - np.minimum.reduceat(projected, starts, axis=0)
    feret = (float(spread.max()) + 1.0) * voxel
    padded = np.pad(inside, 1)
    area = sum(int(np.count_nonzero(np.diff(padded, axis=a))) for a in range(3)) * voxel**2
    return np.array(
        [
            np.log(feret),
            np.log(volume),
            hu.mean(),
            hu.std(),
            np.percentile(hu, 90),
            float((hu > SOLID_HU).mean()),
            36 * np.pi * volume**2 / area**3,
        ]
    )


def outline_statistics_batch(
    segmentations: np.ndarray,
    patches: np.ndarray,
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
    extents: list[Extent] | None = None,
) -> np.ndarray:
    """:func:`outline_statistics` of each ``[N, S, S, S]`` map and its ``[N, C, S, S, S]`` cube: ``[N, 7]``.

    ``extents``: the nodules' extents when the caller has found them already (the runtime path
    has, to draw the boxes), so that the component search is not run twice."""
    if extents is None:
        extents = [nodule_extent(np.asarray(s), _threshold(spec)) for s in segmentations]
    if not len(segmentations) == len(patches) == len(extents):
        raise ValueError(f"{len(segmentations)} segmentations and {len(extents)} extents for {len(patches)} patches")
    rows = [
        _statistics_in_extent(np.asarray(s), p, e, spec)
        for s, p, e in zip(segmentations, patches, extents, strict=True)
    ]
    return np.stack(rows) if rows else np.zeros((0, len(OUTLINE_FEATURE_NAMES)))


@dataclass(frozen=True)
class OutlineHead:
    """The outline term of the malignancy logit, fitted by the head step (:mod:`nodule_edge.train.head`).

    ``z = z_network + weights · statistics + bias``. Grad-CAM explains the network's part; the
    term is one number per nodule, the same over the cube, so it moves the probability and not
    where the map points, except that the map is the evidence for the predicted class: where the
    term changes the class, the min-max normalised map becomes ``1 − map`` (the normalised map of
    the negated evidence), and with it the attention inside and outside the nodule.

    Attributes:
        weights: One weight per :data:`OUTLINE_FEATURE_NAMES` entry (raw units).
        bias: Added to the logit.
    """

    weights: tuple[float, ...]
    bias: float

    def __post_init__(self) -> None:
        if len(self.weights) != len(OUTLINE_FEATURE_NAMES) or not np.all(np.isfinite([*self.weights, self.bias])):
            raise ValueError(
                f"OutlineHead needs {len(OUTLINE_FEATURE_NAMES)} finite weights and a finite bias, got {self.weights}, {self.bias}"
            )

    def logit(self, statistics: np.ndarray) -> np.ndarray:
        """The term for ``[N, 7]`` statistics: ``[N]``."""
        return np.asarray(statistics, np.float64) @ np.asarray(self.weights) + self.bias

    def apply(self, outputs: dict[str, np.ndarray], statistics: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs of the network's pass with the term added (a new dict; arrays not modified).

        Reads ``malignancy_logit``; rewrites it and ``malignancy_probability``, and where the
        class changes, the Grad-CAM maps (``saliency``, ``cam16``) and the attention inside and
        outside the nodule. Adds ``outline_logit`` (the term, float64 ``[N]``) and
        ``outline_changes_class`` (bool ``[N]``: where it changed the class).
        """
        out = dict(outputs)
        z_network = np.asarray(outputs["malignancy_logit"], np.float64)
        term = self.logit(statistics)
        z = z_network + term
        dtype = np.asarray(outputs["malignancy_probability"]).dtype
        out["malignancy_logit"] = z.astype(np.asarray(outputs["malignancy_logit"]).dtype)
        out["malignancy_probability"] = (1.0 / (1.0 + np.exp(-z))).astype(dtype)
        flipped = (z > 0) != (z_network > 0)
        out["outline_logit"], out["outline_changes_class"] = term, flipped
        if flipped.any():
            for key in ("saliency", "cam16", "nodule_attention", "background_attention"):
                if key in out:
                    values = np.array(out[key], copy=True)
                    values[flipped] = 1 - values[flipped]
                    out[key] = values
        return out

    def to_dict(self) -> dict[str, Any]:
        """The statistics' names, the weights and the bias (what :meth:`from_dict` reads)."""
        return {"names": list(OUTLINE_FEATURE_NAMES), "weights": list(self.weights), "bias": self.bias}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutlineHead:
        """From :meth:`to_dict`'s fields; the names must be this version's statistics."""
        names = tuple(data.get("names", ()))
        if names != OUTLINE_FEATURE_NAMES:
            raise ValueError(
                f"outline head for statistics {list(names)}, this version computes {list(OUTLINE_FEATURE_NAMES)}"
            )
        return cls(tuple(float(w) for w in data["weights"]), float(data["bias"]))


def outline_step(spec: PatchSpec, head: OutlineHead | None = None) -> FinishStep:
    """The runtime path's last step (``finish`` of :func:`nodule_edge.patch.run_nodule_bounded`):
    the first pass's outline statistics as ``outline_statistics`` ``[N, 7]``, and with ``head``
    the outline term added to the second pass's outputs (:meth:`OutlineHead.apply`)."""

    def finish(
        segmentation: np.ndarray, patches: np.ndarray, extents: list[Extent], outputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        statistics = outline_statistics_batch(segmentation, patches, spec, extents)
        out = head.apply(outputs, statistics) if head is not None else dict(outputs)
        out["outline_statistics"] = statistics
        return out

    return finish


def runtime_finish(spec: PatchSpec, head: OutlineHead | None) -> FinishStep | None:
    """What ``finish`` of :func:`nodule_edge.patch.run_nodule_bounded` is for a model: its outline
    term's step (:func:`outline_step`), or None for a model without one."""
    return outline_step(spec, head) if head is not None else None

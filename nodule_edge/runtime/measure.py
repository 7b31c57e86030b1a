"""Measurements on a predicted segmentation (volume, longest axial diameter) on the patch grid."""

from __future__ import annotations

import numpy as np

from nodule_edge.components import connected_components

__all__ = ["component_measurements", "largest_central_component", "segmentation_measurements"]


def largest_central_component(mask: np.ndarray) -> np.ndarray:
    """Keep the connected component nearest the patch centre (the nodule), drop stray blobs.

    Components are face-connected (6-connectivity), as SimpleITK's ``ConnectedComponent`` default.
    """
    if not mask.any():
        return mask
    labels = connected_components(mask)
    centre = tuple(s // 2 for s in mask.shape)
    label = labels[centre]
    if label == 0:
        coords = np.argwhere(labels > 0)
        nearest = coords[np.argmin(((coords - np.asarray(centre)) ** 2).sum(1))]
        label = labels[tuple(nearest)]
    return labels == label


def _max_feret_2d(points: np.ndarray) -> float:
    if len(points) < 2:
        return 0.0
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


def segmentation_measurements(probability: np.ndarray, spacing_mm: float, threshold: float = 0.5) -> dict[str, float]:
    """Volume (mm³) and longest axial diameter (mm) of the central nodule component.

    Args:
        probability: ``[z, y, x]`` segmentation probabilities on the isotropic patch grid.
        spacing_mm: Patch voxel spacing.
        threshold: Probability threshold of the binary mask.
    """
    return component_measurements(largest_central_component(probability >= threshold), spacing_mm)


def component_measurements(mask: np.ndarray, spacing_mm: float) -> dict[str, float]:
    """Volume (mm³) and longest axial diameter (mm) of an already isolated nodule component."""
    volume = float(mask.sum()) * spacing_mm**3
    longest = 0.0
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        sl = mask[z]
        # Boundary pixels bound the Feret diameter; interior ones cannot lengthen it.
        interior = sl.copy()
        interior[1:-1, 1:-1] &= sl[:-2, 1:-1] & sl[2:, 1:-1] & sl[1:-1, :-2] & sl[1:-1, 2:]
        interior[[0, -1], :] = False
        interior[:, [0, -1]] = False
        edge = np.argwhere(sl & ~interior) if sl.sum() > 4 else np.argwhere(sl)
        longest = max(longest, _max_feret_2d(edge.astype(np.float64)) + 1.0)
    return {"volume_mm3": volume, "longest_axial_diameter_mm": longest * spacing_mm if mask.any() else 0.0}

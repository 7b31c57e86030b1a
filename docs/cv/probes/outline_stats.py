"""Candidate outline statistics computable at run time from what the runtime already has: the
first pass's probability map and the windowed whole cube (no raw HU, no component labelling).

The nodule: voxels at p >= threshold inside the box of the component nearest the centre
(nodule_edge.patch.nodule_extent, as the runtime's box). HU from the lung window channel
(clipped at its ends, -1000 and 400 HU). The in-plane Feret diameter: per slice, the largest
extent of the voxel centres projected on 32 in-plane directions, plus one voxel.
"""
from __future__ import annotations

import numpy as np
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, nodule_extent

NAMES = ("log_feret_mm", "log_volume_mm3", "hu_mean", "hu_sd", "hu_p90", "solid_fraction", "compactness")
_ANGLES = np.linspace(0.0, np.pi, 32, endpoint=False)
_DIRECTIONS = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)  # [32, (y, x)]


def outline_statistics(segmentation: np.ndarray, patch: np.ndarray, spec: PatchSpec = DEFAULT_PATCH_SPEC,
                       threshold: float = 0.5) -> np.ndarray:
    extent = nodule_extent(segmentation, threshold)
    if extent is None:
        return np.array([np.log(0.5), 0.0, -1000.0, 0.0, -1000.0, 0.0, 0.0])
    (z0, y0, x0), (z1, y1, x1) = extent
    m = np.zeros(segmentation.shape, bool)
    m[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = segmentation[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] >= threshold
    low, high = spec.windows[0]
    hu = low + (high - low) * np.asarray(patch[0], np.float32)[m]
    vox = spec.spacing_mm
    n = int(m.sum())
    volume = n * vox**3
    pts = np.argwhere(m)
    proj = pts[:, 1:].astype(np.float64) @ _DIRECTIONS.T  # [n, 32]
    order = np.argsort(pts[:, 0], kind="stable")
    z, proj = pts[order, 0], proj[order]
    starts = np.flatnonzero(np.r_[True, z[1:] != z[:-1]])
    spread = np.maximum.reduceat(proj, starts, axis=0) - np.minimum.reduceat(proj, starts, axis=0)
    feret = (float(spread.max()) + 1.0) * vox
    padded = np.pad(m, 1)
    faces = sum(int(np.count_nonzero(np.diff(padded, axis=a))) for a in range(3))
    area = faces * vox**2
    return np.array([np.log(feret), np.log(volume), hu.mean(), hu.std(), np.percentile(hu, 90),
                     float((hu > -300).mean()), 36 * np.pi * volume**2 / area**3])

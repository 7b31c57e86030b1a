"""Geometry of a study's slice lattice: output grids, regularity checks, orientation and points.

:class:`GridGeometry` describes a voxel grid without pixels (the study's or a nodule's ROI);
:func:`slice_index` and :func:`slice_position` map between the slice index and the position along
the slice normal by the slices' own positions; :func:`irregularities` notes gaps, uneven steps
and conflicting duplicates when a series opens, and :func:`check_slab` refuses them where a cube
needs the slices; :func:`orientation_code` names the axes' directions. :class:`~nodule_edge.runtime.study.Study` builds on these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nodule_edge.errors import CoordinateError, GeometryError
from nodule_edge.volume import Grid

__all__ = [
    "GridGeometry",
    "as_points",
    "check_slab",
    "fmt",
    "irregularities",
    "orientation_code",
    "readonly",
    "slice_index",
    "slice_position",
]

# A step this much larger than the series' median step means missing slices.
_GAP_FACTOR = 1.5
# Slices inside a cube's slab may sit this far (fraction of the step) off a uniform lattice.
_UNIFORM_TOL_FRACTION = 0.05


@dataclass(frozen=True)
class GridGeometry(Grid):
    """A voxel grid of a study (the whole study's or a nodule's ROI), without pixels: enough to resample onto it.

    The fields of :class:`nodule_edge.volume.Grid` (size, spacing, origin, direction), plus:

    Attributes:
        index_offset: Voxel index, in the study's own grid, of this grid's voxel (0, 0, 0).
    """

    index_offset: tuple[int, int, int] = (0, 0, 0)


def orientation_code(direction: np.ndarray | Sequence[float]) -> str:
    """Three letters naming where the column, row and slice axes point in LPS (e.g. ``"LPS"``).

    Each axis gets the patient direction its cosine vector is closest to: ``L``/``R`` for +x/−x,
    ``P``/``A`` for +y/−y, ``S``/``I`` for +z/−z (the letter is the direction the index grows
    towards, as SimpleITK's ``DICOMOrientImageFilter`` and TorchIO name it). An axial series read
    top-down in the usual way is ``"LPS"``; an oblique axis takes its largest component.

    Args:
        direction: 3×3 direction matrix whose columns are the axes (or its 9 values row-major).

    Returns:
        The code, one letter per axis.
    """
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    letters = ("LR", "PA", "SI")
    code = []
    for axis in matrix.T:
        world = int(np.argmax(np.abs(axis)))
        code.append(letters[world][0 if axis[world] >= 0 else 1])
    return "".join(code)


def slice_index(steps_along: np.ndarray, along: np.ndarray, nominal: float) -> np.ndarray:
    """Continuous slice index of positions ``along`` the slice normal (mm).

    Between slices it interpolates the slices' own positions ``steps_along`` (ascending), so a
    gap maps each slice to where it really is; beyond the ends it extends the end steps (a single
    slice: the ``nominal`` step).
    """
    d = steps_along
    if d.size == 1:
        return (along - d[0]) / nominal
    k = np.interp(along, d, np.arange(d.size, dtype=np.float64))
    lo, hi = along < d[0], along > d[-1]
    k[lo] = (along[lo] - d[0]) / (d[1] - d[0])
    k[hi] = d.size - 1 + (along[hi] - d[-1]) / (d[-1] - d[-2])
    return k


def slice_position(positions: np.ndarray, k: np.ndarray, nominal: float, normal: np.ndarray) -> np.ndarray:
    """LPS position ``[N, 3]`` of continuous slice indices ``k``: the inverse of :func:`slice_index`.

    ``positions`` holds each slice's voxel (0, 0) position ``[n, 3]``; a single slice steps
    ``nominal`` mm along ``normal``.
    """
    p = positions
    n = p.shape[0]
    if n == 1:
        return p[0] + np.outer(k * nominal, normal)
    idx = np.arange(n, dtype=np.float64)
    out = np.column_stack([np.interp(k, idx, p[:, a]) for a in range(3)])
    lo, hi = k < 0, k > n - 1
    out[lo] = p[0] + np.outer(k[lo], p[1] - p[0])
    out[hi] = p[-1] + np.outer(k[hi] - (n - 1), p[-1] - p[-2])
    return out


def fmt(arr: np.ndarray | Sequence[float]) -> str:
    """Short text of a point or array for messages (3 decimals)."""
    a = np.asarray(arr, dtype=np.float64)
    return np.array2string(a, precision=3, separator=", ", threshold=12, suppress_small=True)


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only float64 copy."""
    a = np.array(a, dtype=np.float64, copy=True)
    a.flags.writeable = False
    return a


def as_points(value: object, what: str) -> tuple[np.ndarray, bool]:
    """Three numbers or an N×3 array as float64 ``[N, 3]``, and whether it was a single point.

    Raises:
        CoordinateError: Not numbers, the wrong shape, or not finite (``what`` names the input).
    """
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
        raise CoordinateError(f"{what} {fmt(arr if not single else arr[0])} is not finite")
    return arr, single


def irregularities(d: np.ndarray, nominal: float, conflicts: frozenset[int]) -> list[str]:
    """Notes on gaps, uneven steps and conflicting duplicates of slices at positions ``d`` (mm, ascending)."""
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


def check_slab(
    steps_along: np.ndarray, conflicts: frozenset[int], nominal: float, k0: int, k1: int, where: str
) -> None:
    """Refuse a slab of slices ``k0 … k1`` with a conflicting duplicate, a gap or uneven spacing.

    Args:
        steps_along: Position of each slice along the slice normal (mm), ascending.
        conflicts: Slices at which different images share a position.
        nominal: The series' median step (mm).
        k0: First slice of the slab.
        k1: Last slice of the slab.
        where: What needs the slab, for the message (e.g. "the cube around LPS [...] mm").

    Raises:
        GeometryError: The slab holds a conflicting duplicate, missing slices or uneven spacing.
    """
    bad = sorted(k for k in conflicts if k0 <= k <= k1)
    if bad:
        raise GeometryError(
            f"different images share slice position {steps_along[bad[0]]:.2f} mm (slice {bad[0]}) inside "
            f"{where}; remove the duplicate instances"
        )
    if k1 <= k0:
        return
    d = steps_along[k0 : k1 + 1]
    steps = np.diff(d)
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

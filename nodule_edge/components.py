"""Connected components of a binary mask, labelled as SimpleITK's ``ConnectedComponent`` labels them.

numpy only, so that the runtime's default path imports no SimpleITK (see :mod:`nodule_edge._sitk`).
Labels run 1, 2, … in the order in which each component's first voxel comes in a C-order scan of
the array (x fastest for ``[z, y, x]``), as ITK numbers them; background is 0.
tests/test_components.py compares the labels with SimpleITK's on random masks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["connected_components", "nearest_component_bounds"]


def connected_components(mask: np.ndarray, *, fully_connected: bool = False) -> np.ndarray:
    """Label the connected components of a binary mask.

    Args:
        mask: Boolean (or 0/non-zero) array of any dimension.
        fully_connected: Neighbours share a face only (False: 6-connectivity in 3-D, SimpleITK's
            default) or also an edge or a corner (True: 26-connectivity).

    Returns:
        int32 labels of ``mask``'s shape: 0 for background, 1 … n per component in the order of
        their first voxel in C order (SimpleITK's ``ConnectedComponent(mask, fully_connected)``).
    """
    m = np.asarray(mask).astype(bool, copy=False)
    labels = np.zeros(m.shape, dtype=np.int32)
    if m.ndim == 0 or not m.any():
        return labels
    # Label only the box around the foreground (a nodule's mask fills a small part of its cube,
    # and the work below grows with the array's size). A C-order scan of the box meets the
    # components' first voxels in the same order as a scan of the whole array, so the labels agree.
    box = tuple(
        slice(int(hit[0]), int(hit[-1]) + 1)
        for hit in (np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis))) for axis in range(m.ndim))
    )
    labels[box] = _label_box(np.ascontiguousarray(m[box]), fully_connected)
    return labels


def _forward_rows(ndim: int, fully_connected: bool) -> list[tuple[int, ...]]:
    """Offsets to the neighbouring rows (every axis but the last) that come later in C order."""
    if not fully_connected:
        return [tuple(int(a == b) for b in range(ndim - 1)) for a in range(ndim - 1)]
    return [o for o in itertools.product((-1, 0, 1), repeat=ndim - 1) if o > (0,) * (ndim - 1)]


@dataclass(frozen=True)
class _Runs:
    """The runs of a boolean array (maximal stretches of foreground along the last axis) and their
    components: run ``i`` starts at ``[c[i] for c in start]`` and ends at x ``end_x[i]``; runs
    are numbered in C order of their first voxel and ``root[i]`` is the smallest run of its
    component (the one that holds the component's first voxel)."""

    start: tuple[np.ndarray, ...]
    end_x: np.ndarray
    root: np.ndarray


def _runs(m: np.ndarray, fully_connected: bool) -> _Runs:
    """The runs of ``m`` joined into components.

    Two runs in neighbouring rows touch when their x-intervals overlap (widened by one voxel
    under 26-connectivity). Runs are sorted by row, then x, and disjoint within a row, so the runs
    of a neighbouring row that touch run ``i`` are one contiguous stretch, found by binary search:
    no voxel-sized array beyond the run starts and ends (a nodule's mask has about a twentieth as
    many runs as voxels).
    """
    width = m.shape[-1]
    rows = m.reshape(-1, width)
    starts = rows.copy()
    starts[:, 1:] &= ~rows[:, :-1]
    ends = rows.copy()
    ends[:, :-1] &= ~rows[:, 1:]
    row, start_x = np.nonzero(starts)  # C order: run i is the i-th start and the i-th end
    end_x = np.nonzero(ends)[1]
    n_runs = len(row)
    dtype = np.int32 if m.size < 2**31 else np.int64
    # Keys that order runs by row, then x, with a gap between rows wider than any widened run.
    stride = width + 2
    key_start, key_end = row * stride + start_x, row * stride + end_x
    row_at = np.unravel_index(row, m.shape[:-1]) if m.ndim > 1 else ()
    widen = 1 if fully_connected else 0
    us, vs = [], []
    for offset in _forward_rows(m.ndim, fully_connected):
        at = [c + o for c, o in zip(row_at, offset, strict=True)]
        inside = np.ones(n_runs, bool)
        for c, n in zip(at, m.shape[:-1], strict=True):
            inside &= (c >= 0) & (c < n)
        i = np.flatnonzero(inside)
        if not i.size:
            continue
        other = np.ravel_multi_index(tuple(c[i] for c in at), m.shape[:-1]) * stride
        first = np.searchsorted(key_end, other + start_x[i] - widen, side="left")
        count = np.maximum(np.searchsorted(key_start, other + end_x[i] + widen, side="right") - first, 0)
        total = int(count.sum())
        if total:
            us.append(np.repeat(i, count))
            vs.append(np.repeat(first - (np.cumsum(count) - count), count) + np.arange(total))
    # Union-find over all pairs: hook the larger root of every pair that joins two trees under the
    # smaller one, point every run at its root, repeat until no pair joins two trees. Each run's
    # root ends as the smallest run id (the first voxel in C order) of its component.
    parent = np.arange(n_runs, dtype=dtype)
    if us:
        u, v = np.concatenate(us).astype(dtype), np.concatenate(vs).astype(dtype)
        while u.size:
            pu, pv = parent[u], parent[v]
            joins = pu != pv
            if not joins.any():
                break
            u, v, pu, pv = u[joins], v[joins], pu[joins], pv[joins]
            np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
            while True:
                up = parent[parent]
                if np.array_equal(up, parent):
                    break
                parent = up
    return _Runs((*row_at, start_x), end_x, parent)


def _label_box(m: np.ndarray, fully_connected: bool) -> np.ndarray:
    """:func:`connected_components` of a boolean array, without the cropping."""
    runs = _runs(m, fully_connected)
    _, component = np.unique(runs.root, return_inverse=True)
    labels = np.zeros(m.shape, dtype=np.int32)
    lengths = runs.end_x - runs.start[-1] + 1
    labels[m] = np.repeat(component.reshape(-1).astype(np.int32) + 1, lengths)
    return labels


def nearest_component_bounds(
    mask: np.ndarray, point: Sequence[float] | np.ndarray, *, fully_connected: bool = True
) -> tuple[np.ndarray, np.ndarray] | None:
    """Index bounds ``(low, high)`` (inclusive) of the connected component of ``mask`` nearest ``point``.

    The component holding the foreground voxel nearest to ``point`` (Euclidean, in voxels; of
    equally near voxels the first in C order), as labelling the whole mask with
    :func:`connected_components` and taking that voxel's label would give, without labelling
    voxels: the runs carry the bounds. Returns None for an empty mask.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim == 0 or not m.any():
        return None
    hits = [np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis))) for axis in range(m.ndim)]
    origin = np.array([int(h[0]) for h in hits])
    crop = np.ascontiguousarray(m[tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits)])
    runs = _runs(crop, fully_connected)
    centre = np.asarray(point, dtype=np.float64) - origin
    # Each run's voxel nearest the point: x clipped into the run, trying both integers beside a
    # fractional x so that a tie goes to the smaller x (the first in C order), as among voxels.
    start_x, end_x = runs.start[-1], runs.end_x
    other = sum((c - centre[a]) ** 2 for a, c in enumerate(runs.start[:-1]))
    best = np.full(len(end_x), np.inf)
    for x in (np.floor(centre[-1]), np.ceil(centre[-1])):
        d = other + (np.clip(x, start_x, end_x) - centre[-1]) ** 2
        best = np.minimum(best, d)
    root = runs.root[int(np.argmin(best))]
    member = runs.root == root
    low = [int(c[member].min()) for c in runs.start[:-1]] + [int(start_x[member].min())]
    high = [int(c[member].max()) for c in runs.start[:-1]] + [int(end_x[member].max())]
    return np.asarray(low) + origin, np.asarray(high) + origin

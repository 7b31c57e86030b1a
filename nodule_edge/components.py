"""Connected components of a binary mask, labelled as SimpleITK's ``ConnectedComponent`` labels them.

numpy only, so that the runtime's default path imports no SimpleITK (see :mod:`nodule_edge._sitk`).
Labels run 1, 2, … in the order in which each component's first voxel comes in a C-order scan of
the array (x fastest for ``[z, y, x]``), as ITK numbers them; background is 0.
tests/test_components.py compares the labels with SimpleITK's on random masks.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["connected_components"]


def _forward_offsets(ndim: int, fully_connected: bool) -> list[tuple[int, ...]]:
    """Neighbour offsets that come later in a C-order scan: each neighbouring pair once."""
    if not fully_connected:
        return [tuple(int(a == b) for b in range(ndim)) for a in range(ndim)]
    return [o for o in itertools.product((-1, 0, 1), repeat=ndim) if o > (0,) * ndim]


def _pairs(mask: np.ndarray, rank: np.ndarray, offset: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``rank`` at the foreground voxels ``p`` and ``p + offset`` where both are foreground."""
    here = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, mask.shape, strict=True))
    there = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, mask.shape, strict=True))
    both = mask[here] & mask[there]
    return rank[here][both], rank[there][both]


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


def _label_box(m: np.ndarray, fully_connected: bool) -> np.ndarray:
    """:func:`connected_components` of a boolean array, without the cropping.

    The nodes are runs: maximal stretches of foreground along the last axis (x), numbered in C
    order of their first voxel, so a component's smallest run holds its first voxel. Runs are
    joined through every other neighbour offset; a nodule's mask has about a twentieth as many
    runs as voxels.
    """
    labels = np.zeros(m.shape, dtype=np.int32)
    starts = m.copy()
    starts[..., 1:] &= ~m[..., :-1]
    n_runs = int(np.count_nonzero(starts))
    dtype = np.int32 if m.size < 2**31 else np.int64
    run = np.cumsum(starts, axis=None, dtype=dtype).reshape(m.shape) - 1  # run id of each foreground voxel
    # Union-find, one neighbour offset at a time (bounded memory): hook the larger root of every
    # pair that joins two trees under the smaller one, point every run at its root, repeat until
    # no pair of this offset joins two trees (later merges keep earlier pairs joined). Each run's
    # root ends as the smallest run id (the first voxel in C order) of its component.
    parent = np.arange(n_runs, dtype=dtype)
    along_x = (0,) * (m.ndim - 1) + (1,)
    for offset in _forward_offsets(m.ndim, fully_connected):
        if offset == along_x:  # neighbours along x share a run
            continue
        u, v = _pairs(m, run, offset)
        # Pairs come in C order, so the voxels of two overlapping runs give consecutive equal pairs.
        if u.size > 1:
            keep = np.empty(u.size, bool)
            keep[0] = True
            np.not_equal(u[1:], u[:-1], out=keep[1:])
            keep[1:] |= v[1:] != v[:-1]
            u, v = u[keep], v[keep]
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
    _, component = np.unique(parent, return_inverse=True)
    labels[m] = component.reshape(-1).astype(np.int32)[run[m]] + 1
    return labels

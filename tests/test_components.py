"""numpy connected components (nodule_edge.components) against SimpleITK's ConnectedComponent.

The nodule box (26-connectivity, nodule_edge.patch.nodule_extent) and the measured component
(6-connectivity, nodule_edge.runtime.measure) used SimpleITK before issue 14; the labels, their
numbering included, must be the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nodule_edge.components import connected_components, nearest_component_bounds


def _sitk_labels(mask: np.ndarray, fully_connected: bool) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(image, fully_connected))


@pytest.mark.parametrize("fully_connected", [False, True], ids=["6-connected", "26-connected"])
def test_labels_equal_simpleitks_on_random_masks(fully_connected: bool) -> None:
    rng = np.random.default_rng(int(fully_connected))
    for _ in range(150):
        shape = tuple(int(v) for v in rng.integers(1, 20, 3))
        mask = rng.random(shape) < rng.uniform(0.05, 0.7)
        ours = connected_components(mask, fully_connected=fully_connected)
        np.testing.assert_array_equal(ours, _sitk_labels(mask, fully_connected))


@pytest.mark.parametrize("fully_connected", [False, True], ids=["6-connected", "26-connected"])
def test_long_winding_component_and_full_cube(fully_connected: bool) -> None:
    snake = np.zeros((16, 16, 16), bool)  # planes joined at alternate ends: one component
    snake[::2] = True
    snake[1::4, :, -1] = True
    snake[3::4, :, 0] = True
    for mask in (snake, np.ones((64, 64, 64), bool), np.zeros((5, 5, 5), bool)):
        np.testing.assert_array_equal(
            connected_components(mask, fully_connected=fully_connected), _sitk_labels(mask, fully_connected)
        )


def test_diagonal_neighbours_join_only_when_fully_connected() -> None:
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    assert connected_components(mask).max() == 2
    assert connected_components(mask, fully_connected=True).max() == 1


@pytest.mark.parametrize("fully_connected", [False, True], ids=["6-connected", "26-connected"])
def test_labels_equal_simpleitks_on_sparse_blobs_in_a_large_cube(fully_connected: bool) -> None:
    """Only the box around the foreground is labelled; labels and numbering must not change."""
    rng = np.random.default_rng(7 + int(fully_connected))
    for _ in range(20):
        mask = np.zeros((40, 40, 40), bool)
        for _ in range(int(rng.integers(1, 4))):
            low = rng.integers(0, 34, 3)
            size = rng.integers(1, 7, 3)
            block = tuple(slice(int(lo), int(lo + n)) for lo, n in zip(low, size, strict=True))
            mask[block] = rng.random(tuple(int(n) for n in size)) < 0.6
        np.testing.assert_array_equal(
            connected_components(mask, fully_connected=fully_connected), _sitk_labels(mask, fully_connected)
        )


@pytest.mark.parametrize("fully_connected", [False, True], ids=["4-connected", "8-connected"])
def test_labels_equal_simpleitks_in_two_dimensions(fully_connected: bool) -> None:
    """Runs along the last axis are the nodes in any dimension, not only in 3-D."""
    rng = np.random.default_rng(11 + int(fully_connected))
    for _ in range(100):
        shape = tuple(int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random(shape) < rng.uniform(0.1, 0.7)
        np.testing.assert_array_equal(
            connected_components(mask, fully_connected=fully_connected), _sitk_labels(mask, fully_connected)
        )


def test_one_dimension_has_one_label_per_run() -> None:
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1], bool)
    np.testing.assert_array_equal(connected_components(mask), [0, 1, 1, 0, 2, 0, 0, 3, 3, 3])


def _bounds_by_labelling(mask: np.ndarray, point: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The definition: label every voxel, take the voxel nearest the point (first in C order)."""
    labels = connected_components(mask, fully_connected=True)
    points = np.argwhere(labels > 0)
    if len(points) == 0:
        return None
    nearest = points[np.argmin(((points - point) ** 2).sum(axis=1))]
    component = points[labels[tuple(points.T)] == labels[tuple(nearest)]]
    return component.min(axis=0), component.max(axis=0)


def test_nearest_component_bounds_equal_those_of_a_full_labelling() -> None:
    rng = np.random.default_rng(11)
    for trial in range(300):
        shape = tuple(int(v) for v in rng.integers(1, 16, 3))
        mask = rng.random(shape) < rng.uniform(0.02, 0.5)
        # Half the points on the half-voxel grid (the cube centre of an even-sized cube): ties.
        point = (np.asarray(shape) - 1) / 2.0 if trial % 2 else rng.uniform(-2, np.asarray(shape) + 2)
        expected = _bounds_by_labelling(mask, point)
        got = nearest_component_bounds(mask, point)
        if expected is None:
            assert got is None
        else:
            assert got is not None
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])

"""Segmentation measurements and PNG overlays on synthetic patch-grid volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodule_edge.runtime.measure import largest_central_component, segmentation_measurements
from nodule_edge.runtime.overlays import heat_colormap, plane_views, render_overlay, render_similar_strip

SPACING = 0.5
N = 64


def _ball(radius_vox: float, centre=(32, 32, 32), shape=(N, N, N)) -> np.ndarray:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = centre
    return ((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius_vox**2).astype(np.float32)


@pytest.mark.parametrize("radius_mm", [2.0, 5.0, 9.0])
def test_sphere_volume_and_diameter(radius_mm):
    r = radius_mm / SPACING
    m = segmentation_measurements(_ball(r), SPACING)
    assert m["volume_mm3"] == pytest.approx(4 / 3 * math.pi * radius_mm**3, rel=0.08)
    # Pixel-extent convention: centre-to-centre Feret plus one voxel.
    assert m["longest_axial_diameter_mm"] == pytest.approx(2 * radius_mm + SPACING, abs=SPACING / 2)


def test_elongated_nodule_diameter_is_the_longest_axial_extent():
    z, y, x = np.mgrid[:N, :N, :N]
    # Ellipsoid 12 mm long along a diagonal in-plane direction, 4 mm wide, 4 mm tall.
    u = ((x - 32) + (y - 32)) / math.sqrt(2) * SPACING
    v = ((x - 32) - (y - 32)) / math.sqrt(2) * SPACING
    w = (z - 32) * SPACING
    mask = ((u / 6.0) ** 2 + (v / 2.0) ** 2 + (w / 2.0) ** 2 <= 1).astype(np.float32)
    m = segmentation_measurements(mask, SPACING)
    assert 11.5 <= m["longest_axial_diameter_mm"] <= 13.0


def test_threshold_and_empty_mask():
    probs = _ball(6) * 0.4
    assert segmentation_measurements(probs, SPACING) == {"volume_mm3": 0.0, "longest_axial_diameter_mm": 0.0}
    assert segmentation_measurements(probs, SPACING, threshold=0.3)["volume_mm3"] > 0


def test_stray_blobs_are_dropped():
    nodule = _ball(6)
    stray = _ball(3, centre=(8, 8, 8))
    m_alone = segmentation_measurements(nodule, SPACING)
    m_both = segmentation_measurements(np.maximum(nodule, stray), SPACING)
    assert m_both == m_alone


def test_component_nearest_the_centre_is_kept_when_the_centre_is_empty():
    near = _ball(3, centre=(32, 32, 40))
    far = _ball(5, centre=(8, 8, 8))
    kept = largest_central_component((near + far) > 0)
    np.testing.assert_array_equal(kept, near > 0)


def test_plane_views_follow_radiological_convention():
    vol = np.zeros((N, N, N), np.float32)
    vol[32, 10, 50] = 1.0  # anterior (low y/P), patient left (high x/L), centre slice
    vol[60, 32, 32] = 2.0  # superior (high z/S)
    planes = plane_views(vol)
    axial = planes["axial"]
    r, c = np.unravel_index(np.argmax(axial), axial.shape)
    assert r < N // 2, "anterior must be up"
    assert c > N // 2, "patient left must be on the image right"
    coronal = planes["coronal"]
    r, _ = np.unravel_index(np.argmax(coronal), coronal.shape)
    assert r < N // 2, "superior must be up on the coronal plane"
    sagittal = planes["sagittal"]
    r, _ = np.unravel_index(np.argmax(sagittal), sagittal.shape)
    assert r < N // 2, "superior must be up on the sagittal plane"


def test_heat_colormap_endpoints_and_clipping():
    rgb = heat_colormap(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]))
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 3)
    np.testing.assert_array_equal(rgb[0], rgb[1])
    np.testing.assert_array_equal(rgb[3], rgb[4])
    assert rgb[1][2] > rgb[1][0]  # cold end blue
    assert rgb[3][0] > rgb[3][2]  # hot end red


def test_overlay_shows_the_contour_and_the_title_strip():
    ct = np.full((N, N, N), 0.3, np.float32)
    seg = _ball(10)
    sal = np.zeros((N, N, N), np.float32)
    image = render_overlay(ct, seg, sal, "nodule 0")
    assert image.mode == "RGB"
    assert image.size == (3 * N * 4, N * 4 + 18)
    px = np.asarray(image)
    green = (px[..., 0] == 0) & (px[..., 1] == 255) & (px[..., 2] == 0)
    assert green[18:].sum() > 100
    # The contour of a centred ball sits in the middle of each of the three tiles.
    cols = np.flatnonzero(green[18:].any(axis=0))
    for tile in range(3):
        inside = cols[(cols >= tile * 256) & (cols < (tile + 1) * 256)]
        assert inside.size and abs(inside.mean() - (tile * 256 + 128)) < 8
    # Without a segmentation there is no contour.
    none = np.asarray(render_overlay(ct, np.zeros_like(seg), sal, "x"))
    assert not ((none[..., 0] == 0) & (none[..., 1] == 255) & (none[..., 2] == 0))[18:].any()


def test_saliency_tints_the_ct():
    ct = np.full((N, N, N), 0.5, np.float32)
    hot = render_overlay(ct, np.zeros((N, N, N)), np.ones((N, N, N), np.float32), "")
    cold = render_overlay(ct, np.zeros((N, N, N)), np.zeros((N, N, N), np.float32), "")
    hot_px, cold_px = np.asarray(hot)[40:, 40:200], np.asarray(cold)[40:, 40:200]
    assert np.all(cold_px[..., 0] == cold_px[..., 1])  # grey
    assert hot_px[..., 0].mean() > hot_px[..., 2].mean() + 20  # red-tinted


def test_similar_strip_handles_missing_thumbnails():
    thumbs = [np.full((64, 64), 200, np.uint8), None, np.zeros((64, 64), np.uint8)]
    image = render_similar_strip(thumbs, ["malignant\nd=0.10", "benign\nd=0.20", "unknown\nd=0.30"], "similar")
    assert image.size == (3 * 128, 128 + 44)
    px = np.asarray(image.convert("L"))
    assert px[18 + 64, 64] == 200  # first thumbnail drawn
    assert px[18 + 10, 128 + 64] == 0  # second: no image, black tile with a note
    empty = render_similar_strip([], [], "none")
    assert empty.size == (128, 128 + 44)

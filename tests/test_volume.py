"""numpy resampling (nodule_edge.volume) against SimpleITK's Resample, the implementation it replaces.

The runtime resamples without SimpleITK (issue 14: memory and the exit-time hang); the patches,
the maps written on the study's lattice and the DICOM SEG masks must not change. Each case builds
a random source and output geometry, resamples with both, and asks for the very same float32
values: SimpleITK's scan-line arithmetic is followed operation for operation, so even points on a
half-voxel border fall on the same side.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, build_patch, patch_grid, resample_hu, window_channels
from nodule_edge.volume import Grid, Volume, float3, int3, resample

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))  # uniform over rotations and reflections


def _sitk_resample(volume: Volume, grid: Grid, interpolation: str, default: float) -> np.ndarray:
    out = sitk.Resample(
        volume.to_sitk(),
        grid.to_image(sitk.sitkFloat32),
        sitk.Transform(),
        INTERPOLATORS[interpolation],
        default,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def _random_case(rng: np.random.Generator, oblique: bool) -> tuple[Volume, Grid]:
    size = tuple(int(v) for v in rng.integers(1, 24, 3))
    spacing = tuple(float(v) for v in rng.uniform(0.3, 3.0, 3))
    direction = _rotation(rng) if oblique else np.diag(rng.choice([-1.0, 1.0], 3))
    source = Grid(size, spacing, tuple(float(v) for v in rng.uniform(-80, 80, 3)), tuple(direction.ravel()))  # type: ignore[arg-type]
    voxels = (rng.normal(size=size[::-1]) * 400).astype(np.float32)
    out_size = tuple(int(v) for v in rng.integers(1, 32, 3))
    out_spacing = tuple(float(v) for v in rng.uniform(0.25, 2.0, 3))
    out_direction = _rotation(rng) if oblique and rng.random() < 0.5 else np.eye(3)
    centre = source.index_to_physical([np.asarray(size) / 2.0])[0] + rng.normal(size=3) * 4
    origin = centre - out_direction @ (np.asarray(out_size) * np.asarray(out_spacing) / 2)
    grid = Grid(out_size, out_spacing, tuple(float(v) for v in origin), tuple(out_direction.ravel()))  # type: ignore[arg-type]
    return Volume(voxels, source), grid


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
@pytest.mark.parametrize("oblique", [False, True], ids=["axis-aligned", "oblique"])
def test_resample_equals_simpleitk_on_random_geometry(interpolation: str, oblique: bool) -> None:
    rng = np.random.default_rng(14 + oblique)
    for _ in range(40):
        volume, grid = _random_case(rng, oblique)
        ours = resample(volume, grid, interpolation, -1000.0)  # type: ignore[arg-type]
        theirs = _sitk_resample(volume, grid, interpolation, -1000.0)
        assert ours.dtype == np.float32 and ours.shape == grid.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_points_on_half_voxel_borders_fall_on_simpleitks_side(interpolation: str) -> None:
    """Output grids that start exactly on the source's outer half-voxel border, in whole steps."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        size = tuple(int(v) for v in rng.integers(1, 12, 3))
        spacing = tuple(float(v) for v in rng.choice([0.5, 0.7, 0.703125, 1.0, 1.25, 2.5], 3))
        source = Grid(
            size,
            spacing,
            tuple(float(v) for v in rng.choice([-10.0, 0.0, 3.5], 3)),
            tuple(np.diag(rng.choice([-1.0, 1.0], 3)).ravel()),
        )  # type: ignore[arg-type]
        volume = Volume(rng.normal(size=size[::-1]).astype(np.float32), source)
        out_spacing = tuple(float(v) for v in rng.choice([0.125, 0.25, 0.5, 1.0], 3))
        corner = source.index_to_physical([[-0.5, -0.5, -0.5]])[0]
        origin = corner - rng.choice([0, 1, 2], 3) * np.asarray(out_spacing)
        grid = Grid(
            tuple(int(v) for v in rng.integers(1, 30, 3)), out_spacing, tuple(float(v) for v in origin), IDENTITY
        )  # type: ignore[arg-type]
        ours = resample(volume, grid, interpolation, -7.0)  # type: ignore[arg-type]
        np.testing.assert_array_equal(ours, _sitk_resample(volume, grid, interpolation, -7.0))


def test_patch_of_an_oblique_anisotropic_roi_equals_simpleitks() -> None:
    """build_patch on a Volume against the pre-issue-14 path: sitk.Resample onto the cube, then the windows."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        direction = _rotation(rng)
        size = (50, 44, 20)
        source = Grid(size, (0.7, 0.8, 2.5), (-20.0, 15.0, -40.0), tuple(direction.ravel()))
        volume = Volume((rng.normal(size=size[::-1]) * 500 - 300).astype(np.int16), source)
        centre = source.index_to_physical([(25.3, 21.7, 9.4)])[0]
        image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
        reference = sitk.Resample(
            image,
            patch_grid(centre).to_image(sitk.sitkFloat32),
            sitk.Transform(),
            sitk.sitkLinear,
            -1000.0,
            sitk.sitkFloat32,
        )
        expected = window_channels(sitk.GetArrayFromImage(reference))
        np.testing.assert_allclose(build_patch(volume, centre), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(build_patch(volume.to_sitk(), centre), expected, rtol=0, atol=1e-6)


def test_bspline_goes_through_simpleitk() -> None:
    rng = np.random.default_rng(5)
    source = Grid((20, 20, 12), (1.0, 1.0, 2.0), (-10.0, -10.0, -12.0), IDENTITY)
    volume = Volume(rng.normal(size=(12, 20, 20)).astype(np.float32), source)
    spec = PatchSpec(size=16, interpolation="bspline")
    reference = sitk.Resample(
        volume.to_sitk(),
        patch_grid((0.0, 0.0, 0.0), spec).to_image(sitk.sitkFloat32),
        sitk.Transform(),
        sitk.sitkBSpline,
        spec.outside_hu,
        sitk.sitkFloat32,
    )
    np.testing.assert_array_equal(resample_hu(volume, (0.0, 0.0, 0.0), spec), sitk.GetArrayFromImage(reference))


def test_volume_round_trips_through_simpleitk() -> None:
    grid = Grid((4, 3, 2), (0.5, 0.75, 2.0), (1.0, -2.0, 3.0), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    volume = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4), grid)
    image = volume.to_sitk()
    assert image.GetSize() == grid.size and image.GetDirection() == grid.direction
    back = Volume.from_sitk(image)
    assert back.grid == grid
    np.testing.assert_array_equal(back.array, volume.array)
    for index in [(0, 0, 0), (3, 2, 1), (1.5, 0.25, 0.5)]:
        np.testing.assert_allclose(
            grid.index_to_physical([index])[0], image.TransformContinuousIndexToPhysicalPoint(index)
        )
        np.testing.assert_allclose(grid.physical_to_index(grid.index_to_physical([index]))[0], index, atol=1e-12)


def test_resample_refuses_bad_input() -> None:
    volume = Volume(np.zeros((2, 2, 2), np.float32), Grid((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY))
    with pytest.raises(ValueError, match="interpolation"):
        resample(volume, volume.grid, "cubic")  # type: ignore[arg-type]
    flat = Grid((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="singular"):
        resample(volume, flat)
    with pytest.raises(ValueError, match="does not match"):
        Volume(np.zeros((2, 2, 3), np.float32), volume.grid)


def test_default_patch_spec_grid_is_the_cube() -> None:
    grid = patch_grid((10.0, -5.0, 3.0))
    assert grid.size == (DEFAULT_PATCH_SPEC.size,) * 3 and grid.direction == IDENTITY
    centre = grid.index_to_physical([np.full(3, (DEFAULT_PATCH_SPEC.size - 1) / 2.0)])[0]
    np.testing.assert_allclose(centre, (10.0, -5.0, 3.0))


def test_float3_and_int3_take_any_three_numbers_and_name_a_wrong_count() -> None:
    assert float3(np.array([1, 2.5, -3])) == (1.0, 2.5, -3.0)
    assert int3([4.0, 5, np.int64(6)]) == (4, 5, 6)
    with pytest.raises(ValueError, match="expected three values, got 2"):
        float3([1.0, 2.0])
    with pytest.raises(ValueError, match="expected three values, got 4"):
        int3(range(4))

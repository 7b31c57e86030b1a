"""Images as numpy arrays with their patient geometry, and resampling from one grid onto another.

The default ``nodule-edge infer`` path (DICOM study → patch → engine → outputs) runs on these and
imports no SimpleITK (README, Performance: importing it maps about 90 MB of shared libraries, a
third of the run's peak memory). The conventions are SimpleITK's, so that the numbers are the same:

* a :class:`Grid` has ``size``, ``spacing_mm`` and ``origin`` in (x, y, z) order and a 3×3
  ``direction`` flattened row-major whose columns are the column-, row- and slice-index
  directions in LPS; voxel index ``i`` (x, y, z) lies at ``origin + direction @ (spacing * i)``;
* a :class:`Volume` holds its voxels as ``array[z, y, x]`` (``sitk.GetArrayFromImage``'s order);
* :func:`resample` is ``sitk.Resample(image, reference, identity, interpolator, default)`` with
  float32 output: a point whose continuous index lies in ``[-0.5, size - 0.5)`` along every axis
  is inside and interpolated with the edge voxels repeated, any other point takes the default;
  linear interpolation runs in float64, as ITK's does. tests/test_volume.py compares it with
  SimpleITK on random oblique, anisotropic and flipped grids.

B-spline interpolation (a :class:`~nodule_edge.patch.PatchSpec` option, not the shipped one)
still goes through SimpleITK, imported then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

__all__ = ["Grid", "Interpolation", "Volume", "float3", "int3", "resample"]

Interpolation = Literal["linear", "bspline", "nearest"]

# Output slices resampled per step: bounds the float64 temporaries (about 15 arrays of this many
# points) to a few MB whatever the grid's size.
_POINTS_PER_STEP = 1 << 16


_T = TypeVar("_T")


def _three(values: Any, cast: Callable[[Any], _T]) -> tuple[_T, _T, _T]:
    items = [cast(v) for v in values]
    if len(items) != 3:
        raise ValueError(f"expected three values, got {len(items)}: {items}")
    return (items[0], items[1], items[2])


def float3(values: Any) -> tuple[float, float, float]:
    """Three floats from any sequence or array of three numbers (a spacing, an origin).

    Raises:
        ValueError: Not exactly three values.
    """
    return _three(values, float)


def int3(values: Any) -> tuple[int, int, int]:
    """Three ints from any sequence or array of three integers (a size, a voxel index).

    Raises:
        ValueError: Not exactly three values.
    """
    return _three(values, int)


@dataclass(frozen=True)
class Grid:
    """A voxel grid in patient space, without pixels.

    Example:
        >>> from nodule_edge.volume import Grid
        >>> grid = Grid((4, 4, 2), (0.5, 0.5, 2.0), (-10.0, 0.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        >>> grid.index_to_physical([(1, 2, 1)]).tolist()
        [[-9.5, 1.0, 32.0]]

    Attributes:
        size: Voxels (columns, rows, slices).
        spacing_mm: (x, y, z) spacing in mm.
        origin: LPS position of voxel (0, 0, 0) in mm.
        direction: 3×3 direction matrix flattened row-major (SimpleITK's convention; the columns
            are the column-index, row-index and slice directions).
    """

    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid's array shape ``(z, y, x)``."""
        x, y, z = (int(v) for v in self.size)
        return (z, y, x)

    def index_matrix(self) -> np.ndarray:
        """The 3×3 matrix taking an index (x, y, z) to an LPS offset from the origin: direction × spacing."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing_mm, np.float64)

    def index_to_physical(self, index: Any) -> np.ndarray:
        """LPS positions ``[n, 3]`` (mm) of continuous indices ``[n, 3]`` (x, y, z)."""
        idx = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        return np.asarray(self.origin, dtype=np.float64) + idx @ self.index_matrix().T

    def physical_to_index(self, points: Any) -> np.ndarray:
        """Continuous indices ``[n, 3]`` (x, y, z) of LPS positions ``[n, 3]`` (mm)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return (p - np.asarray(self.origin, dtype=np.float64)) @ np.linalg.inv(self.index_matrix()).T

    def to_image(self, pixel_id: int | None = None) -> Any:
        """An empty (zero) SimpleITK image on this grid (imports SimpleITK; ``sitkUInt8`` by default)."""
        from nodule_edge._sitk import simpleitk

        sitk = simpleitk()
        image = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8 if pixel_id is None else pixel_id)
        self.apply_to(image)
        return image

    def apply_to(self, image: Any) -> None:
        """Stamp origin, spacing and direction onto a SimpleITK image of this grid's size."""
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing_mm))
        image.SetDirection(tuple(float(v) for v in self.direction))


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels ``array[z, y, x]`` on a :class:`Grid`: what SimpleITK calls an image.

    Example:
        >>> import numpy as np
        >>> from nodule_edge.volume import Grid, Volume
        >>> grid = Grid((4, 3, 2), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        >>> Volume(np.zeros((2, 3, 4), np.float32), grid).size
        (4, 3, 2)

    Attributes:
        array: The voxels, ``[z, y, x]``.
        grid: Where they are.
    """

    array: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if self.array.shape != self.grid.shape:
            raise ValueError(f"array shape {self.array.shape} does not match the grid's (z, y, x) {self.grid.shape}")

    @property
    def size(self) -> tuple[int, int, int]:
        """Voxels (columns, rows, slices)."""
        return self.grid.size

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """(x, y, z) spacing in mm."""
        return self.grid.spacing_mm

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS position of voxel (0, 0, 0) in mm."""
        return self.grid.origin

    @property
    def direction(self) -> tuple[float, ...]:
        """3×3 direction matrix flattened row-major."""
        return self.grid.direction

    @classmethod
    def from_sitk(cls, image: Any) -> Volume:
        """A copy of a 3-D scalar SimpleITK image's voxels and geometry."""
        import SimpleITK as sitk  # the caller holds a SimpleITK image: the library is loaded

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"expected a 3-D scalar image, got {image.GetDimension()}-D with "
                f"{image.GetNumberOfComponentsPerPixel()} components"
            )
        grid = Grid(
            size=int3(image.GetSize()),
            spacing_mm=float3(image.GetSpacing()),
            origin=float3(image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )
        return cls(sitk.GetArrayFromImage(image), grid)

    def to_sitk(self) -> Any:
        """This volume as a SimpleITK image (imports SimpleITK; the voxels are copied)."""
        from nodule_edge._sitk import simpleitk

        image = simpleitk().GetImageFromArray(np.ascontiguousarray(self.array))
        self.grid.apply_to(image)
        return image


def as_volume(image: Volume | Any) -> Volume:
    """``image`` itself, or a copy of a SimpleITK image as a :class:`Volume`."""
    return image if isinstance(image, Volume) else Volume.from_sitk(image)


def _continuous_index(source: Grid, grid: Grid, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Continuous index in ``source`` (float64 ``[3, *broadcast(j, k), nx]``, x y z) of ``grid``'s rows ``(j, k)``.

    Computed as ITK's ResampleImageFilter does for an identity transform, operation for
    operation, so that points on a half-voxel border fall on the same side: the physical points of
    each row's first voxel and of one voxel past its last (``origin + Σ_j M[i, j] · index[j]``),
    their continuous indices (``inverse(direction × spacing) @ (point − origin)``), and each voxel
    of the row at ``start + α · (end − start)`` with ``α = x / nx`` (ITK 5.4's
    ``LinearThreadedGenerateData``).
    """
    nx = int(grid.size[0])
    out_matrix = grid.index_matrix()
    in_inverse = np.linalg.inv(source.index_matrix())
    j = np.asarray(j, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)

    def row_index(i: float) -> list[np.ndarray]:
        offset = []
        for a in range(3):
            p = float(grid.origin[a]) + out_matrix[a, 0] * i
            offset.append(((p + out_matrix[a, 1] * j) + out_matrix[a, 2] * k) - float(source.origin[a]))
        return [
            ((in_inverse[a, 0] * offset[0]) + in_inverse[a, 1] * offset[1]) + in_inverse[a, 2] * offset[2]
            for a in range(3)
        ]

    start, end = row_index(0.0), row_index(float(nx))
    alpha = np.arange(nx, dtype=np.float64) / float(nx)
    return np.stack([start[a][..., None] + alpha * (end[a] - start[a])[..., None] for a in range(3)])


def _axis_aligned(a: Grid, b: Grid) -> bool:
    """Whether both grids' directions are diagonal (axes along ±x, ±y, ±z, in that order).

    Then each continuous index depends on one output index only, exactly (the other terms are
    products with 0), and the interpolation can run axis by axis with the same operations.
    """
    return all(
        not np.any(np.asarray(g.direction, dtype=np.float64).reshape(3, 3)[~np.eye(3, dtype=bool)]) for g in (a, b)
    )


def _inside(index: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Whether each point lies in ``[-0.5, size - 0.5)`` along every axis (ITK's IsInsideBuffer; NaN is outside)."""
    inside = np.ones(index.shape[1:], dtype=bool)
    for a in range(3):
        inside &= (index[a] >= -0.5) & (index[a] < size[a] - 0.5)
    return inside


def _linear(flat: np.ndarray, index: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Trilinear values (float64) at continuous indices ``[3, n]`` that are inside, edge voxels repeated.

    As ITK's LinearInterpolateImageFunction: along each axis ``v0 + (v1 − v0) · t``, x first,
    then y, then z; a neighbour past the last voxel is the last voxel.
    """
    strides = (1, int(size[0]), int(size[0]) * int(size[1]))
    base = np.zeros(index.shape[1], dtype=np.int64)
    steps, weights = [], []
    for a in range(3):
        c = np.clip(index[a], 0.0, size[a] - 1.0)
        lo = np.floor(c)
        weights.append(c - lo)
        lo_i = lo.astype(np.int64)
        base += lo_i * strides[a]
        steps.append(np.where(lo_i + 1 < size[a], strides[a], 0))
    dx, dy, dz = steps
    tx, ty, tz = weights

    def lerp(v0: np.ndarray, v1: np.ndarray, t: np.ndarray) -> np.ndarray:
        return v0 + (v1 - v0) * t

    def plane(offset: np.ndarray) -> np.ndarray:
        at = base + offset
        v00 = lerp(flat[at].astype(np.float64), flat[at + dx].astype(np.float64), tx)
        v10 = lerp(flat[at + dy].astype(np.float64), flat[at + dy + dx].astype(np.float64), tx)
        return lerp(v00, v10, ty)

    return lerp(plane(np.zeros_like(base)), plane(dz), tz)


def _nearest(flat: np.ndarray, index: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-voxel values at continuous indices ``[3, n]`` that are inside (ITK rounds half up)."""
    strides = (1, int(size[0]), int(size[0]) * int(size[1]))
    at = np.zeros(index.shape[1], dtype=np.int64)
    for a in range(3):
        at += np.clip(np.floor(index[a] + 0.5), 0, size[a] - 1).astype(np.int64) * strides[a]
    return flat[at].astype(np.float64)


def _bspline(volume: Volume, grid: Grid, default_value: float) -> np.ndarray:
    """Cubic B-spline resampling through SimpleITK (its prefiltered interpolator; not reimplemented here)."""
    from nodule_edge._sitk import simpleitk

    sitk = simpleitk()
    image = Volume(np.asarray(volume.array, dtype=np.float32), volume.grid).to_sitk()
    out = sitk.Resample(
        image,
        grid.to_image(sitk.sitkFloat32),
        sitk.Transform(),
        sitk.sitkBSpline,
        float(default_value),
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def _separable(volume: Volume, grid: Grid, interpolation: Interpolation, default_value: float) -> np.ndarray:
    """:func:`resample` for axis-aligned grids (:func:`_axis_aligned`), one axis after the other.

    The same values as the point-by-point path: linear interpolation of every output point still
    runs x, then y, then z on the same neighbours, only each partial result is shared by the
    points that need it.
    """
    nz, ny, nx = grid.shape
    zero = np.zeros(1)
    per_axis = (
        _continuous_index(volume.grid, grid, zero, zero)[0, 0],  # x along a row
        _continuous_index(volume.grid, grid, np.arange(ny), zero)[1, :, 0],  # y at x = 0, z = 0
        _continuous_index(volume.grid, grid, zero, np.arange(nz))[2, :, 0],  # z at x = 0, y = 0
    )
    size = [int(v) for v in volume.size]
    inside = [(c >= -0.5) & (c < n - 0.5) for c, n in zip(per_axis, size, strict=True)]
    values = np.asarray(volume.array)
    if interpolation == "nearest":
        nearest = [np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.intp) for c, n in zip(per_axis, size, strict=True)]
        result = values[np.ix_(nearest[2], nearest[1], nearest[0])].astype(np.float64)
    else:
        result = values.astype(np.float64)  # [z, y, x] of the source
        for axis, c, n in ((2, per_axis[0], size[0]), (1, per_axis[1], size[1]), (0, per_axis[2], size[2])):
            clamped = np.clip(c, 0.0, n - 1.0)
            lo = np.floor(clamped)
            t = clamped - lo
            lo_i = lo.astype(np.intp)
            hi_i = np.minimum(lo_i + 1, n - 1)
            shape = [1, 1, 1]
            shape[axis] = len(c)
            v0, v1 = np.take(result, lo_i, axis=axis), np.take(result, hi_i, axis=axis)
            result = v0 + (v1 - v0) * t.reshape(shape)
    keep = inside[2][:, None, None] & inside[1][None, :, None] & inside[0][None, None, :]
    return np.where(keep, result, default_value).astype(np.float32)


def resample(
    volume: Volume, grid: Grid, interpolation: Interpolation = "linear", default_value: float = 0.0
) -> np.ndarray:
    """Resample a volume onto another grid (SimpleITK's ``Resample`` with an identity transform).

    Args:
        volume: The source voxels and geometry (any orientation and spacing).
        grid: The grid to fill.
        interpolation: ``"linear"`` (trilinear), ``"nearest"``, or ``"bspline"`` (cubic, through
            SimpleITK).
        default_value: Value of the points outside the source volume.

    Returns:
        float32 ``[z, y, x]`` on ``grid``.

    Raises:
        ValueError: Unknown interpolation, or a grid with a singular direction or zero spacing.
    """
    if interpolation == "bspline":
        return _bspline(volume, grid, default_value)
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear', 'nearest' or 'bspline', got {interpolation!r}")
    for g in (volume.grid, grid):
        if not np.isfinite(g.index_matrix()).all() or np.linalg.det(g.index_matrix()) == 0.0:
            raise ValueError(f"grid with spacing {g.spacing_mm} and direction {g.direction} is singular")
    nz, ny, nx = grid.shape
    if volume.array.size == 0 or nz * ny * nx == 0:
        return np.full((nz, ny, nx), default_value, dtype=np.float32)
    if _axis_aligned(volume.grid, grid):
        return _separable(volume, grid, interpolation, default_value)
    size = [int(v) for v in volume.size]
    flat = np.ascontiguousarray(volume.array).reshape(-1)
    out = np.empty((nz, ny, nx), dtype=np.float32)
    step = max(1, _POINTS_PER_STEP // (nx * ny))
    evaluate = _linear if interpolation == "linear" else _nearest
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        index = _continuous_index(volume.grid, grid, np.arange(ny)[None, :], np.arange(z0, z1)[:, None])
        index = index.reshape(3, -1)
        inside = _inside(index, size)
        values = np.full(inside.shape, default_value, dtype=np.float64)
        if inside.any():
            values[inside] = evaluate(flat, index[:, inside], size)
        out[z0:z1] = values.reshape(z1 - z0, ny, nx)
    return out

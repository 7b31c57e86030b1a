"""Outputs: NIfTI maps land where the nodule is in a viewer (LPS/RAS), atomic writing."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from nodule_edge.errors import OutputError
from nodule_edge.patch import DEFAULT_PATCH_SPEC, patch_grid
from nodule_edge.runtime.nifti import write_nifti
from nodule_edge.runtime.outputs import check_output_dir, patch_to_study_grid
from nodule_edge.volume import Volume


class _Grid:
    """A study geometry; ``study()`` makes a real in-memory Study on it."""

    def __init__(self, size, spacing, origin, direction):
        self.size, self.spacing_mm, self.origin, self.direction = (
            size,
            spacing,
            origin,
            np.asarray(direction, float).reshape(3, 3),
        )

    def study(self):
        from nodule_edge.runtime.study import study_from_image

        image = sitk.Image(list(self.size), sitk.sitkFloat32)
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return study_from_image(image)


def _nifti_affine_and_data(path):
    """Parse a NIfTI-1 file by hand (sform), independent of SimpleITK's reader."""
    raw = gzip.decompress(path.read_bytes())
    dims = struct.unpack("<8h", raw[40:56])
    datatype = struct.unpack("<h", raw[70:72])[0]
    vox_offset = int(struct.unpack("<f", raw[108:112])[0])
    srow = np.array(struct.unpack("<12f", raw[280:328]), dtype=np.float64).reshape(3, 4)
    dtype = {2: np.uint8, 16: np.float32}[datatype]
    shape = dims[1 : dims[0] + 1]
    data = np.frombuffer(raw[vox_offset:], dtype=dtype, count=int(np.prod(shape))).reshape(shape[::-1])  # [z, y, x]
    return srow, data


GRIDS = {
    "axial_identity": _Grid((80, 80, 40), (0.7, 0.7, 1.25), (-30.0, 10.0, -60.0), np.eye(3)),
    # Rows running right→left and slices descending, as some scanners and NIfTI files store them.
    "flipped_axes": _Grid((80, 80, 40), (0.7, 0.7, 1.25), (25.0, 60.0, -10.0), np.diag([-1.0, -1.0, -1.0])),
}


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_segmentation_lands_at_its_lps_position(tmp_path, grid_name):
    grid = GRIDS[grid_name]
    direction = grid.direction
    centre_index = np.array([40, 40, 20])
    centre_lps = np.asarray(grid.origin) + direction @ (centre_index * np.asarray(grid.spacing_mm))
    # A sphere offset from the patch centre by (+5 L, -3 P, +4 S) mm.
    offset = np.array([5.0, -3.0, 4.0])
    z, y, x = np.mgrid[:64, :64, :64]
    coords = (np.stack([x, y, z], -1) - 31.5) * DEFAULT_PATCH_SPEC.spacing_mm  # LPS offsets from centre
    sphere = (np.linalg.norm(coords - offset, axis=-1) < 3.0).astype(np.float32)

    image = patch_to_study_grid(sphere, centre_lps, DEFAULT_PATCH_SPEC, grid.study())
    out = tmp_path / "seg.nii.gz"
    write_nifti(Volume((image.array > 0.5).astype(np.uint8), image.grid), out)

    srow, data = _nifti_affine_and_data(out)
    idx = np.argwhere(data > 0).mean(0)[::-1]  # (i, j, k)
    ras = srow[:, :3] @ idx + srow[:, 3]
    lps = ras * np.array([-1, -1, 1])  # NIfTI is RAS; DICOM/ITK world is LPS
    np.testing.assert_allclose(lps, centre_lps + offset, atol=0.5)
    # SimpleITK reads the same geometry and voxels back.
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), data)
    np.testing.assert_allclose(back.GetOrigin(), image.origin, atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.direction, atol=1e-6)


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_patch_to_study_grid_equals_simpleitk_resample(grid_name):
    """The maps land on the study's lattice exactly as SimpleITK's Resample put them before."""
    grid = GRIDS[grid_name]
    rng = np.random.default_rng(3)
    volume = rng.random((64, 64, 64), dtype=np.float32)
    centre = np.asarray(grid.origin) + grid.direction @ (np.array([40.3, 38.9, 20.2]) * np.asarray(grid.spacing_mm))
    study = grid.study()
    for full_grid in (False, True):
        ours = patch_to_study_grid(volume, centre, DEFAULT_PATCH_SPEC, study, full_grid)
        src = sitk.GetImageFromArray(volume)
        src.CopyInformation(patch_grid(centre, DEFAULT_PATCH_SPEC).to_image())
        reference = study.reference_geometry(None if full_grid else centre).to_image(sitk.sitkFloat32)
        theirs = sitk.Resample(src, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(theirs))


def test_full_grid_has_the_study_size():
    grid = GRIDS["axial_identity"]
    image = patch_to_study_grid(
        np.zeros((64, 64, 64), np.float32), (-2.0, 38.0, -35.0), DEFAULT_PATCH_SPEC, grid.study(), full_grid=True
    )
    assert image.size == grid.size
    assert image.origin == pytest.approx(grid.origin)


def test_check_output_dir(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        check_output_dir(tmp_path / "full", overwrite=False)
    check_output_dir(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir(tmp_path / "file", overwrite=False)
    # Missing parents are fine (created at write time, like mkdir -p); a file in the way is not.
    check_output_dir(tmp_path / "missing" / "deeper" / "out", overwrite=False)
    assert not (tmp_path / "missing").exists(), "checking creates nothing"
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_dir(tmp_path / "file" / "sub" / "out", overwrite=False)

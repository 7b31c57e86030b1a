"""The NIfTI writer (nodule_edge.runtime.nifti) against SimpleITK's WriteImage, which it replaces."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from nodule_edge.runtime.nifti import write_nifti
from nodule_edge.volume import Grid, Volume

# Byte ranges of the header's float fields (pixdim, quatern/qoffset, srow): compared to float32
# precision; everything else byte for byte.
_FLOAT_FIELDS = [(76, 108), (256, 328)]


def _random_image(rng: np.random.Generator, dtype: type) -> sitk.Image:
    kind = rng.integers(3)
    if kind == 0:
        direction = np.diag(rng.choice([-1.0, 1.0], 3))
    elif kind == 1:
        direction = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    else:
        direction, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    size = tuple(int(v) for v in rng.integers(1, 9, 3))
    image = sitk.GetImageFromArray((rng.random(size[::-1]) * 100).astype(dtype))
    image.SetSpacing(tuple(float(v) for v in rng.uniform(0.3, 3.0, 3)))
    image.SetOrigin(tuple(float(v) for v in rng.uniform(-100, 100, 3)))
    image.SetDirection(tuple(direction.ravel()))
    return image


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_header_and_voxels_match_simpleitks_writer(tmp_path, dtype) -> None:
    rng = np.random.default_rng(14)
    for k in range(30):
        image = _random_image(rng, dtype)
        theirs, ours = tmp_path / f"sitk{k}.nii.gz", tmp_path / f"ours{k}.nii.gz"
        sitk.WriteImage(image, str(theirs), useCompression=True)
        write_nifti(Volume.from_sitk(image), ours)
        a, b = gzip.decompress(theirs.read_bytes()), gzip.decompress(ours.read_bytes())
        assert len(a) == len(b) and a[352:] == b[352:]
        masked_a, masked_b = bytearray(a[:352]), bytearray(b[:352])
        for lo, hi in _FLOAT_FIELDS:
            fa = np.frombuffer(a[lo:hi], "<f4")
            fb = np.frombuffer(b[lo:hi], "<f4")
            np.testing.assert_allclose(fb, fa, rtol=1e-6, atol=1e-6)
            masked_a[lo:hi] = masked_b[lo:hi] = bytes(hi - lo)
        assert masked_a == masked_b
        back = sitk.ReadImage(str(ours))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
        np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)


def test_uncompressed_file_and_refused_type(tmp_path) -> None:
    image = _random_image(np.random.default_rng(0), np.float32)
    write_nifti(Volume.from_sitk(image), tmp_path / "plain.nii")
    raw = (tmp_path / "plain.nii").read_bytes()
    assert struct.unpack("<i", raw[:4])[0] == 348 and raw[344:348] == b"n+1\0"
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain.nii"))), sitk.GetArrayFromImage(image)
    )
    grid = Grid((1, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="float64"):
        write_nifti(Volume(np.zeros((1, 1, 1)), grid), tmp_path / "x.nii")

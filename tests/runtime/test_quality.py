"""Quality flags: each check on a constructed case where the answer is known, and on real series."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nodule_edge.errors import BundleError
from nodule_edge.patch import DEFAULT_PATCH_SPEC as SPEC
from nodule_edge.runtime.quality import (
    FLAG_CODES,
    TrainingRanges,
    nodule_flags,
    study_flags,
    training_ranges_from_voi_dir,
)

RANGES = TrainingRanges(
    source="test",
    in_plane_spacing_mm=(0.46, 0.98),
    slice_spacing_mm=(0.45, 2.5),
    nodule_volume_mm3=(29.0, 14800.0),
    lung_hu_p1=(-1180.0, -744.0),
    center_to_mask_mm=(0.07, 1.3),
)


def _study(**changes):
    base = dict(
        kind="dicom",
        spacing_mm=(0.7, 0.7, 1.25),
        slice_thickness_mm=1.25,
        geometry_notes=(),
        modality="CT",
        contrast_agent=None,
        outside=0.0,
    )
    base.update(changes)
    outside = base.pop("outside")
    return SimpleNamespace(**base, fraction_outside=lambda points: outside)


def _codes(flags):
    return [f.code for f in flags]


def test_ranges_round_trip_and_refuse_a_malformed_section():
    assert TrainingRanges.from_json(RANGES.to_json()) == RANGES
    assert TrainingRanges.from_json(None) is None
    bad = RANGES.to_json()
    bad["slice_spacing_mm"] = ["a"]
    with pytest.raises(BundleError, match="training_data"):
        TrainingRanges.from_json(bad)


def test_a_series_like_the_training_data_has_no_flags():
    assert study_flags(_study(), RANGES) == []


@pytest.mark.parametrize(
    ("changes", "code", "value"),
    [
        ({"spacing_mm": (0.7, 0.7, 5.0)}, "slice_spacing_outside_training", 5.0),
        ({"spacing_mm": (0.7, 0.7, 0.3)}, "slice_spacing_outside_training", 0.3),
        ({"slice_thickness_mm": 8.0}, "slice_thickness_outside_training", 8.0),
        ({"spacing_mm": (1.2, 1.2, 1.25)}, "in_plane_spacing_outside_training", 1.2),
        ({"geometry_notes": ("a gap of 2 slices",)}, "irregular_slice_geometry", 1),
        ({"modality": None}, "modality_missing", None),
        ({"contrast_agent": "OMNIPAQUE"}, "contrast_agent", "OMNIPAQUE"),
    ],
)
def test_each_series_check(changes, code, value):
    (flag,) = study_flags(_study(**changes), RANGES)
    assert flag.code == code and flag.value == value and flag.message
    assert code in FLAG_CODES


def test_spacing_checks_need_the_bundles_ranges_the_others_do_not():
    assert study_flags(_study(spacing_mm=(0.7, 0.7, 5.0)), None) == []
    assert _codes(study_flags(_study(contrast_agent="YES"), None)) == ["contrast_agent"]
    # A DICOM rounding of the range's edge is inside (2 % tolerance).
    assert study_flags(_study(spacing_mm=(0.7, 0.7, 2.52)), RANGES) == []


def _cube(hu: float = -850.0, nodule_hu: float = 40.0, radius_mm: float = 5.0, centre_vox=(31.5, 31.5, 31.5)):
    """A whole-cube patch (two windows) and segmentation with a sphere at ``centre_vox``."""
    idx = np.indices((SPEC.size,) * 3).astype(np.float64)
    d = np.sqrt(sum((idx[a] - centre_vox[a]) ** 2 for a in range(3))) * SPEC.spacing_mm
    inside = d <= radius_mm
    hu_vol = np.where(inside, nodule_hu, hu)
    rng = np.random.default_rng(0)
    hu_vol = hu_vol + rng.normal(0, 60, hu_vol.shape)
    channels = [np.clip((hu_vol - lo) / (hi - lo), 0, 1) for lo, hi in SPEC.windows]
    patch = np.stack(channels).astype(np.float32)
    seg = np.where(inside, 0.95, 0.02).astype(np.float32)
    return patch, seg, float(inside.sum()) * SPEC.spacing_mm**3


def _nodule_flags(patch, seg, volume, study=None, found=True, trustworthy=True, ranges=RANGES):
    return nodule_flags(study or _study(), (0.0, 0.0, 0.0), patch, seg, volume, found, trustworthy, SPEC, ranges)


def test_a_nodule_in_lung_at_the_point_has_no_flags():
    patch, seg, volume = _cube()
    assert _nodule_flags(patch, seg, volume) == []


def test_empty_or_tiny_segmentation_is_no_nodule_found():
    patch, seg, _ = _cube()
    assert "no_nodule_found" in _codes(_nodule_flags(patch, np.zeros_like(seg), 0.0, found=False))
    small_patch, small_seg, small_volume = _cube(radius_mm=1.0)
    flags = _nodule_flags(small_patch, small_seg, small_volume)
    assert _codes(flags) == ["no_nodule_found"] and flags[0].value == pytest.approx(small_volume)


def test_a_finding_beside_the_point_is_no_nodule_at_point():
    patch, seg, volume = _cube(radius_mm=3.0, centre_vox=(31.5, 31.5, 45.5))  # 7 mm away, 4 mm gap
    flags = _nodule_flags(patch, seg, volume)
    assert _codes(flags) == ["no_nodule_at_point"]
    assert flags[0].value == pytest.approx(4.0, abs=0.6)


def test_a_finding_larger_than_the_cube_reaches_its_faces():
    patch, seg, volume = _cube(radius_mm=18.0)
    flags = _nodule_flags(patch, seg, volume)
    assert "nodule_exceeds_cube" in _codes(flags)
    assert 0 < next(f.value for f in flags if f.code == "nodule_exceeds_cube") <= 1


def test_volume_above_every_training_nodule():
    patch, seg, volume = _cube(radius_mm=12.0)
    ranges = TrainingRanges(**{**RANGES.__dict__, "nodule_volume_mm3": (29.0, 5000.0)})
    assert _codes(_nodule_flags(patch, seg, volume, ranges=ranges)) == ["nodule_volume_outside_training"]


def test_no_aerated_lung_in_the_cube():
    patch, seg, volume = _cube(hu=30.0, nodule_hu=60.0)  # soft tissue all around
    flags = _nodule_flags(patch, seg, volume)
    assert _codes(flags) == ["lung_hu_outside_training"] and flags[0].value > -744


def test_cube_outside_scan_and_attention_off_nodule():
    patch, seg, volume = _cube()
    flags = _nodule_flags(patch, seg, volume, study=_study(outside=0.25), trustworthy=False)
    assert _codes(flags) == ["cube_outside_scan", "attention_off_nodule"]
    assert flags[0].value == 0.25


def test_real_study_fraction_outside(dicom_dir):
    from nodule_edge.runtime import open_study

    study = open_study(dicom_dir / "chest_ricord_jpeg_lossless")
    centre = study.voxel_to_world((256, 256, 128))
    corner = study.voxel_to_world((0, 0, 0))
    from nodule_edge.runtime.quality import _cube_points

    assert study.fraction_outside(_cube_points(centre, SPEC)) == 0.0
    # At a corner voxel, seven of the eight octants of the cube lie outside.
    assert study.fraction_outside(_cube_points(corner, SPEC)) == pytest.approx(7 / 8, abs=0.05)


def test_training_ranges_of_a_voi_folder(synthetic_voi_dir):
    ranges = training_ranges_from_voi_dir(synthetic_voi_dir)
    # make_voi_dir: 0.8 x 0.8 x 2.0 mm voxels, spheres of radius 6 and 3 mm centred on a voxel.
    assert ranges.in_plane_spacing_mm == pytest.approx((0.8, 0.8))
    assert ranges.slice_spacing_mm == pytest.approx((2.0, 2.0))
    lo, hi = ranges.nodule_volume_mm3
    assert lo == pytest.approx(4 / 3 * np.pi * 27, rel=0.35) and hi == pytest.approx(4 / 3 * np.pi * 216, rel=0.2)
    assert ranges.center_to_mask_mm == pytest.approx((0.0, 0.0), abs=1e-3)
    assert ranges.lung_hu_p1[1] < -800
    assert ranges.source.endswith("6 nodules")


@pytest.fixture(scope="module")
def shipped_inferer():
    from nodule_edge.runtime import NoduleInferer

    return NoduleInferer(backend="cpu", top_k=0, threads=2)


def test_shipped_bundle_records_the_training_ranges(shipped_inferer):
    ranges = shipped_inferer.training_ranges
    assert ranges is not None and ranges.source == "lidc_voi: 679 nodules"
    assert ranges.slice_spacing_mm[1] == pytest.approx(2.5) and ranges.in_plane_spacing_mm[1] < 1.0


def test_real_series_flags_with_the_shipped_bundle(shipped_inferer, dicom_dir):
    """The 3 mm contrast Siemens series is flagged as such; a point in aerated lung with no nodule
    is flagged as not a nodule, and the flags leave the prediction as it was."""
    siemens = shipped_inferer.infer(dicom_dir / "siemens_j2k_20_slices", voxels=[(256, 256, 10)])
    codes = [f.code for f in siemens.quality_flags]
    assert codes == ["slice_thickness_outside_training", "contrast_agent"]
    assert siemens.quality_flags[0].value == 3.0 and siemens.quality_flags[1].value == "APPLIED"

    chest = shipped_inferer.infer(dicom_dir / "chest_ricord_jpeg_lossless", voxels=[(150, 220, 128)])
    assert chest.quality_flags == []
    nodule = chest.nodules[0]
    assert "no_nodule_at_point" in [f.code for f in nodule.quality_flags]
    raw = shipped_inferer.predict_patches(nodule.patch[None])[0]
    assert raw.malignancy_probability == pytest.approx(nodule.malignancy_probability, abs=1e-6)

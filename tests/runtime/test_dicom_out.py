"""DICOM SEG + TID 1500 SR output (``infer --dicom-out``).

A synthetic CT series (tests.runtime.dicom_factory, 64×64×40) is opened with the real study
reader; a fake :class:`StudyResult` carries an ellipsoid segmentation with different semi-axes
along L, P and S on the 64³ patch grid, so an axis swap or a wrong slice mapping moves or
reshapes the segmented voxels. The written files are checked with pydicom alone: segmented pixels
are mapped to LPS through the SEG's own plane geometry and compared with the ellipsoid.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import MissingDependencyError, OutputError
from nodule_edge.patch import DEFAULT_PATCH_SPEC
from nodule_edge.runtime.inferer import NodulePrediction, NoduleResult, StudyResult
from nodule_edge.runtime.measure import segmentation_measurements
from nodule_edge.runtime.study import open_study
from tests.runtime.dicom_factory import PATIENT_ID, PATIENT_NAME, SyntheticSeries, write_series

needs_highdicom = pytest.mark.skipif(
    importlib.util.find_spec("highdicom") is None,
    reason="highdicom not installed (pip install 'nodule-edge[dicom-out]')",
)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SPEC = DEFAULT_PATCH_SPEC
ROTATED = (math.cos(0.5), math.sin(0.5), 0.0, -math.sin(0.5), math.cos(0.5), 0.0)


# ------------------------------------------------------------------------------ fixtures
def ellipsoid(semi_axes_lps_mm: tuple[float, float, float]) -> np.ndarray:
    """Probabilities on the patch grid ``[z(S), y(P), x(L)]``: 0.9 inside, 0.1 outside."""
    c = (np.arange(SPEC.size) - (SPEC.size / 2 - 0.5)) * SPEC.spacing_mm
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    ax, ay, az = semi_axes_lps_mm
    inside = (x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2 <= 1.0
    return np.where(inside, 0.9, 0.1).astype(np.float32)


def nodule(
    study: Any, xyz: tuple[float, float, float], segmentation: np.ndarray, probability: float = 0.73
) -> NoduleResult:
    attributes = {name: 1.25 + 0.5 * i for i, name in enumerate(ATTRIBUTE_NAMES)}
    prediction = NodulePrediction(
        malignancy_probability=probability,
        attributes=attributes,
        nodule_attention=0.62,
        background_attention=0.21,
        trustworthy=True,
        embedding=np.zeros(8, np.float32),
        segmentation=segmentation,
        saliency=np.zeros_like(segmentation),
    )
    m = segmentation_measurements(segmentation, SPEC.spacing_mm)
    return NoduleResult(
        xyz_voxel=xyz,
        world_lps_mm=tuple(float(v) for v in study.voxel_to_world(xyz)),  # type: ignore[arg-type]
        center_slice=None,
        prediction=prediction,
        patch=np.zeros((SPEC.channels, SPEC.size, SPEC.size, SPEC.size), np.float32),
        volume_mm3=m["volume_mm3"],
        longest_axial_diameter_mm=m["longest_axial_diameter_mm"],
    )


def result_for(study: Any, nodules: list[NoduleResult]) -> StudyResult:
    return StudyResult(study=study, nodules=nodules, backend="cpu", model_version="test-model-1", timing_ms={})


@pytest.fixture
def series(tmp_path: Path) -> SyntheticSeries:
    return write_series(tmp_path / "series")


def write(tmp_path: Path, result: StudyResult) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    from nodule_edge.runtime.dicom_out import dicom_writer

    out = tmp_path / "out"
    out.mkdir()
    names = dicom_writer(SimpleNamespace(spec=SPEC))(out, result)
    assert names == ["nodule_seg.dcm", "nodule_sr.dcm"]
    return pydicom.dcmread(out / names[0]), pydicom.dcmread(out / names[1])


# ------------------------------------------------------------------------------- readers
def segment_of_frame(seg: pydicom.Dataset, i: int) -> int:
    item = seg.PerFrameFunctionalGroupsSequence[i]
    if "SegmentIdentificationSequence" not in item:
        item = seg.SharedFunctionalGroupsSequence[0]
    return int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def segmented_world_points(seg: pydicom.Dataset, segment: int) -> tuple[np.ndarray, list[str]]:
    """LPS mm of every segmented pixel of one segment, and the source SOP UIDs of its frames."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    points, sources = [], []
    for i, frame in enumerate(frames):
        if segment_of_frame(seg, i) != segment:
            continue
        item = seg.PerFrameFunctionalGroupsSequence[i]
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        sources.append(str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID))
        r, c = np.nonzero(frame)
        points.append(ipp + np.outer(c * dx, iop[:3]) + np.outer(r * dy, iop[3:]))
    return (np.concatenate(points) if points else np.zeros((0, 3))), sources


def content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(content_items(item))
    return out


def code(item: pydicom.Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodingSchemeDesignator), str(c.CodeValue)


def measurement_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    return [i for i in content_items(sr) if i.ValueType == "CONTAINER" and code(i) == ("DCM", "125007")]


def numbers(group: pydicom.Dataset) -> dict[tuple[str, str], tuple[float, str]]:
    out = {}
    for item in group.ContentSequence:
        if item.ValueType == "NUM":
            mv = item.MeasuredValueSequence[0]
            out[code(item)] = (float(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue))
    return out


# --------------------------------------------------------------------------------- tests
@needs_highdicom
@pytest.mark.parametrize("orientation", [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), ROTATED], ids=["axial", "rotated"])
def test_seg_puts_the_nodule_where_it_is(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    series = write_series(tmp_path / "series", orientation=orientation)
    study = open_study(series.folder)
    semi = (6.0, 4.0, 3.0)
    n = nodule(study, (38.0, 25.0, 21.0), ellipsoid(semi))
    seg, _ = write(tmp_path, result_for(study, [n]))

    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert seg.FrameOfReferenceUID == pydicom.dcmread(series.paths[0], stop_before_pixels=True).FrameOfReferenceUID
    segment = seg.SegmentSequence[0]
    assert (
        segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
    ) == ("27925004", "SCT")
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "nodule-edge" and algo.AlgorithmVersion == "test-model-1"
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"

    points, sources = segmented_world_points(seg, 1)
    # Every frame sits on a real source slice, at that slice's position.
    slice_of = {uid: k for k, uid in enumerate(series.sop_uids)}
    for i, uid in enumerate(sources):
        expected = series.voxel_to_world((0, 0, slice_of[uid]))
        ipp = np.asarray(seg.PerFrameFunctionalGroupsSequence[i].PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(ipp, expected, atol=1e-3)
    centre = np.asarray(n.world_lps_mm)
    np.testing.assert_allclose(points.mean(axis=0), centre, atol=0.4)
    extent = points.max(axis=0) - points.min(axis=0)
    # Voxel-centre extent of the sampled ellipsoid: the full axis minus up to one voxel.
    spacing_along_lps = np.abs(series.direction) @ np.asarray(series.spacing)
    assert np.all(extent <= 2 * np.asarray(semi) + 1e-6)
    assert np.all(extent >= 2 * np.asarray(semi) - 1.5 * spacing_along_lps)
    voxel_mm3 = float(np.prod(series.spacing))
    expected_volume = 4 / 3 * math.pi * np.prod(semi)
    assert len(points) * voxel_mm3 == pytest.approx(expected_volume, rel=0.1)


@needs_highdicom
def test_sr_carries_the_measurements_and_references_the_segment(tmp_path: Path, series: SyntheticSeries) -> None:
    study = open_study(series.folder)
    n = nodule(study, (32.0, 30.0, 20.0), ellipsoid((5.0, 5.0, 5.0)), probability=0.8125)
    seg, sr = write(tmp_path, result_for(study, [n]))

    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.VerificationFlag == "UNVERIFIED"
    observers = [i for i in content_items(sr) if code(i) == ("DCM", "121013")]  # Device Observer Name
    assert [str(i.TextValue) for i in observers] == ["nodule-edge"]
    schemes = {str(i.CodingSchemeDesignator) for i in sr.CodingSchemeIdentificationSequence}
    assert "99NODULEEDGE" in schemes

    (group,) = measurement_groups(sr)
    values = numbers(group)
    assert values[("SCT", "118565006")] == (pytest.approx(n.volume_mm3, rel=1e-6), "mm3")
    assert values[("SCT", "81827009")] == (pytest.approx(n.longest_axial_diameter_mm, rel=1e-6), "mm")
    assert values[("DCM", "111047")] == (pytest.approx(0.8125), "1")
    for name, rating in n.attributes.items():
        assert values[("99NODULEEDGE", name)] == (pytest.approx(rating), "{rating}")
    assert values[("99NODULEEDGE", "NODULE_ATTN")][0] == pytest.approx(0.62)
    trust = [i for i in group.ContentSequence if code(i) == ("99NODULEEDGE", "TRUSTWORTHY")]
    assert trust[0].ConceptCodeSequence[0].CodeValue == "373066001"  # Yes

    ref = [i for i in group.ContentSequence if i.ValueType == "IMAGE" and code(i) == ("DCM", "121191")][0]
    sop = ref.ReferencedSOPSequence[0]
    assert sop.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert sop.ReferencedSegmentNumber == 1
    tracking = [i for i in group.ContentSequence if code(i) == ("DCM", "112040")][0]  # Tracking Unique Identifier
    assert tracking.UID == seg.SegmentSequence[0].TrackingUID


@needs_highdicom
def test_sr_carries_the_series_and_nodule_quality_flags(tmp_path: Path, series: SyntheticSeries) -> None:
    from nodule_edge.runtime.quality import FLAG_CODES, QualityFlag

    study = open_study(series.folder)
    n = nodule(study, (32.0, 30.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))
    n.quality_flags = [QualityFlag("nodule_volume_outside_training", "too big", 99999.0)]
    result = result_for(study, [n])
    result.quality_flags = [QualityFlag("slice_thickness_outside_training", "thick", 5.0)]
    _, sr = write(tmp_path, result)
    (group,) = measurement_groups(sr)
    flags = [i for i in group.ContentSequence if code(i) == ("99NODULEEDGE", "QUALITY_FLAG")]
    values = [
        getattr(i.ConceptCodeSequence[0], "LongCodeValue", None) or i.ConceptCodeSequence[0].CodeValue for i in flags
    ]
    assert values == ["slice_thickness_outside_training", "nodule_volume_outside_training"]
    assert set(values) <= set(FLAG_CODES)


@needs_highdicom
@pytest.mark.parametrize("changes_class", [False, True])
def test_sr_carries_the_outline_term_in_natural_units(
    tmp_path: Path, series: SyntheticSeries, changes_class: bool
) -> None:
    study = open_study(series.folder)
    n = nodule(study, (32.0, 30.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))
    statistics = np.array([np.log(9.5), np.log(420.0), -85.0, 120.0, 40.0, 0.75, 0.6])
    n.prediction.outline_statistics, n.prediction.outline_logit = statistics, -0.375
    n.prediction.outline_changes_class = changes_class
    _, sr = write(tmp_path, result_for(study, [n]))
    (group,) = measurement_groups(sr)
    values = numbers(group)
    assert values[("99NODULEEDGE", "FERET_MM")] == (pytest.approx(9.5), "mm")
    assert values[("99NODULEEDGE", "VOLUME_MM3")] == (pytest.approx(420.0), "mm3")
    assert values[("99NODULEEDGE", "HU_MEAN")] == (pytest.approx(-85.0), "[hnsf'U]")
    assert values[("99NODULEEDGE", "SOLID_FRACTION")] == (pytest.approx(0.75), "1")
    assert values[("99NODULEEDGE", "OUTLINE_LOGIT")] == (pytest.approx(-0.375), "1")
    # The SEG's own volume stays the second pass's segmentation's, beside the outline's.
    assert values[("SCT", "118565006")][0] == pytest.approx(n.volume_mm3, rel=1e-6)
    (changed,) = [i for i in group.ContentSequence if code(i) == ("99NODULEEDGE", "OUTLINE_CLASS")]
    assert changed.ConceptCodeSequence[0].CodeValue == ("373066001" if changes_class else "373067005")


@needs_highdicom
def test_a_model_without_an_outline_term_writes_none_of_its_items(tmp_path: Path, series: SyntheticSeries) -> None:
    study = open_study(series.folder)
    _, sr = write(tmp_path, result_for(study, [nodule(study, (32.0, 30.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))]))
    (group,) = measurement_groups(sr)
    names = {code(i)[1] for i in group.ContentSequence}
    assert not names & {"FERET_MM", "VOLUME_MM3", "OUTLINE_LOGIT", "OUTLINE_CLASS"}


@needs_highdicom
def test_patient_and_study_come_from_the_source(
    tmp_path: Path, series: SyntheticSeries, caplog: pytest.LogCaptureFixture
) -> None:
    study = open_study(series.folder)
    source = pydicom.dcmread(series.paths[0], stop_before_pixels=True)
    with caplog.at_level(logging.DEBUG):
        seg, sr = write(tmp_path, result_for(study, [nodule(study, (32.0, 32.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))]))
    for ds in (seg, sr):
        assert ds.PatientName == PATIENT_NAME
        assert ds.PatientID == PATIENT_ID
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        # The synthetic source has no PatientBirthDate/PatientSex: present but empty (Type 2).
        assert "PatientBirthDate" in ds and not ds.PatientBirthDate
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


@needs_highdicom
def test_single_component_name_is_copied_but_never_warned_or_logged(
    tmp_path: Path, series: SyntheticSeries, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    # highdicom warns about such names and quotes them; the writer must keep that off stderr.
    name = "SYNTHONLYONECOMPONENT"
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = name
        ds.save_as(path)
    study = open_study(series.folder)
    with caplog.at_level(logging.DEBUG):
        seg, sr = write(tmp_path, result_for(study, [nodule(study, (32.0, 32.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))]))
    assert seg.PatientName == name and sr.PatientName == name
    assert name not in caplog.text
    assert not [w for w in recwarn if name in str(w.message)]


@needs_highdicom
def test_two_nodules_one_empty(tmp_path: Path, series: SyntheticSeries) -> None:
    study = open_study(series.folder)
    found = nodule(study, (30.0, 30.0, 14.0), ellipsoid((4.0, 4.0, 4.0)))
    empty = nodule(study, (34.0, 34.0, 26.0), np.zeros((SPEC.size,) * 3, np.float32))
    seg, sr = write(tmp_path, result_for(study, [found, empty]))

    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    first, _ = segmented_world_points(seg, 1)
    second, _ = segmented_world_points(seg, 2)
    assert len(first) > 0 and len(second) == 0
    np.testing.assert_allclose(first.mean(axis=0), found.world_lps_mm, atol=0.4)
    groups = measurement_groups(sr)
    assert len(groups) == 2
    assert numbers(groups[1])[("SCT", "118565006")][0] == 0.0
    refs = [[i for i in g.ContentSequence if code(i) == ("DCM", "121191")][0] for g in groups]
    assert [int(r.ReferencedSOPSequence[0].ReferencedSegmentNumber) for r in refs] == [1, 2]


@needs_highdicom
def test_all_empty_still_writes_a_valid_seg(tmp_path: Path, series: SyntheticSeries) -> None:
    study = open_study(series.folder)
    seg, sr = write(
        tmp_path, result_for(study, [nodule(study, (32.0, 32.0, 20.0), np.zeros((SPEC.size,) * 3, np.float32))])
    )
    assert int(seg.NumberOfFrames) >= 1
    assert not np.any(seg.pixel_array)
    assert len(measurement_groups(sr)) == 1


@needs_highdicom
def test_volume_study_is_refused(tmp_path: Path, series: SyntheticSeries) -> None:
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(series.image(), str(path))
    study = open_study(path)
    result = result_for(study, [nodule(study, (32.0, 32.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))])
    from nodule_edge.runtime.dicom_out import dicom_writer

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputError, match="--dicom-out needs a DICOM study"):
        dicom_writer(SimpleNamespace(spec=SPEC))(out, result)
    assert list(out.iterdir()) == []


@needs_highdicom
def test_write_outputs_runs_the_writer_atomically(tmp_path: Path, series: SyntheticSeries) -> None:
    from nodule_edge.runtime.dicom_out import dicom_writer
    from nodule_edge.runtime.outputs import write_outputs

    writer = dicom_writer(SimpleNamespace(spec=SPEC))
    study = open_study(series.folder)
    result = result_for(study, [nodule(study, (32.0, 32.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))])
    report = write_outputs(result, tmp_path / "ok", SPEC, extra_writers=[writer])
    assert report["dicom_outputs"] == ["nodule_seg.dcm", "nodule_sr.dcm"]
    assert (tmp_path / "ok" / "nodule_seg.dcm").is_file() and (tmp_path / "ok" / "nodule_sr.dcm").is_file()

    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(series.image(), str(path))
    vol = open_study(path)
    with pytest.raises(OutputError, match="needs a DICOM study"):
        write_outputs(
            result_for(vol, [nodule(vol, (32.0, 32.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))]),
            tmp_path / "bad",
            SPEC,
            extra_writers=[writer],
        )
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


@needs_highdicom
def test_source_without_frame_of_reference_is_refused(tmp_path: Path, series: SyntheticSeries) -> None:
    study = open_study(series.folder)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    with pytest.raises(OutputError, match="FrameOfReferenceUID"):
        write(tmp_path, result_for(study, [nodule(study, (32.0, 32.0, 20.0), ellipsoid((5.0, 5.0, 5.0)))]))


def test_missing_highdicom_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodule_edge.runtime.dicom_out import dicom_writer

    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(MissingDependencyError, match=r"nodule-edge\[dicom-out\]"):
        dicom_writer(SimpleNamespace(spec=SPEC))


@needs_highdicom
@pytest.mark.realdata
def test_real_jpeg_lossless_series(tmp_path: Path, dicom_dir: Path) -> None:
    folder = dicom_dir / "chest_ricord_jpeg_lossless"
    study = open_study(folder)
    xyz = ((study.size[0] - 1) / 2, (study.size[1] - 1) / 2, (study.size[2] - 1) / 2)
    n = nodule(study, xyz, ellipsoid((6.0, 6.0, 6.0)))
    seg, sr = write(tmp_path, result_for(study, [n]))
    source = pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.is_file()), stop_before_pixels=True)
    for ds in (seg, sr):
        assert ds.PatientName == source.PatientName and ds.StudyInstanceUID == source.StudyInstanceUID
    points, _ = segmented_world_points(seg, 1)
    np.testing.assert_allclose(points.mean(axis=0), n.world_lps_mm, atol=0.5 * max(study.spacing_mm))
    assert numbers(measurement_groups(sr)[0])[("DCM", "111047")][0] == pytest.approx(0.73)

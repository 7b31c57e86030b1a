"""Study front end: series discovery, geometry checks, coordinates and the ROI → patch path.

Synthetic series come from :mod:`tests.runtime.dicom_factory` (64×64 pixels, 40 slices at 1 mm by
default) and carry their ground-truth HU volume, so the reader is compared against patches built
without it. Real series in ../shared/data/dicom are exercised at the end (skipped when absent).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from nodule_edge.errors import ConfigError, CoordinateError, GeometryError, SeriesSelectionError, StudyError
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, build_patch, patch_grid, window_channels
from nodule_edge.runtime.dicom import SliceHeader, decode_slice, decode_slices, list_series
from nodule_edge.runtime.dicom import decoders as dicom_decoders
from nodule_edge.runtime.dicom import headers as dicom_headers
from nodule_edge.runtime.study import open_study, study_from_image

from .dicom_factory import (
    PATIENT_ID,
    PATIENT_NAME,
    SyntheticSeries,
    write_mr_series,
    write_non_dicom_files,
    write_series,
)

PATCH_TOL = 1e-5
requires_imagecodecs = pytest.mark.skipif(
    importlib.util.find_spec("imagecodecs") is None, reason="imagecodecs is not installed (the imagecodecs extra)"
)


@pytest.fixture(autouse=True, params=["dicomsdl", "pydicom"])
def header_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with both header readers: dicomsdl (``dicomsdl`` extra) and pydicom."""
    if request.param == "dicomsdl":
        if dicom_headers._dicomsdl_module() is None:
            pytest.skip("dicomsdl is not installed (the dicomsdl extra)")
    else:
        monkeypatch.setattr(dicom_headers, "_dicomsdl_module", lambda: None)
    return request.param


SITK_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}


def sitk_patch(image: sitk.Image, center, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> np.ndarray:
    """The patch SimpleITK's own ``Resample`` gives, independent of :mod:`nodule_edge.volume`."""
    cube = sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32),
        patch_grid(center, spec).to_image(sitk.sitkFloat32),
        sitk.Transform(),
        SITK_INTERPOLATORS[spec.interpolation],
        spec.outside_hu,
        sitk.sitkFloat32,
    )
    return window_channels(sitk.GetArrayFromImage(cube), spec)


def reference_patch(series: SyntheticSeries, center, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> np.ndarray:
    """The patch from the whole ground-truth volume, built by SimpleITK without the reader."""
    return sitk_patch(series.image(), center, spec)


@pytest.fixture()
def axial(tmp_path: Path) -> SyntheticSeries:
    return write_series(tmp_path / "study")


@pytest.fixture()
def off_center(axial: SyntheticSeries) -> np.ndarray:
    # Off the voxel lattice on purpose, so interpolation is exercised.
    return axial.center_world + np.array([1.37, -2.11, 0.73])


# --------------------------------------------------------------------------- discovery


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="no files"):
        open_study(tmp_path)


def test_folder_with_only_non_dicom_files_is_refused(tmp_path: Path) -> None:
    write_non_dicom_files(tmp_path)
    with pytest.raises(StudyError, match="no DICOM files among the 5 files"):
        open_study(tmp_path)


def test_missing_path_and_single_dicom_file_are_refused(tmp_path: Path, axial: SyntheticSeries) -> None:
    with pytest.raises(StudyError, match="does not exist"):
        open_study(tmp_path / "nope")
    with pytest.raises(StudyError, match="single DICOM file"):
        open_study(axial.paths[0])


def test_nested_folders_odd_names_and_junk_are_tolerated(tmp_path: Path) -> None:
    root = tmp_path / "export"
    series = write_series(root / "PAT" / "ST1" / "SE2", name_pattern="{index}")  # names without extension
    write_non_dicom_files(root)
    write_non_dicom_files(root / "PAT" / "ST1" / "SE2")
    study = open_study(root)
    assert study.kind == "dicom"
    assert study.series_uid == series.series_uid
    assert study.size == (64, 64, 40)
    assert study.n_slices == 40


def test_two_ct_series_are_listed_and_series_uid_selects(tmp_path: Path) -> None:
    thin = write_series(tmp_path / "a", description="THIN 1mm", n_slices=40, slice_spacing=1.0)
    thick = write_series(tmp_path / "b", description="THICK 2mm", n_slices=20, slice_spacing=2.0)
    with pytest.raises(SeriesSelectionError) as info:
        open_study(tmp_path)
    msg = str(info.value)
    for uid, desc, count in ((thin.series_uid, "THIN 1mm", 40), (thick.series_uid, "THICK 2mm", 20)):
        line = next(line for line in msg.splitlines() if uid in line)
        assert desc in line and f"{count} slices" in line
    assert "2 mm thick" in msg and "1 mm thick" in msg

    study = open_study(tmp_path, series_uid=thick.series_uid)
    assert study.series_uid == thick.series_uid
    assert study.n_slices == 20
    assert study.spacing_mm[2] == pytest.approx(2.0)
    assert study.series_description == "THICK 2mm"


def test_unknown_series_uid_lists_available(tmp_path: Path, axial: SyntheticSeries) -> None:
    with pytest.raises(SeriesSelectionError) as info:
        open_study(tmp_path, series_uid="1.2.3.4")
    assert "'1.2.3.4'" in str(info.value)
    assert axial.series_uid in str(info.value)


def test_mr_only_names_the_modality(tmp_path: Path) -> None:
    write_mr_series(tmp_path / "mr")
    with pytest.raises(StudyError, match=r"only modality MR"):
        open_study(tmp_path)


def test_only_a_scout_is_refused(tmp_path: Path) -> None:
    write_series(
        tmp_path / "scout",
        n_slices=1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        orientation=(1, 0, 0, 0, 0, -1),
        rows=128,
    )
    with pytest.raises(StudyError, match="localizer") as info:
        open_study(tmp_path)
    assert not isinstance(info.value, GeometryError)


def test_scouts_next_to_an_axial_series_are_ignored(tmp_path: Path) -> None:
    axial = write_series(tmp_path / "axial")
    write_series(
        tmp_path / "loc", n_slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=(1, 0, 0, 0, 0, -1)
    )
    # A scout that does not say so: one coronal image in its own series.
    write_series(tmp_path / "topo", n_slices=1, orientation=(1, 0, 0, 0, 0, -1))
    study = open_study(tmp_path)
    assert study.series_uid == axial.series_uid


def test_derived_series_is_ignored_unless_asked_for(tmp_path: Path) -> None:
    original = write_series(tmp_path / "orig")
    derived = write_series(tmp_path / "mpr", image_type=("DERIVED", "SECONDARY", "AXIAL"), description="MPR")
    write_series(tmp_path / "sc", sop_class=SecondaryCaptureImageStorage, n_slices=3)
    assert open_study(tmp_path).series_uid == original.series_uid
    assert open_study(tmp_path, series_uid=derived.series_uid).series_description == "MPR"


def test_non_image_objects_are_ignored(tmp_path: Path, axial: SyntheticSeries) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    assert open_study(tmp_path).series_uid == axial.series_uid


def test_missing_modality_is_accepted_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_series(tmp_path / "s", modality=None)
    with caplog.at_level(logging.WARNING):
        study = open_study(tmp_path)
    assert study.modality is None
    assert "no Modality tag" in caplog.text


def test_list_series_reports_usable_and_not(tmp_path: Path) -> None:
    ct = write_series(tmp_path / "ct")
    mr = write_mr_series(tmp_path / "mr", n_slices=5)
    listed = {s.series_uid: s for s in list_series(tmp_path)}
    assert listed[ct.series_uid].usable and listed[ct.series_uid].n_files == 40
    assert listed[ct.series_uid].slice_spacing_mm == pytest.approx(1.0)
    assert not listed[mr.series_uid].usable and listed[mr.series_uid].modality == "MR"


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "syntax, preamble",
    [
        (ExplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, False),
        (RLELossless, True),
        (JPEGLSLossless, True),
        (JPEG2000Lossless, True),
    ],
    ids=["explicit", "implicit", "implicit-no-preamble", "rle", "jpeg-ls", "j2k"],
)
def test_encodings_give_the_whole_volume_patch(tmp_path: Path, syntax: str, preamble: bool) -> None:
    series = write_series(tmp_path / "s", transfer_syntax=syntax, preamble=preamble)
    study = open_study(tmp_path)
    assert study.transfer_syntax == syntax
    assert study.transfer_syntax_name
    center = series.center_world + np.array([0.4, 0.9, -1.3])
    patch = build_patch(study.read_roi(center), center)
    np.testing.assert_allclose(patch, reference_patch(series, center), atol=PATCH_TOL, rtol=0)


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    series = write_series(tmp_path / "s", slope=2.0, intercept=-1000.0)
    study = open_study(tmp_path)
    roi = study.read_roi(series.center_world)
    off = study.world_to_voxel(roi.origin).round().astype(int)
    nx, ny, nz = roi.size
    expected = series.hu[off[2] : off[2] + nz, off[1] : off[1] + ny, off[0] : off[0] + nx]
    got = roi.array
    np.testing.assert_allclose(roi.grid.physical_to_index([roi.origin])[0], 0, atol=1e-9)
    np.testing.assert_array_equal(got, expected)
    # Stored values are (HU + 1000) / 2, so without the rescale these would be far apart.
    assert got.min() < -500 and got.max() > 0


# --------------------------------------------------------------------------- decoders


def _slices(folder: Path) -> tuple[SliceHeader, ...]:
    return open_study(folder, min_extent_mm=1).slices


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transfer_syntax": RLELossless},
        {"transfer_syntax": JPEGLSLossless},
        {"transfer_syntax": JPEG2000Lossless},
        # 0.3 and 1024.1 are not exact in binary: both paths must round the same way.
        {"transfer_syntax": JPEG2000Lossless, "slope": 0.3, "intercept": -1024.1},
        {"transfer_syntax": JPEGLSLossless, "include_rescale": False},
        {"transfer_syntax": ExplicitVRLittleEndian},
        {"transfer_syntax": ImplicitVRLittleEndian, "preamble": False},
    ],
    ids=["rle", "jpeg-ls", "j2k", "j2k-fractional-rescale", "jpeg-ls-no-rescale", "explicit", "implicit-no-preamble"],
)
def test_gdcm_decodes_exactly_as_pydicom(tmp_path: Path, kwargs: dict) -> None:
    series = write_series(tmp_path / "s", n_slices=6, rows=48, cols=40, **kwargs)
    headers = _slices(tmp_path)
    gdcm = decode_slices(headers, backend="gdcm")
    pydicom_hu = decode_slices(headers, backend="pydicom")
    assert gdcm.dtype == pydicom_hu.dtype == np.float32 and gdcm.shape == (6, 48, 40)
    np.testing.assert_array_equal(gdcm, pydicom_hu)
    np.testing.assert_array_equal(decode_slices(headers), pydicom_hu)
    np.testing.assert_array_equal(decode_slices(headers, threads=4), pydicom_hu)
    np.testing.assert_array_equal(decode_slice(headers[2], backend="gdcm"), pydicom_hu[2])
    for backend in ("gdcm", "pydicom"):
        np.testing.assert_array_equal(
            decode_slices(headers, (3, 20), (5, 39), backend=backend), pydicom_hu[:, 3:20, 5:39]
        )
    # Ground truth: the factory's HU assume RescaleIntercept -1024 (stored = HU + 1024 without it).
    offset = 0.0 if kwargs.get("include_rescale", True) else 1024.0
    np.testing.assert_array_equal(pydicom_hu, series.hu + offset)


@pytest.mark.parametrize(
    "kwargs, photometric",
    [
        ({"transfer_syntax": JPEGLosslessSV1}, None),
        # Predictor 6, 12 unsigned bits, and a rescale that is not exact in binary.
        ({"transfer_syntax": JPEGLossless, "unsigned_bits": 12, "slope": 0.3, "intercept": -1024.1}, None),
        ({"transfer_syntax": JPEGLosslessSV1, "preamble": False}, None),
        # Stored values, not inverted ones, are what the rescale turns into HU.
        ({"transfer_syntax": JPEGLosslessSV1}, "MONOCHROME1"),
        # JPEG-LS (CharLS), JPEG 2000 Lossless (OpenJPEG, a signed codestream for signed data)
        # and RLE Lossless, each signed 16-bit and unsigned 12-bit with a rescale not exact in binary.
        ({"transfer_syntax": JPEGLSLossless}, None),
        ({"transfer_syntax": JPEGLSLossless, "unsigned_bits": 12, "slope": 0.3, "intercept": -1024.1}, None),
        ({"transfer_syntax": JPEG2000Lossless}, None),
        ({"transfer_syntax": JPEG2000Lossless, "unsigned_bits": 12, "slope": 0.3, "intercept": -1024.1}, None),
        ({"transfer_syntax": RLELossless}, None),
        ({"transfer_syntax": RLELossless, "unsigned_bits": 12, "slope": 0.3, "intercept": -1024.1}, None),
        ({"transfer_syntax": RLELossless, "preamble": False}, "MONOCHROME1"),
    ],
    ids=[
        "sv1-signed-16",
        "process14-unsigned-12-fractional-rescale",
        "sv1-no-preamble",
        "sv1-monochrome1",
        "jpeg-ls-signed-16",
        "jpeg-ls-unsigned-12-fractional-rescale",
        "j2k-signed-16",
        "j2k-unsigned-12-fractional-rescale",
        "rle-signed-16",
        "rle-unsigned-12-fractional-rescale",
        "rle-no-preamble-monochrome1",
    ],
)
@requires_imagecodecs
def test_imagecodecs_decodes_exactly_as_gdcm_and_pydicom(tmp_path: Path, kwargs: dict, photometric: str | None) -> None:
    import pydicom

    series = write_series(tmp_path / "s", n_slices=6, rows=48, cols=40, **kwargs)
    if photometric:
        for path in series.paths:
            ds = pydicom.dcmread(path, force=True)
            ds.PhotometricInterpretation = photometric
            ds.save_as(path)
    headers = _slices(tmp_path)
    assert {h.transfer_syntax_uid for h in headers} == {kwargs["transfer_syntax"]}
    fast = decode_slices(headers, backend="imagecodecs")
    assert fast.dtype == np.float32 and fast.shape == (6, 48, 40)
    np.testing.assert_array_equal(fast, series.hu)
    np.testing.assert_array_equal(fast, decode_slices(headers, backend="pydicom"))
    if not photometric:  # GDCM inverts MONOCHROME1 (test_monochrome1_goes_to_pydicom)
        np.testing.assert_array_equal(fast, decode_slices(headers, backend="gdcm"))
    for threads in (1, 2, 4):
        np.testing.assert_array_equal(decode_slices(headers, threads=threads), series.hu)
    np.testing.assert_array_equal(
        decode_slices(headers, (3, 20), (5, 39), backend="imagecodecs"), series.hu[:, 3:20, 5:39]
    )
    np.testing.assert_array_equal(decode_slice(headers[2], backend="imagecodecs"), series.hu[2])


@requires_imagecodecs
def test_imagecodecs_takes_only_what_it_decodes_unambiguously(tmp_path: Path) -> None:
    import dataclasses

    write_series(tmp_path / "s", n_slices=4, transfer_syntax=ExplicitVRLittleEndian)
    plain = _slices(tmp_path)
    with pytest.raises(StudyError, match=re.escape(plain[0].path) + r" \(1\.2\.840\.10008\.1\.2\.1, MONOCHROME2"):
        decode_slices(plain, backend="imagecodecs")
    # Signed data narrower than 16 bits needs a sign extension: left to GDCM and pydicom.
    for syntax in (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless):
        narrow_signed = dataclasses.replace(
            plain[0], transfer_syntax_uid=syntax, bits_stored=12, pixel_representation=1
        )
        assert not dicom_decoders._imagecodecs_decodes(narrow_signed)
        assert dicom_decoders._imagecodecs_decodes(dataclasses.replace(narrow_signed, pixel_representation=0))


@requires_imagecodecs
def test_imagecodecs_leaves_a_j2k_codestream_whose_sign_disagrees_with_the_header(tmp_path: Path) -> None:
    """An unsigned JPEG 2000 codestream under PixelRepresentation 1: GDCM and pydicom decide."""
    import pydicom

    series = write_series(tmp_path / "s", n_slices=4, transfer_syntax=JPEG2000Lossless, unsigned_bits=16)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.PixelRepresentation = 1
        ds.save_as(path)
    headers = _slices(tmp_path)
    with pytest.raises(StudyError, match=r"decoded uint16 \(64, 64\), the header says int16"):
        decode_slices(headers, backend="imagecodecs")
    np.testing.assert_array_equal(decode_slices(headers), decode_slices(headers, backend="gdcm"))


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=["jpeg-ls", "j2k", "rle"])
@requires_imagecodecs
def test_truncated_slice_is_left_to_the_other_decoders(
    tmp_path: Path, syntax: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CharLS, OpenJPEG and the RLE decoder refuse a truncated stream: the file goes on, named."""
    write_series(tmp_path / "s", n_slices=6, transfer_syntax=syntax)
    headers = _slices(tmp_path)
    victim = Path(headers[2].path)
    victim.write_bytes(victim.read_bytes()[:-300])
    with pytest.raises(StudyError, match=re.escape(str(victim))):
        decode_slices(headers, backend="imagecodecs")
    with caplog.at_level(logging.DEBUG, logger="nodule_edge.runtime.dicom"):
        try:
            decode_slices(headers)
        except StudyError as exc:  # GDCM and pydicom may refuse it too
            assert str(victim) in str(exc)
    assert f"imagecodecs cannot decode 1 of 6 {dicom_decoders._IMAGECODECS_SYNTAXES[syntax][1]} files" in caplog.text


@pytest.mark.parametrize("decoy", ["icon_before", "padding_after"])
@requires_imagecodecs
def test_imagecodecs_finds_the_image_pixel_data_among_decoys(
    tmp_path: Path, decoy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The pixel data signature also occurs in an icon image before it or in trailing padding."""
    import imagecodecs
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate

    series = write_series(tmp_path / "s", n_slices=4, transfer_syntax=JPEGLosslessSV1)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        if decoy == "icon_before":
            icon = Dataset()
            icon.SamplesPerPixel, icon.PhotometricInterpretation, icon.Rows, icon.Columns = 1, "MONOCHROME2", 8, 8
            icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 16, 16, 15, 0
            tile = np.arange(64, dtype=np.uint16).reshape(8, 8)
            icon.PixelData = encapsulate([imagecodecs.jpeg8_encode(tile, lossless=True, predictor=1, bitspersample=16)])
            icon["PixelData"].VR = "OB"
            icon["PixelData"].is_undefined_length = True
            ds.IconImageSequence = [icon]
        else:
            ds.add_new(0xFFFCFFFC, "OB", dicom_decoders._ENCAPSULATED_PIXEL_DATA + b"junk")
        ds.save_as(path)
    headers = _slices(tmp_path)
    with caplog.at_level(logging.WARNING, logger="nodule_edge.runtime.dicom"):
        np.testing.assert_array_equal(decode_slices(headers, backend="imagecodecs"), series.hu)
    assert caplog.text == ""


@requires_imagecodecs
def test_imagecodecs_failure_falls_back_to_the_other_decoders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    series = write_series(tmp_path / "s", n_slices=6, transfer_syntax=JPEGLosslessSV1)
    headers = _slices(tmp_path)
    real = dicom_decoders._imagecodecs_decode

    def refuse_one(imagecodecs, header, crop):
        if header.path == headers[3].path:
            raise dicom_decoders.NotDecoded("simulated")
        return real(imagecodecs, header, crop)

    monkeypatch.setattr(dicom_decoders, "_imagecodecs_decode", refuse_one)
    with caplog.at_level(logging.WARNING, logger="nodule_edge.runtime.dicom"):
        for threads in (1, 2):
            np.testing.assert_array_equal(decode_slices(headers, threads=threads), series.hu)
    assert f"imagecodecs cannot decode 1 of 6 JPEG Lossless files (first {headers[3].path}: simulated)" in caplog.text
    with pytest.raises(StudyError, match=f"imagecodecs cannot decode {re.escape(headers[3].path)}: simulated"):
        decode_slices(headers, backend="imagecodecs")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@requires_imagecodecs
def test_damaged_jpeg_lossless_slice_names_the_file(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=6, transfer_syntax=JPEGLosslessSV1)
    headers = _slices(tmp_path)
    victim = Path(headers[2].path)
    victim.write_bytes(victim.read_bytes()[:-300])
    for threads in (1, 2):
        with pytest.raises(StudyError, match=re.escape(str(victim))):
            decode_slices(headers, threads=threads)


def _damage_huffman_table(path: Path) -> None:
    """Zero 20 bytes of the JPEG stream's Huffman table: imagecodecs, GDCM and pydicom all refuse it."""
    data = path.read_bytes()
    dht = data.rfind(b"\xff\xc4")
    path.write_bytes(data[: dht + 4] + bytes(20) + data[dht + 24 :])


@requires_imagecodecs
def test_undecodable_slice_prints_nothing_and_warns_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """GDCM's libjpeg messages on stderr and the imagecodecs fallback note go to the debug log only."""
    write_series(tmp_path / "s", n_slices=6, transfer_syntax=JPEGLosslessSV1)
    headers = _slices(tmp_path)
    _damage_huffman_table(Path(headers[2].path))
    capfd.readouterr()
    for threads in (1, 2):
        with caplog.at_level(logging.DEBUG, logger="nodule_edge.runtime.dicom"):
            with pytest.raises(StudyError, match=re.escape(headers[2].path)):
                decode_slices(headers, threads=threads)
        assert capfd.readouterr().err == ""
        own = [r for r in caplog.records if r.name.startswith("nodule_edge.runtime.dicom.")]
        assert [r.getMessage() for r in own if r.levelno >= logging.WARNING] == []
        assert any(
            "GDCM printed while decoding" in r.getMessage() and "Bogus marker length" in r.getMessage() for r in own
        )
        assert any("imagecodecs cannot decode 1 of 6" in r.getMessage() for r in own)
        caplog.clear()


def test_gdcm_stderr_diversion_restores_the_descriptor(capfd: pytest.CaptureFixture[str]) -> None:
    """Overlapping diversions from three threads: the last one out restores fd 2 and gets all the text."""
    import os

    barrier = threading.Barrier(3)
    texts: list[list[str]] = []

    def write(k: int) -> None:
        with dicom_decoders._gdcm_stderr_logged(f"part {k}") as printed:
            os.write(2, f"native {k}\n".encode())
            barrier.wait()  # all three are inside before any leaves
        texts.append(printed)

    workers = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
    received = [t[0] for t in texts if t]
    assert len(received) == 1
    assert sorted(re.findall(r"native (\d)", received[0])) == ["0", "1", "2"]


@requires_imagecodecs
def test_without_imagecodecs_jpeg_lossless_goes_to_gdcm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodule_edge.errors import MissingDependencyError

    series = write_series(tmp_path / "s", n_slices=4, transfer_syntax=JPEGLosslessSV1)
    headers = _slices(tmp_path)
    monkeypatch.setattr(dicom_decoders, "_imagecodecs_module", lambda: None)
    np.testing.assert_array_equal(decode_slices(headers), series.hu)
    with pytest.raises(MissingDependencyError, match=r"nodule-edge\[imagecodecs\]"):
        decode_slices(headers, backend="imagecodecs")


def test_each_slice_keeps_its_own_rescale_in_one_gdcm_batch(tmp_path: Path) -> None:
    import pydicom

    series = write_series(tmp_path / "s", n_slices=6, transfer_syntax=JPEGLSLossless, shuffle_seed=None)
    # The first slice's integer rescale alone would make GDCM pick an integer pixel type.
    for path in series.paths[1::2]:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = "0.7", "-1000.3"
        ds.save_as(path)
    headers = _slices(tmp_path)
    assert [h.slope for h in headers] == [1.0, 0.7] * 3
    expected = series.hu.copy()
    stored = series.hu[1::2].astype(np.float64) + 1024.0
    expected[1::2] = (stored * 0.7 - 1000.3).astype(np.float32)
    np.testing.assert_array_equal(decode_slices(headers, backend="gdcm"), expected)
    np.testing.assert_array_equal(decode_slices(headers, backend="pydicom"), expected)


def test_monochrome1_goes_to_pydicom(tmp_path: Path) -> None:
    import pydicom

    series = write_series(tmp_path / "s", n_slices=4, transfer_syntax=JPEGLSLossless)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(path)
    headers = _slices(tmp_path)
    assert {h.photometric for h in headers} == {"MONOCHROME1"}
    np.testing.assert_array_equal(decode_slices(headers), series.hu)
    # Why: GDCM inverts MONOCHROME1, which is no HU at all (lift the restriction if this fails).
    assert not np.array_equal(decode_slices(headers, backend="gdcm"), series.hu)


def test_gdcm_failure_falls_back_to_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    series = write_series(tmp_path / "s", n_slices=6, transfer_syntax=RLELossless)
    headers = _slices(tmp_path)

    def refuse(batch, crop):
        raise StudyError(f"GDCM cannot decode {batch[0].path}: simulated")

    monkeypatch.setattr(dicom_decoders, "_gdcm_read", refuse)
    monkeypatch.setattr(dicom_decoders, "_imagecodecs_module", lambda: None)  # else imagecodecs takes RLE
    with caplog.at_level(logging.DEBUG, logger="nodule_edge.runtime.dicom"):
        got = decode_slices(headers)
    np.testing.assert_array_equal(got, series.hu)
    assert "simulated; retrying those files one at a time" in caplog.text
    assert caplog.text.count("pydicom decoded it instead") == 6
    with pytest.raises(StudyError, match="simulated"):
        decode_slices(headers, backend="gdcm")


def test_a_panicking_pydicom_plugin_is_a_study_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pylibjpeg-rle panics on some damaged RLE frames with pyo3's PanicException, a BaseException."""
    import pydicom

    write_series(tmp_path / "s", n_slices=2, transfer_syntax=RLELossless)
    headers = _slices(tmp_path)

    class PanicException(BaseException):  # what pyo3 raises: not an Exception subclass
        pass

    def panic(self: object) -> None:
        raise PanicException("index out of bounds")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(panic))
    with pytest.raises(
        StudyError, match=rf"cannot decode pixel data of {re.escape(headers[0].path)}.*index out of bounds"
    ):
        decode_slices(headers[:1], backend="pydicom")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_damaged_compressed_slice_in_a_batch_names_the_file(tmp_path: Path) -> None:
    series = write_series(tmp_path / "s", n_slices=6, transfer_syntax=JPEG2000Lossless)
    headers = _slices(tmp_path)
    victim = Path(headers[3].path)
    victim.write_bytes(victim.read_bytes()[:-300])
    for threads in (1, 2):
        with pytest.raises(StudyError, match=re.escape(str(victim))):
            decode_slices(headers, threads=threads)
    with pytest.raises(StudyError, match=f"GDCM cannot decode {re.escape(str(victim))}"):
        decode_slices(headers, backend="gdcm")
    # The other slices still decode, alone or together.
    others = headers[:3] + headers[4:]
    np.testing.assert_array_equal(decode_slices(others), np.delete(series.hu, 3, axis=0))


def test_decoding_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import pydicom

    series = write_series(tmp_path / "s", transfer_syntax=RLELossless)
    # Jitter below the uneven-spacing tolerance: ITK would print a non-uniform sampling warning.
    for path in series.paths[::3]:
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.02
        ds.save_as(path)
    study = open_study(tmp_path)
    capfd.readouterr()
    study.read_roi(series.center_world)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["pydicom", "gdcm"])
@pytest.mark.parametrize(
    "field, value", [("RescaleSlope", math.nan), ("RescaleIntercept", math.inf), ("RescaleIntercept", 1e39)]
)
def test_non_finite_hu_are_refused_naming_the_file(tmp_path: Path, syntax: str, field: str, value: float) -> None:
    import warnings

    import pydicom

    series = write_series(tmp_path / "s", n_slices=4, transfer_syntax=syntax, shuffle_seed=None)
    with warnings.catch_warnings():  # pydicom warns about writing such values; writing them is the point
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(series.paths[2])
        setattr(ds, field, value)
        ds.save_as(series.paths[2])
    headers = _slices(tmp_path)
    with pytest.raises(StudyError, match=re.escape(str(series.paths[2])) + ".*(not finite|beyond float32)"):
        decode_slices(headers)
    np.testing.assert_array_equal(decode_slices(headers[:2]), series.hu[:2])


def test_unknown_backend_and_bad_crop_are_refused(axial: SyntheticSeries) -> None:
    headers = open_study(axial.folder).slices[:2]
    with pytest.raises(ConfigError, match="'gpu'"):
        decode_slices(headers, backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not inside the 64x64 matrix"):
        decode_slices(headers, (10, 70), (0, 64))


def test_study_slices_are_the_headers_in_slice_order(axial: SyntheticSeries) -> None:
    study = open_study(axial.folder)
    assert len(study.slices) == study.n_slices
    assert all(isinstance(h, SliceHeader) for h in study.slices)
    assert [h.sop_instance_uid for h in study.slices] == axial.sop_uids
    assert [h.instance_number for h in study.slices] == axial.instance_numbers
    assert (study.slices[7].sop_instance_uid, study.slices[7].instance_number) == study.slice_reference(7)
    assert study_from_image(axial.image()).slices == ()


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "orientation",
    [
        (1, 0, 0, 0, 1, 0),
        (-1, 0, 0, 0, 1, 0),  # normal along -z: slices ascend feet-ward
        (math.cos(0.5), math.sin(0.5), 0, -math.sin(0.5), math.cos(0.5), 0),  # rotated in-plane
        (1, 0, 0, 0, 0, -1),  # coronal stack
    ],
    ids=["axial", "flipped", "oblique", "coronal"],
)
def test_roi_patch_equals_whole_volume_patch(tmp_path: Path, orientation) -> None:
    series = write_series(tmp_path / "s", orientation=orientation, pixel_spacing=(0.7, 0.8))
    study = open_study(tmp_path)
    np.testing.assert_allclose(study.direction, series.direction, atol=1e-9)
    rng = np.random.default_rng(7)
    centers = [series.center_world + rng.uniform(-3, 3, size=3) for _ in range(2)]
    centers.append(series.voxel_to_world((2.2, 60.4, 1.6)))  # near a corner: cube partly outside
    for c in centers:
        roi = study.read_roi(c)
        assert roi.array.dtype == np.float32
        assert np.prod(roi.size) < series.hu.size  # an ROI, not the volume
        np.testing.assert_allclose(build_patch(roi, c), reference_patch(series, c), atol=PATCH_TOL, rtol=0)


def test_build_patches_decodes_each_slice_once(
    axial: SyntheticSeries, off_center: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = open_study(axial.folder)
    calls: list[str] = []
    original = decode_slices

    def counting(headers, *args, **kwargs):
        calls.extend(h.path for h in headers)
        return original(headers, *args, **kwargs)

    monkeypatch.setattr("nodule_edge.runtime.study_sources.decode_slices", counting)
    centers = np.stack([off_center, off_center + [0, 0, 4.0], axial.center_world])
    patches = study.build_patches(centers)
    assert patches.shape == (3, 2, 64, 64, 64) and patches.dtype == np.float32
    assert len(calls) == len(set(calls)) < axial.hu.shape[0]
    for c, p in zip(centers, patches, strict=True):
        np.testing.assert_allclose(p, reference_patch(axial, c), atol=PATCH_TOL, rtol=0)
    assert study.build_patches(np.zeros((0, 3))).shape == (0, 2, 64, 64, 64)


def test_bspline_roi_is_close_to_whole_volume(axial: SyntheticSeries, off_center: np.ndarray) -> None:
    spec = PatchSpec(interpolation="bspline")
    study = open_study(axial.folder)
    roi_patch = build_patch(study.read_roi(off_center, spec), off_center, spec)
    whole = reference_patch(axial, off_center, spec)
    # The B-spline prefilter sees the ROI border; a 3-voxel margin keeps the effect small.
    assert np.abs(roi_patch - whole).max() < 2e-3


def test_gap_inside_the_cube_is_refused(tmp_path: Path) -> None:
    series = write_series(tmp_path / "s", skip=(19, 20))
    study = open_study(tmp_path)
    assert study.n_slices == 38
    with pytest.raises(GeometryError, match="missing slices inside the cube"):
        study.read_roi(series.center_world)


def test_gap_far_from_the_nodule_proceeds_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    series = write_series(tmp_path / "s", n_slices=60, skip=(57,))
    with caplog.at_level(logging.WARNING):
        study = open_study(tmp_path)
    assert "missing slices" in caplog.text
    assert study.geometry_notes and "missing slices" in study.geometry_notes[0]
    center = series.voxel_to_world((30.0, 31.0, 20.0))
    np.testing.assert_allclose(
        build_patch(study.read_roi(center), center), reference_patch(series, center), atol=PATCH_TOL, rtol=0
    )
    # Voxel z indexes the slices that exist; past the gap it follows their real positions.
    np.testing.assert_allclose(study.voxel_to_world((0, 0, 58)), series.voxel_to_world((0, 0, 59)), atol=1e-9)
    with pytest.raises(GeometryError, match="not a uniform lattice"):
        study.reference_geometry()
    with pytest.raises(GeometryError, match="missing slices"):
        study.read_roi(series.voxel_to_world((30.0, 31.0, 50.0)))


def test_uneven_spacing_inside_the_cube_is_refused(tmp_path: Path) -> None:
    series = write_series(tmp_path / "s", n_slices=50)
    # Move one slice 0.3 mm: not a gap, but no uniform lattice fits it.
    import pydicom

    victim = next(p for p in series.paths if pydicom.dcmread(p).InstanceNumber == 25)
    ds = pydicom.dcmread(victim)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.3
    ds.save_as(victim)
    study = open_study(tmp_path)
    assert any("uneven" in n for n in study.geometry_notes)
    with pytest.raises(GeometryError, match="uneven slice spacing"):
        study.read_roi(series.voxel_to_world((32, 32, 24)))


def test_single_slice_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=1)
    with pytest.raises(GeometryError, match="single slice"):
        open_study(tmp_path)


def test_too_short_a_stack_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=10, slice_spacing=2.0)
    with pytest.raises(GeometryError, match=r"10 slices covering 20.0 mm.*32 mm"):
        open_study(tmp_path)
    assert open_study(tmp_path, min_extent_mm=10).n_slices == 10


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    tilted = (1, 0, 0, 0, math.cos(0.2), math.sin(0.2))
    write_series(tmp_path / "s", orientation_of=lambda k: tilted if k % 2 else (1, 0, 0, 0, 1, 0))
    with pytest.raises(GeometryError, match="mixes slice orientations") as info:
        open_study(tmp_path)
    # Plain numbers a reader can compare with the header, not numpy reprs.
    assert "[1, 0, 0, 0, 1, 0]" in str(info.value) and "np.float64" not in str(info.value)


def test_non_orthogonal_orientation_is_refused_with_its_numbers(tmp_path: Path) -> None:
    write_series(tmp_path / "s", orientation=(1, 0, 0, 0.5, 1, 0))
    with pytest.raises(
        GeometryError, match=r"ImageOrientationPatient \[1, 0, 0, 0.5, 1, 0\] is not two orthogonal unit vectors"
    ):
        open_study(tmp_path)


@pytest.mark.parametrize(
    "orientation",
    [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, math.cos(math.radians(15)), math.sin(math.radians(15)))],
    ids=["sheared-positions", "tilted-orientation"],  # the second steps straight along z, as GE writes it
)
def test_gantry_tilt_is_refused(tmp_path: Path, orientation) -> None:
    write_series(tmp_path / "s", tilt_deg=15.0, orientation=orientation)
    with pytest.raises(GeometryError, match=r"15\.00° off the slice normal \(gantry tilt, GantryDetectorTilt 15°\)"):
        open_study(tmp_path)


def test_duplicate_copies_are_dropped_but_conflicts_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    series = write_series(tmp_path / "s")
    (tmp_path / "copy").mkdir()
    for p in series.paths[:5]:
        (tmp_path / "copy" / p.name).write_bytes(p.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert open_study(tmp_path).n_slices == 40
    assert "duplicate copies" in caplog.text

    # Same position, different instance (e.g. a second reconstruction with the same UID).
    clash = next(p for p in series.paths if pydicom.dcmread(p).InstanceNumber == 36)
    ds = pydicom.dcmread(clash)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "clash.dcm")
    study = open_study(tmp_path)
    assert study.n_slices == 40
    with pytest.raises(GeometryError, match="share slice position"):
        study.read_roi(series.center_world)
    study.read_roi(series.voxel_to_world((32, 32, 5)))  # its slab ends near slice 23: fine


# --------------------------------------------------------------------------- pixel errors


def test_truncated_slice_in_the_cube_names_the_file(axial: SyntheticSeries) -> None:
    study = open_study(axial.folder)
    import pydicom

    victim = next(p for p in axial.paths if pydicom.dcmread(p).InstanceNumber == 20)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 3000])
    with pytest.raises(StudyError, match=str(victim.name)):
        study.read_roi(axial.center_world)


def test_only_the_needed_slices_are_read(axial: SyntheticSeries) -> None:
    import pydicom

    study = open_study(axial.folder)
    # Ruin slices far from the cube: reading must not touch them.
    for p in axial.paths:
        if pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber in (1, 40):
            p.write_bytes(p.read_bytes()[:600])
    center = axial.voxel_to_world((32, 32, 20))
    np.testing.assert_allclose(
        build_patch(study.read_roi(center), center), reference_patch(axial, center), atol=PATCH_TOL, rtol=0
    )


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_truncated_compressed_slice_is_refused(tmp_path: Path) -> None:
    series = write_series(tmp_path / "s", transfer_syntax=JPEGLSLossless)
    study = open_study(tmp_path)
    for p in series.paths:
        p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(StudyError, match="no pixel data|cannot decode"):
        study.read_roi(series.center_world)


# --------------------------------------------------------------------------- coordinates


def test_voxel_world_round_trip(tmp_path: Path) -> None:
    series = write_series(
        tmp_path / "s", orientation=(math.cos(0.3), math.sin(0.3), 0, -math.sin(0.3), math.cos(0.3), 0)
    )
    study = open_study(tmp_path)
    rng = np.random.default_rng(3)
    voxels = rng.uniform(0, 1, size=(50, 3)) * (np.asarray(study.size) - 1)
    world = study.voxel_to_world(voxels)
    np.testing.assert_allclose(world, [series.voxel_to_world(v) for v in voxels], atol=1e-6)
    np.testing.assert_allclose(study.world_to_voxel(world), voxels, atol=1e-6)
    np.testing.assert_allclose(study.world_to_voxel(world[0]), voxels[0], atol=1e-6)
    assert study.voxel_to_world([0, 0, 0]) == pytest.approx(study.origin)


@pytest.mark.parametrize(
    "bad, match",
    [
        ((-1, 5, 5), "negative"),
        ((5, 5, 40), r"outside the volume of size \(64, 64, 40\)"),
        ((5, float("nan"), 5), "not finite"),
        ((5, 5), "must be 3 numbers"),
        (("a", 1, 2), "not a list of numbers"),
    ],
)
def test_bad_voxel_coordinates(axial: SyntheticSeries, bad, match: str) -> None:
    study = open_study(axial.folder)
    with pytest.raises(CoordinateError, match=match):
        study.voxel_to_world(bad)


def test_bad_world_coordinates(axial: SyntheticSeries) -> None:
    study = open_study(axial.folder)
    far = axial.center_world + np.array([0.0, 0.0, 500.0])
    with pytest.raises(CoordinateError, match=r"outside the volume.*size \(64, 64, 40\)"):
        study.world_to_voxel(far)
    with pytest.raises(CoordinateError, match="outside the volume"):
        study.read_roi(far)
    with pytest.raises(CoordinateError, match="not finite"):
        study.read_roi((np.inf, 0, 0))
    with pytest.raises(CoordinateError, match="outside the volume"):
        study.build_patches([axial.center_world, far])


def test_slice_reference(axial: SyntheticSeries) -> None:
    study = open_study(axial.folder)
    k = study.world_to_voxel(axial.center_world)[2]
    assert study.slice_reference(k) == (axial.sop_uids[round(k)], axial.instance_numbers[round(k)])
    assert study.slice_reference(0) == (axial.sop_uids[0], 1)
    with pytest.raises(CoordinateError):
        study.slice_reference(40)


def test_reference_geometry_matches_roi_and_full_grid(axial: SyntheticSeries, off_center: np.ndarray) -> None:
    study = open_study(axial.folder)
    roi = study.read_roi(off_center)
    grid = study.reference_geometry(off_center)
    assert grid.size == roi.size
    np.testing.assert_allclose(grid.origin, roi.origin)
    np.testing.assert_allclose(grid.spacing_mm, roi.spacing_mm)
    np.testing.assert_allclose(study.voxel_to_world(grid.index_offset), roi.origin, atol=1e-9)
    full = study.reference_geometry().to_image()
    truth = axial.image()
    assert full.GetSize() == truth.GetSize()
    np.testing.assert_allclose(full.GetOrigin(), truth.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(full.GetSpacing(), truth.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(full.GetDirection(), truth.GetDirection(), atol=1e-9)


def test_read_roi_is_thread_safe(axial: SyntheticSeries) -> None:
    study = open_study(axial.folder)
    centers = [axial.voxel_to_world((30 + i, 31, 15 + 2 * i)) for i in range(6)]
    expected = [build_patch(study.read_roi(c), c) for c in centers]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = build_patch(study.read_roi(centers[i]), centers[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(centers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(results[i], e)


# --------------------------------------------------------------------------- volume files


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_volume_file_gives_the_dicom_patch(tmp_path: Path, suffix: str) -> None:
    series = write_series(tmp_path / "dicom", orientation=(-1, 0, 0, 0, 1, 0))
    volume = tmp_path / f"vol{suffix}"
    sitk.WriteImage(series.image(), str(volume))
    dicom_study = open_study(tmp_path / "dicom")
    vol_study = open_study(volume)
    assert vol_study.kind == "volume" and vol_study.size == dicom_study.size
    assert vol_study.slice_reference(3) is None and vol_study.transfer_syntax is None
    centers = np.stack([series.center_world + [0.3, -1.2, 2.1], series.voxel_to_world((5.5, 50.2, 35.1))])
    np.testing.assert_allclose(vol_study.build_patches(centers), dicom_study.build_patches(centers), atol=1e-4, rtol=0)
    np.testing.assert_allclose(vol_study.world_to_voxel(centers), dicom_study.world_to_voxel(centers), atol=1e-4)


def test_study_from_image_matches_whole_volume(axial: SyntheticSeries, off_center: np.ndarray) -> None:
    study = study_from_image(axial.image())
    assert study.kind == "volume" and study.path is None and study.size == (64, 64, 40)
    np.testing.assert_allclose(study.build_patches(off_center)[0], reference_patch(axial, off_center), atol=PATCH_TOL)
    np.testing.assert_allclose(study.world_to_voxel(axial.voxel_to_world((3, 4, 5))), (3, 4, 5), atol=1e-9)


def test_volume_file_rejects_series_uid_and_2d(tmp_path: Path) -> None:
    img = sitk.Image([8, 8], sitk.sitkInt16)
    sitk.WriteImage(img, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(GeometryError, match="2-D"):
        open_study(tmp_path / "flat.nii.gz")
    with pytest.raises(StudyError, match="volume file"):
        open_study(tmp_path / "flat.nii.gz", series_uid="1.2.3")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StudyError, match="neither a folder"):
        open_study(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- privacy


def test_repr_shows_size_spacing_and_orientation(tmp_path: Path) -> None:
    axial = open_study(write_series(tmp_path / "axial", pixel_spacing=(0.7, 0.8)).folder)
    assert axial.orientation == "LPS"
    assert repr(axial) == (
        f"Study(kind='dicom', series_uid={axial.series_uid!r}, size=(64, 64, 40), spacing_mm=(0.7, 0.8, 1.0), "
        f"orientation='LPS', path={str(tmp_path / 'axial')!r})"
    )
    # Coronal: columns run along +x (L), rows down the patient (-z, I), slices towards +y (P).
    coronal = open_study(write_series(tmp_path / "coronal", orientation=(1, 0, 0, 0, 0, -1)).folder)
    assert coronal.orientation == "LIP" and "orientation='LIP'" in repr(coronal)
    image = sitk.Image([4, 5, 6], sitk.sitkFloat32)
    image.SetSpacing((0.5, 0.75, 2.5))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # what a NIfTI in RAS storage order reads as
    flipped = study_from_image(image)
    assert repr(flipped) == (
        "Study(kind='volume', series_uid=None, size=(4, 5, 6), spacing_mm=(0.5, 0.75, 2.5), "
        "orientation='RAS', path=None)"
    )


@pytest.mark.parametrize(
    "direction",
    [
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        (-1, 0, 0, 0, -1, 0, 0, 0, 1),
        (1, 0, 0, 0, 0, 1, 0, -1, 0),
        (0, 0, -1, 1, 0, 0, 0, -1, 0),
        (0.96, -0.28, 0, 0.28, 0.96, 0, 0, 0, 1),  # oblique: each axis takes its largest component
    ],
)
def test_orientation_code_matches_simpleitk(direction: tuple[float, ...]) -> None:
    from nodule_edge.runtime.study_geometry import orientation_code

    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    u, _, vt = np.linalg.svd(matrix)  # SimpleITK needs an orthonormal matrix
    orthonormal = tuple((u @ vt).ravel())
    assert orientation_code(matrix) == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(orthonormal)


def test_patient_identity_never_reaches_logs_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_series(tmp_path / "a", modality=None, skip=(35,))
    write_series(tmp_path / "b")
    messages = []
    with caplog.at_level(logging.DEBUG):
        try:
            open_study(tmp_path)
        except SeriesSelectionError as exc:
            messages.append(str(exc))
        for s in list_series(tmp_path):
            messages.append(s.describe())
        uid = next(s.series_uid for s in list_series(tmp_path) if s.modality is None)
        study = open_study(tmp_path, series_uid=uid)
        messages.append(repr(study))
    text = caplog.text + "\n".join(messages)
    assert "no Modality tag" in text  # the logs were captured at all
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe", "SYNTH-PID"):
        assert secret not in text


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_chest_jpeg_lossless(dicom_dir: Path) -> None:
    study = open_study(dicom_dir / "chest_ricord_jpeg_lossless")
    assert study.n_slices == 255
    assert study.size == (512, 512, 255)
    assert study.spacing_mm == pytest.approx((0.703125, 0.703125, 1.25))
    assert study.transfer_syntax == "1.2.840.10008.1.2.4.70"
    assert study.modality == "CT"
    center = study.voxel_to_world((200.0, 260.0, 120.0))
    roi = study.read_roi(center)
    assert roi.size[2] < 40  # 32 mm / 1.25 mm plus margins, not 255
    hu = roi.array
    assert -1100 <= hu.min() < -500 and hu.max() > 0
    sop, number = study.slice_reference(120)
    assert sop.startswith("1.2.") and isinstance(number, int)

    # Independent reader (GDCM orders and decodes the whole series itself).
    folder = dicom_dir / "chest_ricord_jpeg_lossless"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    whole = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    np.testing.assert_allclose(build_patch(roi, center), sitk_patch(whole, center), atol=1e-4, rtol=0)


@pytest.mark.realdata
def test_real_siemens_j2k_matches_gdcm_whole_series(dicom_dir: Path) -> None:
    folder = dicom_dir / "siemens_j2k_20_slices"
    study = open_study(folder)
    assert study.n_slices == 20 and study.size[:2] == (512, 512)
    assert study.series_uid.startswith("unknown:")  # the files carry blank UIDs
    center = study.voxel_to_world((256.0, 300.0, 9.5))
    patch = study.build_patches(center)[0]
    assert patch.std() > 0.01

    # Independent reader: GDCM orders the files and decodes J2K itself.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    whole = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    np.testing.assert_allclose(patch, sitk_patch(whole, center), atol=1e-4, rtol=0)


@pytest.mark.realdata
@pytest.mark.parametrize("name, every", [("chest_ricord_jpeg_lossless", 8), ("siemens_j2k_20_slices", 1)])
def test_real_series_gdcm_decodes_exactly_as_pydicom(dicom_dir: Path, name: str, every: int) -> None:
    headers = open_study(dicom_dir / name).slices[::every]
    gdcm = decode_slices(headers, backend="gdcm")
    assert gdcm.shape == (len(headers), 512, 512)
    np.testing.assert_array_equal(gdcm, decode_slices(headers, backend="pydicom"))
    np.testing.assert_array_equal(gdcm, decode_slices(headers))


@pytest.mark.realdata
@pytest.mark.parametrize("name, every", [("chest_ricord_jpeg_lossless", 5), ("siemens_j2k_20_slices", 1)])
@requires_imagecodecs
def test_real_series_imagecodecs_decodes_exactly_as_gdcm(dicom_dir: Path, name: str, every: int) -> None:
    headers = open_study(dicom_dir / name).slices[::every]
    decoder = dicom_decoders.ImagecodecsDecoder.load()
    assert decoder is not None and all(decoder.can_decode(h) for h in headers)
    fast = decode_slices(headers, backend="imagecodecs", threads=2)
    assert fast.shape == (len(headers), 512, 512)
    np.testing.assert_array_equal(fast, decode_slices(headers, backend="gdcm", threads=2))
    if every == 1:  # pydicom (pylibjpeg-openjpeg) on the short JPEG 2000 series, every slice
        np.testing.assert_array_equal(fast, decode_slices(headers, backend="pydicom"))


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless], ids=["jpeg-ls", "rle"])
@requires_imagecodecs
def test_real_slices_reencoded_imagecodecs_decodes_exactly_as_gdcm_and_pydicom(
    dicom_dir: Path, tmp_path: Path, syntax: str
) -> None:
    """No real JPEG-LS or RLE series here: real J2K slices re-encoded losslessly by pydicom."""
    import pydicom

    sources = open_study(dicom_dir / "siemens_j2k_20_slices").slices[::4]
    for k, header in enumerate(sources):
        ds = pydicom.dcmread(header.path)
        ds.compress(syntax, ds.pixel_array, generate_instance_uid=False)
        ds.save_as(tmp_path / f"IM{k:04d}")
    headers = open_study(tmp_path, min_extent_mm=1).slices
    assert {h.transfer_syntax_uid for h in headers} == {syntax} and len(headers) == len(sources)
    fast = decode_slices(headers, backend="imagecodecs", threads=2)
    np.testing.assert_array_equal(fast, decode_slices(sources, backend="pydicom"))
    np.testing.assert_array_equal(fast, decode_slices(headers, backend="pydicom"))
    np.testing.assert_array_equal(fast, decode_slices(headers, backend="gdcm"))


@pytest.mark.realdata
def test_real_two_slices_is_refused_cleanly(dicom_dir: Path) -> None:
    with pytest.raises(GeometryError, match=r"2 slices covering"):
        open_study(dicom_dir / "two_slices")


def test_an_empty_image_matrix_is_a_study_error(tmp_path: Path) -> None:
    import pydicom

    series = write_series(tmp_path / "s")
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.Rows = 0
        ds.save_as(path)
    with pytest.raises(StudyError, match=r"Rows 0 x Columns 64 .* empty image matrix"):
        open_study(tmp_path)

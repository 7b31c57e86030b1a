"""The two header readers of the scan, dicomsdl (``dicomsdl`` extra) and pydicom, agree.

The scan reads headers with dicomsdl's C++ parser when it is installed and with pydicom otherwise
(and for every file dicomsdl cannot read); every test in test_study.py runs with both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from nodule_edge.runtime.dicom import headers as dicom_headers

from ..dicom_factory import write_series

pytestmark = pytest.mark.skipif(
    dicom_headers._dicomsdl_module() is None, reason="dicomsdl is not installed (the dicomsdl extra)"
)


def _scan_both(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    fast = dicom_headers.scan_folder(folder)
    monkeypatch.setattr(dicom_headers, "_dicomsdl_module", lambda: None)
    slow = dicom_headers.scan_folder(folder)
    return fast.files, slow.files


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transfer_syntax": ExplicitVRLittleEndian},
        {"transfer_syntax": ImplicitVRLittleEndian},
        {"transfer_syntax": RLELossless, "slope": 0.5, "intercept": -1000.5},
        {"transfer_syntax": JPEGLSLossless, "include_rescale": False},
        {"transfer_syntax": JPEG2000Lossless, "modality": None},
        {"sop_class": SecondaryCaptureImageStorage, "image_type": ("DERIVED", "SECONDARY")},
    ],
    ids=["explicit", "implicit", "rle", "jpegls-no-rescale", "j2k-no-modality", "derived"],
)
def test_dicomsdl_and_pydicom_headers_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict) -> None:
    write_series(tmp_path / "s", n_slices=5, **kwargs)
    fast, slow = _scan_both(tmp_path / "s", monkeypatch)
    assert len(fast) == 5
    assert fast == slow


@pytest.mark.parametrize("reader", ["dicomsdl", "pydicom"])
def test_non_ascii_description_is_decoded_by_its_character_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    if reader == "pydicom":
        monkeypatch.setattr(dicom_headers, "_dicomsdl_module", lambda: None)
    import pydicom

    series = write_series(tmp_path / "s", n_slices=3, description="plain")
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SeriesDescription = "Thorax nativ Lungenfenster \u00e9"
        ds.save_as(path)
    found = dicom_headers.scan_folder(tmp_path / "s").files
    assert [f.description for f in found] == ["Thorax nativ Lungenfenster \u00e9"] * 3


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["chest_ricord_jpeg_lossless", "siemens_j2k_20_slices", "two_slices"])
def test_dicomsdl_and_pydicom_headers_agree_on_real_series(
    dicom_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    folder = dicom_dir / name
    fast, slow = _scan_both(folder, monkeypatch)
    assert fast and fast == slow


def test_dicomsdl_parse_errors_print_nothing_and_the_file_goes_to_pydicom(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import dicomsdl

    series = write_series(tmp_path / "s", n_slices=4)
    damaged = tmp_path / "s" / "damaged.dcm"
    damaged.write_bytes(series.paths[0].read_bytes()[:700])  # cut inside a header element
    level = dicomsdl.get_loglevel()
    capfd.readouterr()
    scan = dicom_headers.scan_folder(tmp_path / "s")
    assert capfd.readouterr() == ("", "")  # dicomsdl prints its parse errors to stderr unless silenced
    assert dicomsdl.get_loglevel() == level  # and its level is given back
    assert str(damaged) not in dicom_headers._fast_scan([str(damaged)])
    assert len(scan.files) + len(scan.unreadable) + scan.not_dicom == 5

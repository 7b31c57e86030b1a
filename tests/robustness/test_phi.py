"""PHI: a study's patient name and ID never reach logs, console or non-DICOM outputs.

The demo study is rewritten with a distinctive PatientName/PatientID (and birth date), then run
through ``nodule-edge -vv infer`` (debug logging of every library) as a user would. Only the DICOM
outputs (SEG/SR, --dicom-out) may, and must, carry them.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pydicom
import pytest

from nodule_edge.runtime.outputs import write_outputs

PATIENT_NAME = "Quirinuszx^Wolkenbruch^Phi"
PATIENT_ID = "PHI-4711-QZX"
BIRTH_DATE = "19230817"
# Any of these in a log line or output would be a leak (name parts also appear reformatted).
NEEDLES = ["Quirinuszx", "Wolkenbruch", PATIENT_ID, "4711-QZX", BIRTH_DATE]
ENTRY_POINT = Path(sys.executable).with_name("nodule-edge")


@pytest.fixture(scope="module")
def phi_study(demo_study, tmp_path_factory) -> tuple[Path, tuple[int, int, int]]:
    folder, voxel = demo_study
    target = tmp_path_factory.mktemp("phi") / "study"
    shutil.copytree(folder, target)
    for path in sorted(target.iterdir()):
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = BIRTH_DATE
        ds.OtherPatientIDs = PATIENT_ID
        ds.save_as(path, enforce_file_format=True)
    return target, voxel


def _leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    low = text.lower()
    return [n for n in NEEDLES if n.lower() in low]


def _file_text(path: Path) -> bytes:
    """The file's bytes, with gzip members and PNG zlib chunks expanded (NIfTI headers, PNG text)."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data += gzip.decompress(data)
    if path.suffix == ".png":
        pos = 8
        while pos + 8 <= len(data):
            length = int.from_bytes(data[pos : pos + 4], "big")
            kind = data[pos + 4 : pos + 8]
            chunk = data[pos + 8 : pos + 8 + length]
            if kind in (b"zTXt", b"iTXt"):
                try:
                    data += zlib.decompress(chunk[chunk.index(b"\0") + 2 :])
                except (zlib.error, ValueError):
                    pass
            pos += 12 + length
    return data


def _run(*args: str, bundle: Path) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.exists():  # pragma: no cover
        pytest.skip("the nodule-edge entry point is not installed")
    env = dict(os.environ, NODULE_EDGE_BUNDLE=str(bundle), NODULE_EDGE_THREADS="1")
    return subprocess.run([str(ENTRY_POINT), "-vv", *args], capture_output=True, text=True, timeout=300, env=env)


def _have_highdicom() -> bool:
    try:
        import highdicom  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def test_the_study_really_carries_the_phi(phi_study):
    folder, _ = phi_study
    ds = pydicom.dcmread(next(folder.iterdir()))
    assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID


def test_infer_at_debug_level_leaks_nothing(phi_study, tiny_bundle, tmp_path):
    folder, (x, y, z) = phi_study
    out = tmp_path / "out"
    dicom_out = ["--dicom-out"] if _have_highdicom() else []
    proc = _run(
        "infer",
        str(folder),
        "--xyz",
        f"{x},{y},{z}",
        "--world",
        "70,56,25",
        "--out",
        str(out),
        *dicom_out,
        bundle=tiny_bundle,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEBUG" in proc.stderr  # debug logging really was on
    assert _leaks(proc.stdout) == [] and _leaks(proc.stderr) == [], "PHI in console output"

    files = sorted(out.iterdir())
    assert any(p.name.endswith(".nii.gz") for p in files) and any(p.suffix == ".png" for p in files)
    dicom_files = [p for p in files if p.suffix == ".dcm"]
    for path in files:
        if path in dicom_files:
            continue
        assert _leaks(_file_text(path)) == [], f"PHI in {path.name}"
    if dicom_out:
        assert dicom_files, "--dicom-out wrote no DICOM"
        for path in dicom_files:
            ds = pydicom.dcmread(path)
            assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID, f"{path.name} lost the patient"


def test_errors_at_debug_level_leak_nothing(phi_study, tiny_bundle, tmp_path):
    folder, _ = phi_study
    proc = _run("infer", str(folder), "--xyz", "10,10,400", "--out", str(tmp_path / "o"), bundle=tiny_bundle)
    assert proc.returncode == 2
    assert _leaks(proc.stdout + proc.stderr) == []

    # A damaged copy: one file cut inside its header, one other's pixel data cut short.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    files = sorted(broken.iterdir())
    head = files[20].read_bytes()
    files[20].write_bytes(head[: head.index(PATIENT_ID.encode()) + 3])
    tail = files[24].read_bytes()
    files[24].write_bytes(tail[: len(tail) - 5000])
    proc = _run("infer", str(broken), "--xyz", "62,90,24", "--out", str(tmp_path / "o2"), bundle=tiny_bundle)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert _leaks(proc.stdout + proc.stderr) == []


def test_python_api_logs_no_phi(phi_study, real_inferer, tmp_path, caplog):
    folder, voxel = phi_study
    caplog.set_level(logging.DEBUG)  # every logger: nodule_edge, pydicom, highdicom, ...
    result = real_inferer.infer(folder, voxels=[voxel])
    write_outputs(
        result,
        tmp_path / "out",
        real_inferer.spec,
        thumbnails=real_inferer.thumbnails,
        index_kind=real_inferer.index_kind,
    )
    with pytest.raises(Exception) as info:
        real_inferer.infer(folder, voxels=[(5000, 0, 0)])
    assert _leaks(str(info.value)) == []
    assert caplog.records, "nothing was logged: the check would be vacuous"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert _leaks(text) == [], f"PHI in a log record of {record.name}: {text[:200]}"
    assert _leaks(repr(result.study)) == []
    for path in (tmp_path / "out").iterdir():
        assert _leaks(_file_text(path)) == [], f"PHI in {path.name}"

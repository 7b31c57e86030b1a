"""What a failing `nodule-edge` run prints: its own one-line error, and other libraries' output only at -v/-vv.

A slice whose JPEG Lossless stream cannot be decoded makes three decoders fail in turn: imagecodecs
(the package's own fallback note), GDCM inside SimpleITK (libjpeg's messages written straight to
stderr) and pydicom (its decoder plugins log each failure with a full traceback). The runs go through
the installed entry point in a subprocess, as a user would run them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import JPEGLosslessSV1

from nodule_edge.cli import _console_filter
from tests.runtime.dicom_factory import write_series

ENTRY_POINT = Path(sys.executable).with_name("nodule-edge")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("imagecodecs") is None,
    reason="the synthetic JPEG Lossless series is encoded with imagecodecs",
)


@pytest.fixture(scope="module")
def damaged_study(tmp_path_factory) -> tuple[Path, Path]:
    """A 40-slice JPEG Lossless series whose middle slice's Huffman table is zeroed; and that slice."""
    series = write_series(
        tmp_path_factory.mktemp("damaged") / "study",
        n_slices=40,
        slice_spacing=1.0,
        transfer_syntax=JPEGLosslessSV1,
        shuffle_seed=None,
    )
    victim = series.paths[20]
    data = victim.read_bytes()
    dht = data.rfind(b"\xff\xc4")
    victim.write_bytes(data[: dht + 4] + bytes(20) + data[dht + 24 :])
    return series.paths[0].parent, victim


def _infer(tiny_bundle: Path, study: Path, out: Path, *verbosity: str) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.exists():  # pragma: no cover - not installed in this interpreter
        pytest.skip(f"the nodule-edge entry point is not installed beside {sys.executable}")
    env = dict(os.environ, NODULE_EDGE_BUNDLE=str(tiny_bundle), NODULE_EDGE_THREADS="1")
    args = [str(ENTRY_POINT), *verbosity, "infer", str(study), "--xyz", "32,32,20", "--out", str(out)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)


def test_undecodable_slice_ends_with_one_error_line_and_nothing_else(tiny_bundle, damaged_study, tmp_path):
    study, victim = damaged_study
    done = _infer(tiny_bundle, study, tmp_path / "out")
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot decode pixel data of ") and str(victim) in lines[0]
    assert done.stdout == ""


def test_the_details_appear_with_vv(tiny_bundle, damaged_study, tmp_path):
    study, victim = damaged_study
    done = _infer(tiny_bundle, study, tmp_path / "out", "-vv")
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1].startswith("error: cannot decode pixel data of ")
    assert f"imagecodecs cannot decode 1 of 32 JPEG Lossless files (first {victim}" in done.stderr
    assert "GDCM printed while decoding" in done.stderr and "Bogus marker length" in done.stderr
    assert "ERROR pydicom" in done.stderr and "Traceback (most recent call last)" in done.stderr


def test_with_v_other_libraries_warnings_show_but_not_their_debug(tiny_bundle, damaged_study, tmp_path):
    study, _ = damaged_study
    done = _infer(tiny_bundle, study, tmp_path / "out", "-v")
    assert done.returncode == 3, done.stderr
    assert "ERROR pydicom" in done.stderr
    assert "INFO nodule_edge" in done.stderr
    assert "DEBUG" not in done.stderr


@pytest.mark.parametrize(
    ("verbose", "name", "level", "shown"),
    [
        (0, "nodule_edge.runtime.study", logging.WARNING, True),
        (0, "nodule_edge", logging.ERROR, True),
        (0, "pydicom.pixels.decoders.base", logging.ERROR, False),
        (0, "py.warnings", logging.WARNING, False),
        (0, "nodule_edgeish", logging.WARNING, False),
        (1, "pydicom", logging.WARNING, True),
        (1, "pylibjpeg.utils", logging.INFO, False),
        (2, "pylibjpeg.utils", logging.DEBUG, True),
    ],
)
def test_console_filter(verbose, name, level, shown):
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    assert _console_filter(verbose)(record) is shown


@pytest.mark.parametrize(("verbosity", "shown"), [((), False), (("-v",), True)])
def test_itk_warnings_are_shown_only_with_v(verbosity, shown, tmp_path):
    """ITK writes its warnings to stderr itself; the CLI turns them off unless -v is given."""
    import SimpleITK as sitk
    from click.testing import CliRunner

    from nodule_edge.cli import main

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(not shown)
    try:
        result = CliRunner().invoke(
            main, [*verbosity, "infer", str(tmp_path / "missing"), "--xyz", "1,2,3", "--out", str(tmp_path / "out")]
        )
        assert result.exit_code == 2  # the study path does not exist: parsed after the group's setup
        assert sitk.ProcessObject.GetGlobalWarningDisplay() is shown
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)

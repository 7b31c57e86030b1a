"""Fuzzed DICOM headers and pixel data: a result or one of the package's own exceptions, nothing else.

A small valid series (12 slices of 24×24, 36 mm deep) is mutated by hypothesis: geometry tags,
matrix size against pixel data length, rescale, bit depth, transfer syntax, truncated pixel data,
truncated or corrupted files, deleted tags and files. Each mutant goes through the front end
(``open_study`` + ``build_patches``) and through ``NoduleInferer`` (engine replaced by a cheap
stand-in); a few go through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate

from nodule_edge.errors import NoduleEdgeError
from nodule_edge.runtime.outputs import build_report
from nodule_edge.runtime.study import open_study
from tests.runtime.dicom_factory import write_series

N_SLICES = 12
PER_EXAMPLE_TIMEOUT_S = 60

COMPRESSED = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
NATIVE = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"]  # implicit, explicit, deflated
UNKNOWN = ["1.2.3.4.5", "1.2.840.10008.1.2.4.999"]


# ------------------------------------------------------------------------ the base series


class _Base:
    """The base series as file bytes (kept out of hypothesis' reports of failing examples)."""

    def __init__(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            series = write_series(
                Path(tmp),
                n_slices=N_SLICES,
                rows=24,
                cols=24,
                pixel_spacing=(1.5, 1.5),
                slice_spacing=3.0,
                shuffle_seed=None,
            )
            self.files = [(p.name, p.read_bytes()) for p in series.paths]
        self.centre = tuple(float(v) for v in series.center_world)

    def __iter__(self):
        return iter((self.files, self.centre))

    def __repr__(self) -> str:
        return f"<base series: {len(self.files)} slices>"


@pytest.fixture(scope="module")
def base() -> _Base:
    return _Base()


# ------------------------------------------------------------------------ mutations

any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, -1.0, 1e-12, 1e12, 1e39, -1e39, math.nan, math.inf]),
)
small_float = st.floats(min_value=-400, max_value=400, allow_nan=False)
float_lists = st.one_of(
    st.lists(any_float, min_size=0, max_size=7),
    st.lists(small_float, min_size=0, max_size=7),
)
orientations = st.one_of(
    float_lists,
    st.sampled_from(
        [
            [0, 1, 0, 1, 0, 0],  # transposed
            [1, 0, 0, 0, 0, -1],  # coronal
            [1, 0, 0, 0, 1, 0, 0],  # seven values
            [1, 0, 0, 0, 0.996, 0.087],  # slight tilt of the plane
            [1, 0, 0, 1, 0, 0],  # parallel rows and columns
            [0, 0, 0, 0, 0, 0],
        ]
    ),
)
HEADER_FIELDS = {
    "ImageOrientationPatient": orientations,
    "ImagePositionPatient": float_lists,
    "PixelSpacing": float_lists,
    "SliceThickness": any_float,
    "Rows": st.integers(0, 65535),
    "Columns": st.integers(0, 65535),
    "RescaleSlope": any_float,
    "RescaleIntercept": any_float,
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64]),
    "BitsStored": st.integers(0, 64),
    "HighBit": st.integers(0, 64),
    "PixelRepresentation": st.integers(0, 3),
    "SamplesPerPixel": st.integers(0, 4),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", ""]),
    "NumberOfFrames": st.integers(0, 3),
    "InstanceNumber": st.integers(-5, 5),
    "Modality": st.sampled_from(["CT", "MR", "", "SR", "SEG"]),
    "ImageType": st.sampled_from([["DERIVED", "SECONDARY"], ["ORIGINAL", "PRIMARY", "LOCALIZER"], []]),
    "SOPClassUID": st.sampled_from(["1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.7", "1.2.3"]),
    "SeriesInstanceUID": st.sampled_from(["", "1.2.3.4"]),
}

targets = st.one_of(st.just("all"), st.integers(0, N_SLICES - 1))
mutation = st.one_of(
    # One branch per header field, so that each is drawn about as often as each byte-level mutation.
    *(st.tuples(st.just("set"), targets, st.just(name), values) for name, values in sorted(HEADER_FIELDS.items())),
    st.tuples(st.just("delete"), targets, st.sampled_from(sorted(HEADER_FIELDS) + ["PixelData"]), st.none()),
    st.tuples(st.just("transfer_syntax"), targets, st.sampled_from(sorted(COMPRESSED) + NATIVE + UNKNOWN), st.none()),
    st.tuples(st.just("truncate_pixels"), targets, st.integers(0, 24 * 24 * 2 - 1), st.none()),
    st.tuples(st.just("extend_pixels"), targets, st.integers(1, 4096), st.none()),
    st.tuples(st.just("truncate_file"), targets, st.floats(0, 0.999), st.none()),
    st.tuples(st.just("corrupt_bytes"), targets, st.floats(0, 0.999), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete_file"), st.integers(0, N_SLICES - 1), st.none(), st.none()),
)
mutations = st.lists(mutation, min_size=1, max_size=3)


def _apply_header(ds: pydicom.Dataset, kind: str, field: str | None, value) -> None:
    if kind == "set":
        setattr(ds, field, value)
    elif kind == "delete":
        if field in ds:
            del ds[field]
    elif kind == "transfer_syntax":
        if field in COMPRESSED and "PixelData" in ds:
            # Native pixels declared as compressed: decoders must fail cleanly on them.
            ds.PixelData = encapsulate([ds.PixelData])
        ds.file_meta.TransferSyntaxUID = field
    elif kind == "truncate_pixels":
        if "PixelData" in ds:
            ds.PixelData = ds.PixelData[:field]
    elif kind == "extend_pixels":
        if "PixelData" in ds:
            ds.PixelData = ds.PixelData + bytes(field + field % 2)


def write_mutant(folder: Path, files: list[tuple[str, bytes]], muts) -> bool:
    """Write the base series with ``muts`` applied; False when pydicom refuses to write it."""
    for k, (name, data) in enumerate(files):
        mine = [m for m in muts if m[1] == "all" or m[1] == k]
        if any(m[0] == "delete_file" and m[1] == k for m in muts):
            continue
        header = [m for m in mine if m[0] in ("set", "delete", "transfer_syntax", "truncate_pixels", "extend_pixels")]
        if header:
            ds = pydicom.dcmread(io.BytesIO(data))
            try:
                # Writing invalid values is the point here; pydicom's warnings about them are noise.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for kind, _, field, value in header:
                        _apply_header(ds, kind, field, value)
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
            except Exception:  # noqa: BLE001 - pydicom refuses some combinations: not under test
                return False
            data = buf.getvalue()
        for kind, _, field, value in mine:
            if kind == "truncate_file":
                data = data[: int(len(data) * field)]
            elif kind == "corrupt_bytes":
                at = int(len(data) * field)
                data = data[:at] + value + data[at + len(value) :]
        (folder / name).write_bytes(data)
    return True


@contextlib.contextmanager
def time_limit(seconds: int):
    """Turn a hang into a test failure (SIGALRM; the tests run in the main thread)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no outcome within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call):
    """('ok', value) or ('error', NoduleEdgeError); anything else propagates and fails the test."""
    try:
        return "ok", call()
    except NoduleEdgeError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return "error", exc


FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces, CI does not flake
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
    database=None,
)


# The fields the issue names always run, besides the 40 drawn examples.
NAMED_EXAMPLES = [
    [("set", "all", "ImageOrientationPatient", [0, 0, 0, 0, 0, 0])],
    [("set", 4, "ImageOrientationPatient", [1, 0, 0, 0, 0.996, 0.087])],
    [("set", "all", "ImageOrientationPatient", [math.nan, 0, 0, 0, 1, 0])],
    [("set", 6, "ImagePositionPatient", [1e300, -1e300, 0.0])],
    [("set", "all", "ImagePositionPatient", [0.0, 0.0])],
    [("set", "all", "PixelSpacing", [0.0, 1.5])],
    [("set", "all", "PixelSpacing", [1e-9, 1e-9])],
    [("set", 2, "PixelSpacing", [1.5, 1.6])],
    [("set", "all", "Rows", 25), ("set", "all", "Columns", 23)],
    [("set", "all", "Rows", 65535)],
    [("set", "all", "RescaleSlope", 1e30)],
    [("set", "all", "RescaleIntercept", -1e30)],
    [("set", "all", "BitsAllocated", 8)],
    [("set", "all", "BitsAllocated", 32)],
    [("transfer_syntax", "all", "1.2.840.10008.1.2.4.90", None)],
    [("transfer_syntax", "all", "1.2.840.10008.1.2", None)],
    [("transfer_syntax", 7, "1.2.840.10008.1.2.5", None)],
    [("truncate_pixels", "all", 0, None)],
    [("truncate_pixels", 6, 1151, None)],
    [("extend_pixels", 6, 2, None)],
    [("delete", "all", "PixelData", None)],
    [("corrupt_bytes", 6, 0.5, b"\xff" * 8)],
]


def _with_named_examples(test):
    for muts in reversed(NAMED_EXAMPLES):
        test = example(muts=muts)(test)
    return test


@FUZZ
@_with_named_examples
@given(muts=mutations)
def test_front_end_gives_a_patch_or_its_own_error(base, fake_inferer, muts):
    files, centre = base
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not write_mutant(folder, files, muts):
            return
        with time_limit(PER_EXAMPLE_TIMEOUT_S):
            kind, value = outcome(lambda: open_study(folder).build_patches([centre]))
            if kind == "ok":
                assert value.shape == (1, 2, 64, 64, 64) and value.dtype == np.float32
                finite = value[np.isfinite(value)]
                assert finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
            # The embedding API: a result whose every number is finite, or its own error.
            kind, result = outcome(lambda: fake_inferer.infer(folder, worlds=[centre]))
            if kind == "ok":
                report = build_report(result, fake_inferer.index_kind)
                json.dumps(report, allow_nan=False)  # raises on NaN/inf anywhere in the report


BAD_RESCALE = [("RescaleSlope", math.nan), ("RescaleIntercept", math.inf), ("RescaleIntercept", 1e39)]


@pytest.mark.parametrize("field,value", BAD_RESCALE)
def test_front_end_never_returns_nan_for_a_bad_rescale(base, tmp_path, field, value):
    files, centre = base
    assert write_mutant(tmp_path, files, [("set", "all", field, value)])
    kind, patches = outcome(lambda: open_study(tmp_path).build_patches([centre]))
    assert kind == "error" or np.isfinite(patches).all()


@pytest.mark.parametrize("field,value", BAD_RESCALE)
def test_inferer_never_returns_nan_for_a_bad_rescale(base, tmp_path, fake_inferer, field, value):
    files, centre = base
    assert write_mutant(tmp_path, files, [("set", "all", field, value)])
    calls = fake_inferer.engine.calls
    kind, result = outcome(lambda: fake_inferer.infer(tmp_path, worlds=[centre]))
    if kind == "error":
        assert fake_inferer.engine.calls == calls  # refused before the engine
    else:
        assert np.isfinite(result.nodules[0].patch).all()
        json.dumps(build_report(result, fake_inferer.index_kind), allow_nan=False)


@pytest.mark.parametrize(
    "muts",
    [
        [("set", "all", "Rows", 4096)],
        [("set", "all", "Rows", 25)],  # 600 pixels for 576 stored
        [("set", "all", "Columns", 12)],
        [("truncate_pixels", "all", 1000, None)],
        # One slice inside the cube, one pixel short (an odd length would be padded back by pydicom).
        [("truncate_pixels", 6, 24 * 24 * 2 - 2, None)],
    ],
    ids=["rows>data", "one-row-short", "cols<data", "truncated", "one-slice-one-pixel-short"],
)
def test_pixel_data_that_does_not_fit_the_matrix_is_refused(base, tmp_path, muts):
    """Rows x Columns x BitsAllocated must match the pixel data; a mismatch is never a patch."""
    files, centre = base
    assert write_mutant(tmp_path, files, muts)
    with pytest.raises(NoduleEdgeError):
        open_study(tmp_path).build_patches([centre])


# ------------------------------------------------------------------------ through the CLI

# case -> (mutations, must the CLI refuse it?)
CLI_CASES = {
    "truncated pixel data": ([("truncate_pixels", 5, 100, None)], True),
    "nan rescale slope": ([("set", "all", "RescaleSlope", math.nan)], False),
    "overflowing rescale intercept": ([("set", "all", "RescaleIntercept", 1e39)], True),
    "garbage orientation": ([("set", 3, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0])], True),
    "unknown transfer syntax": ([("transfer_syntax", "all", "1.2.3.4.5", None)], True),
    "jpeg claim on raw pixels": ([("transfer_syntax", 4, "1.2.840.10008.1.2.4.70", None)], True),
    "matrix larger than pixels": ([("set", "all", "Rows", 4096)], True),
    "truncated files": ([("truncate_file", "all", 0.5, None)], True),
}


def _cli(folder: Path, centre, out: Path, inferer, monkeypatch):
    import nodule_edge.cli as cli
    from nodule_edge.cli import _common

    monkeypatch.setattr(_common, "_make_inferer", lambda *a, **k: inferer)
    point = ",".join(f"{v:.4f}" for v in centre)
    return CliRunner().invoke(cli.main, ["infer", str(folder), "--world", point, "--out", str(out)])


def _assert_one_line_or_success(result, out: Path) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and lines[0].startswith("error:"), result.stderr
        assert not any(line.lstrip().startswith('File "') for line in lines), result.stderr
        assert result.exit_code not in (1, 70), result.stderr  # 70: an internal error, i.e. a bug
        assert not out.exists()
    else:
        json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_on_malformed_studies(base, tmp_path, fake_inferer, monkeypatch, case):
    files, centre = base
    study = tmp_path / "study"
    study.mkdir()
    muts, must_refuse = CLI_CASES[case]
    assert write_mutant(study, files, muts)
    out = tmp_path / "out"
    result = _cli(study, centre, out, fake_inferer, monkeypatch)
    _assert_one_line_or_success(result, out)
    if must_refuse:
        assert result.exit_code != 0, f"{case}: accepted\n{result.output}"


@settings(max_examples=10, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(muts=mutations)
def test_cli_never_shows_a_traceback(base, fake_inferer, muts):
    files, centre = base
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        study = Path(tmp) / "study"
        study.mkdir()
        if not write_mutant(study, files, muts):
            return
        out = Path(tmp) / "out"
        with time_limit(PER_EXAMPLE_TIMEOUT_S):
            result = _cli(study, centre, out, fake_inferer, mp)
        _assert_one_line_or_success(result, out)


def test_cli_error_with_the_real_engine(base, tmp_path, real_inferer, monkeypatch):
    """One malformed study with the real model: the engine is never reached, one line, no output."""
    files, centre = base
    study = tmp_path / "study"
    study.mkdir()
    assert write_mutant(study, files, [("truncate_pixels", "all", 1000, None)])
    out = tmp_path / "out"
    result = _cli(study, centre, out, real_inferer, monkeypatch)
    assert result.exit_code == 3
    _assert_one_line_or_success(result, out)

"""Write failures (disk full mid-output, unwritable folder): OutputError, nothing partial left.

The disk is "filled" by making the n-th write call raise ``OSError(ENOSPC)``, the error a real full
disk gives; the destination must then not exist (or keep its previous contents with --overwrite),
and no temporary folder may remain beside it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import nodule_edge._files as files_mod
import nodule_edge.runtime.evaluate as evaluate_mod
import nodule_edge.runtime.nifti as nifti_mod
import nodule_edge.runtime.outputs as outputs_mod
from nodule_edge.cli import main
from nodule_edge.errors import OutputError
from nodule_edge.runtime.outputs import write_outputs


@pytest.fixture(scope="module")
def result(real_inferer, demo_study):
    folder, voxel = demo_study
    return real_inferer.infer(folder, voxels=[voxel, (100, 80, 20)])


def fail_on_call(n: int, real, exc: BaseException | None = None):
    """A wrapper that lets calls through except the n-th (1-based), which raises ``exc``."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    wrapper.calls = calls  # type: ignore[attr-defined]
    return wrapper


def _write(result, real_inferer, out: Path, **kwargs):
    return write_outputs(
        result, out, real_inferer.spec, thumbnails=real_inferer.thumbnails, index_kind=real_inferer.index_kind, **kwargs
    )


def _assert_nothing_left(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before, "a partial output or temp folder was left behind"


@pytest.mark.parametrize("nth", [1, 2, 4])
def test_nifti_write_fails(result, real_inferer, tmp_path, monkeypatch, nth):
    wrapper = fail_on_call(nth, outputs_mod.write_nifti)
    monkeypatch.setattr(outputs_mod, "write_nifti", wrapper)
    with pytest.raises(OutputError, match="No space left on device"):
        _write(result, real_inferer, tmp_path / "out")
    assert wrapper.calls["n"] == nth
    _assert_nothing_left(tmp_path, set())


def test_disk_full_half_way_through_a_nifti_file(result, real_inferer, tmp_path, monkeypatch):
    """The compressed stream of a NIfTI file fails after its header: the file is named, nothing is left."""
    monkeypatch.setattr(nifti_mod.gzip.GzipFile, "write", fail_on_call(2, nifti_mod.gzip.GzipFile.write))
    with pytest.raises(OutputError, match=r"nodule0_segmentation\.nii\.gz: No space left on device"):
        _write(result, real_inferer, tmp_path / "out")
    _assert_nothing_left(tmp_path, set())


@pytest.mark.parametrize("nth", [1, 3])
def test_png_write_fails(result, real_inferer, tmp_path, monkeypatch, nth):
    monkeypatch.setattr(Image.Image, "save", fail_on_call(nth, Image.Image.save))
    with pytest.raises(OutputError, match="No space left"):
        _write(result, real_inferer, tmp_path / "out")
    _assert_nothing_left(tmp_path, set())


def test_report_write_fails(result, real_inferer, tmp_path, monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "report.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OutputError):
        _write(result, real_inferer, tmp_path / "out")
    _assert_nothing_left(tmp_path, set())


def test_final_rename_fails(result, real_inferer, tmp_path, monkeypatch):
    monkeypatch.setattr(
        files_mod.os, "rename", fail_on_call(1, os.rename, OSError(errno.EXDEV, "Invalid cross-device link"))
    )
    with pytest.raises(OutputError):
        _write(result, real_inferer, tmp_path / "out")
    _assert_nothing_left(tmp_path, set())


def _previous_outputs(out: Path) -> dict[str, bytes]:
    out.mkdir()
    (out / "report.json").write_text('{"previous": true}')
    (out / "nodule0_overlay.png").write_bytes(b"old png")
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("where", ["nifti", "png"])
def test_overwrite_keeps_the_previous_outputs_when_writing_fails(result, real_inferer, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    previous = _previous_outputs(out)
    if where == "nifti":
        monkeypatch.setattr(outputs_mod, "write_nifti", fail_on_call(3, outputs_mod.write_nifti))
    else:
        monkeypatch.setattr(Image.Image, "save", fail_on_call(2, Image.Image.save))
    with pytest.raises(OutputError):
        _write(result, real_inferer, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    _assert_nothing_left(tmp_path, {"out"})


def test_overwrite_keeps_the_previous_outputs_when_the_swap_fails(result, real_inferer, tmp_path, monkeypatch):
    """The old folder is moved aside, then the new one cannot be moved in: the old one comes back."""
    out = tmp_path / "out"
    previous = _previous_outputs(out)
    monkeypatch.setattr(files_mod.os, "rename", fail_on_call(2, os.rename))
    with pytest.raises(OutputError):
        _write(result, real_inferer, out, overwrite=True)
    assert out.is_dir() and {p.name: p.read_bytes() for p in out.iterdir()} == previous
    _assert_nothing_left(tmp_path, {"out"})


def test_overwrite_success_replaces_everything(result, real_inferer, tmp_path):
    out = tmp_path / "out"
    _previous_outputs(out)
    report = _write(result, real_inferer, out, overwrite=True)
    assert "previous" not in (out / "report.json").read_text()
    assert len(report["nodules"]) == 2
    _assert_nothing_left(tmp_path, {"out"})


def test_cli_disk_full_is_one_line_and_leaves_nothing(real_inferer, demo_study, tmp_path, monkeypatch):
    from nodule_edge.cli import _common

    folder, (x, y, z) = demo_study
    monkeypatch.setattr(_common, "_make_inferer", lambda *a, **k: real_inferer)
    monkeypatch.setattr(outputs_mod, "write_nifti", fail_on_call(2, outputs_mod.write_nifti))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(out)])
    assert res.exit_code == OutputError.exit_code, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0]
    _assert_nothing_left(tmp_path, set())


def test_evaluate_csv_write_fails(real_inferer, synthetic_voi_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(files_mod.os, "replace", fail_on_call(1, os.replace))
    with pytest.raises(OutputError, match="nothing was written"):
        evaluate_mod.evaluate_voi_dir(real_inferer, synthetic_voi_dir, tmp_path / "p.csv", limit=1)
    _assert_nothing_left(tmp_path, set())


def test_unwritable_output_folder(result, real_inferer, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    try:
        probe = parent / ".probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip(
                "running with privileges that ignore folder permissions (root): chmod 0o500 does not block writes"
            )
        with pytest.raises(OutputError, match="permission denied|Permission denied"):
            _write(result, real_inferer, parent / "out")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("parent", ["/sys", "/proc"])
def test_folder_that_refuses_writes_even_to_root(result, real_inferer, parent):
    """/sys and /proc refuse new entries whatever the permissions say (os.access says yes as root)."""
    if not Path(parent).is_dir():
        pytest.skip(f"{parent} not mounted")
    out = Path(parent) / "nodule-edge-out"
    with pytest.raises(OutputError, match=parent):
        _write(result, real_inferer, out)
    assert not out.exists()


def test_cli_on_a_folder_that_refuses_writes(real_inferer, demo_study, monkeypatch):
    from nodule_edge.cli import _common

    if not Path("/sys").is_dir():
        pytest.skip("/sys not mounted")
    folder, (x, y, z) = demo_study
    monkeypatch.setattr(_common, "_make_inferer", lambda *a, **k: real_inferer)
    res = CliRunner().invoke(main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", "/sys/nodule-edge-out"])
    assert res.exit_code == OutputError.exit_code, res.output
    assert "Traceback" not in res.output and "internal error" not in res.output
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1

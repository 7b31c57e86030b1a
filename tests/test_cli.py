"""The `nodule-edge` command line: help, infer end to end, error handling, index, evaluate, demo.

Most cases run in-process with click's CliRunner; the end-to-end and one-line-error cases run
the installed entry point in a subprocess, as a user would.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from PIL import Image

from nodule_edge import __version__
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.cli import main

ENTRY_POINT = Path(sys.executable).with_name("nodule-edge")
CSV_HEADER = [
    "voi_id",
    "malignancy_probability",
    "subtlety",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "malignancy",
    "dice",
    "nodule_attention",
    "background_attention",
    "retrieval_score",
    "quality_flags",
    "outline_logit",
]


def _cli_env(bundle: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NODULE_EDGE_BUNDLE", None)
    if bundle is not None:
        env["NODULE_EDGE_BUNDLE"] = str(bundle)
    env.setdefault("NODULE_EDGE_THREADS", "1")
    return env


def run_entry_point(*args: str, bundle: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.exists():  # pragma: no cover - not installed in this interpreter
        pytest.skip(f"the nodule-edge entry point is not installed beside {sys.executable}")
    return subprocess.run(
        [str(ENTRY_POINT), *args], capture_output=True, text=True, timeout=timeout, env=_cli_env(bundle)
    )


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def use_bundle(tiny_bundle, monkeypatch):
    monkeypatch.setenv("NODULE_EDGE_BUNDLE", str(tiny_bundle))
    monkeypatch.setenv("NODULE_EDGE_THREADS", "1")
    return tiny_bundle


def assert_clean_error(result, exit_code: int | None = None, *, one_line: bool = True) -> str:
    """A non-zero exit with a short message and no traceback; returns the message."""
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    stderr = result.stderr
    assert result.exit_code if hasattr(result, "exit_code") else result.returncode, output
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    if exit_code is not None:
        assert code == exit_code, output
    assert "Traceback" not in output
    if hasattr(result, "exception") and result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    if one_line:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr
    return stderr


# ------------------------------------------------------------------------------------- help


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((prefix + (name,), cmd))
        if isinstance(cmd, click.Group):
            out.extend(_all_commands(cmd, prefix + (name,)))
    return out


COMMANDS = _all_commands(main)


def test_the_expected_commands_exist():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"infer", "evaluate", "demo", "train", "export", "index", "index build", "index add", "index query"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_help(runner, path):
    cmd = dict(COMMANDS)[path]
    result = runner.invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {' '.join(path)}" in result.output or "Usage:" in result.output
    assert cmd.help and cmd.help.strip(), f"{' '.join(path)} has no help text"
    first = " ".join(cmd.help.strip().split("\n\n")[0].split())
    assert first in " ".join(result.output.split())  # click re-wraps the text
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"option {param.opts} of {' '.join(path)} has no help text"


def test_export_help_is_the_real_command(runner):
    result = runner.invoke(main, ["export", "--help"])
    assert "CHECKPOINT" in result.output and "--index-from" in result.output
    assert "not implemented" not in result.output


def test_top_level_help_and_version(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "infer" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


# ------------------------------------------------------------------------------------ infer


def check_report(report: dict, out_dir: Path, n_nodules: int = 1) -> None:
    """The report.json schema documented in nodule_edge.runtime.outputs."""
    assert report["schema_version"] == "1.3"
    assert report["nodule_edge_version"] == __version__
    quality = report["quality"]
    assert set(quality) == {"training_data", "flags"}
    for flag in quality["flags"]:
        assert set(flag) == {"code", "message", "value", "nodule"} and flag["message"]
        assert flag["nodule"] is None or 0 <= flag["nodule"] < n_nodules
    study = report["study"]
    assert study["source"] == "dicom"
    assert study["slice_count"] == 48 and study["size_voxels"] == [192, 192, 48]
    assert study["spacing_mm"] == pytest.approx([0.7, 0.7, 1.25])
    assert study["series_instance_uid"].startswith("1.2.")
    assert study["transfer_syntax"]["name"] == "Explicit VR Little Endian"
    model = report["model"]
    assert set(model) >= {"version", "backend", "index_kind"}
    from nodule_edge.runtime.engines.openvino import openvino_available

    assert model["backend"] == ("cpu-fast" if openvino_available() else "cpu") and model["index_kind"] == "attributes"
    assert len(report["nodules"]) == n_nodules
    for i, n in enumerate(report["nodules"]):
        assert n["index"] == i
        assert len(n["xyz_voxel"]) == 3 and len(n["world_lps_mm"]) == 3
        assert all(isinstance(v, float) and math.isfinite(v) for v in n["xyz_voxel"] + n["world_lps_mm"])
        assert isinstance(n["center_slice"]["sop_instance_uid"], str) and n["center_slice"]["sop_instance_uid"]
        assert n["center_slice"]["instance_number"] == round(n["xyz_voxel"][2]) + 1
        assert 0.0 <= n["malignancy_probability"] <= 1.0
        assert isinstance(n["model_input"]["nodule_bounded"], bool) and isinstance(
            n["model_input"]["first_pass_found_nodule"], bool
        )
        # This bundle's model has no outline term (tests/runtime/test_outline_term.py has one).
        assert n["outline_term"] is None
        assert list(n["attributes"]) == list(ATTRIBUTE_NAMES)
        assert all(1.0 <= v <= 5.0 for v in n["attributes"].values())
        seg = n["segmentation"]
        assert seg["volume_mm3"] >= 0 and seg["longest_axial_diameter_mm"] >= 0
        assert seg["file"] == f"nodule{i}_segmentation.nii.gz" and (out_dir / seg["file"]).is_file()
        sal = n["saliency"]
        assert sal["file"] == f"nodule{i}_saliency.nii.gz" and (out_dir / sal["file"]).is_file()
        assert 0.0 <= sal["nodule_attention"] <= 1.0 and 0.0 <= sal["background_attention"] <= 1.0
        assert isinstance(sal["trustworthy"], bool)
        assert isinstance(n["similar"], list) and len(n["similar"]) == 6
        for s in n["similar"]:
            assert set(s) >= {"id", "distance", "label", "diameter_mm"}
            assert s["distance"] >= 0 and s["label"] in (0, 1, None)
        assert [s["distance"] for s in n["similar"]] == sorted(s["distance"] for s in n["similar"])
        assert n["retrieval_score"] is None or 0.0 <= n["retrieval_score"] <= 1.0
        assert (out_dir / n["overlay_png"]).is_file()
        assert n["similar_png"] is None or (out_dir / n["similar_png"]).is_file()
    timing = report["timing_ms"]
    assert {"open_study", "read_and_patch", "engine"} <= set(timing)
    assert all(v >= 0 for v in timing.values())


@pytest.fixture(scope="module")
def infer_run(tiny_bundle, demo_study, tmp_path_factory):
    """`nodule-edge infer` through the installed entry point, two nodules in one call."""
    folder, (x, y, z) = demo_study
    out = tmp_path_factory.mktemp("cli") / "out"
    proc = run_entry_point(
        "infer",
        str(folder),
        "--xyz",
        f"{x},{y},{z}",
        "--world",
        "70.0,56.0,25.0",
        "--out",
        str(out),
        "--bundle",
        str(tiny_bundle),
    )
    return proc, out


def test_infer_end_to_end_writes_report_nifti_and_png(infer_run, demo_study):
    proc, out = infer_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    check_report(report, out, n_nodules=2)
    folder, voxel = demo_study
    assert report["nodules"][0]["xyz_voxel"] == list(map(float, voxel))
    assert report["nodules"][1]["world_lps_mm"] == [70.0, 56.0, 25.0]
    assert report["nodules"][1]["xyz_voxel"] == pytest.approx([100.0, 80.0, 20.0], abs=1e-6)
    assert "malignancy probability" in proc.stdout and "nodule 1" in proc.stdout

    names = sorted(p.name for p in out.iterdir())
    expected = {"report.json"} | {
        f"nodule{i}_{k}"
        for i in range(2)
        for k in ("segmentation.nii.gz", "saliency.nii.gz", "overlay.png", "similar.png")
    }
    assert set(names) == expected
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left

    for _i, n in enumerate(report["nodules"]):
        seg = sitk.ReadImage(str(out / n["segmentation"]["file"]))
        sal = sitk.ReadImage(str(out / n["saliency"]["file"]))
        # The study's own lattice: same spacing and orientation, covering the nodule centre.
        for img in (seg, sal):
            assert img.GetSpacing() == pytest.approx((0.7, 0.7, 1.25))
            assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
            idx = img.TransformPhysicalPointToContinuousIndex(tuple(n["world_lps_mm"]))
            assert all(0 <= v < s for v, s in zip(idx, img.GetSize()))
        assert seg.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= {0, 1}
        sal_arr = sitk.GetArrayViewFromImage(sal)
        assert sal_arr.min() >= 0 and sal_arr.max() <= 1 + 1e-6
        with Image.open(out / n["overlay_png"]) as png:
            assert png.format == "PNG" and png.size == (768, 274)
        with Image.open(out / n["similar_png"]) as png:
            assert png.format == "PNG"


def test_infer_json_prints_the_report(runner, use_bundle, demo_study, tmp_path):
    folder, (x, y, z) = demo_study
    # Missing parent folders are created, as `mkdir -p` would (issue: --out results/run1).
    out = tmp_path / "results" / "run1"
    result = runner.invoke(main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads((out / "report.json").read_text())
    assert printed == written
    check_report(printed, out)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["run1"], "no staging folder is left"


@pytest.mark.parametrize("value", ["1,2", "a,b,c", "nan,1,2", "1,inf,2", "1,2,3,4", "", "1;2;3", "1,,2"])
@pytest.mark.parametrize("option", ["--xyz", "--world"])
def test_malformed_points_are_usage_errors(runner, use_bundle, demo_study, tmp_path, option, value):
    folder, _ = demo_study
    out = tmp_path / "out"
    result = runner.invoke(main, ["infer", str(folder), option, value, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert option in result.output
    assert not out.exists()


def test_no_point_is_a_usage_error(runner, use_bundle, demo_study, tmp_path):
    folder, _ = demo_study
    result = runner.invoke(main, ["infer", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--xyz or --world" in result.output
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_and_overwrite_replaces_it(runner, use_bundle, demo_study, tmp_path):
    folder, (x, y, z) = demo_study
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(out)]
    refused = runner.invoke(main, args)
    message = assert_clean_error(refused, 7)
    assert "--overwrite" in message and str(out) in message
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    replaced = runner.invoke(main, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists()
    check_report(json.loads((out / "report.json").read_text()), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old folders left


def test_out_that_is_a_file_is_refused(runner, use_bundle, demo_study, tmp_path):
    folder, (x, y, z) = demo_study
    target = tmp_path / "report"
    target.write_text("x")
    result = runner.invoke(main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(target), "--overwrite"])
    assert_clean_error(result, 7)
    assert target.read_text() == "x"


def test_point_outside_the_volume_is_one_line_and_creates_nothing(tiny_bundle, demo_study, tmp_path):
    folder, _ = demo_study
    out = tmp_path / "out"
    proc = run_entry_point("infer", str(folder), "--xyz", "10,10,300", "--out", str(out), "--bundle", str(tiny_bundle))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "300" in lines[0] and "(192, 192, 48)" in lines[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_world_point_outside_the_volume(runner, use_bundle, demo_study, tmp_path):
    folder, _ = demo_study
    result = runner.invoke(main, ["infer", str(folder), "--world", "0,0,-500", "--out", str(tmp_path / "o")])
    message = assert_clean_error(result, 2)
    assert "-500" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_study_path(runner, use_bundle, tmp_path):
    result = runner.invoke(main, ["infer", str(tmp_path / "nope"), "--xyz", "1,2,3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "does not exist" in result.output
    assert not (tmp_path / "o").exists()


def test_empty_folder(runner, use_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["infer", str(tmp_path / "empty"), "--xyz", "1,2,3", "--out", str(tmp_path / "o")])
    message = assert_clean_error(result, 3)
    assert "no files" in message and "empty" in message
    assert not (tmp_path / "o").exists()


def test_folder_of_non_dicom_files(runner, use_bundle, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image\n")
    (junk / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (junk / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    result = runner.invoke(main, ["infer", str(junk), "--xyz", "1,2,3", "--out", str(tmp_path / "o")])
    message = assert_clean_error(result, 3)
    assert "no DICOM files among the 3 files" in message
    assert not (tmp_path / "o").exists()


def test_single_non_volume_file(runner, use_bundle, tmp_path):
    f = tmp_path / "scan.txt"
    f.write_text("hello")
    result = runner.invoke(main, ["infer", str(f), "--xyz", "1,2,3", "--out", str(tmp_path / "o")])
    assert_clean_error(result, 3)


def test_several_series_need_a_choice_and_the_option_the_message_names_works(runner, use_bundle, demo_study, tmp_path):
    import re

    import pydicom
    from pydicom.uid import generate_uid

    folder, (x, y, z) = demo_study
    both = tmp_path / "both"
    shutil.copytree(folder, both / "a")
    second_uid = generate_uid()
    (both / "b").mkdir()
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = second_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(both / "b" / path.name, enforce_file_format=True)
    args = ["infer", str(both), "--xyz", f"{x},{y},{z}", "--out", str(tmp_path / "o"), "--top-k", "0"]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 3 and "Traceback" not in refused.output
    assert second_uid in refused.stderr and "2 CT series" in refused.stderr
    assert not (tmp_path / "o").exists()
    options = re.findall(r"--[a-z-]+", refused.stderr)
    assert options, "the message does not say which option chooses a series"
    chosen = runner.invoke(main, [*args, options[0], second_uid])
    assert chosen.exit_code == 0, chosen.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["study"]["series_instance_uid"] == second_uid


def test_missing_bundle(runner, demo_study, tmp_path):
    folder, (x, y, z) = demo_study
    result = runner.invoke(
        main,
        [
            "infer",
            str(folder),
            "--xyz",
            f"{x},{y},{z}",
            "--out",
            str(tmp_path / "o"),
            "--bundle",
            str(tmp_path / "no-bundle"),
        ],
    )
    message = assert_clean_error(result, 4)
    assert "no-bundle" in message and "does not exist" in message
    assert not (tmp_path / "o").exists()


def test_unavailable_backend_is_a_clean_error(runner, use_bundle, demo_study, tmp_path):
    folder, (x, y, z) = demo_study
    result = runner.invoke(
        main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(tmp_path / "o"), "--backend", "tensorrt"]
    )
    message = assert_clean_error(result)
    assert "TensorRT" in message
    result = runner.invoke(
        main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(tmp_path / "o"), "--backend", "quantum"]
    )
    assert result.exit_code == 2 and "quantum" in result.output


# ------------------------------------------------------------------------------------ index


@pytest.fixture(scope="module")
def built_index(tiny_bundle, synthetic_voi_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    env_before = os.environ.get("NODULE_EDGE_THREADS")
    os.environ["NODULE_EDGE_THREADS"] = "1"
    try:
        result = CliRunner().invoke(
            main, ["index", "build", str(synthetic_voi_dir), "--out", str(out), "--bundle", str(tiny_bundle)]
        )
    finally:
        if env_before is None:
            os.environ.pop("NODULE_EDGE_THREADS", None)
        else:
            os.environ["NODULE_EDGE_THREADS"] = env_before
    return result, out


def test_index_build(built_index):
    result, out = built_index
    assert result.exit_code == 0, result.output
    assert "index of 6 nodules (attributes)" in result.stdout
    assert {"entries.json", "index.bin", "vectors.npy", "checksums.json"} <= {p.name for p in out.iterdir()}


def test_index_query(runner, built_index):
    _, out = built_index
    result = runner.invoke(
        main, ["index", "query", str(out), "--attributes", "4.5,2.5,2,3.5,3,4.5", "-k", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert len(answer["neighbours"]) == 3
    assert all(n["id"].startswith("SYN-") for n in answer["neighbours"])
    distances = [n["distance"] for n in answer["neighbours"]]
    assert distances == sorted(distances)
    labels = [n["label"] for n in answer["neighbours"] if n["label"] is not None]
    assert answer["retrieval_score"] == pytest.approx(sum(labels) / len(labels))

    text = runner.invoke(main, ["index", "query", str(out), "--attributes", "3,3,3,3,3,3"])
    assert text.exit_code == 0 and "retrieval score:" in text.stdout
    assert len(text.stdout.strip().splitlines()) == 7  # six neighbours (k=20 > 6) and the score


@pytest.mark.parametrize("attributes", ["1,2,3", "a,b,c,d,e,f", "1,2,3,4,5,6,7"])
def test_index_query_rejects_bad_attributes(runner, built_index, attributes):
    _, out = built_index
    result = runner.invoke(main, ["index", "query", str(out), "--attributes", attributes])
    assert result.exit_code == 2 and "--attributes" in result.output and "Traceback" not in result.output


def test_index_add_new_and_duplicate_ids(runner, built_index, use_bundle, synthetic_voi_dir, tmp_path):
    _, built = built_index
    index_dir = tmp_path / "idx"
    shutil.copytree(built, index_dir)
    # One new nodule: an existing volume under a new id.
    voi = tmp_path / "new_voi"
    (voi / "image").mkdir(parents=True)
    shutil.copy(synthetic_voi_dir / "image" / "SYN-0000_R_1.nii.gz", voi / "image" / "NEW-0000_R_1.nii.gz")
    with (synthetic_voi_dir / "manifest.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    rows = [rows[0], ["NEW-0000_R_1", "NEW-0000", *rows[1][2:]]]
    with (voi / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    added = runner.invoke(main, ["index", "add", str(index_dir), str(voi)])
    assert added.exit_code == 0, added.output
    assert "index now holds 7 nodules" in added.stdout
    again = runner.invoke(main, ["index", "add", str(index_dir), str(voi)])
    # Refused before the model runs: one line, no progress bar.
    message = assert_clean_error(again, 6)
    assert "NEW-0000_R_1" in message and "already in the index" in message
    assert "running the model" not in again.output


def test_index_add_records_a_bad_row_and_adds_the_others(runner, built_index, use_bundle, synthetic_voi_dir, tmp_path):
    """A nodule whose centre lies outside its volume is left out and named in errors.csv; exit 9."""
    _, built = built_index
    index_dir = tmp_path / "idx"
    shutil.copytree(built, index_dir)
    voi = tmp_path / "new_voi"
    (voi / "image").mkdir(parents=True)
    with (synthetic_voi_dir / "manifest.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, new_rows = rows[0], []
    for i, name in enumerate(["NEW-GOOD_R_1", "NEW-FAR_R_1"]):
        shutil.copy(synthetic_voi_dir / "image" / f"SYN-000{i}_R_1.nii.gz", voi / "image" / f"{name}.nii.gz")
        row = [name, name[:-4], *rows[1 + i][2:]]
        if name == "NEW-FAR_R_1":
            row[header.index("center_x_mm")] = str(float(row[header.index("center_x_mm")]) + 200.0)
        new_rows.append(row)
    with (voi / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *new_rows])

    fast = runner.invoke(main, ["index", "add", str(index_dir), str(voi), "--fail-fast"])
    assert_clean_error(fast, 2, one_line=False)
    assert "error: NEW-FAR_R_1: LPS point" in fast.stderr
    assert "index now holds" not in fast.stdout

    result = runner.invoke(main, ["index", "add", str(index_dir), str(voi)])
    message = assert_clean_error(result, 9, one_line=False)
    assert "index now holds 7 nodules" in result.stdout
    errors_line = [line for line in message.splitlines() if line.startswith("error:")]
    assert len(errors_line) == 1 and "1 of 2 nodules failed" in errors_line[0] and "NEW-FAR_R_1" in errors_line[0]
    with (tmp_path / "errors.csv").open(newline="") as fh:
        failures = list(csv.DictReader(fh))
    assert [(f["id"], f["error"]) for f in failures] == [("NEW-FAR_R_1", "CoordinateError")]
    query = runner.invoke(main, ["index", "query", str(index_dir), "--attributes", "3,3,3,3,3,3", "-k", "20", "--json"])
    ids = {n["id"] for n in json.loads(query.stdout)["neighbours"]}
    assert "NEW-GOOD_R_1" in ids and "NEW-FAR_R_1" not in ids


def test_index_query_on_a_missing_index(runner, tmp_path):
    (tmp_path / "idx").mkdir()
    result = runner.invoke(main, ["index", "query", str(tmp_path / "idx"), "--attributes", "3,3,3,3,3,3"])
    assert_clean_error(result, 6)


# --------------------------------------------------------------------------------- evaluate


def test_evaluate_writes_the_csv(runner, use_bundle, synthetic_voi_dir, tmp_path):
    out = tmp_path / "predictions.csv"
    result = runner.invoke(main, ["evaluate", str(synthetic_voi_dir), "--out", str(out), "--limit", "2"])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == CSV_HEADER
    assert [r[0] for r in rows[1:]] == ["SYN-0000_R_1", "SYN-0001_R_1"]
    for row in rows[1:]:
        assert 0 <= float(row[1]) <= 1
        assert all(1 <= float(v) <= 5 for v in row[2:8])
        assert 0 <= float(row[8]) <= 1  # dice: masks exist
        assert 0 <= float(row[11]) <= 1
    assert (
        "nodules: 2" in result.stdout
        and "failed: 0" in result.stdout
        and f"predictions written to {out}" in result.stdout
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.csv", "predictions.csv"]
    assert (tmp_path / "errors.csv").read_text().splitlines() == ["id,error,reason"]


def test_evaluate_on_a_folder_without_manifest(runner, use_bundle, tmp_path):
    result = runner.invoke(main, ["evaluate", str(tmp_path), "--out", str(tmp_path / "p.csv")])
    message = assert_clean_error(result, 3)  # one line: refused before the progress bar starts
    assert message.startswith("error:") and "manifest.csv" in message


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_evaluate_records_a_bad_row_and_exits_9(runner, use_bundle, synthetic_voi_dir, break_voi_dir, tmp_path):
    voi = break_voi_dir(synthetic_voi_dir, tmp_path / "voi", outside="SYN-0001_R_1")
    out = tmp_path / "out" / "predictions.csv"
    out.parent.mkdir()
    result = runner.invoke(main, ["evaluate", str(voi), "--out", str(out), "--limit", "3"])
    assert_clean_error(result, 9, one_line=False)  # the progress bar shares stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "1 of 3 nodules failed" in errors[0] and "SYN-0001_R_1" in errors[0], result.stderr
    # The summary is printed before the exit, over the two good rows.
    assert "nodules: 3" in result.stdout and "failed: 1" in result.stdout, result.stdout
    assert "metrics are over the 2 nodules that ran" in result.stdout
    with out.open(newline="") as fh:
        assert [r[0] for r in list(csv.reader(fh))[1:]] == ["SYN-0000_R_1", "SYN-0002_R_1"]
    with (out.parent / "errors.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["id"], r["error"]) for r in rows] == [("SYN-0001_R_1", "CoordinateError")]
    assert "outside the volume" in rows[0]["reason"]


def test_evaluate_fail_fast_stops_and_writes_nothing(runner, use_bundle, synthetic_voi_dir, break_voi_dir, tmp_path):
    voi = break_voi_dir(synthetic_voi_dir, tmp_path / "voi", outside="SYN-0001_R_1")
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(
        main, ["evaluate", str(voi), "--out", str(out / "p.csv"), "--limit", "3", "--fail-fast", "--report"]
    )
    assert_clean_error(result, 2, one_line=False)
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "SYN-0001_R_1" in errors[0] and "outside the volume" in errors[0], result.stderr
    assert list(out.iterdir()) == []
    assert "failed:" not in result.stdout


def test_evaluate_report_without_matplotlib_fails_before_the_run(
    runner, use_bundle, synthetic_voi_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = runner.invoke(main, ["evaluate", str(synthetic_voi_dir), "--out", str(tmp_path / "p.csv"), "--report"])
    message = assert_clean_error(result, 8)  # one line: refused before the progress bar starts
    assert "nodule-edge[report]" in message
    assert list(tmp_path.iterdir()) == []


def test_evaluate_report_beside_the_csv_or_at_a_path(runner, use_bundle, synthetic_voi_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="the report needs nodule-edge[report]")
    out = tmp_path / "predictions.csv"
    result = runner.invoke(main, ["evaluate", str(synthetic_voi_dir), "--out", str(out), "--limit", "2", "--report"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "evaluation.html").read_text(encoding="utf-8")
    assert "<h2>Malignancy: ROC</h2>" in page and "--limit 2" in page
    assert f"report written to {tmp_path / 'evaluation.html'}" in result.stdout
    # An explicit path (given before the positional argument); its folder must exist, checked before the run.
    mine = tmp_path / "reports" / "run1.html"
    result = runner.invoke(
        main, ["evaluate", "--report", str(mine), str(synthetic_voi_dir), "--out", str(out), "--limit", "1"]
    )
    message = assert_clean_error(result, 7)
    assert "reports" in message and "evaluation" not in result.stdout
    (tmp_path / "reports").mkdir()
    result = runner.invoke(
        main, ["evaluate", "--report", str(mine), str(synthetic_voi_dir), "--out", str(out), "--limit", "1"]
    )
    assert result.exit_code == 0, result.output
    assert mine.is_file()


# ------------------------------------------------------------------------------------- demo


def test_demo_runs_end_to_end(runner, use_bundle, tmp_path):
    result = runner.invoke(main, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.stdout
    out = tmp_path / "demo" / "outputs"
    check_report(json.loads((out / "report.json").read_text()), out)


# --------------------------------------------------------------------------------- console script


class _Exited(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


@pytest.mark.parametrize(
    ("raised", "expected"),
    [(None, 0), (SystemExit(0), 0), (SystemExit(None), 0), (SystemExit(3), 3), (SystemExit("boom"), 1)],
)
def test_entry_point_keeps_the_exit_code_and_skips_exit_handlers(monkeypatch, capsys, raised, expected):
    """The console script ends with os._exit (SimpleITK's static destructors can hang at exit)."""
    import nodule_edge.cli as cli

    def fake_main():
        if raised is not None:
            raise raised

    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(_Exited) as info:
        cli.entry_point()
    assert info.value.code == expected
    if expected == 1:
        assert "boom" in capsys.readouterr().err


def test_console_script_flushes_piped_output():
    exe = Path(sys.executable).with_name("nodule-edge")
    if not exe.exists():  # pragma: no cover
        pytest.skip("the nodule-edge entry point is not installed")
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("nodule-edge, version")
    bad = subprocess.run(
        [str(exe), "infer", "/no/such/study", "--xyz", "1,2,3", "--out", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr

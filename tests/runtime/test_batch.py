"""Batch inference: jobs CSV validation, one study read per group, per-job failures, resuming."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodule_edge.cli import main
from nodule_edge.errors import CoordinateError, DataError, StudyError
from nodule_edge.runtime.batch import JOB_COLUMNS, SUMMARY_COLUMNS, read_jobs, run_batch


def _write_jobs(path: Path, rows: list[list[object]], header: tuple[str, ...] = JOB_COLUMNS) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def inferer(tiny_bundle):
    from nodule_edge.runtime import NoduleInferer

    return NoduleInferer(tiny_bundle, backend="cpu", threads=1)


@pytest.fixture
def jobs_csv(tmp_path, demo_study):
    folder, (x, y, z) = demo_study
    return _write_jobs(
        tmp_path / "jobs.csv",
        [
            ["a", str(folder), "", "voxel", x, y, z],
            ["b", str(folder), "", "voxel", x + 6, y - 4, z],
            ["outside", str(folder), "", "voxel", x, y, 9999],
            ["missing", "no/such/study", "", "world", 0, 0, 0],
        ],
    )


@pytest.mark.parametrize(
    ("rows", "header", "fragment"),
    [
        ([["a", "s", "", "voxel", 1, 2]], ("job_id", "study", "series_uid", "space", "x", "y"), "missing column(s) z"),
        ([["", "s", "", "voxel", 1, 2, 3]], JOB_COLUMNS, "jobs.csv:2: job_id ''"),
        ([["../up", "s", "", "voxel", 1, 2, 3]], JOB_COLUMNS, "job_id '../up'"),
        (
            [["a", "s", "", "voxel", 1, 2, 3], ["a", "s", "", "voxel", 1, 2, 3]],
            JOB_COLUMNS,
            "jobs.csv:3: job_id 'a' repeats line 2",
        ),
        ([["a", "s", "", "pixel", 1, 2, 3]], JOB_COLUMNS, "space must be 'voxel' or 'world'"),
        ([["a", "s", "", "voxel", 1, "two", 3]], JOB_COLUMNS, "jobs.csv:2: y is not a number: 'two'"),
        ([["a", "s", "", "voxel", 1, 2, "nan"]], JOB_COLUMNS, "z must be finite"),
        ([["a", "", "", "voxel", 1, 2, 3]], JOB_COLUMNS, "empty study path"),
        ([], JOB_COLUMNS, "has no jobs"),
    ],
)
def test_read_jobs_names_the_bad_line(tmp_path, rows, header, fragment):
    path = _write_jobs(tmp_path / "jobs.csv", rows, header)
    with pytest.raises(DataError, match=None) as info:
        read_jobs(path)
    assert fragment in str(info.value)


def test_read_jobs_resolves_relative_studies_and_optional_series(tmp_path):
    path = _write_jobs(
        tmp_path / "jobs.csv", [["a", "studies/x", "World", 1, 2, 3]], ("job_id", "study", "space", "x", "y", "z")
    )
    (job,) = read_jobs(path)
    assert job.study == tmp_path / "studies" / "x" and job.space == "world" and job.point == (1.0, 2.0, 3.0)
    assert job.series_uid is None and job.line == 2


def test_batch_opens_each_study_once_records_failures_and_resumes(inferer, jobs_csv, tmp_path, monkeypatch, demo_study):
    jobs = read_jobs(jobs_csv)
    opened: list[Path] = []
    real_open = inferer.open
    monkeypatch.setattr(
        inferer, "open", lambda path, series_uid=None: (opened.append(Path(path)), real_open(path, series_uid))[1]
    )
    seen: list[tuple[int, int]] = []
    out = tmp_path / "out"
    outcome = run_batch(inferer, jobs, out, workers=2, progress=lambda done, total: seen.append((done, total)))

    assert (outcome.total, outcome.done, outcome.skipped) == (4, 2, 0)
    assert sorted(map(str, opened)) == sorted(
        [str(demo_study[0]), str(jobs_csv.parent / "no/such/study")]
    )  # one open per study
    assert [(f.id, f.error) for f in outcome.errors.failures] == [
        ("outside", CoordinateError.__name__),
        ("missing", StudyError.__name__),
    ]
    assert seen[-1] == (4, 4)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "errors.csv", "summary.csv"]  # no staging folders left
    with (out / "summary.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job_id"] for r in rows] == ["a", "b", "outside", "missing"]
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    for row in rows[:2]:
        report = json.loads((out / row["job_id"] / "report.json").read_text())
        assert len(report["nodules"]) == 1
        assert float(row["malignancy_probability"]) == pytest.approx(
            report["nodules"][0]["malignancy_probability"], abs=1e-6
        )
    assert "outside the volume" in rows[2]["error"] and "does not exist" in rows[3]["error"]
    with (out / "errors.csv").open(newline="") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == ["outside", "missing"]

    # A re-run does only what is not complete; finished folders are not touched.
    stamp = os.stat(out / "a" / "report.json").st_mtime_ns
    opened.clear()
    again = run_batch(inferer, jobs, out, workers=1)
    assert (again.done, again.skipped, len(again.errors)) == (0, 2, 2)
    assert os.stat(out / "a" / "report.json").st_mtime_ns == stamp
    assert len(opened) == 2  # only the failed jobs' studies are tried again


def test_batch_keeps_job_order_when_voxel_and_world_points_mix(inferer, tmp_path, demo_study):
    folder, (x, y, z) = demo_study
    world = inferer.open(folder).voxel_to_world((x, y, z))
    path = _write_jobs(
        tmp_path / "jobs.csv",
        [
            ["w", str(folder), "", "world", *world],
            ["v", str(folder), "", "voxel", x + 5, y, z],
            ["same", str(folder), "", "voxel", x, y, z],
        ],
    )
    run_batch(inferer, read_jobs(path), tmp_path / "out", workers=1)
    reports = {
        j: json.loads((tmp_path / "out" / j / "report.json").read_text())["nodules"][0] for j in ("w", "v", "same")
    }
    assert reports["w"]["xyz_voxel"] == pytest.approx([x, y, z], abs=1e-3)
    assert reports["v"]["xyz_voxel"] == pytest.approx([x + 5, y, z], abs=1e-3)
    assert reports["w"]["malignancy_probability"] == pytest.approx(reports["same"]["malignancy_probability"], abs=1e-5)


def test_batch_fail_fast_stops_at_the_first_bad_job(inferer, tmp_path, demo_study):
    folder, (x, y, z) = demo_study
    path = _write_jobs(tmp_path / "jobs.csv", [["bad", str(folder), "", "voxel", x, y, -50]])
    with pytest.raises(CoordinateError):
        run_batch(inferer, read_jobs(path), tmp_path / "out", workers=1, fail_fast=True)
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_cli_infer_batch_exit_code_and_summary(tiny_bundle, jobs_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("NODULE_EDGE_BUNDLE", str(tiny_bundle))
    monkeypatch.setenv("NODULE_EDGE_THREADS", "1")
    result = CliRunner().invoke(main, ["infer-batch", str(jobs_csv), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 9, result.output
    assert "2 jobs diagnosed, 0 already complete, 2 failed" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 of 4 jobs failed" in errors[0] and "errors.csv" in errors[0]
    assert "Traceback" not in result.output
    ok = _write_jobs(tmp_path / "ok.csv", [r[:7] for r in csv.reader(jobs_csv.open()) if r[0] in ("a", "b")])
    result = CliRunner().invoke(main, ["infer-batch", str(ok), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "0 jobs diagnosed, 2 already complete, 0 failed" in result.stdout

"""Batch inference: 20 nodules over the real studies, one `infer-batch` run against 20 `infer` runs.

Both sides are the CLI as a user runs it (Python start-up, bundle verification and engine
compilation included): the batch pays them once, opens each study once for all its nodules and
works on two studies at a time. ``extra_info["nodules_per_s"]`` is the throughput of each side.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from benches.conftest import SHARED_DATA

N_JOBS = 20


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list[tuple[str, Path, tuple[int, int, int]]]:
    chest = SHARED_DATA / "dicom" / "chest_ricord_jpeg_lossless"
    siemens = SHARED_DATA / "dicom" / "siemens_j2k_20_slices"
    if not chest.is_dir() or not siemens.is_dir():
        pytest.skip(f"real DICOM series not found under {SHARED_DATA / 'dicom'}")
    out = []
    for i in range(14):  # points spread over both lungs and levels of the chest study
        out.append((f"chest-{i:02d}", chest, (120 + 20 * (i % 7), 200 + 25 * (i // 7), 60 + 10 * i)))
    for i in range(N_JOBS - len(out)):
        out.append((f"siemens-{i:02d}", siemens, (150 + 40 * i, 250, 10)))
    return out


def _cli() -> str:
    return str(Path(sys.executable).with_name("nodule-edge"))


def test_infer_batch(benchmark, jobs, bundle_dir, tmp_path):
    """`nodule-edge infer-batch` on 20 jobs (a fresh output folder each round)."""
    table = tmp_path / "jobs.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["job_id", "study", "series_uid", "space", "x", "y", "z"])
        writer.writerows([job_id, study, "", "voxel", *xyz] for job_id, study, xyz in jobs)
    counter = iter(range(10_000))

    def run():
        out = tmp_path / f"batch{next(counter)}"
        subprocess.run(
            [_cli(), "infer-batch", str(table), "--out", str(out), "--bundle", str(bundle_dir)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        with (out / "summary.csv").open(newline="") as fh:
            statuses = [row["status"] for row in csv.DictReader(fh)]
        if statuses != ["ok"] * len(jobs):
            raise RuntimeError(f"infer-batch did not diagnose every job: {statuses}")

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info["nodules_per_s"] = round(len(jobs) / benchmark.stats.stats.median, 3)


def test_infer_separate_runs(benchmark, jobs, bundle_dir, tmp_path):
    """The same 20 nodules as 20 `nodule-edge infer` runs, one after another."""
    counter = iter(range(10_000))

    def run():
        for _, study, xyz in jobs:
            out = tmp_path / f"single{next(counter)}"
            subprocess.run(
                [
                    _cli(),
                    "infer",
                    str(study),
                    "--xyz",
                    ",".join(map(str, xyz)),
                    "--out",
                    str(out),
                    "--bundle",
                    str(bundle_dir),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info["nodules_per_s"] = round(len(jobs) / benchmark.stats.stats.median, 3)

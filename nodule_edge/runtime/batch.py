"""Batch inference: many nodules in many studies from one jobs CSV (``nodule-edge infer-batch``).

A jobs CSV has one row per nodule::

    job_id,study,series_uid,space,x,y,z
    p1-n1,studies/chest,,voxel,256,300,128
    p1-n2,studies/chest,,world,-80.5,12.0,-150.25

``study`` is a DICOM folder or volume file (relative paths are relative to the CSV's folder),
``series_uid`` is optional (needed when the folder holds several CT series), ``space`` is
``voxel`` (zero-based column, row, slice) or ``world`` (LPS mm). Several rows may share a study:
it is opened, and its pixels read, once for all of its nodules.

Each job writes its own folder ``OUT/<job_id>/`` exactly as ``nodule-edge infer`` does (atomic:
complete or absent), so a re-run skips finished jobs and picks up the rest. A job that fails
(unreadable study, point outside the scan) is recorded in ``errors.csv`` and the others go on
(:mod:`nodule_edge.row_errors`). ``summary.csv`` has one row per job of the CSV.

Example:
    >>> from nodule_edge.runtime import NoduleInferer
    >>> from nodule_edge.runtime.batch import read_jobs, run_batch
    >>> jobs = read_jobs("jobs.csv")
    >>> outcome = run_batch(NoduleInferer(), jobs, "results/")
    >>> outcome.done, outcome.skipped, len(outcome.errors)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from nodule_edge._files import write_csv_atomic
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import DataError, NoduleEdgeError, OutputError
from nodule_edge.row_errors import RowErrors
from nodule_edge.runtime.inferer import NoduleInferer, StudyResult
from nodule_edge.runtime.outputs import write_outputs

__all__ = ["JOB_COLUMNS", "SUMMARY_COLUMNS", "BatchJob", "BatchOutcome", "read_jobs", "run_batch"]

log = logging.getLogger(__name__)

#: Columns of the jobs CSV (``series_uid`` may be empty).
JOB_COLUMNS: tuple[str, ...] = ("job_id", "study", "series_uid", "space", "x", "y", "z")
#: Columns of ``summary.csv``.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "job_id",
    "status",
    "malignancy_probability",
    *ATTRIBUTE_NAMES,
    "volume_mm3",
    "longest_axial_diameter_mm",
    "trustworthy",
    "retrieval_score",
    "quality_flags",
    "folder",
    "error",
)
# A job id names a folder: no separators, no leading dot (hidden / staging folders are ours).
_JOB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class BatchJob:
    """One nodule to diagnose.

    Attributes:
        id: Job id, also its output folder's name.
        study: DICOM folder or volume file.
        series_uid: SeriesInstanceUID, or None.
        space: ``voxel`` or ``world``.
        point: (x, y, z) in that space.
        line: Line of the jobs CSV it came from (for messages).
    """

    id: str
    study: Path
    series_uid: str | None
    space: Literal["voxel", "world"]
    point: tuple[float, float, float]
    line: int = 0


@dataclass
class BatchOutcome:
    """What a batch run did.

    Attributes:
        total: Jobs in the CSV.
        done: Jobs diagnosed by this run.
        skipped: Jobs already complete from an earlier run.
        errors: Failed jobs (written to ``errors.csv``).
        summary_csv: Path of ``summary.csv``.
        errors_csv: Path of ``errors.csv``.
    """

    total: int
    done: int
    skipped: int
    errors: RowErrors
    summary_csv: Path
    errors_csv: Path
    reports: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)


def read_jobs(path: str | Path) -> list[BatchJob]:
    """Read and validate a jobs CSV (columns :data:`JOB_COLUMNS`).

    Raises:
        DataError: Missing file or column, empty or duplicate or unsafe job id, a ``space`` other
            than voxel/world, or a coordinate that is not a finite number; the message names the
            file and line. A study path that does not exist is not an error here: that job fails
            alone at run time.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"jobs file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in JOB_COLUMNS if c != "series_uid" and c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(JOB_COLUMNS)} (series_uid optional)"
                )
            rows = list(enumerate(reader, start=2))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV: {exc}") from exc
    jobs: list[BatchJob] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        where = f"{path}:{line}"
        job_id = (row.get("job_id") or "").strip()
        if not _JOB_ID.fullmatch(job_id):
            raise DataError(
                f"{where}: job_id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-' (it names the job's folder) and not start with '.' or '-'"
            )
        if job_id in seen:
            raise DataError(f"{where}: job_id {job_id!r} repeats line {seen[job_id]}")
        seen[job_id] = line
        study = (row.get("study") or "").strip()
        if not study:
            raise DataError(f"{where}: empty study path")
        space = (row.get("space") or "").strip().lower()
        if space not in ("voxel", "world"):
            raise DataError(f"{where}: space must be 'voxel' or 'world', got {row.get('space')!r}")
        point = []
        for axis in "xyz":
            text = (row.get(axis) or "").strip()
            try:
                value = float(text)
            except ValueError:
                raise DataError(f"{where}: {axis} is not a number: {text!r}") from None
            if not math.isfinite(value):
                raise DataError(f"{where}: {axis} must be finite, got {text!r}")
            point.append(value)
        study_path = Path(study)
        jobs.append(
            BatchJob(
                id=job_id,
                study=study_path if study_path.is_absolute() else path.parent / study_path,
                series_uid=(row.get("series_uid") or "").strip() or None,
                space=space,  # type: ignore[arg-type]  # a str checked against the two space names above
                point=(point[0], point[1], point[2]),
                line=line,
            )
        )
    if not jobs:
        raise DataError(f"{path} has no jobs")
    return jobs


def run_batch(
    inferer: NoduleInferer,
    jobs: Sequence[BatchJob],
    out_dir: str | Path,
    *,
    workers: int = 2,
    fail_fast: bool = False,
    full_grid: bool = False,
    extra_writers: list[Callable[[Path, StudyResult], list[str]]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchOutcome:
    """Diagnose every job not already complete in ``out_dir``; write its folder, then the CSVs.

    Jobs are grouped by (study, series): each study is opened once and all its pending nodules go
    through the engine in one batch. ``workers`` studies are processed at a time (threads; the
    decoders, resampling, engine and compression release the GIL). A group whose joint call
    fails is retried job by job, so one bad point does not fail its neighbours.

    Args:
        inferer: A loaded inferer (thread-safe).
        jobs: From :func:`read_jobs`.
        out_dir: Output folder (created).
        workers: Studies in flight at once.
        fail_fast: Stop at the first failed job (its error propagates).
        full_grid: Write NIfTI maps on the whole study grid.
        extra_writers: Passed to :func:`~nodule_edge.runtime.outputs.write_outputs` (DICOM SEG/SR).
        progress: Called with (jobs finished or skipped, total) as jobs complete.

    Returns:
        What was done; ``errors`` is empty when every job succeeded.

    Raises:
        OutputError: ``out_dir`` cannot be created or written.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc}") from exc
    total = len(jobs)
    pending = [j for j in jobs if not _complete(out / j.id)]
    skipped = total - len(pending)
    if skipped:
        log.info("%d of %d jobs already complete in %s; skipping them", skipped, total, out)
    errors = RowErrors(fail_fast=fail_fast)
    lock = threading.Lock()
    finished = [skipped]
    if progress:
        progress(skipped, total)

    def one_done() -> None:
        with lock:
            finished[0] += 1
            if progress:
                progress(finished[0], total)

    def fail(job: BatchJob, exc: NoduleEdgeError) -> None:
        with lock:
            errors.record(job.id, exc)

    groups: dict[tuple[Path, str | None], list[BatchJob]] = {}
    for job in pending:
        groups.setdefault((job.study, job.series_uid), []).append(job)

    def run_group(group: list[BatchJob]) -> int:
        written = 0
        try:
            study = inferer.open(group[0].study, series_uid=group[0].series_uid)
        except NoduleEdgeError as exc:
            for job in group:
                fail(job, exc)
                one_done()
            return 0
        parts = [group]
        try:
            results = [_infer_jobs(inferer, study, group)]
        except NoduleEdgeError:
            parts, results = [], []
            for job in group:  # isolate the bad point(s)
                try:
                    results.append(_infer_jobs(inferer, study, [job]))
                    parts.append([job])
                except NoduleEdgeError as exc:
                    fail(job, exc)
                    one_done()
        for part, result in zip(parts, results):
            for job, nodule in zip(part, result.nodules):
                single = replace(result, nodules=[nodule])
                try:
                    write_outputs(
                        single,
                        out / job.id,
                        inferer.spec,
                        thumbnails=inferer.thumbnails,
                        index_kind=inferer.index_kind,
                        overwrite=True,
                        full_grid=full_grid,
                        extra_writers=extra_writers,
                    )
                    written += 1
                except OutputError:
                    raise
                except NoduleEdgeError as exc:
                    fail(job, exc)
                one_done()
        return written

    done = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nodule-edge-batch") as pool:
        futures = [pool.submit(run_group, g) for g in groups.values()]
        try:
            for future in futures:
                done += future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    errors.sort([j.id for j in jobs])
    summary_csv = _write_summary(out, jobs, errors)
    errors_csv = errors.write_csv(out / "errors.csv")
    return BatchOutcome(
        total=total, done=done, skipped=skipped, errors=errors, summary_csv=summary_csv, errors_csv=errors_csv
    )


def _infer_jobs(inferer: NoduleInferer, study: Any, jobs: list[BatchJob]) -> StudyResult:
    """One engine batch for ``jobs`` (same study), nodules in job order."""
    voxels = [j.point for j in jobs if j.space == "voxel"]
    worlds = [j.point for j in jobs if j.space == "world"]
    result = inferer.infer(study, voxels=voxels, worlds=worlds)
    # infer returns voxel points first, then world points: put them back in job order.
    order = [i for i, j in enumerate(jobs) if j.space == "voxel"] + [
        i for i, j in enumerate(jobs) if j.space == "world"
    ]
    nodules: list[Any] = [None] * len(jobs)
    for slot, nodule in zip(order, result.nodules):
        nodules[slot] = nodule
    return replace(result, nodules=nodules)


def _complete(folder: Path) -> bool:
    # write_outputs moves the whole folder into place in one rename: report.json present = done.
    return (folder / "report.json").is_file()


def _read_report(folder: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("nodules") else None


def _summary_row(job: BatchJob, out: Path, errors: dict[str, str]) -> list[str]:
    if job.id in errors:
        return [job.id, "failed", *[""] * (len(SUMMARY_COLUMNS) - 4), "", errors[job.id]]
    report = _read_report(out / job.id)
    if report is None:
        return [job.id, "missing", *[""] * (len(SUMMARY_COLUMNS) - 4), "", "no complete report.json in its folder"]
    n = report["nodules"][0]
    flags = ";".join(f["code"] for f in report.get("quality", {}).get("flags", []))
    score = n.get("retrieval_score")
    return [
        job.id,
        "ok",
        f"{n['malignancy_probability']:.6f}",
        *(f"{n['attributes'].get(a, float('nan')):.4f}" for a in ATTRIBUTE_NAMES),
        f"{n['segmentation']['volume_mm3']:.2f}",
        f"{n['segmentation']['longest_axial_diameter_mm']:.2f}",
        str(bool(n["saliency"]["trustworthy"])).lower(),
        "" if score is None else f"{score:.4f}",
        flags,
        job.id,
        "",
    ]


def _write_summary(out: Path, jobs: Sequence[BatchJob], errors: RowErrors) -> Path:
    failed = {f.id: f.reason for f in errors.failures}
    return write_csv_atomic(out / "summary.csv", SUMMARY_COLUMNS, [_summary_row(job, out, failed) for job in jobs])

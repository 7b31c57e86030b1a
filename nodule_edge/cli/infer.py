"""``nodule-edge infer``, ``infer-batch`` and ``demo``, and the text summary of a report."""

from __future__ import annotations

import sys
from typing import Any

import click

from nodule_edge.cli import _common
from nodule_edge.cli._common import _handle_errors, _parse_point, backend_option, bundle_option


def _summary_lines(report: dict[str, Any], out_dir: str) -> list[str]:
    study = report["study"]
    lines = [
        f"study: {study['slice_count']} slices, spacing {' x '.join(f'{v:.3g}' for v in study['spacing_mm'])} mm"
        + (f", {study['transfer_syntax']['name']}" if study.get("transfer_syntax") else ""),
        f"model {report['model']['version']} on {report['model']['backend']}",
    ]
    flags = report.get("quality", {}).get("flags", [])
    lines += [f"quality: {f['code']}: {f['message']}" for f in flags if f["nodule"] is None]
    for n in report["nodules"]:
        attrs = ", ".join(f"{k} {v:.1f}" for k, v in n["attributes"].items())
        trust = (
            "attention on nodule"
            if n["saliency"]["trustworthy"]
            else "WARNING: "
            + "; ".join(n["saliency"].get("trust_reasons") or ["model attention not on the nodule"])
            + " - review"
        )
        score = n["retrieval_score"]
        lines += [
            f"nodule {n['index']} at voxel {tuple(round(v, 1) for v in n['xyz_voxel'])} / LPS {tuple(round(v, 1) for v in n['world_lps_mm'])} mm",
            f"  malignancy probability {n['malignancy_probability']:.2f}   ({trust})",
            f"  attributes (1-5): {attrs}",
            f"  segmentation: {n['segmentation']['volume_mm3']:.0f} mm3, longest axial diameter {n['segmentation']['longest_axial_diameter_mm']:.1f} mm",
            f"  similar nodules: {len(n['similar'])}"
            + (f", {score:.0%} of them malignant" if score is not None else ""),
        ]
        explained = n.get("explanations")
        if explained:
            parts = []
            for method, e in explained["methods"].items():
                metrics = ", ".join(
                    f"{k.replace('_', ' ')} {v:.2f}" for k, v in e["metrics"].items() if isinstance(v, float)
                )
                parts.append(f"{method} ({metrics}" + (f"; {e['seconds']:.1f} s)" if e["seconds"] else ")"))
            lines.append("  explanations: " + "; ".join(parts))
            agreement = explained.get("agreement")
            if agreement and agreement["spearman"] is not None:
                threshold = (
                    "no threshold in this bundle"
                    if agreement["threshold"] is None
                    else f"threshold {agreement['threshold']:.2f}"
                )
                lines.append(f"  Grad-CAM vs occlusion: Spearman {agreement['spearman']:.2f} ({threshold})")
        lines += [f"  quality: {f['code']}: {f['message']}" for f in flags if f["nodule"] == n["index"]]
    lines.append(
        f"total {sum(report['timing_ms'].values()):.0f} ms; outputs in {out_dir}/ (report.json, *_overlay.png, *.nii.gz)"
    )
    return lines


@click.command()
@click.argument("study", type=click.Path(exists=True, path_type=str))
@click.option(
    "--xyz",
    "voxels",
    multiple=True,
    metavar="X,Y,Z",
    help="Nodule centre as zero-based voxel column,row,slice (slices ordered by position along the slice normal). Repeatable.",
)
@click.option(
    "--world", "worlds", multiple=True, metavar="X,Y,Z", help="Nodule centre in patient LPS millimetres. Repeatable."
)
@click.option(
    "--series",
    "--series-uid",
    "series_uid",
    default=None,
    help="SeriesInstanceUID to use when the folder holds several CT series.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=str),
    help="Output folder (created; must be empty unless --overwrite).",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@backend_option
@bundle_option
@click.option(
    "--top-k", default=20, show_default=True, type=click.IntRange(0, 1000), help="Similar nodules to retrieve."
)
@click.option("--full-grid", is_flag=True, help="Write NIfTI maps on the whole study grid instead of the 32 mm region.")
@click.option(
    "--dicom-out", is_flag=True, help="Also write a DICOM SEG and a TID 1500 SR (needs nodule-edge[dicom-out])."
)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
@click.option(
    "--explain",
    "explain",
    default=None,
    metavar="METHODS",
    help="Saliency methods, comma-separated: gradcam,occlusion. One NIfTI and one overlay panel per method, metrics in report.json; with both, their agreement is a second trust check.",
)
@click.option(
    "--occlusion-block",
    type=int,
    default=None,
    help="Occlusion block edge in voxels of the 64³ patch (default: 16, coarsened to fit 32 passes).",
)
@click.option("--occlusion-stride", type=int, default=None, help="Occlusion stride in voxels (default: the block).")
@click.option(
    "--explain-faithfulness",
    is_flag=True,
    help="Also compute each map's deletion and insertion areas (16 engine passes each).",
)
@_handle_errors
def infer(
    study: str,
    voxels: tuple[str, ...],
    worlds: tuple[str, ...],
    series_uid: str | None,
    out_dir: str,
    overwrite: bool,
    backend: str,
    bundle: str | None,
    top_k: int,
    full_grid: bool,
    dicom_out: bool,
    as_json: bool,
    explain: str | None,
    occlusion_block: int | None,
    occlusion_stride: int | None,
    explain_faithfulness: bool,
) -> None:
    """Diagnose nodules at given locations of a STUDY.

    STUDY is a folder of DICOM files (any nesting; other files are ignored) or a volume file
    (.nii/.nii.gz, .mha/.mhd, .nrrd). Writes report.json, segmentation and saliency NIfTI
    volumes in the study's geometry, and PNG overlays into --out, atomically.
    """
    import json
    from pathlib import Path

    from nodule_edge.runtime.outputs import check_output_dir, write_outputs

    points = [_parse_point(v, "--xyz") for v in voxels]
    world_points = [_parse_point(v, "--world") for v in worlds]
    if not points and not world_points:
        raise click.UsageError("give at least one nodule location with --xyz or --world")
    methods = None
    if explain is not None:
        from nodule_edge.runtime.explain import parse_methods

        methods = parse_methods(explain)
    elif occlusion_block is not None or occlusion_stride is not None or explain_faithfulness:
        raise click.UsageError("--occlusion-block, --occlusion-stride and --explain-faithfulness need --explain")
    check_output_dir(Path(out_dir), overwrite)
    inferer = _common._make_inferer(bundle, backend, top_k)
    n_points = len(points) + len(world_points)
    if n_points > 1 and not as_json:
        click.echo(f"diagnosing {n_points} nodules in one batch...", err=True)
    result = inferer.infer(study, voxels=points, worlds=world_points, series_uid=series_uid)
    if methods is not None:
        occlusion = {k: v for k, v in (("block", occlusion_block), ("stride", occlusion_stride)) if v is not None}
        inferer.explain(result, methods, occlusion_options=occlusion, faithfulness=explain_faithfulness)
    writers = []
    if dicom_out:
        from nodule_edge.runtime.dicom_out import dicom_writer

        writers.append(dicom_writer(inferer))
    report = write_outputs(
        result,
        out_dir,
        inferer.spec,
        thumbnails=inferer.thumbnails,
        index_kind=inferer.index_kind,
        overwrite=overwrite,
        full_grid=full_grid,
        extra_writers=writers,
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in _summary_lines(report, out_dir):
            click.echo(line)


@click.command("infer-batch")
@click.argument("jobs_csv", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Output folder: one sub-folder per job, summary.csv, errors.csv (created).",
)
@backend_option
@bundle_option
@click.option(
    "--top-k", default=20, show_default=True, type=click.IntRange(0, 1000), help="Similar nodules to retrieve."
)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Studies processed at once.")
@click.option("--full-grid", is_flag=True, help="Write NIfTI maps on the whole study grid instead of the 32 mm region.")
@click.option(
    "--dicom-out", is_flag=True, help="Also write a DICOM SEG and a TID 1500 SR per job (needs nodule-edge[dicom-out])."
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed job instead of recording it in errors.csv.")
@_handle_errors
def infer_batch(
    jobs_csv: str,
    out_dir: str,
    backend: str,
    bundle: str | None,
    top_k: int,
    workers: int,
    full_grid: bool,
    dicom_out: bool,
    fail_fast: bool,
) -> None:
    """Diagnose every nodule listed in JOBS_CSV; resumable.

    JOBS_CSV columns: job_id, study, series_uid (may be empty), space (voxel or world), x, y, z;
    relative study paths are relative to the CSV. Each job writes OUT/<job_id>/ as `infer` does;
    a re-run skips jobs already complete. Each study is opened once for all its nodules. Failed
    jobs go to OUT/errors.csv and the run goes on (exit code 9 at the end); OUT/summary.csv has
    one row per job.
    """
    from nodule_edge.runtime.batch import read_jobs, run_batch

    jobs = read_jobs(jobs_csv)
    inferer = _common._make_inferer(bundle, backend, top_k)
    writers = []
    if dicom_out:
        from nodule_edge.runtime.dicom_out import dicom_writer

        writers.append(dicom_writer(inferer))
    with click.progressbar(length=len(jobs), label=f"{len(jobs)} jobs", file=sys.stderr, show_pos=True) as bar:
        outcome = run_batch(
            inferer,
            jobs,
            out_dir,
            workers=workers,
            fail_fast=fail_fast,
            full_grid=full_grid,
            extra_writers=writers,
            progress=lambda done, total: bar.update(done - bar.pos),
        )
    click.echo(
        f"{outcome.done} jobs diagnosed, {outcome.skipped} already complete, {len(outcome.errors)} failed; summary in {outcome.summary_csv}"
    )
    outcome.errors.raise_if_failed(outcome.total, outcome.errors_csv, noun="jobs")


@click.command()
@click.option(
    "--out",
    "out_dir",
    default="nodule-edge-demo",
    show_default=True,
    type=click.Path(path_type=str),
    help="Where to write the demo study and the outputs.",
)
@backend_option
@_handle_errors
def demo(out_dir: str, backend: str) -> None:
    """Run infer end to end on the bundled (synthetic, plainly labelled) demo study."""
    from pathlib import Path

    from nodule_edge.runtime.demo import write_demo_study
    from nodule_edge.runtime.outputs import write_outputs

    root = Path(out_dir)
    study_dir, voxel = write_demo_study(root / "study")
    click.echo(f"demo study (SYNTHETIC phantom, not patient data): {study_dir}")
    inferer = _common._make_inferer(None, backend, 20)
    result = inferer.infer(study_dir, voxels=[voxel])
    report = write_outputs(
        result,
        root / "outputs",
        inferer.spec,
        thumbnails=inferer.thumbnails,
        index_kind=inferer.index_kind,
        overwrite=True,
    )
    for line in _summary_lines(report, str(root / "outputs")):
        click.echo(line)
    click.echo(f"look at {root / 'outputs' / 'nodule0_overlay.png'} and {root / 'outputs' / 'report.json'}")

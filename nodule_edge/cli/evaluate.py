"""``nodule-edge evaluate``: the runtime over a VOI folder, a predictions CSV and an optional HTML report."""

from __future__ import annotations

import sys

import click

from nodule_edge.cli import _common
from nodule_edge.cli._common import _handle_errors, backend_option, bundle_option


@click.command()
@click.argument("voi_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option(
    "--out",
    "out_csv",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Predictions CSV to write (errors.csv goes beside it).",
)
@backend_option
@bundle_option
@click.option("--limit", default=0, type=click.IntRange(0), help="Evaluate only the first N nodules (0 = all).")
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop at the first nodule the model cannot run on, instead of recording it in errors.csv.",
)
@click.option(
    "--report",
    "report",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    type=click.Path(dir_okay=False, path_type=str),
    help="Also write a self-contained HTML report (default path: evaluation.html beside --out; needs nodule-edge[report]).",
)
@_handle_errors
def evaluate(
    voi_dir: str, out_csv: str, backend: str, bundle: str | None, limit: int, fail_fast: bool, report: str | None
) -> None:
    """Run the runtime on every nodule of VOI_DIR and write one CSV row per nodule.

    VOI_DIR has the layout of ../shared/data/lidc_voi (manifest.csv with voi_id and
    center_{x,y,z}_mm; image/ and optional mask/). The evaluated nodule is excluded from its own
    similar-nodule retrieval. A nodule the model cannot run on (centre outside its volume,
    unreadable file) is left out and listed in errors.csv beside --out; the metrics are over the
    others and the exit code is 9.
    """
    import shlex
    from pathlib import Path

    from nodule_edge.errors import OutputError, require
    from nodule_edge.manifest import read_unsure_manifest
    from nodule_edge.runtime.evaluate import evaluate_voi_dir

    read_unsure_manifest(voi_dir)  # a folder that is not a VOI folder fails here, before any progress output
    report_path = None
    if report is not None:
        # Refuse a missing dependency or report folder now, not after a run of several minutes.
        require("matplotlib", "report")
        report_path = Path(report) if report else Path(out_csv).parent / "evaluation.html"
        if not report_path.resolve().parent.is_dir():
            raise OutputError(
                f"cannot write the report {report_path}: folder {report_path.resolve().parent} does not exist"
            )
    inferer = _common._make_inferer(bundle, backend, 20)
    with click.progressbar(length=1, label="evaluating", file=sys.stderr) as bar:

        def advance(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        evaluation = evaluate_voi_dir(inferer, voi_dir, out_csv, limit=limit, fail_fast=fail_fast, progress=advance)
    summary = evaluation.summary
    for key, value in summary.items():
        click.echo(f"{key}: {value}")
    if evaluation.errors:
        click.echo(
            f"metrics are over the {len(evaluation.nodules)} nodules that ran; {len(evaluation.errors)} failed, listed in {evaluation.errors_csv}"
        )
    click.echo(f"predictions written to {out_csv}")
    if report_path is not None:
        from nodule_edge.runtime.report_html import write_evaluation_report

        options = [
            f"--{name} {shlex.quote(str(value))}"
            for name, value in (("backend", backend), ("bundle", bundle), ("limit", limit))
            if value not in (None, "auto", 0)
        ]
        command = " ".join(
            [
                "nodule-edge evaluate",
                shlex.quote(voi_dir),
                "--out",
                shlex.quote(out_csv),
                *options,
                *(["--fail-fast"] if fail_fast else []),
                "--report",
                shlex.quote(str(report_path)),
            ]
        )
        write_evaluation_report(evaluation, report_path, inferer=inferer, command=command)
        click.echo(f"report written to {report_path}")
    evaluation.errors.raise_if_failed(evaluation.total, evaluation.errors_csv, noun="nodules")

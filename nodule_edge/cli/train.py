"""``nodule-edge train``, ``cv-report``, ``explain-compare`` and ``export``: the training side (needs the extras)."""

from __future__ import annotations

from typing import Any

import click

from nodule_edge.cli._common import _handle_errors
from nodule_edge.data_paths import lidc_voi_dir
from nodule_edge.explanation_methods import RUNTIME_METHODS, TORCH_METHODS


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(path_type=str),
    help="Bundle folder to write (default: the shipped bundle location inside the package).",
)
@click.option(
    "--index-from",
    "index_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False, path_type=str),
    help="VOI folder (lidc_voi layout) whose nodules fill the similar-nodule index.",
)
@click.option("--cache-dir", default=None, type=click.Path(path_type=str), help="Patch cache folder.")
@click.option(
    "--summary",
    "summary_json",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="Training summary.json: its metrics go into the ONNX metadata and a MODEL_CARD.md is rendered from it into the bundle.",
)
@click.option(
    "--other-run",
    "other_runs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="summary.json of a run that is not the shipped model (ablation, short folds): listed in the model card. Repeatable.",
)
@click.option("--no-cpu-engine", is_flag=True, help="Skip building the fast CPU engine.")
@click.option(
    "--onnx-only",
    "onnx_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    help="Only export the fp32 ONNX graph to this file.",
)
@click.option(
    "--tensorrt",
    "tensorrt",
    is_flag=True,
    help="Also build a TensorRT engine (needs nodule-edge[trt] and an NVIDIA GPU; untested here).",
)
@click.option(
    "--triton",
    "triton_dir",
    default=None,
    type=click.Path(path_type=str),
    help="Also write a Triton Inference Server model repository here.",
)
@click.option(
    "--first-pass",
    "first_pass",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="Box net checkpoint for the runtime's first pass (default: the one the --summary's final model names, if any).",
)
@click.option(
    "--explain-summary",
    "explain_summary",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="explain-compare JSON whose Grad-CAM/occlusion agreement threshold the bundle records.",
)
@_handle_errors
def export(
    checkpoint: str,
    out_dir: str | None,
    index_dir: str | None,
    cache_dir: str | None,
    summary_json: str | None,
    other_runs: tuple[str, ...],
    no_cpu_engine: bool,
    onnx_path: str | None,
    tensorrt: bool,
    triton_dir: str | None,
    explain_summary: str | None,
    first_pass: str | None,
) -> None:
    """Export a training CHECKPOINT (.safetensors) to the runtime's artifacts.

    Writes a verified bundle: fp32 ONNX with in-graph Grad-CAM and metadata, the fast CPU engine,
    the similar-nodule index (--index-from), a model card and a checksum manifest.
    """
    import json
    from pathlib import Path

    from nodule_edge.errors import require

    require("torch", "export")
    if onnx_path:
        from nodule_edge.export.onnx_export import export_onnx

        result = export_onnx(checkpoint, onnx_path)
        click.echo(f"ONNX written to {result.path} (sha256 {result.sha256})")
        return
    import tempfile

    from nodule_edge.export.bundle_builder import build_bundle
    from nodule_edge.runtime.bundle import default_bundle_path

    metrics = json.loads(Path(summary_json).read_text()) if summary_json else None
    if first_pass is None and metrics is not None:
        # A run with [first_pass] network = "box_net" trained its final box net beside the model.
        first_pass = (metrics.get("final") or {}).get("box_net", {}).get("checkpoint")
    target = Path(out_dir) if out_dir else default_bundle_path()
    with tempfile.TemporaryDirectory() as tmp:
        card = None
        if summary_json:
            from nodule_edge.train.model_card import write_model_card

            card = write_model_card(
                summary_json, Path(tmp) / "MODEL_CARD.md", other_runs=list(other_runs), explain_summary=explain_summary
            )
        explanations = _explanation_threshold(explain_summary) if explain_summary else None
        bundle = build_bundle(
            checkpoint,
            target,
            index_manifest_dir=index_dir,
            cache_dir=cache_dir,
            cpu_engine=not no_cpu_engine,
            model_card=card,
            metrics=_headline_metrics(metrics),
            explanations=explanations,
            first_pass=first_pass,
            progress=lambda m: click.echo(m, err=True),
        )
    engine_path = None
    if tensorrt:
        from nodule_edge.export.tensorrt import build_engine_for_bundle

        engine_path = build_engine_for_bundle(bundle)
        click.echo(f"TensorRT engine: {engine_path}")
    if triton_dir:
        from nodule_edge.export.triton import write_triton_repository

        repo = write_triton_repository(bundle / "model.onnx", triton_dir, engine_path=engine_path)
        if (bundle / "first_pass.onnx").is_file():
            # The runtime's first pass (a box net) is a model of its own: a Triton client runs it
            # first, bounds the cube to its box (nodule_edge.patch.bound_to_nodule), then the model.
            write_triton_repository(bundle / "first_pass.onnx", triton_dir, model_name="nodule_edge_first_pass")
        click.echo(f"Triton repository: {repo.root}")
    click.echo(f"bundle written to {bundle}")


def _explanation_threshold(path: str) -> dict[str, Any]:
    """The bundle's ``explanations`` section from an explain-compare JSON."""
    import json
    from pathlib import Path

    from nodule_edge.errors import DataError

    try:
        result = json.loads(Path(path).read_text())
        agreement = result["agreement"]
        threshold = float(agreement["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not an explain-compare result with an agreement threshold: {exc}") from exc
    return {
        "agreement_threshold": threshold,
        "source": f"the {agreement['percentile']:g}th percentile of Grad-CAM/occlusion Spearman over {agreement['n']} held-out nodules of CV fold {result['fold']}",
    }


def _headline_metrics(summary: dict[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {}
    out: dict[str, Any] = {}
    for fold, result in summary.get("folds", {}).items():
        out[f"fold{fold}"] = {
            "auc": result["malignancy"]["auc"],
            "accuracy": result["malignancy"]["accuracy"],
            "dice": result.get("dice_mean"),
            "attributes_mean_mae": result.get("attributes_mean_mae"),
            "cam_on_nodule_fraction": result.get("cam_on_nodule_fraction_gt_mask"),
        }
    return out


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set train.epochs=2 (value parsed as TOML).",
)
@click.option("--folds-only", is_flag=True, help="Run the configured CV folds but not the final model.")
@_handle_errors
def train(config: str, overrides: tuple[str, ...], folds_only: bool) -> None:
    """Train the collaborative model from a TOML/JSON CONFIG (see configs/shipped.toml).

    Runs patient-disjoint cross-validation folds (checkpoints as safetensors + JSON, resumable:
    re-run the same command to continue; a fold whose result exists is not run again, and each
    finished fold is also written to cv.export_dir, docs/cv for the shipped config), then the
    final model on all data. Multi-process: torchrun --nproc-per-node 2 -m nodule_edge.cli train CONFIG.
    """
    import tomllib

    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            parsed[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key] = value
    from nodule_edge.errors import require

    require("torch", "train")
    from nodule_edge.train.config import load_config
    from nodule_edge.train.run import run_training

    cfg = load_config(config, parsed)
    summary = run_training(cfg, progress=lambda msg: click.echo(msg, err=True), folds_only=folds_only)
    for fold, result in summary["folds"].items():
        m = result["malignancy"]
        click.echo(
            f"fold {fold}: AUC {m['auc']:.3f} accuracy {m['accuracy']:.3f} dice {result.get('dice_mean', float('nan')):.3f}"
        )
    if "final" in summary:
        click.echo(f"final checkpoint: {summary['final']['checkpoint']}")


# The manifest whose rows the fold files' per-nodule predictions index (cv-report, cv-compare).
_manifest_option = click.option(
    "--voi-dir",
    type=click.Path(exists=True, file_okay=False, path_type=str),
    default=lambda: str(lidc_voi_dir()),
    show_default="$NODULE_EDGE_DATA/lidc_voi, else ../shared/data/lidc_voi",
    help="The manifest the folds' row indices refer to.",
)


@click.command("cv-report")
@click.argument("fold_files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=str))
@_manifest_option
@click.option("--title", default="Cross-validation", show_default=True, help="Heading of the report.")
@_handle_errors
def cv_report(fold_files: tuple[str, ...], voi_dir: str, title: str) -> None:
    """Print the per-fold table, mean ± sd and pooled AUC of FOLD_FILES (docs/cv/fold*.json) as Markdown."""
    from nodule_edge.errors import require

    require("torch", "train")
    from nodule_edge.train.evaluation import pool_fold_files
    from nodule_edge.train.model_card import render_cv_report

    folds, pooled = pool_fold_files(list(fold_files), voi_dir)
    click.echo(render_cv_report(folds, pooled, title), nl=False)


@click.command("cv-compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=str))
@_manifest_option
@click.option(
    "--draws",
    default=2000,
    show_default=True,
    type=click.IntRange(100),
    help="Bootstrap resamples for the Δ AUC interval.",
)
@click.option("--title", default="Cross-validated runs", show_default=True, help="Heading of the table.")
@_handle_errors
def cv_compare(run_dirs: tuple[str, ...], voi_dir: str, draws: int, title: str) -> None:
    """Print one table of cross-validated RUN_DIRS (docs/cv, docs/ablations/NAME), the first the reference.

    Each run is pooled over its own folds; its Δ AUC against the first run pairs the two runs'
    predictions of the same nodules on the folds both have, with a paired bootstrap interval.
    """
    from nodule_edge.errors import require

    require("torch", "train")
    from nodule_edge.train.evaluation import compare_runs
    from nodule_edge.train.model_card import render_run_comparison

    click.echo(render_run_comparison(compare_runs(list(run_dirs), voi_dir, draws=draws), title), nl=False)


@click.command("explain-compare")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option(
    "--fold",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="CV fold whose held-out (test) nodules are explained.",
)
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="The fold's model (default: its refit or last checkpoint under the config's output_dir).",
)
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(1),
    help="Held-out nodules to explain (the fold's first N test nodules).",
)
@click.option(
    "--methods",
    default=",".join(RUNTIME_METHODS + TORCH_METHODS),
    show_default=True,
    help="Comma-separated methods.",
)
@click.option(
    "--curve-steps",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="Steps of the deletion and insertion curves.",
)
@click.option(
    "--randomisation-nodules",
    default=3,
    show_default=True,
    type=click.IntRange(0),
    help="Nodules of the model-randomisation check.",
)
@click.option(
    "--out",
    "out_json",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="JSON of every nodule's metrics and the summary.",
)
@_handle_errors
def explain_compare(
    config: str,
    fold: int,
    checkpoint: str | None,
    limit: int,
    methods: str,
    curve_steps: int,
    randomisation_nodules: int,
    out_json: str,
) -> None:
    """Compare every explanation method on held-out nodules of one CV fold; print the table.

    Grad-CAM and occlusion as the runtime computes them, and integrated gradients, gradient x
    input, saliency, SmoothGrad, gradient SHAP, LIME and LRP through Captum (extra 'explain'):
    pointing game, mass inside the readers' mask, deletion/insertion areas, seconds per nodule,
    and the model-randomisation check. The Grad-CAM/occlusion agreement's 5th percentile is the
    runtime's agreement threshold (nodule-edge export --explain-summary OUT).
    """
    from nodule_edge.errors import require

    require("torch", "train")
    require("captum", "explain")
    from nodule_edge.train.config import load_config
    from nodule_edge.train.explain_compare import compare_explanations, render_table, write_result

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    result = compare_explanations(
        load_config(config),
        fold,
        checkpoint,
        limit=limit,
        methods=chosen,
        curve_steps=curve_steps,
        randomisation_nodules=randomisation_nodules,
        progress=lambda m: click.echo(m, err=True),
    )
    write_result(result, out_json)
    click.echo(render_table(result), nl=False)
    click.echo(f"written to {out_json}")

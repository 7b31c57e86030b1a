"""Writing results: report.json, NIfTI volumes in the study's own geometry, PNG overlays.

The maps are resampled onto the study's lattice with :func:`nodule_edge.volume.resample` and
written by :mod:`nodule_edge.runtime.nifti`, without SimpleITK (see :mod:`nodule_edge._sitk`).

Everything is written into a temporary folder beside the destination and moved into place in one
rename, so a failure (unwritable folder, full disk) leaves nothing partial behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nodule_edge import __version__
from nodule_edge._files import staged_folder
from nodule_edge.errors import OutputError
from nodule_edge.outline import OUTLINE_FEATURE_NAMES
from nodule_edge.patch import PatchSpec, patch_grid
from nodule_edge.runtime.inferer import NodulePrediction, NoduleResult, StudyResult
from nodule_edge.runtime.nifti import write_nifti
from nodule_edge.runtime.overlays import render_overlay, render_similar_strip
from nodule_edge.volume import Interpolation, Volume, resample

__all__ = ["REPORT_SCHEMA_VERSION", "build_report", "write_outputs", "patch_to_study_grid", "check_output_dir"]

log = logging.getLogger(__name__)
REPORT_SCHEMA_VERSION = "1.3"
# zlib level 1: PNG encoding at the default level 6 was half of all output writing (measured
# ~23 ms of ~39 ms per nodule); level 1 files are somewhat larger and decode the same.
_PNG_COMPRESS_LEVEL = 1


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any work) when the destination cannot be used."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out_dir} is not empty (use --overwrite to replace it)")
    # Missing parent folders are created when the outputs are written (as `mkdir -p` would); the
    # nearest existing ancestor must be a writable folder.
    ancestor = out_dir.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create {out_dir}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {ancestor}: permission denied")


def patch_to_study_grid(
    volume: np.ndarray,
    center_lps_mm: Any,
    spec: PatchSpec,
    study: Any,
    full_grid: bool = False,
    interpolation: Interpolation = "linear",
) -> Volume:
    """Resample a patch-grid volume onto the study's own voxel lattice.

    By default only the part of the lattice the 32 mm cube covers is written (the study's own
    voxel positions, spacing and orientation; the grid the pixels were read from): viewers overlay
    by physical coordinates, and a full 512²×N grid would cost far more to write than the whole
    inference. ``full_grid`` writes the whole study grid (refused for unevenly spaced series).

    Returns:
        float32 values on that lattice (0 outside the cube).
    """
    src = Volume(np.asarray(volume, dtype=np.float32), patch_grid(center_lps_mm, spec))
    grid = study.reference_geometry(None if full_grid else center_lps_mm, spec)
    return Volume(resample(src, grid, interpolation, 0.0), grid)


def _study_summary(result: StudyResult) -> dict[str, Any]:
    s = result.study
    return {
        "source": s.kind,
        "series_instance_uid": s.series_uid,
        "series_description": s.series_description,
        "slice_count": int(s.n_slices),
        "size_voxels": [int(v) for v in s.size],
        "spacing_mm": [round(float(v), 6) for v in s.spacing_mm],
        "transfer_syntax": {"uid": s.transfer_syntax, "name": s.transfer_syntax_name} if s.transfer_syntax else None,
    }


def _nodule_report(i: int, n: NoduleResult) -> dict[str, Any]:
    p = n.prediction
    return {
        "index": i,
        "xyz_voxel": [round(v, 3) for v in n.xyz_voxel],
        "world_lps_mm": [round(v, 3) for v in n.world_lps_mm],
        "center_slice": n.center_slice,
        "malignancy_probability": round(p.malignancy_probability, 6),
        "attributes": {k: round(v, 4) for k, v in p.attributes.items()},
        "attribute_scale": [1, 5],
        "model_input": {
            "nodule_bounded": p.nodule_bounded,
            "first_pass_found_nodule": p.first_pass_found_nodule,
        },
        "outline_term": _outline_report(p),
        "segmentation": {
            "volume_mm3": round(n.volume_mm3, 2),
            "longest_axial_diameter_mm": round(n.longest_axial_diameter_mm, 2),
            "file": f"nodule{i}_segmentation.nii.gz",
        },
        "saliency": {
            "file": f"nodule{i}_saliency.nii.gz",
            "nodule_attention": round(p.nodule_attention, 6),
            "background_attention": round(p.background_attention, 6),
            "trustworthy": n.trustworthy,
            "trust_reasons": n.trust_reasons,
            "sign_uncertain": p.saliency_sign_uncertain,
        },
        "explanations": _explanations_report(i, n),
        "similar": [
            {
                "id": nb.id,
                "distance": round(float(nb.distance), 6),
                "label": nb.label,
                "attributes": {k: round(float(v), 3) for k, v in (nb.attributes or {}).items()} or None,
                "diameter_mm": nb.diameter_mm,
            }
            for nb in p.similar
        ],
        "retrieval_score": None if p.retrieval_score is None else round(p.retrieval_score, 6),
        "overlay_png": f"nodule{i}_overlay.png",
        "similar_png": f"nodule{i}_similar.png" if p.similar else None,
    }


def _outline_report(p: NodulePrediction) -> dict[str, Any] | None:
    """The outline term's measurements and what they added to the logit (README, Outputs)."""
    if p.outline_statistics is None or p.outline_logit is None:
        return None
    return {
        "statistics": {k: round(float(v), 4) for k, v in zip(OUTLINE_FEATURE_NAMES, p.outline_statistics)},
        "logit": round(p.outline_logit, 4),
        "changes_class": bool(p.outline_changes_class),
    }


def _quality(result: StudyResult) -> dict[str, Any]:
    return {
        "training_data": result.training_data,
        "flags": [{**flag.to_json(), "nodule": i} for i, flag in result.all_quality_flags],
    }


def _explanations_report(i: int, n: NoduleResult) -> dict[str, Any] | None:
    explained = n.explanations
    if explained is None:
        return None
    methods = {
        method: {
            "file": _explanation_file(i, method),
            "options": exp.options,
            "seconds": exp.seconds,
            "metrics": exp.metrics,
        }
        for method, exp in explained.maps.items()
    }
    agreement = explained.agreement
    return {
        "methods": methods,
        "agreement": None
        if agreement is None
        else {
            "spearman": None if not np.isfinite(agreement.spearman) else round(agreement.spearman, 6),
            "threshold": agreement.threshold,
            "threshold_source": agreement.source,
            "agrees": agreement.agrees,
        },
    }


def _explanation_file(i: int, method: str) -> str:
    # Grad-CAM keeps the file every report has had since schema 1.0.
    return f"nodule{i}_saliency.nii.gz" if method == "gradcam" else f"nodule{i}_{method}.nii.gz"


def build_report(result: StudyResult, index_kind: str | None = None) -> dict[str, Any]:
    """The JSON report (schema documented in the README)."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "nodule_edge_version": __version__,
        "study": _study_summary(result),
        "model": {
            "version": result.model_version,
            "backend": result.backend,
            "executor": result.executor,
            "index_kind": index_kind,
        },
        "nodules": [_nodule_report(i, n) for i, n in enumerate(result.nodules)],
        "quality": _quality(result),
        "timing_ms": dict(result.timing_ms),
    }


def write_outputs(
    result: StudyResult,
    out_dir: str | Path,
    spec: PatchSpec,
    *,
    thumbnails: dict[str, np.ndarray] | None = None,
    index_kind: str | None = None,
    overwrite: bool = False,
    full_grid: bool = False,
    extra_writers: list[Callable[[Path, StudyResult], list[str]]] | None = None,
) -> dict[str, Any]:
    """Write report.json, NIfTI volumes and PNGs atomically into ``out_dir``.

    Returns:
        The report as written.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    with staged_folder(out_dir, overwrite=overwrite) as tmp:
        report = build_report(result, index_kind)
        for i, nodule in enumerate(result.nodules):
            _write_nodule(tmp, i, nodule, result, spec, thumbnails or {}, full_grid)
        for writer in extra_writers or []:
            report.setdefault("dicom_outputs", []).extend(writer(tmp, result))
        report["timing_ms"] = dict(result.timing_ms)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _write_nodule(
    tmp: Path,
    i: int,
    n: NoduleResult,
    result: StudyResult,
    spec: PatchSpec,
    thumbnails: dict[str, np.ndarray],
    full_grid: bool,
) -> None:
    p = n.prediction
    seg = patch_to_study_grid(p.segmentation, n.world_lps_mm, spec, result.study, full_grid)
    seg_mask = (seg.array >= 0.5).astype(np.uint8)
    _write_image(Volume(seg_mask, seg.grid), tmp / f"nodule{i}_segmentation.nii.gz")
    sal = patch_to_study_grid(p.saliency, n.world_lps_mm, spec, result.study, full_grid)
    _write_image(sal, tmp / f"nodule{i}_saliency.nii.gz")
    title = (
        f"nodule {i}: p(malignant)={p.malignancy_probability:.2f}  attention in/out {p.nodule_attention:.2f}/{p.background_attention:.2f}"
        + ("" if p.trustworthy else "  [CHECK: attention off-nodule]")
    )
    overlay = render_overlay(
        n.patch[0], p.segmentation, p.saliency, "Grad-CAM  " + title if n.explanations is not None else title
    )
    if n.explanations is not None:
        panels = [overlay]
        for method, exp in n.explanations.maps.items():
            if method == "gradcam":
                continue
            _write_image(
                patch_to_study_grid(exp.display, n.world_lps_mm, spec, result.study, full_grid),
                tmp / _explanation_file(i, method),
            )
            metrics = "  ".join(f"{k} {v:.2f}" for k, v in exp.metrics.items() if isinstance(v, float))
            panels.append(render_overlay(n.patch[0], p.segmentation, exp.display, f"{method}  {metrics}"))
        overlay = _stack(panels)
    overlay.save(tmp / f"nodule{i}_overlay.png", compress_level=_PNG_COMPRESS_LEVEL)
    if p.similar:
        shown = p.similar[:8]
        captions = [
            f"{'malignant' if nb.label == 1 else 'benign' if nb.label == 0 else 'unknown'}\nd={nb.distance:.2f}"
            + (f" {nb.diameter_mm:.0f}mm" if nb.diameter_mm else "")
            for nb in shown
        ]
        score = "n/a" if p.retrieval_score is None else f"{p.retrieval_score:.2f}"
        render_similar_strip(
            [thumbnails.get(nb.id) for nb in shown],
            captions,
            f"nodule {i}: most similar nodules (retrieval score {score})",
        ).save(tmp / f"nodule{i}_similar.png", compress_level=_PNG_COMPRESS_LEVEL)


def _stack(panels: list[Any]) -> Any:
    """Overlay panels one below the other (one per explanation method)."""
    from PIL import Image

    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), (0, 0, 0))
    y = 0
    for panel in panels:
        canvas.paste(panel, (0, y))
        y += panel.height
    return canvas


def _write_image(image: Volume, path: Path) -> None:
    try:
        write_nifti(image, path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path.name}: {exc.strerror or exc}") from exc

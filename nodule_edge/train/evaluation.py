"""Evaluation of a trained model on held-out nodules, with the baselines it must beat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.metrics import binary_metrics, brier_score, dice, roc_auc, within_one_accuracy
from nodule_edge.outline import OutlineHead
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, nodule_extent
from nodule_edge.train.head import fit_logistic
from nodule_edge.train.model import CollaborativeNet
from nodule_edge.train.trainer import Dataset, predict, predict_runtime_path, reference_bounded

__all__ = [
    "evaluate_model",
    "first_pass_quality",
    "fit_diameter_baseline",
    "context_statistics",
    "pooled_metrics",
    "retrieval_comparison",
    "pool_fold_files",
    "compare_runs",
]

LABEL_NOTE = "LIDC proxy labels: reader-mean malignancy > 3 malignant, < 3 benign, = 3 excluded"


def fit_diameter_baseline(diameters: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Logistic regression of the label on log-diameter (unpenalised); returns (a, b)."""
    (b,), a = fit_logistic(
        np.log(np.asarray(diameters, dtype=np.float64))[:, None], np.asarray(labels, dtype=np.float64), l2=0.0
    )
    return a, float(b)


def context_statistics(ds: Dataset) -> dict[str, float]:
    """How much the training VOIs' z context says about nodule size.

    ``z_extent_mm`` is twice the smaller distance from the centre to a VOI end (the symmetric
    context the patch gets); where it tracks the diameter, the air boundary is a size cue.
    """
    ok = np.isfinite(ds.diameters)
    z, d = ds.cache.z_extent_mm[ok], ds.diameters[ok]
    return {
        "n": int(ok.sum()),
        "median_z_context_mm": float(np.median(z)),
        "median_z_context_minus_diameter_mm": float(np.median(z - d)),
        "z_context_vs_diameter_r": float(np.corrcoef(z, d)[0, 1]),
        "n_z_context_ge_24mm": int((ds.cache.z_extent_mm >= 24).sum()),
    }


def _soft_inside_outside(cam: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(range(1, cam.ndim))
    inside = (cam * mask).sum(axes) / np.maximum(mask.sum(axes), 1e-6)
    outside = (cam * (1 - mask)).sum(axes) / np.maximum((1 - mask).sum(axes), 1e-6)
    return inside, outside


def _truncate_z_around_nodule(images: np.ndarray, masks: np.ndarray, extra_mm: float, spacing_mm: float) -> np.ndarray:
    """Blank z slices more than ``extra_mm`` beyond the reference mask's z extent (nodule intact)."""
    out = images.copy()
    size = images.shape[-3]
    for i in range(len(images)):
        rows = np.flatnonzero((masks[i] >= 0.5).any(axis=(1, 2)))
        if len(rows) == 0:
            continue
        lo = rows[0] - extra_mm / spacing_mm
        hi = rows[-1] + extra_mm / spacing_mm
        keep = (np.arange(size) >= lo) & (np.arange(size) <= hi)
        out[i][:, ~keep] = 0
    return out


def evaluate_model(
    model: CollaborativeNet,
    ds: Dataset,
    test_idx: np.ndarray,
    train_idx: np.ndarray,
    device: torch.device,
    spec: PatchSpec | None = None,
    context_extra_mm: float = 2.0,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    outline_head: OutlineHead | None = None,
) -> dict[str, Any]:
    """All reported metrics for one held-out set, with the diameter-only and constant baselines.

    The headline figures are those of the runtime's path (:func:`predict_runtime_path`: first
    pass on the whole cube, box of its segmentation, second pass). Beside them: the training path
    (box of the reference mask), how far the two paths' probabilities differ, and how far the
    runtime path moves when the z context is cut to the nodule plus ``context_extra_mm`` (the
    nodule left whole). Predictions are made in fp32: bf16 rounds probabilities to steps of about
    0.003, which creates ties that distort the AUC.

    ``segment`` is the runtime's first pass when it is not the model's own segmentation (a box
    net, :mod:`nodule_edge.train.first_pass`); its Dice and box error against the readers' mask
    are reported under ``first_pass``. ``outline_head`` is the head step's outline term
    (:mod:`nodule_edge.outline`), added on every path from the first pass's outline statistics
    (the training path shares the runtime path's: both come from the whole cube).

    Returns:
        A JSON-serialisable dict, plus ``_predictions`` (per-nodule arrays) for pooling.
    """
    spec = spec or DEFAULT_PATCH_SPEC
    pred, found = predict_runtime_path(model, ds, test_idx, device, spec, segment=segment, outline_head=outline_head)
    labels = ds.labels[test_idx]
    sel = labels >= 0
    result: dict[str, Any] = {
        "n_nodules": int(len(test_idx)),
        "n_labelled": int(sel.sum()),
        "label_note": LABEL_NOTE,
        "input": "nodule-bounded (runtime path: two passes)" if spec.nodule_box else "whole cube",
        "first_pass_found_nodule_fraction": float(found.mean()) if len(found) else float("nan"),
    }
    result["malignancy"] = binary_metrics(labels[sel], pred["malignancy_probability"][sel])

    # Diameter-only baseline, fitted on the training nodules.
    tr_sel = (ds.labels[train_idx] >= 0) & np.isfinite(ds.diameters[train_idx])
    te_d = ds.diameters[test_idx][sel]
    if tr_sel.sum() > 2 and np.isfinite(te_d).all():
        a, b = fit_diameter_baseline(ds.diameters[train_idx][tr_sel], ds.labels[train_idx][tr_sel])
        p_d = 1 / (1 + np.exp(-(a + b * np.log(te_d))))
        result["baseline_diameter"] = binary_metrics(labels[sel], p_d)

    has_a = ds.has_attributes[test_idx]
    if has_a.any() and pred["attributes"].shape[1] == len(ATTRIBUTE_NAMES):
        true_r = ds.attributes[test_idx][has_a] * 4 + 1
        pred_r = pred["attributes"][has_a] * 4 + 1
        const = ds.attributes[train_idx][ds.has_attributes[train_idx]].mean(0) * 4 + 1
        mae = np.abs(pred_r - true_r).mean(0)
        const_mae = np.abs(const - true_r).mean(0)
        result["attributes"] = {
            name: {
                "mae": float(mae[i]),
                "within_1": float(within_one_accuracy(pred_r, true_r)[i]),
                "baseline_constant_mae": float(const_mae[i]),
            }
            for i, name in enumerate(ATTRIBUTE_NAMES)
        }
        result["attributes_mean_mae"] = float(mae.mean())
        result["attributes_baseline_constant_mean_mae"] = float(const_mae.mean())

    has_m = ds.cache.has_mask[test_idx]
    masks = ds.cache.masks[test_idx].astype(np.float32)
    volume = pred["segmentation64"].astype(np.float32).sum(axis=(1, 2, 3)) * spec.spacing_mm**3
    if has_m.any():
        dices = [dice(pred["segmentation64"][i] > 0.5, masks[i] > 0.5) for i in np.flatnonzero(has_m)]
        result["dice_mean"] = float(np.mean(dices))
        mask16 = masks.reshape(len(masks), 16, 4, 16, 4, 16, 4).mean((2, 4, 6))
        inside, outside = _soft_inside_outside(pred["cam16"][has_m], mask16[has_m])
        result["cam_on_nodule_fraction_gt_mask"] = float((inside > outside).mean())
    result["cam_on_nodule_fraction_predicted_mask"] = float(
        (pred["nodule_attention"] > pred["background_attention"]).mean()
    )
    # What the segmentation alone knows: the AUC of its soft volume (a probe, not a product output).
    result["segmentation_volume_auc"] = roc_auc(labels[sel], volume[sel]) if sel.any() else float("nan")

    if spec.nodule_box is not None:
        reference = predict(model, ds, test_idx, device, bf16=False, images=reference_bounded(ds, test_idx, spec))
        if outline_head is not None:
            reference = outline_head.apply(reference, pred["outline_statistics"])
        result["malignancy_reference_box"] = binary_metrics(labels[sel], reference["malignancy_probability"][sel])
        delta = pred["malignancy_probability"] - reference["malignancy_probability"]
        result["path_parity"] = {
            "note": "runtime path (box of the first pass's segmentation) minus training path (box of the reference mask)",
            "n": int(len(test_idx)),
            "mean_abs_delta_probability": float(np.abs(delta).mean()),
            "mean_delta_probability": float(delta.mean()),
            "max_abs_delta_probability": float(np.abs(delta).max()),
        }
    # Context stability with the nodule intact: z context cut to the nodule plus 2 mm, runtime path.
    roomy = np.flatnonzero(
        has_m
        & (
            ds.cache.z_extent_mm[test_idx]
            >= np.nan_to_num(ds.diameters[test_idx], nan=np.inf) + 2 * context_extra_mm + 2.0
        )
    )
    if len(roomy):
        cut = _truncate_z_around_nodule(
            ds.cache.images[test_idx[roomy]].astype(np.float32), masks[roomy], context_extra_mm, spec.spacing_mm
        )
        short, _ = predict_runtime_path(
            model, ds, test_idx[roomy], device, spec, images=cut, segment=segment, outline_head=outline_head
        )
        delta = short["malignancy_probability"] - pred["malignancy_probability"][roomy]
        result["context_sensitivity_nodule_intact"] = {
            "n": int(len(roomy)),
            "median_full_context_mm": float(np.median(ds.cache.z_extent_mm[test_idx[roomy]])),
            "truncated_to": f"reference z extent + {context_extra_mm} mm each side",
            "mean_abs_delta_probability": float(np.abs(delta).mean()),
            "mean_delta_probability": float(delta.mean()),
            "max_abs_delta_probability": float(np.abs(delta).max()),
        }
    if spec.nodule_box is not None and has_m.any():
        result["first_pass"] = first_pass_quality(
            segment or (lambda x: predict(model, ds, np.arange(len(x)), device, False, images=x)["segmentation64"]),
            ds.cache.images[test_idx[has_m]],
            masks[has_m],
            spec.nodule_box.threshold,
        )
        result["first_pass"]["network"] = "model" if segment is None else "box_net"
    result["_predictions"] = {
        "index": test_idx,
        "probability": pred["malignancy_probability"],
        "attributes": pred["attributes"],
        "embedding": pred["embedding"],
        "volume_mm3": volume,
    }
    return result


def first_pass_quality(
    segment: Callable[[np.ndarray], np.ndarray], cubes: np.ndarray, masks: np.ndarray, threshold: float
) -> dict[str, Any]:
    """How well a first pass outlines the nodules of whole cubes, against the readers' masks.

    Dice of the segmentation at 0.5, and the error of the box the runtime draws from it
    (:func:`nodule_edge.patch.nodule_extent`) against the readers' mask's box, in voxels per side.
    """
    dices, errors = [], []
    for start in range(0, len(cubes), 16):
        segs = np.asarray(segment(np.asarray(cubes[start : start + 16], np.float32)), np.float32)
        for seg, mask in zip(segs, masks[start : start + 16], strict=True):
            dices.append(dice(seg > 0.5, mask > 0.5))
            ref, got = nodule_extent(mask, 0.5), nodule_extent(seg, threshold)
            if ref is None:
                continue
            # No nodule found: every side counts as off by the whole cube.
            errors.append(
                np.full(6, float(len(seg)))
                if got is None
                else np.abs(np.concatenate([got[0] - ref[0], got[1] - ref[1]])).astype(float)
            )
    err = np.asarray(errors).reshape(-1, 6)
    return {
        "dice_mean": float(np.mean(dices)) if dices else float("nan"),
        "box_error_voxels_z_mean": float(err[:, [0, 3]].mean()) if len(err) else float("nan"),
        "box_error_voxels_inplane_mean": float(err[:, [1, 2, 4, 5]].mean()) if len(err) else float("nan"),
        "boxes_within_one_voxel_fraction": float((err.max(axis=1) <= 1).mean()) if len(err) else float("nan"),
        "n": len(dices),
    }


def pooled_metrics(per_fold: list[dict[str, Any]], ds: Dataset) -> dict[str, Any]:
    """Pool per-nodule out-of-fold predictions and recompute the headline metrics.

    ``per_fold`` items carry ``predictions`` (``index``, ``probability``, ``volume_mm3``) as
    written to each fold's JSON, so folds finished in earlier sessions pool with new ones.
    """
    idx = np.concatenate([np.asarray(f["predictions"]["index"], np.int64) for f in per_fold])
    prob = np.concatenate([np.asarray(f["predictions"]["probability"], np.float64) for f in per_fold])
    labels = ds.labels[idx]
    sel = labels >= 0
    out: dict[str, Any] = {
        "n_folds": len(per_fold),
        "malignancy": binary_metrics(labels[sel], prob[sel]),
        "brier": brier_score(labels[sel], prob[sel]),
        "label_note": LABEL_NOTE,
    }
    if np.isfinite(ds.diameters[idx][sel]).all():
        out["diameter_auc"] = roc_auc(labels[sel], ds.diameters[idx][sel])
    if all("volume_mm3" in f["predictions"] for f in per_fold):
        volume = np.concatenate([np.asarray(f["predictions"]["volume_mm3"], np.float64) for f in per_fold])
        out["segmentation_volume_auc"] = roc_auc(labels[sel], volume[sel])
    calcified = getattr(ds, "calcified", None)
    if calcified is not None and np.isfinite(calcified[idx][sel]).all():
        flag, y, p, diameter = calcified[idx][sel], labels[sel], prob[sel], ds.diameters[idx][sel]
        out["by_calcification"] = {
            name: _subgroup(y[rows], p[rows], diameter[rows])
            for name, rows in (("calcified", flag == 1), ("non_calcified", flag == 0))
        }
    return out


def _subgroup(labels: np.ndarray, prob: np.ndarray, diameters: np.ndarray) -> dict[str, Any]:
    """Size of a subgroup of labelled nodules and, where both classes occur, the model's and the
    readers' diameter's AUC within it (the pooled AUC can hide a subgroup where diameter wins)."""
    out: dict[str, Any] = {"n": int(len(labels)), "n_malignant": int(labels.sum())}
    if 0 < out["n_malignant"] < out["n"]:
        out["auc"] = roc_auc(labels, prob)
        if np.isfinite(diameters).all():
            out["diameter_auc"] = roc_auc(labels, diameters)
    return out


def pool_fold_files(paths: list[Any], voi_dir: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Read ``foldK.json`` files (``docs/cv``) and pool their predictions against the manifest.

    Returns:
        The folds by number and the pooled metrics. Folds written by different configurations
        are refused: they would pool two models.
    """
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from nodule_edge.errors import DataError
    from nodule_edge.train.data import calcification, read_unsure_manifest, targets

    folds: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read fold result {path}: {exc}") from exc
        if "predictions" not in result or "fold" not in result:
            raise DataError(f"{path} is not a fold result written by 'nodule-edge train' (no predictions or fold)")
        folds[str(result["fold"])] = result
    shas = {r.get("fold_config_sha256") for r in folds.values()}
    if len(shas) > 1:
        raise DataError(f"the fold files come from {len(shas)} different configurations; pool one run at a time")
    records = read_unsure_manifest(voi_dir)
    _, _, labels, diameters = targets(records)
    n = len(records)
    for fold, r in folds.items():
        top = max(r["predictions"]["index"], default=-1)
        if top >= n:
            raise DataError(f"fold {fold} refers to manifest row {top}, but {voi_dir} has {n} rows: another manifest?")
    fields = SimpleNamespace(labels=labels, diameters=diameters, calcified=calcification(records))
    pooled = pooled_metrics([folds[k] for k in sorted(folds)], fields)  # type: ignore[arg-type]  # duck-typed: the fields pooled_metrics reads of a Dataset
    return folds, pooled


def _paired_interval(
    metric: Callable[[np.ndarray, np.ndarray], float],
    labels: np.ndarray,
    run: np.ndarray,
    reference: np.ndarray,
    folds: np.ndarray,
    draws: int,
    seed: int,
) -> tuple[float, float]:
    """95 % bootstrap interval of ``metric`` of ``run`` minus that of ``reference`` on the same nodules.

    Nodules are resampled within their fold (the folds are fixed by the patient split), the same
    draw for both scores, so the interval is of the paired difference.
    """
    rng = np.random.default_rng(seed)
    rows_by_fold = [np.flatnonzero(folds == k) for k in np.unique(folds)]
    deltas = np.empty(draws)
    for i in range(draws):
        s = np.concatenate([rng.choice(rows, len(rows)) for rows in rows_by_fold])
        deltas[i] = metric(labels[s], run[s]) - metric(labels[s], reference[s])
    low, high = np.nanpercentile(deltas, [2.5, 97.5])
    return float(low), float(high)


def compare_runs(run_dirs: list[Any], voi_dir: Any, draws: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Summarise several cross-validated runs against the first one, on the same nodules.

    Each directory holds one run's ``foldK.json`` files (``docs/cv``, ``docs/ablations/NAME``).
    Every run is pooled over the folds it has; its difference from the first run (the reference)
    is the pooled AUC on the folds both have, with a paired bootstrap interval
    (``draws`` resamples of nodules within folds).

    Returns:
        One JSON-serialisable dict per run, in the given order.

    Raises:
        DataError: A directory without fold files, or two runs whose same fold holds different
            nodules (another split: their predictions cannot be paired).
    """
    from pathlib import Path

    from nodule_edge.errors import DataError
    from nodule_edge.train.data import read_unsure_manifest, targets
    from nodule_edge.train.model_card import mean_of, result_value

    _, _, labels, _ = targets(read_unsure_manifest(voi_dir))
    runs: list[tuple[str, dict[str, dict[str, Any]], dict[str, Any]]] = []
    for run_dir in run_dirs:
        files = sorted(Path(run_dir).glob("fold*.json"))
        if not files:
            raise DataError(f"{run_dir} holds no foldK.json files")
        folds, pooled = pool_fold_files(files, voi_dir)
        runs.append((str(run_dir), folds, pooled))

    def scores(folds: dict[str, dict[str, Any]], keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.concatenate([np.asarray(folds[k]["predictions"]["index"], np.int64) for k in keys])
        prob = np.concatenate([np.asarray(folds[k]["predictions"]["probability"], np.float64) for k in keys])
        fold = np.concatenate([np.full(len(folds[k]["predictions"]["index"]), int(k)) for k in keys])
        order = np.argsort(idx, kind="stable")
        return idx[order], prob[order], fold[order]

    def mean(folds: dict[str, dict[str, Any]], *path: str) -> float | None:
        return mean_of([result_value(r, ".".join(path)) for r in folds.values()])

    ref_name, ref_folds, _ = runs[0]
    out: list[dict[str, Any]] = []
    for name, folds, pooled in runs:
        above = [
            r["malignancy"]["auc"] > r["baseline_diameter"]["auc"] for r in folds.values() if "baseline_diameter" in r
        ]
        mae, const = mean(folds, "attributes_mean_mae"), mean(folds, "attributes_baseline_constant_mean_mae")
        row: dict[str, Any] = {
            "run": name,
            "folds": sorted(int(k) for k in folds),
            "n_labelled": int(pooled["malignancy"]["n"]),
            "pooled_auc": pooled["malignancy"]["auc"],
            "pooled_brier": pooled["brier"],
            "pooled_diameter_auc": pooled.get("diameter_auc"),
            "folds_above_diameter": int(sum(above)),
            "reference_box_auc_mean": mean(folds, "malignancy_reference_box", "auc"),
            "path_parity_mean": mean(folds, "path_parity", "mean_abs_delta_probability"),
            "dice_mean": mean(folds, "dice_mean"),
            "cam_on_nodule_mean": mean(folds, "cam_on_nodule_fraction_gt_mask"),
            "attribute_mae_mean": mae,
            "attribute_mae_below_constant": None if mae is None or not const else 1 - mae / const,
            "epochs": sorted({int(r["epochs_run"]) for r in folds.values() if "epochs_run" in r}),
            "seconds_per_epoch_mean": mean(folds, "seconds_per_epoch"),
        }
        shared = sorted(set(folds) & set(ref_folds), key=int)
        if name != ref_name and shared:
            for k in shared:
                if sorted(folds[k]["predictions"]["index"]) != sorted(ref_folds[k]["predictions"]["index"]):
                    raise DataError(
                        f"fold {k} of {name} holds other nodules than fold {k} of {ref_name}: another split"
                    )
            idx, prob, fold = scores(folds, shared)
            _, ref_prob, _ = scores(ref_folds, shared)
            sel = labels[idx] >= 0
            y, run_p, ref_p = labels[idx][sel], prob[sel], ref_prob[sel]
            auc, ref_auc = roc_auc(y, run_p), roc_auc(y, ref_p)
            row["versus_reference"] = {
                "reference": ref_name,
                "folds": [int(k) for k in shared],
                "n_labelled": int(sel.sum()),
                "auc": auc,
                "reference_auc": ref_auc,
                "delta_auc": auc - ref_auc,
                "delta_auc_ci95": list(_paired_interval(roc_auc, y, run_p, ref_p, fold[sel], draws, seed)),
                "delta_brier": brier_score(y, run_p) - brier_score(y, ref_p),
                "delta_brier_ci95": list(_paired_interval(brier_score, y, run_p, ref_p, fold[sel], draws, seed)),
            }
        out.append(row)
    return out


def retrieval_comparison(ds: Dataset, result: dict[str, Any], k: int = 20) -> dict[str, Any]:
    """Compare the papers' two retrieval vectors on held-out predictions (leave-one-patient-out).

    The index holds the test fold's own nodules with the model's predicted attributes and
    probabilities; each labelled nodule queries it with its own patient excluded.
    """
    from nodule_edge.index import evaluate_retrieval, vector_for

    pred = result["_predictions"]
    idx = pred["index"]
    if pred["attributes"].shape[1] != len(ATTRIBUTE_NAMES):
        return {}
    labels = [int(v) if v >= 0 else None for v in ds.labels[idx]]
    ids = [ds.records[i].id for i in idx]
    groups = [ds.patients[i] for i in idx]
    out: dict[str, Any] = {"k": k, "note": "held-out fold, model outputs, leave-one-patient-out"}
    for kind in ("attributes", "machine_expert"):
        ratings = pred["attributes"] * 4 + 1
        vectors = np.stack([vector_for(kind, ratings[j], float(pred["probability"][j])) for j in range(len(idx))])
        ev = evaluate_retrieval(kind, vectors, labels, ids, k=k, groups=groups)
        out[kind] = {"auc": ev.auc, "accuracy": ev.accuracy, "n_evaluated": ev.n_evaluated}
    return out

"""Evaluation of a trained model on held-out nodules, with the baselines it must beat."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.metrics import binary_metrics, dice, roc_auc, within_one_accuracy
from nodule_edge.patch import DEFAULT_PATCH_SPEC
from nodule_edge.train.model import CollaborativeNet
from nodule_edge.train.trainer import Dataset, predict

__all__ = ["evaluate_model", "fit_diameter_baseline", "truncate_context", "context_statistics"]

LABEL_NOTE = "LIDC proxy labels: reader-mean malignancy > 3 malignant, < 3 benign, = 3 excluded"


def fit_diameter_baseline(diameters: np.ndarray, labels: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """Logistic regression of the label on log-diameter (Newton's method); returns (a, b)."""
    x = np.log(np.asarray(diameters, dtype=np.float64))
    y = np.asarray(labels, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-design @ w))
        grad = design.T @ (p - y)
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
        w -= np.linalg.solve(hess, grad)
    return float(w[0]), float(w[1])


def truncate_context(images: np.ndarray, extent_mm: float, spacing_mm: float = DEFAULT_PATCH_SPEC.spacing_mm) -> np.ndarray:
    """Blank every z slice farther than ``extent_mm / 2`` from the centre (outside value 0)."""
    size = images.shape[-3]
    z = (np.arange(size) - (size / 2 - 0.5)) * spacing_mm
    keep = (np.abs(z) <= extent_mm / 2).astype(images.dtype).reshape(-1, 1, 1)
    return images * keep


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


def evaluate_model(
    model: CollaborativeNet,
    ds: Dataset,
    test_idx: np.ndarray,
    train_idx: np.ndarray,
    device: torch.device,
    context_min_extent_mm: float = 24.0,
    context_truncated_mm: float = 10.0,
) -> dict[str, Any]:
    """All reported metrics for one held-out set, with the diameter-only and constant baselines.

    Predictions are made in fp32: bf16 rounds probabilities to steps of about 0.003, which
    creates ties that distort the AUC.

    Returns:
        A JSON-serialisable dict, plus ``_predictions`` (per-nodule arrays) for pooling.
    """
    pred = predict(model, ds, test_idx, device, bf16=False)
    labels = ds.labels[test_idx]
    sel = labels >= 0
    result: dict[str, Any] = {"n_nodules": int(len(test_idx)), "n_labelled": int(sel.sum()), "label_note": LABEL_NOTE}
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
            name: {"mae": float(mae[i]), "within_1": float(within_one_accuracy(pred_r, true_r)[i]), "baseline_constant_mae": float(const_mae[i])}
            for i, name in enumerate(ATTRIBUTE_NAMES)
        }
        result["attributes_mean_mae"] = float(mae.mean())
        result["attributes_baseline_constant_mean_mae"] = float(const_mae.mean())

    has_m = ds.cache.has_mask[test_idx]
    masks = ds.cache.masks[test_idx].astype(np.float32)
    if has_m.any():
        dices = [dice(pred["segmentation64"][i] > 0.5, masks[i] > 0.5) for i in np.flatnonzero(has_m)]
        result["dice_mean"] = float(np.mean(dices))
        mask16 = masks.reshape(len(masks), 16, 4, 16, 4, 16, 4).mean((2, 4, 6))
        inside, outside = _soft_inside_outside(pred["cam16"][has_m], mask16[has_m])
        result["cam_on_nodule_fraction_gt_mask"] = float((inside > outside).mean())
    result["cam_on_nodule_fraction_predicted_mask"] = float((pred["nodule_attention"] > pred["background_attention"]).mean())

    # Context sensitivity: full available context vs context truncated to 10 mm.
    long_ctx = test_idx[ds.cache.z_extent_mm[test_idx] >= context_min_extent_mm]
    if len(long_ctx):
        full = predict(model, ds, long_ctx, device, bf16=False)
        truncated_images = truncate_context(ds.cache.images[long_ctx].astype(np.float32), context_truncated_mm)
        short = predict(model, ds, np.arange(len(long_ctx)), device, bf16=False, images=truncated_images)
        dp = np.abs(full["malignancy_probability"] - short["malignancy_probability"])
        da = np.abs(full["attributes"] - short["attributes"]) * 4
        result["context_sensitivity"] = {
            "n": int(len(long_ctx)),
            "mean_abs_delta_probability": float(dp.mean()),
            # Signed (truncated − full): negative means shorter context makes nodules look more benign.
            "mean_delta_probability": float((short["malignancy_probability"] - full["malignancy_probability"]).mean()),
            "max_abs_delta_probability": float(dp.max()),
            "mean_abs_delta_attribute_rating": float(da.mean()),
        }
    # The same question with the nodule left whole: context beyond diameter + 2 mm removed, on
    # test nodules whose available context reaches at least diameter + 4 mm.
    diam = ds.diameters[test_idx]
    roomy = test_idx[np.isfinite(diam) & (ds.cache.z_extent_mm[test_idx] >= np.nan_to_num(diam, nan=np.inf) + 4.0)]
    if len(roomy):
        full = predict(model, ds, roomy, device, bf16=False)
        images = ds.cache.images[roomy].astype(np.float32)
        cut = np.stack([truncate_context(images[i : i + 1], float(ds.diameters[j]) + 2.0)[0] for i, j in enumerate(roomy)])
        short = predict(model, ds, np.arange(len(roomy)), device, bf16=False, images=cut)
        delta = short["malignancy_probability"] - full["malignancy_probability"]
        result["context_sensitivity_nodule_intact"] = {
            "n": int(len(roomy)),
            "median_full_context_mm": float(np.median(ds.cache.z_extent_mm[roomy])),
            "median_truncated_context_mm": float(np.median(ds.diameters[roomy] + 2.0)),
            "mean_abs_delta_probability": float(np.abs(delta).mean()),
            "mean_delta_probability": float(delta.mean()),
            "max_abs_delta_probability": float(np.abs(delta).max()),
        }
    result["_predictions"] = {
        "index": test_idx,
        "probability": pred["malignancy_probability"],
        "attributes": pred["attributes"],
        "embedding": pred["embedding"],
    }
    return result


def pooled_metrics(per_fold: list[dict[str, Any]], ds: Dataset) -> dict[str, Any]:
    """Pool per-nodule predictions over folds and recompute the headline metrics."""
    idx = np.concatenate([f["_predictions"]["index"] for f in per_fold])
    prob = np.concatenate([f["_predictions"]["probability"] for f in per_fold])
    labels = ds.labels[idx]
    sel = labels >= 0
    out: dict[str, Any] = {"malignancy": binary_metrics(labels[sel], prob[sel]), "label_note": LABEL_NOTE}
    if np.isfinite(ds.diameters[idx][sel]).all():
        out["diameter_auc"] = roc_auc(labels[sel], ds.diameters[idx][sel])
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

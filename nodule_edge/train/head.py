"""Refit the malignancy classifier on the trained network's features (a convex last step).

Probing the first nodule-bounded model (fold 0, docs/cv/README.md "What capped the model") showed the
jointly trained classifier using its features poorly: its logit reached AUC 0.853 on its *own*
training nodules and 0.857 on the test fold, while an L2-regularised logistic regression on the
same classifier inputs (pooled features + segmentation statistics) reached 0.915 on that test
fold. The network learns good features under five losses; its last linear layer does not converge
to a good classifier within the budget. So after training, the classifier is refitted as a
logistic regression on the runtime path's classifier inputs of the training nodules, with the L2
strength chosen by patient-grouped inner cross-validation, and written back into ``model.cls``
(standardisation folded into the weights). The graph and the runtime are unchanged, the attribute
and segmentation heads untouched; Grad-CAM reads ``cls.weight`` and so changes with the refit
(it moved off the nodule in the CV, which is why the shipped config does not refit).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from nodule_edge.metrics import roc_auc
from nodule_edge.train.data import patient_folds
from nodule_edge.train.model import CollaborativeNet

__all__ = ["L2_GRID", "fit_logistic", "refit_classifier"]

log = logging.getLogger(__name__)

#: L2 strengths tried (on standardised inputs, summed loss), smallest to largest.
L2_GRID: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 30) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (the intercept is not penalised).

    Returns:
        Weights and intercept for the inputs as given.
    """
    design = np.c_[np.ones(len(x)), x]
    w = np.zeros(design.shape[1])
    penalty = np.full(len(w), l2)
    penalty[0] = 1e-8
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
        grad = design.T @ (p - y) + penalty * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[1:], float(w[0])


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    return mean, np.where(sd > 1e-8, sd, 1.0)


def refit_classifier(
    model: CollaborativeNet,
    features: np.ndarray,
    labels: np.ndarray,
    patients: list[str],
    seed: int = 0,
    inner_folds: int = 5,
) -> dict[str, Any]:
    """Refit ``model.cls`` on classifier inputs ``features`` ``[N, D]`` of labelled nodules.

    The L2 strength is the one with the best pooled out-of-fold AUC over ``inner_folds``
    patient-grouped folds of these nodules; the final fit uses all of them. Every weight changes,
    so Grad-CAM (whose channel weights are the classifier's) changes with them: evaluate the CAM
    after a refit.

    Returns:
        What was chosen and measured (JSON-serialisable), for the fold summary.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    if x.ndim != 2 or len(x) != len(y) or x.shape[1] != model.cls.in_features:
        raise ValueError(f"classifier inputs of shape {x.shape} do not fit a classifier of {model.cls.in_features} inputs and {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise ValueError("refitting the classifier needs both classes among the labelled nodules")
    folds = np.asarray(patient_folds(patients, inner_folds, seed))
    scores: dict[str, float] = {}
    for l2 in L2_GRID:
        oof = np.zeros(len(y))
        for k in range(inner_folds):
            test = folds == k
            if test.all() or not test.any():
                continue
            mean, sd = _standardise(x[~test])
            w, b = fit_logistic((x[~test] - mean) / sd, y[~test], l2)
            oof[test] = ((x[test] - mean) / sd) @ w + b
        scores[f"{l2:g}"] = roc_auc(y, oof)
    best = max(L2_GRID, key=lambda v: (scores[f"{v:g}"], v))
    mean, sd = _standardise(x)
    w, b = fit_logistic((x - mean) / sd, y, best)
    before_auc = roc_auc(y, x @ model.cls.weight.detach().double().numpy()[0])
    weight = w / sd
    bias = float(b - (w * mean / sd).sum())
    with torch.no_grad():
        model.cls.weight.copy_(torch.from_numpy(weight).to(model.cls.weight.dtype).unsqueeze(0))
        model.cls.bias.fill_(bias)
    info: dict[str, Any] = {
        "n_labelled": int(len(y)),
        "l2": best,
        "inner_cv_auc_by_l2": scores,
        "training_auc_before": before_auc,
        "training_auc_after": roc_auc(y, x @ weight + bias),
    }
    log.info("classifier refitted: L2 %g (inner-CV AUC %.3f), training AUC %.3f -> %.3f", best, scores[f"{best:g}"], before_auc, info["training_auc_after"])
    return info

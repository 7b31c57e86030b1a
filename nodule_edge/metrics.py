"""Evaluation metrics in numpy (shared by training evaluation, the runtime and the index)."""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc", "binary_metrics", "brier_score", "dice", "within_one_accuracy"]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank (Mann–Whitney) formula, ties counted half.

    Returns NaN when only one class is present.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, AUC, F1, sensitivity, specificity, precision and benign-class precision."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(probabilities) >= threshold
    tp = float((pred & labels).sum())
    tn = float((~pred & ~labels).sum())
    fp = float((pred & ~labels).sum())
    fn = float((~pred & labels).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    precision = ratio(tp, tp + fp)
    sensitivity = ratio(tp, tp + fn)
    return {
        "n": float(len(labels)),
        "accuracy": ratio(tp + tn, len(labels)),
        "auc": roc_auc(labels, probabilities),
        "f1": ratio(2 * precision * sensitivity, precision + sensitivity)
        if precision == precision and sensitivity == sensitivity
        else float("nan"),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "precision_benign": ratio(tn, tn + fn),
    }


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared difference between probabilities and 0/1 labels: lower is better calibrated and sharper."""
    return float(np.mean((np.asarray(probabilities, np.float64) - np.asarray(labels, np.float64)) ** 2))


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    pred = np.asarray(pred).astype(bool)
    target = np.asarray(target).astype(bool)
    denom = pred.sum() + target.sum()
    return 1.0 if denom == 0 else float(2.0 * (pred & target).sum() / denom)


def within_one_accuracy(pred_ratings: np.ndarray, true_ratings: np.ndarray) -> np.ndarray:
    """Per-attribute fraction of predictions within ±1 of the reader mean (1–5 scale)."""
    return (np.abs(np.asarray(pred_ratings) - np.asarray(true_ratings)) <= 1.0).mean(axis=0)

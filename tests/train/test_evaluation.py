"""Pooled CV metrics from per-fold predictions (nodule_edge.train.evaluation.pooled_metrics)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nodule_edge.metrics import roc_auc
from nodule_edge.train.evaluation import pooled_metrics


def _folds(prob: np.ndarray) -> list[dict]:
    half = len(prob) // 2
    return [
        {"predictions": {"index": list(range(half)), "probability": list(prob[:half])}},
        {"predictions": {"index": list(range(half, len(prob))), "probability": list(prob[half:])}},
    ]


def test_pooled_metrics_split_by_calcification() -> None:
    rng = np.random.default_rng(0)
    n = 60
    labels = np.tile([0, 1, 0, -1], n // 4)
    calcified = (np.arange(n) % 3 == 0).astype(np.float32)
    diameters = rng.uniform(3, 30, n).astype(np.float32)
    prob = rng.random(n)
    ds = SimpleNamespace(labels=labels, diameters=diameters, calcified=calcified)
    groups = pooled_metrics(_folds(prob), ds)["by_calcification"]  # type: ignore[arg-type]  # duck-typed Dataset
    for name, flag in (("calcified", 1), ("non_calcified", 0)):
        rows = (labels >= 0) & (calcified == flag)
        assert groups[name]["n"] == rows.sum() and groups[name]["n_malignant"] == (labels[rows] == 1).sum()
        assert groups[name]["auc"] == pytest.approx(roc_auc(labels[rows], prob[rows]))
        assert groups[name]["diameter_auc"] == pytest.approx(roc_auc(labels[rows], diameters[rows]))


def test_no_calcification_split_where_a_labelled_nodule_lacks_the_rating() -> None:
    labels = np.array([0, 1, 0, 1])
    ds = SimpleNamespace(labels=labels, diameters=np.ones(4), calcified=np.array([0, 1, np.nan, 0]))
    assert "by_calcification" not in pooled_metrics(_folds(np.array([0.1, 0.9, 0.2, 0.8])), ds)  # type: ignore[arg-type]  # duck-typed Dataset
    without = SimpleNamespace(labels=labels, diameters=np.ones(4))
    assert "by_calcification" not in pooled_metrics(_folds(np.array([0.1, 0.9, 0.2, 0.8])), without)  # type: ignore[arg-type]  # duck-typed Dataset


def test_a_subgroup_of_one_class_has_no_auc() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    calcified = np.array([1, 1, 0, 0, 0, 0], np.float32)
    ds = SimpleNamespace(labels=labels, diameters=np.arange(6.0), calcified=calcified)
    groups = pooled_metrics(_folds(np.linspace(0, 1, 6)), ds)["by_calcification"]  # type: ignore[arg-type]  # duck-typed Dataset
    assert groups["calcified"] == {"n": 2, "n_malignant": 0}
    assert set(groups["non_calcified"]) == {"n", "n_malignant", "auc", "diameter_auc"}

"""Evaluation metrics against brute force and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodule_edge.metrics import binary_metrics, brier_score, dice, roc_auc, within_one_accuracy


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score_pos > score_neg) + ½·P(tie), over all positive-negative pairs."""
    pos = scores[labels.astype(bool)]
    neg = scores[~labels.astype(bool)]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(8))
def test_roc_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Few distinct values: many ties within and across classes.
    scores = rng.integers(0, 5, n) / 4.0
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def test_roc_auc_continuous_scores() -> None:
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def test_roc_auc_known_values() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([1, 0, 0], [0.5, 0.5, 0.1]) == 0.75


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0], []])
def test_roc_auc_is_nan_with_one_class(labels: list[int]) -> None:
    assert math.isnan(roc_auc(np.array(labels), np.linspace(0, 1, len(labels))))


def test_binary_metrics_on_a_hand_computed_confusion_matrix() -> None:
    # threshold 0.5 → TP = 3, FN = 1, TN = 4, FP = 2
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.7, 0.5, 0.2, 0.1, 0.3, 0.4, 0.45, 0.6, 0.8])
    m = binary_metrics(labels, probs)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["precision_benign"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert m["auc"] == pytest.approx(_pairwise_auc(labels, probs))


def test_binary_metrics_threshold_and_degenerate_cases() -> None:
    labels = np.array([1, 0, 1, 0])
    probs = np.array([0.6, 0.4, 0.3, 0.2])
    assert binary_metrics(labels, probs, threshold=0.25)["sensitivity"] == 1.0
    # No positive predictions: precision and F1 undefined, not a division error.
    m = binary_metrics(labels, np.zeros(4))
    assert math.isnan(m["precision"]) and math.isnan(m["f1"])
    assert m["specificity"] == 1.0 and m["sensitivity"] == 0.0
    # One class only: AUC and specificity undefined.
    m = binary_metrics(np.ones(3), np.array([0.2, 0.7, 0.9]))
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)


def test_dice_edge_cases() -> None:
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, full) == 1.0
    half = np.zeros((4, 4), bool)
    half[:2] = True
    assert dice(half, full) == pytest.approx(2 * 8 / (8 + 16))
    # Non-boolean inputs are binarised (non-zero is foreground).
    assert dice(half.astype(np.float32), half.astype(np.uint8) * 7) == 1.0


def test_within_one_accuracy_per_attribute() -> None:
    pred = np.array([[1.0, 3.0], [2.0, 5.0], [4.0, 1.0]])
    true = np.array([[2.0, 1.0], [2.0, 4.0], [1.0, 2.0]])
    np.testing.assert_allclose(within_one_accuracy(pred, true), [2 / 3, 2 / 3])


def test_roc_auc_matches_pairwise_counting_with_ties() -> None:
    """The one AUC of the package (labels first, like scikit-learn), ties counted half."""
    rng = np.random.default_rng(11)
    scores = rng.integers(0, 5, size=300) / 4.0  # many ties
    labels = rng.integers(0, 2, size=300)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(labels, scores) == pytest.approx(pairwise)
    assert roc_auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0
    assert roc_auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0


def test_brier_score_is_zero_for_certain_right_answers_and_a_quarter_for_a_coin() -> None:
    labels = np.array([0, 1, 1, 0])
    assert brier_score(labels, labels.astype(float)) == 0.0
    assert brier_score(labels, np.full(4, 0.5)) == 0.25
    assert brier_score(labels, 1.0 - labels) == 1.0

"""Explanation metrics on constructed cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from nodule_edge.runtime.explain_metrics import (
    deletion_curve,
    insertion_curve,
    pointing_game,
    randomisation_similarity,
    rank_correlation,
    relevance_mass_accuracy,
)

S = 16
#: The evidence: an 8³ corner of a 16³ grid (1/8 of the voxels), away from the centre so that
#: a raster order and a random order give different deletion curves.
REGION = (slice(0, 8), slice(0, 8), slice(0, 8))


def _mask() -> np.ndarray:
    mask = np.zeros((S, S, S), bool)
    mask[REGION] = True
    return mask


def _patch() -> np.ndarray:
    patch = np.zeros((2, S, S, S), np.float32)
    patch[(slice(None), *REGION)] = 1.0
    return patch


def _score(patches: np.ndarray) -> np.ndarray:
    """Malignancy probability = the share of the evidence region still present (channel 0)."""
    return patches[(slice(None), 0, *REGION)].mean(axis=(1, 2, 3))


# -- pointing game and relevance mass -----------------------------------------------------
def test_map_equal_to_the_mask_scores_pointing_game_1_and_all_mass_inside():
    mask = _mask()
    assert pointing_game(mask.astype(np.float32), mask) == 1.0
    assert relevance_mass_accuracy(mask.astype(np.float32), mask) == 1.0


def test_peak_outside_the_mask_misses_and_mass_splits_by_share():
    mask = _mask()
    saliency = mask * 0.5
    saliency[15, 15, 15] = 1.0
    assert pointing_game(saliency, mask) == 0.0
    assert relevance_mass_accuracy(saliency, mask) == pytest.approx(256 / 257)
    # Uniform map: the mass inside is the mask's share of the grid.
    assert relevance_mass_accuracy(np.ones((S, S, S)), mask) == pytest.approx(1 / 8)


def test_pointing_game_counts_a_tie_for_the_maximum_as_a_hit():
    mask = _mask()
    saliency = np.zeros((S, S, S))
    saliency[0, 0, 0] = saliency[15, 15, 15] = 1.0  # one maximum inside, one outside
    assert pointing_game(saliency, mask) == 1.0


def test_probability_masks_use_the_threshold_and_empty_masks_give_nan():
    soft = _mask() * 0.6
    saliency = _mask().astype(float)
    assert pointing_game(saliency, soft) == 1.0
    assert np.isnan(pointing_game(saliency, soft, threshold=0.7))
    assert np.isnan(relevance_mass_accuracy(saliency, np.zeros((S, S, S), bool)))
    assert np.isnan(relevance_mass_accuracy(np.zeros((S, S, S)), _mask()))


def test_relevance_mass_absolute_option():
    mask = _mask()
    saliency = np.where(mask, 1.0, -1.0)
    assert relevance_mass_accuracy(saliency, mask, absolute=True) == pytest.approx(1 / 8)
    # Signed: 512 − 3584 = −3072 in total, 512 inside.
    assert relevance_mass_accuracy(saliency, mask) == pytest.approx(512 / -3072)


def test_localisation_rejects_mismatched_grids():
    with pytest.raises(ValueError, match=r"share a grid, got \[16, 16, 16\] and \[8, 8, 8\]"):
        pointing_game(np.zeros((S, S, S)), np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="threshold must lie in"):
        relevance_mass_accuracy(np.zeros((S, S, S)), _mask(), threshold=0.0)


# -- rank correlation and randomisation ---------------------------------------------------
def test_spearman_of_a_map_with_itself_is_1_and_with_its_reverse_is_minus_1():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(S, S, S))
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    # Monotone transforms keep the ranks.
    assert rank_correlation(a, np.exp(a)) == pytest.approx(1.0)


def test_spearman_matches_the_pearson_correlation_of_average_ranks_with_ties():
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0]).reshape(2, 2, 2)
    b = np.array([2.0, 1.0, 4.0, 3.0, 8.0, 7.0, 7.0, 1.0]).reshape(2, 2, 2)
    # Average ranks worked out by hand (scipy.stats.rankdata's default).
    ra = np.array([2, 3.5, 3.5, 5, 7, 7, 7, 1])
    rb = np.array([3, 1.5, 5, 4, 8, 6.5, 6.5, 1.5])
    expected = np.corrcoef(ra, rb)[0, 1]
    assert rank_correlation(a, b) == pytest.approx(expected)


def test_spearman_within_a_mask_and_constant_maps():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(S, S, S))
    b = rng.normal(size=(S, S, S))
    mask = _mask()
    b[mask] = 2 * a[mask] + 1  # agree inside the mask only
    assert rank_correlation(a, b, within=mask) == pytest.approx(1.0)
    assert abs(rank_correlation(a, b)) < 0.3
    assert np.isnan(rank_correlation(a, np.ones_like(a)))
    with pytest.raises(ValueError, match="boolean mask"):
        rank_correlation(a, b, within=mask.astype(int))
    with pytest.raises(ValueError, match="one shape"):
        rank_correlation(a, b[:8])


def test_randomisation_similarity():
    rng = np.random.default_rng(2)
    before = rng.normal(size=(S, S, S))
    assert randomisation_similarity(before, before.copy()) == pytest.approx(1.0)
    # A map whose sign flipped is the same map for Quantus' abs=True default.
    assert randomisation_similarity(before, -before) == pytest.approx(1.0)
    assert randomisation_similarity(before, -before, absolute=False) == pytest.approx(-1.0)
    # An unrelated map (what randomisation should produce) is near 0.
    assert abs(randomisation_similarity(before, rng.normal(size=(S, S, S)))) < 0.05


# -- deletion and insertion ---------------------------------------------------------------
def test_deletion_ranks_a_faithful_map_far_below_chance():
    curve = deletion_curve(_score, _patch(), _mask().astype(float), steps=32, baseline=0.0)
    # The region is the first 1/8 of the order: the score reaches 0 after 4 of 32 steps.
    assert curve.scores[0] == 1.0 and curve.scores[4] == 0.0 and curve.scores[-1] == 0.0
    assert curve.auc == pytest.approx(1 / 16)
    assert curve.fractions[0] == 0.0 and curve.fractions[-1] == 1.0 and len(curve.fractions) == 33
    assert curve.target == 1 and curve.voxels == S**3 and curve.baseline == (0.0, 0.0)
    # The reverse map deletes the region last.
    worst = deletion_curve(_score, _patch(), (~_mask()).astype(float), steps=32, baseline=0.0)
    assert worst.auc == pytest.approx(1 - 1 / 16)


def test_constant_map_scores_the_random_order_chance_level():
    """'Chance' for a constant map: ties are ranked in a random order, so it scores as a random map.

    For this score (the share of the evidence left) a random order leaves 1 − t of the region after
    deleting a fraction t, an expected area of 1/2. A raster order would have deleted the corner
    region during the first half and scored about 1/4.
    """
    constant = deletion_curve(_score, _patch(), np.zeros((S, S, S)), steps=32, baseline=0.0)
    rng = np.random.default_rng(3)
    random_maps = [
        deletion_curve(_score, _patch(), rng.random((S, S, S)), steps=32, baseline=0.0).auc for _ in range(5)
    ]
    assert constant.auc == pytest.approx(np.mean(random_maps), abs=0.02)
    assert constant.auc == pytest.approx(0.5, abs=0.02)
    # A different seed draws a different order with the same expectation.
    other = deletion_curve(_score, _patch(), np.zeros((S, S, S)), steps=32, baseline=0.0, seed=7)
    assert not np.array_equal(other.scores, constant.scores) and other.auc == pytest.approx(0.5, abs=0.02)
    inserted = insertion_curve(_score, _patch(), np.zeros((S, S, S)), steps=32, baseline=0.0)
    assert inserted.auc == pytest.approx(0.5, abs=0.02)


def test_insertion_of_a_faithful_map_rises_at_once():
    curve = insertion_curve(_score, _patch(), _mask().astype(float), steps=32, baseline=0.0)
    assert curve.scores[0] == 0.0 and curve.scores[4] == 1.0 and curve.scores[-1] == 1.0
    assert curve.auc == pytest.approx(1 - 1 / 16)


def test_default_baseline_is_the_input_minimum_and_calls_are_batched():
    calls = []

    def score(patches):
        calls.append(len(patches))
        return _score(patches)

    patch = _patch() * 0.8 + 0.1  # minimum 0.1
    curve = deletion_curve(score, patch, _mask().astype(float), steps=20, batch=8)
    assert curve.baseline == pytest.approx((0.1, 0.1))
    assert calls == [8, 8, 5]  # 21 points in batches of 8
    assert curve.scores[-1] == pytest.approx(0.1)


def test_target_benign_scores_one_minus_p_and_defaults_to_the_prediction():
    def benign(patches):  # evidence for benign: p falls as the region is present
        return 1.0 - 0.9 * _score(patches)

    curve = deletion_curve(benign, _patch(), _mask().astype(float), steps=32, baseline=0.0)
    assert curve.target == 0
    np.testing.assert_allclose(curve.scores[[0, -1]], [0.9, 0.0], atol=1e-6)
    forced = deletion_curve(benign, _patch(), _mask().astype(float), steps=32, baseline=0.0, target=1)
    np.testing.assert_allclose(forced.scores[[0, -1]], [0.1, 1.0], atol=1e-6)


def test_within_restricts_ranking_and_perturbation():
    within = np.zeros((S, S, S), bool)
    within[:, :8, :] = True  # 2048 voxels, the region is a quarter of them
    curve = deletion_curve(_score, _patch(), np.zeros((S, S, S)), steps=16, baseline=0.0, within=within)
    assert curve.voxels == 2048
    assert curve.auc == pytest.approx(0.5, abs=0.03)
    faithful = deletion_curve(_score, _patch(), _mask().astype(float), steps=16, baseline=0.0, within=within)
    assert faithful.auc == pytest.approx(1 / 8)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"steps": 0}, "steps must be an integer in [1, 4096] (the ranked voxels), got 0"),
        ({"steps": 5000}, "got 5000"),
        ({"batch": 0}, "batch must be an integer >= 1, got 0"),
        ({"baseline": float("nan")}, "baseline must be one finite number or 2 (one per channel), got nan"),
        ({"target": 2}, "target must be 0 (benign), 1 (malignant) or None (the predicted class), got 2"),
        ({"within": np.zeros((S, S, S), bool)}, "within mask selects no voxels"),
    ],
)
def test_curve_options_are_checked(options, named):
    with pytest.raises(ValueError) as info:
        deletion_curve(_score, _patch(), _mask().astype(float), **options)
    assert named in str(info.value)


def test_curve_rejects_a_map_off_the_patch_grid():
    with pytest.raises(ValueError, match=r"got \[2, 16, 16, 16\] and \[8, 8, 8\]"):
        insertion_curve(_score, _patch(), np.zeros((8, 8, 8)))

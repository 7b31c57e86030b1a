"""Faithfulness, localisation and sanity metrics of saliency maps on the model's patch grid.

numpy only. The definitions follow Quantus (Hedström et al., JMLR 24(34), 2023,
github.com/understandable-machine-intelligence-lab/Quantus); each function names the Quantus
metric and parameters it reproduces and where it departs from them. Maps are ``[S, S, S]`` on the
patch grid (the runtime's ``saliency``, or :attr:`OcclusionResult.map
<nodule_edge.runtime.occlusion.OcclusionResult.map>`); masks are the nodule on the same grid.

The deletion and insertion curves need the model: pass ``score(patches [N, C, S, S, S]) ->
malignancy probabilities [N]``. For the runtime's nodule-bounded model, give them the bounded cube
(``OcclusionResult.bounded_patch``) and a score that runs one pass on it, e.g.
``lambda x: engine.run(x)["malignancy_probability"]``: the box then stays fixed while voxels are
removed, as in :func:`nodule_edge.runtime.occlusion.occlusion_map`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "PerturbationCurve",
    "deletion_curve",
    "insertion_curve",
    "pointing_game",
    "randomisation_similarity",
    "rank_correlation",
    "relevance_mass_accuracy",
]

log = logging.getLogger(__name__)

Score = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PerturbationCurve:
    """A deletion or insertion curve and its area.

    Attributes:
        kind: ``"deletion"`` (most salient voxels replaced by the baseline first, starting from
            the input) or ``"insertion"`` (most salient voxels restored first, starting from the
            all-baseline input).
        fractions: ``[steps + 1]`` fraction of the ranked voxels deleted (inserted), 0 to 1.
        scores: ``[steps + 1]`` probability of the target class at each fraction.
        auc: Trapezoidal area under ``scores`` over ``fractions`` ∈ [0, 1], so in [0, 1]; lower
            is better for deletion, higher for insertion.
        target: The class scored: 1 malignant, 0 benign.
        baseline: Value of a deleted (not yet inserted) voxel, one per channel.
        steps: Perturbation steps after the starting point.
        voxels: Number of ranked voxels (the cube, or the ``within`` mask).
    """

    kind: Literal["deletion", "insertion"]
    fractions: np.ndarray
    scores: np.ndarray
    auc: float
    target: int
    baseline: tuple[float, ...]
    steps: int
    voxels: int


def deletion_curve(
    score: Score,
    patch: np.ndarray,
    saliency: np.ndarray,
    *,
    steps: int = 32,
    baseline: float | Sequence[float] | None = None,
    target: int | None = None,
    within: np.ndarray | None = None,
    batch: int = 8,
    seed: int = 0,
) -> PerturbationCurve:
    """Deletion curve: replace the most salient voxels by the baseline first and track the score.

    Matches Quantus' ``PixelFlipping`` (Bach et al. 2015) with ``features_in_step`` =
    ``voxels / steps`` (rounded per step), ``perturb_baseline="black"`` (the minimum of the input,
    the default here) or a given value, ``abs=False``, ``return_auc_per_sample=True``, and
    ``softmax=True`` for the binary model (the score is the target class's probability). A voxel
    is perturbed in every channel at once, as Quantus perturbs the attribution's axes across
    channels. Departures: the unperturbed input is the first point of the curve, and the area is
    taken over the fraction of voxels (0 to 1) instead of Quantus' ``np.trapz(preds, dx=1)``, so
    it lies in [0, 1] and is comparable between step counts (as the deletion metric of Petsiuk
    et al. 2018, "RISE", arXiv:1806.07421).

    Ties in the map are ranked in a random order drawn from ``seed`` (Quantus leaves them to
    ``np.argsort``, i.e. raster order). So a constant map deletes voxels in a uniformly random
    order, and its area is the chance level this metric is judged against: for a score that
    falls in proportion to the deleted share of the evidence, about half the unperturbed score.

    Args:
        score: ``patches [N, C, S, S, S] -> malignancy probability [N]``.
        patch: The model input ``[C, S, S, S]``.
        saliency: Map ``[S, S, S]``; higher means more important for the target class (use
            ``OcclusionResult.towards_prediction`` or the runtime's signed Grad-CAM).
        steps: Perturbation steps, 1 to the number of ranked voxels.
        baseline: Deleted voxels' value, one number or one per channel; default the input's
            minimum (Quantus' "black"); for the nodule-bounded input that is the windowed air.
        target: Class to score (1 malignant, 0 benign); default the class the unperturbed input
            predicts (p ≥ 0.5 → 1).
        within: Optional boolean ``[S, S, S]`` mask: only these voxels are ranked and deleted.
        batch: Perturbed cubes per ``score`` call.
        seed: Seed of the random order among tied map values.

    Returns:
        The curve and its normalised area.

    Raises:
        ValueError: Shapes disagree, an option is out of range, or the map is not finite.
    """
    return _curve("deletion", score, patch, saliency, steps, baseline, target, within, batch, seed)


def insertion_curve(
    score: Score,
    patch: np.ndarray,
    saliency: np.ndarray,
    *,
    steps: int = 32,
    baseline: float | Sequence[float] | None = None,
    target: int | None = None,
    within: np.ndarray | None = None,
    batch: int = 8,
    seed: int = 0,
) -> PerturbationCurve:
    """Insertion curve: from the all-baseline input, restore the most salient voxels first.

    Quantus has no insertion metric; this is the insertion metric of Petsiuk et al. 2018 ("RISE",
    arXiv:1806.07421) with the same ranking, baseline, steps, tie rule and normalised area as
    :func:`deletion_curve` (whose docstring gives the Quantus correspondence). The first point is
    the all-baseline input (every ranked voxel replaced), the last the unperturbed input. The
    target class defaults to the unperturbed input's prediction. A constant map inserts in a
    uniformly random order: that area is the chance level.

    Args and Raises: as :func:`deletion_curve`.
    """
    return _curve("insertion", score, patch, saliency, steps, baseline, target, within, batch, seed)


def pointing_game(saliency: np.ndarray, mask: np.ndarray, *, threshold: float = 0.5) -> float:
    """Whether the most salient voxel lies inside the nodule mask: 1.0 (hit), 0.0 (miss).

    Matches Quantus' ``PointingGame`` (Zhang et al. 2018) with ``weighted=False``: when several
    voxels share the maximum, it is a hit if any of them is inside. Quantus normalises the map
    first (division by a positive maximum), which does not move the maximum. By that rule a
    constant map (e.g. the all-zero occlusion map of a saturated prediction) always hits; check
    that the map varies before counting its hit.

    Args:
        saliency: Map ``[S, S, S]``.
        mask: Nodule mask or probability map on the same grid; voxels ``>= threshold`` are inside
            (a boolean mask works as is).
        threshold: Mask threshold (the runtime's segmentation uses 0.5).

    Returns:
        1.0 or 0.0; NaN when the mask is empty (as Quantus returns, with a warning), so a mean
        over nodules can skip it with ``np.nanmean``.
    """
    values, inside = _map_and_mask(saliency, mask, threshold)
    if not inside.any():
        log.warning("pointing game: the nodule mask is empty; returning NaN")
        return float("nan")
    return float(inside[values == values.max()].any())


def relevance_mass_accuracy(
    saliency: np.ndarray, mask: np.ndarray, *, threshold: float = 0.5, absolute: bool = False
) -> float:
    """Share of the map's total mass that lies inside the nodule mask.

    Matches Quantus' ``RelevanceMassAccuracy`` (Arras et al. 2022): ``sum(map[mask]) / sum(map)``
    with its default ``abs=False`` (``absolute=True`` takes |map| first, Quantus' ``abs=True``).
    Quantus' normalisation by the maximum cancels in the ratio. For a signed map (occlusion) the
    ratio is only meaningful with ``absolute=True`` or on a non-negative map.

    Args:
        saliency: Map ``[S, S, S]``.
        mask: Nodule mask or probability map; voxels ``>= threshold`` are inside.
        threshold: Mask threshold.
        absolute: Use the map's absolute values.

    Returns:
        The share (1.0 when all mass is inside); NaN when the mask is empty or the map sums to 0.
    """
    values, inside = _map_and_mask(saliency, mask, threshold)
    if absolute:
        values = np.abs(values)
    total = float(values.sum())
    if not inside.any() or total == 0.0:
        log.warning(
            "relevance mass accuracy: %s; returning NaN",
            "the nodule mask is empty" if not inside.any() else "the map sums to 0",
        )
        return float("nan")
    return float(values[inside].sum()) / total


def rank_correlation(a: np.ndarray, b: np.ndarray, *, within: np.ndarray | None = None) -> float:
    """Spearman rank correlation of two maps over the cube's voxels (or those in ``within``).

    The same quantity as Quantus' ``correlation_spearman`` (``scipy.stats.spearmanr``): the
    Pearson correlation of the ranks, tied values sharing their mean rank. Use it for the
    agreement of the Grad-CAM and occlusion maps of one nodule.

    Args:
        a: Map ``[S, S, S]``.
        b: Map of the same shape.
        within: Optional boolean mask of the voxels to compare (e.g. the nodule box, where both
            maps carry information).

    Returns:
        The correlation in [−1, 1]; NaN when either map is constant over the compared voxels.

    Raises:
        ValueError: Shapes disagree or values are not finite.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rank correlation needs maps of one shape, got {list(a.shape)} and {list(b.shape)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("rank correlation needs finite maps (NaN or infinite values found)")
    if within is not None:
        keep = _boolean_mask(within, a.shape, "within")
        a, b = a[keep], b[keep]
    ra, rb = _average_ranks(a.reshape(-1)), _average_ranks(b.reshape(-1))
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / denominator, -1.0, 1.0))


def randomisation_similarity(
    before: np.ndarray, after: np.ndarray, *, absolute: bool = True, within: np.ndarray | None = None
) -> float:
    """Similarity of a map before and after randomising model parameters (a sanity check).

    Matches one layer of Quantus' ``ModelParameterRandomisation`` (Adebayo et al. 2018, "Sanity
    checks for saliency maps") with its defaults ``similarity_func=correlation_spearman``,
    ``abs=True``, ``normalise=True`` (division by the maximum, which leaves the ranks unchanged).
    Call it once per randomised layer (cascading or independent, as the caller randomised the
    model). A map that passes the check changes: the similarity falls towards 0; a value near 1
    means the map does not depend on what the model learned.

    Args:
        before: Map of the trained model ``[S, S, S]``.
        after: Map of the randomised model, same input and shape.
        absolute: Compare absolute values (Quantus' default); False keeps the sign.
        within: Optional boolean mask of the voxels to compare.

    Returns:
        Spearman correlation in [−1, 1]; NaN when a map is constant.
    """
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    if absolute:
        before, after = np.abs(before), np.abs(after)
    return rank_correlation(before, after, within=within)


# -- internals ----------------------------------------------------------------------------
def _curve(
    kind: Literal["deletion", "insertion"],
    score: Score,
    patch: np.ndarray,
    saliency: np.ndarray,
    steps: int,
    baseline: float | Sequence[float] | None,
    target: int | None,
    within: np.ndarray | None,
    batch: int,
    seed: int,
) -> PerturbationCurve:
    patch = np.asarray(patch, dtype=np.float32)
    values = np.asarray(saliency, dtype=np.float64)
    if patch.ndim != 4 or values.shape != patch.shape[1:]:
        raise ValueError(
            f"{kind} needs a patch [C, S, S, S] and a map [S, S, S] on its grid, got {list(patch.shape)} and {list(values.shape)}"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"{kind} needs a finite map (NaN or infinite values found)")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"{kind} batch must be an integer >= 1, got {batch!r}")
    if target not in (None, 0, 1) or isinstance(target, bool):
        raise ValueError(
            f"{kind} target must be 0 (benign), 1 (malignant) or None (the predicted class), got {target!r}"
        )
    fill = _baseline(baseline, patch, kind)
    keep = np.ones(values.shape, bool) if within is None else _boolean_mask(within, values.shape, "within")
    candidates = np.flatnonzero(keep.reshape(-1))
    n = len(candidates)
    if n == 0:
        raise ValueError(f"{kind}: the within mask selects no voxels")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
        raise ValueError(f"{kind} steps must be an integer in [1, {n}] (the ranked voxels), got {steps!r}")

    # Most salient first; ties in a seeded random order (np.lexsort's primary key is the last).
    tie_break = np.random.default_rng(seed).permutation(n)
    order = candidates[np.lexsort((tie_break, -values.reshape(-1)[candidates]))]
    counts = np.rint(np.linspace(0, n, steps + 1)).astype(np.int64)

    channels = patch.shape[0]
    flat = patch.reshape(channels, -1)
    start = flat.copy()
    if kind == "insertion":
        start[:, candidates] = fill[:, None]
    chunks = []
    for first in range(0, steps + 1, batch):  # built per call: 33 cubes of 2×64³ would be 69 MB
        ks = counts[first : first + batch]
        cubes = np.repeat(start[None], len(ks), axis=0)
        for i, k in enumerate(ks):
            cubes[i][:, order[:k]] = fill[:, None] if kind == "deletion" else flat[:, order[:k]]
        chunks.append(np.asarray(score(cubes.reshape(len(ks), *patch.shape)), dtype=np.float64).reshape(-1))
    probabilities = np.concatenate(chunks)
    if probabilities.shape != (steps + 1,):
        raise ValueError(
            f"score must return one probability per patch: {steps + 1} patches gave shape {list(probabilities.shape)}"
        )
    unperturbed = probabilities[0] if kind == "deletion" else probabilities[-1]
    chosen = int(unperturbed >= 0.5) if target is None else int(target)
    scores = probabilities if chosen == 1 else 1.0 - probabilities
    fractions = counts / n
    auc = float(np.sum((scores[1:] + scores[:-1]) * np.diff(fractions)) / 2.0)
    return PerturbationCurve(kind, fractions, scores, auc, chosen, tuple(float(v) for v in fill), int(steps), int(n))


def _baseline(baseline: float | Sequence[float] | None, patch: np.ndarray, kind: str) -> np.ndarray:
    channels = patch.shape[0]
    if baseline is None:
        return np.full(channels, patch.min(), np.float32)  # Quantus' perturb_baseline="black"
    try:
        values = np.asarray(baseline, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{kind} baseline must be a number or one per channel, got {baseline!r}") from exc
    if values.size == 1:
        values = np.repeat(values, channels)
    if values.size != channels or not np.isfinite(values).all():
        raise ValueError(f"{kind} baseline must be one finite number or {channels} (one per channel), got {baseline!r}")
    return values.astype(np.float32)


def _map_and_mask(saliency: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(saliency, dtype=np.float64)
    mask = np.asarray(mask)
    if values.shape != mask.shape:
        raise ValueError(f"map and mask must share a grid, got {list(values.shape)} and {list(mask.shape)}")
    if not np.isfinite(values).all():
        raise ValueError("the map holds NaN or infinite values")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"mask threshold must lie in (0, 1], got {threshold}")
    return values, mask.astype(np.float64) >= threshold


def _boolean_mask(mask: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape or mask.dtype != bool:
        raise ValueError(f"{name} must be a boolean mask of shape {list(shape)}, got {mask.dtype} {list(mask.shape)}")
    return mask


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (``scipy.stats.rankdata``'s default)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of the last member of each group of equal values
    mean_rank = upper - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)].astype(np.float64)

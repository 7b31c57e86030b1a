"""Leave-one-out evaluation of retrieval-based diagnosis, to compare vector kinds on real data.

Each labelled entry queries the index built from all entries with itself excluded (and, when
``groups`` is given, every entry of its own group, e.g. the same patient, since LIDC patients can
have several nodules). Its score is the mean label of its K neighbours; AUC and accuracy at a
threshold summarise the scores against the entries' own labels.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nodule_edge.errors import DataError
from nodule_edge.index.store import DEFAULT_K, AttributeIndex, IndexEntry
from nodule_edge.metrics import roc_auc

__all__ = ["RetrievalEvaluation", "evaluate_retrieval"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class RetrievalEvaluation:
    """Result of :func:`evaluate_retrieval`.

    Attributes:
        kind: The index vector kind evaluated.
        k: Neighbours per query.
        n_entries: Entries in the index.
        n_evaluated: Labelled entries that received a score (neighbours with known labels).
        n_positive: Malignant entries among the evaluated.
        n_negative: Benign entries among the evaluated.
        auc: ROC AUC of the scores, or ``None`` when only one class was evaluated.
        accuracy: Fraction of evaluated entries with ``(score >= threshold) == label``, or
            ``None`` when nothing was evaluated.
        threshold: The accuracy threshold.
        scores: float64 ``[n_entries]``, each entry's retrieval score (NaN where not evaluated).
    """

    kind: str
    k: int
    n_entries: int
    n_evaluated: int
    n_positive: int
    n_negative: int
    auc: float | None
    accuracy: float | None
    threshold: float
    scores: np.ndarray


def evaluate_retrieval(
    index_kind: str,
    vectors: np.ndarray,
    labels: Sequence[int | None],
    ids: Sequence[str],
    k: int = DEFAULT_K,
    *,
    groups: Sequence[str] | None = None,
    threshold: float = 0.5,
    seed: int = 100,
) -> RetrievalEvaluation:
    """Leave-one-out retrieval diagnosis over a labelled set.

    Args:
        index_kind: ``"attributes"`` or ``"machine_expert"``.
        vectors: ``[N, dim]`` index vectors (built with
            :func:`~nodule_edge.index.vectors.vector_for`).
        labels: 0/1, or ``None`` for entries that only serve as neighbours (they are not
            evaluated and do not enter any score).
        ids: Unique entry ids.
        k: Neighbours per query.
        groups: Optional group of each entry (e.g. patient); a query then also excludes its own
            group, so no patient retrieves their own other nodules.
        threshold: Score at or above which an entry is called malignant, for the accuracy.
        seed: HNSW seed.

    Returns:
        The :class:`RetrievalEvaluation`.

    Raises:
        DataError: Lengths disagree.
        IndexError_: Bad vectors, ids or labels (from the index).
    """
    n = len(ids)
    if len(labels) != n or (groups is not None and len(groups) != n):
        raise DataError(
            f"evaluate_retrieval needs one label and group per id: got {n} ids, {len(labels)} "
            f"labels, {None if groups is None else len(groups)} groups"
        )
    entries = [IndexEntry(id=i, label=label) for i, label in zip(ids, labels, strict=True)]
    index = AttributeIndex.create(index_kind, capacity=max(n, 1), seed=seed)
    index.add(entries, vectors)

    members: dict[str, set[str]] = defaultdict(set)
    if groups is not None:
        for entry_id, group in zip(ids, groups, strict=True):
            members[group].add(entry_id)
    query_vectors = index.vectors
    scores = np.full(n, np.nan, dtype=np.float64)
    for row, entry in enumerate(entries):
        if entry.label is None:
            continue
        exclude = members[groups[row]] if groups is not None else {entry.id}
        (neighbours,) = index.query(query_vectors[row], k=k, exclude_ids=exclude)
        score = AttributeIndex.retrieval_score(neighbours)
        if score is not None:
            scores[row] = score

    evaluated = ~np.isnan(scores)
    y = np.array([-1 if e.label is None else e.label for e in entries], dtype=np.int64)[evaluated]
    s = scores[evaluated]
    n_pos = int((y == 1).sum())
    n_neg = int((y == 0).sum())
    auc = roc_auc(y, s) if n_pos and n_neg else None
    accuracy = float(np.mean((s >= threshold) == (y == 1))) if s.size else None
    logger.info(
        "leave-one-out %s retrieval, k=%d: %d evaluated, AUC %s, accuracy %s",
        index_kind,
        k,
        s.size,
        auc,
        accuracy,
    )
    return RetrievalEvaluation(
        kind=index_kind,
        k=int(k),
        n_entries=n,
        n_evaluated=int(s.size),
        n_positive=n_pos,
        n_negative=n_neg,
        auc=auc,
        accuracy=accuracy,
        threshold=float(threshold),
        scores=scores,
    )

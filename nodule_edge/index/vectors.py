"""What a nodule looks like to the index: the two vector kinds and an exact reference search.

Zhang et al. retrieve similar historical nodules by Euclidean distance over one of two vectors:

``"attributes"`` (6-d, MICCAI paper)
    The six attribute scores on the LIDC 1–5 rating scale, in :data:`ATTRIBUTE_NAMES` order, used
    as they are (no rescaling: every axis already spans the same 1–5 range, so each rating point
    weighs the same in the distance).

``"machine_expert"`` (2-d, MedIA Table 2)
    ``[malignancy_probability, (malignancy_rating - 1) / 4]``: the classifier's probability in
    [0, 1] and the malignancy rating mapped from 1–5 to [0, 1] with
    :func:`~nodule_edge.attributes.ratings_to_unit`, so that both axes span [0, 1] and neither
    dominates the distance merely because of its units.

Build both stored and query vectors with :func:`vector_for` so they agree (``AttributeIndex.add``
without vectors builds them from the entries with it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from nodule_edge.attributes import ATTRIBUTE_NAMES, ratings_to_unit
from nodule_edge.errors import IndexError_

__all__ = [
    "VECTOR_KINDS",
    "VectorKind",
    "attribute_array",
    "exact_search",
    "vector_dim",
    "vector_for",
]

logger = logging.getLogger(__name__)

VectorKind = Literal["attributes", "machine_expert"]
#: Vector kind -> dimension.
VECTOR_KINDS: Mapping[str, int] = {"attributes": len(ATTRIBUTE_NAMES), "machine_expert": 2}

_MALIGNANCY = ATTRIBUTE_NAMES.index("malignancy")
# Sizes the exact search's [chunk, N, d] difference tensor to roughly 256 MiB of float64.
_EXACT_CHUNK_ELEMENTS = 32_000_000


def vector_dim(kind: str) -> int:
    """Dimension of the vectors of one kind.

    Args:
        kind: ``"attributes"`` or ``"machine_expert"``.

    Returns:
        6 or 2.

    Raises:
        IndexError_: ``kind`` is unknown.
    """
    try:
        return VECTOR_KINDS[kind]
    except KeyError:
        raise IndexError_(f"unknown index vector kind {kind!r}; expected one of {sorted(VECTOR_KINDS)}") from None


def attribute_array(attributes: Sequence[float] | Mapping[str, float]) -> np.ndarray:
    """Six attribute ratings as a float64 array in :data:`ATTRIBUTE_NAMES` order.

    Args:
        attributes: Either six numbers in :data:`ATTRIBUTE_NAMES` order or a mapping with exactly
            those names as keys. Ratings must be finite and on the 1–5 scale.

    Returns:
        Array of shape ``[6]``.

    Raises:
        IndexError_: Wrong length or names, non-finite values, or ratings outside 1–5.
    """
    if isinstance(attributes, Mapping):
        if set(attributes) != set(ATTRIBUTE_NAMES):
            raise IndexError_(
                f"attributes must have exactly the keys {list(ATTRIBUTE_NAMES)}, got {sorted(attributes)}"
            )
        values = [attributes[name] for name in ATTRIBUTE_NAMES]
    else:
        values = list(attributes)
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise IndexError_(f"attributes must be numbers, got {values!r}") from exc
    if array.shape != (len(ATTRIBUTE_NAMES),):
        raise IndexError_(
            f"attributes must be {len(ATTRIBUTE_NAMES)} ratings ({', '.join(ATTRIBUTE_NAMES)}), got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)) or array.min() < 1.0 or array.max() > 5.0:
        raise IndexError_(f"attribute ratings must be finite and within 1–5, got {array.tolist()}")
    return array


def vector_for(
    kind: str,
    attributes: Sequence[float] | Mapping[str, float],
    malignancy_probability: float | None = None,
) -> np.ndarray:
    """The index vector of one nodule (for storing or for querying).

    Args:
        kind: ``"attributes"`` or ``"machine_expert"`` (see the module docstring).
        attributes: The six ratings on the 1–5 scale, in :data:`ATTRIBUTE_NAMES` order or as a
            mapping by name. For ``"machine_expert"`` only the malignancy rating is used.
        malignancy_probability: The classifier's probability in [0, 1]; required for
            ``"machine_expert"``, ignored for ``"attributes"``.

    Returns:
        float32 array of shape ``[vector_dim(kind)]``.

    Raises:
        IndexError_: Unknown kind, bad attributes, or a missing/out-of-range probability.
    """
    vector_dim(kind)
    ratings = attribute_array(attributes)
    if kind == "attributes":
        return ratings.astype(np.float32)
    if malignancy_probability is None:
        raise IndexError_("the 'machine_expert' index vector needs a malignancy_probability")
    probability = float(malignancy_probability)
    if not 0.0 <= probability <= 1.0:
        raise IndexError_(f"malignancy_probability must be within [0, 1], got {probability!r}")
    return np.array([probability, ratings_to_unit(ratings[_MALIGNANCY])], dtype=np.float32)


def exact_search(vectors_db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k-nearest neighbours by Euclidean distance (the reference for the HNSW index).

    Distances are computed from explicit differences in float64 (not the ``|a|² + |b|² - 2ab``
    expansion) so that they are exact enough to check the index against.

    Args:
        vectors_db: Database vectors ``[N, d]``.
        queries: Query vectors ``[Q, d]``.
        k: Neighbours per query; at most ``N`` are returned.

    Returns:
        ``(indices, distances)``: int64 row indices into ``vectors_db`` and float64 Euclidean
        distances, both ``[Q, min(k, N)]``, nearest first (ties in index order).

    Raises:
        IndexError_: Shapes do not match or ``k`` is not a positive integer.
    """
    db = np.asarray(vectors_db, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    if db.ndim != 2 or q.ndim != 2 or db.shape[1] != q.shape[1]:
        raise IndexError_(f"exact_search needs [N, d] and [Q, d] arrays, got {db.shape} and {q.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexError_(f"k must be a positive integer, got {k!r}")
    n = db.shape[0]
    kk = min(int(k), n)
    indices = np.empty((q.shape[0], kk), dtype=np.int64)
    distances = np.empty((q.shape[0], kk), dtype=np.float64)
    if kk == 0:
        return indices, distances
    chunk = max(1, _EXACT_CHUNK_ELEMENTS // max(1, n * db.shape[1]))
    for start in range(0, q.shape[0], chunk):
        block = q[start : start + chunk]
        diff = block[:, None, :] - db[None, :, :]
        squared = np.einsum("qnd,qnd->qn", diff, diff)
        if kk < n:
            candidates = np.argpartition(squared, kk - 1, axis=1)[:, :kk]
        else:
            candidates = np.broadcast_to(np.arange(n), squared.shape)
        cand_sq = np.take_along_axis(squared, candidates, axis=1)
        # lexsort: last key is primary -> by distance, then by row index for ties
        order = np.lexsort((candidates, cand_sq), axis=1)
        rows = np.take_along_axis(candidates, order, axis=1)
        indices[start : start + chunk] = rows
        distances[start : start + chunk] = np.sqrt(np.take_along_axis(cand_sq, order, axis=1))
    return indices, distances

"""Similar-nodule retrieval: an HNSW index over attribute or machine+expert vectors.

Zhang et al. retrieve the K = 20 nearest historical nodules by Euclidean distance and score a
new nodule by the mean malignancy label of those neighbours. Two vector kinds are supported
(see :mod:`nodule_edge.index.vectors`): the six attribute ratings, or the classifier's
probability with the malignancy rating. Build query vectors with :func:`vector_for`.
"""

from nodule_edge.index.evaluate import RetrievalEvaluation, evaluate_retrieval
from nodule_edge.index.store import (
    DEFAULT_K,
    AttributeIndex,
    IndexEntry,
    Neighbour,
)
from nodule_edge.index.vectors import VECTOR_KINDS, exact_search, vector_dim, vector_for

__all__ = [
    "DEFAULT_K",
    "VECTOR_KINDS",
    "AttributeIndex",
    "IndexEntry",
    "Neighbour",
    "RetrievalEvaluation",
    "evaluate_retrieval",
    "exact_search",
    "vector_dim",
    "vector_for",
]

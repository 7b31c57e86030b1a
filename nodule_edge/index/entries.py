"""The records of the similar-nodule index: what goes in (:class:`IndexEntry`) and what comes out
(:class:`Neighbour`), and the index vectors built from an entry's own metadata.

:class:`~nodule_edge.index.store.AttributeIndex` stores and searches them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import IndexError_
from nodule_edge.index.format import _as_float
from nodule_edge.index.vectors import attribute_array, vector_dim, vector_for

__all__ = ["IndexEntry", "Neighbour"]


@dataclass(frozen=True)
class IndexEntry:
    """One historical nodule in the index.

    Attributes:
        id: Unique identifier (not a patient name or ID; it is logged in error messages).
        label: 1 malignant, 0 benign, ``None`` unknown (unknown labels never enter scores).
        attributes: The six ratings on the 1–5 scale by name (a six-number sequence in
            :data:`ATTRIBUTE_NAMES` order is accepted and converted), or ``None`` if unknown.
        diameter_mm: Nodule diameter in millimetres, or ``None``.
        malignancy_probability: The classifier's probability in [0, 1], or ``None``.
    """

    id: str
    label: int | None = None
    attributes: Mapping[str, float] | Sequence[float] | None = None
    diameter_mm: float | None = None
    malignancy_probability: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise IndexError_(f"index entry id must be a non-empty string, got {self.id!r}")
        if self.label is not None:
            if isinstance(self.label, bool) or self.label not in (0, 1):
                raise IndexError_(f"index entry {self.id!r}: label must be 0, 1 or None, got {self.label!r}")
            object.__setattr__(self, "label", int(self.label))
        if self.attributes is not None:
            try:
                ratings = attribute_array(self.attributes)
            except IndexError_ as exc:
                raise IndexError_(f"index entry {self.id!r}: {exc}") from None
            object.__setattr__(self, "attributes", dict(zip(ATTRIBUTE_NAMES, ratings.tolist(), strict=True)))
        if self.diameter_mm is not None:
            diameter = _as_float(self.diameter_mm)
            if diameter is None or not math.isfinite(diameter) or diameter <= 0:
                raise IndexError_(
                    f"index entry {self.id!r}: diameter_mm must be a positive number, got {self.diameter_mm!r}"
                )
            object.__setattr__(self, "diameter_mm", diameter)
        if self.malignancy_probability is not None:
            probability = _as_float(self.malignancy_probability)
            if probability is None or not 0.0 <= probability <= 1.0:
                raise IndexError_(
                    f"index entry {self.id!r}: malignancy_probability must be within [0, 1], "
                    f"got {self.malignancy_probability!r}"
                )
            object.__setattr__(self, "malignancy_probability", probability)


@dataclass(frozen=True)
class Neighbour:
    """One retrieved nodule.

    Attributes:
        id: The entry's id.
        distance: Euclidean (not squared) distance to the query vector.
        label: 1 malignant, 0 benign, ``None`` unknown.
        attributes: The entry's six ratings by name, or ``None``.
        diameter_mm: The entry's diameter, or ``None``.
    """

    id: str
    distance: float
    label: int | None
    attributes: Mapping[str, float] | None
    diameter_mm: float | None


def _entry_vectors(kind: str, entries: Sequence[IndexEntry]) -> np.ndarray:
    """Index vectors ``[N, dim]`` built from the entries' own metadata with :func:`vector_for`.

    Args:
        kind: ``"attributes"`` or ``"machine_expert"``.
        entries: Entries with ``attributes`` (and ``malignancy_probability`` for
            ``"machine_expert"``).

    Returns:
        float32 array ``[len(entries), vector_dim(kind)]``.

    Raises:
        IndexError_: An entry lacks what the kind needs (the message names the entry).
    """
    dim = vector_dim(kind)
    out = np.empty((len(entries), dim), dtype=np.float32)
    for row, entry in enumerate(entries):
        if entry.attributes is None:
            raise IndexError_(f"index entry {entry.id!r} has no attributes to build a vector from")
        try:
            out[row] = vector_for(kind, entry.attributes, entry.malignancy_probability)
        except IndexError_ as exc:
            raise IndexError_(f"index entry {entry.id!r}: {exc}") from None
    return out

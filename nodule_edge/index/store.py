"""The similar-nodule index: HNSW over attribute or machine+expert vectors, plus nodule metadata.

Retrieval follows Zhang et al.: the K nearest historical nodules by Euclidean distance, and the
diagnosis score is the mean malignancy label of those with a known label (K = 20 by default).

Thread safety: any number of threads may call :meth:`AttributeIndex.query` at once; ``add`` (and
``save``) exclude queries for as long as they change the graph. See :mod:`._rwlock`.

The records (:class:`IndexEntry`, :class:`Neighbour`) live in :mod:`.entries`; the on-disk format
(a directory of four files, nothing pickled, every file checksummed) and its reader and writer in
:mod:`.format`. Both are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from nodule_edge._files import staged_folder
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import IndexError_
from nodule_edge.index._rwlock import ReadWriteLock
from nodule_edge.index.entries import IndexEntry, Neighbour, _entry_vectors
from nodule_edge.index.format import (
    _SPACE,
    FORMAT_NAME,
    FORMAT_VERSION,
    _check_replaceable,
    _is_positive_int,
    entries_payload,
    read_index,
    write_checksums,
    write_data_files,
)
from nodule_edge.index.vectors import attribute_array, exact_search, vector_dim

__all__ = [
    "DEFAULT_K",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AttributeIndex",
    "IndexEntry",
    "Neighbour",
]

logger = logging.getLogger(__name__)

#: Neighbours per query by default (Zhang et al.).
DEFAULT_K = 20
# Query breadth: HNSW recall rises with ef; 64 measured >= 0.99 recall at k=20 on 6-d data while
# costing little, and 2k keeps the candidate list well above k for large k.
_MIN_EF_SEARCH = 64


@dataclass
class _Plan:
    k: int
    k_eff: int
    ef: int
    excluded: frozenset[int] = field(default_factory=frozenset)


class AttributeIndex:
    """Approximate nearest-neighbour index of historical nodules (hnswlib, Euclidean).

    Create with :meth:`create` or :meth:`load`, not the constructor.

    Nothing loads lazily: :meth:`load` verifies the checksums and reads the HNSW graph, the
    vectors and every entry's metadata into memory at once (a few hundred bytes per entry), so
    queries never touch the disk and a damaged index fails at load time, not at the first query.

    Example:
        >>> from nodule_edge.index import AttributeIndex, IndexEntry, vector_for
        >>> index = AttributeIndex.create("attributes")
        >>> index.add([IndexEntry("n1", label=1, attributes=[4, 3, 5, 2, 4, 3])])
        >>> len(index)
        1
        >>> query = vector_for("attributes", [4, 3, 5, 2, 4, 3])
        >>> [n.id for n in index.query(query, k=5)[0]]
        ['n1']
        >>> index.save("runs/index")  # doctest: +SKIP
        >>> AttributeIndex.load("runs/index")  # doctest: +SKIP
        AttributeIndex(kind='attributes', entries=1, M=16)
    """

    def __init__(
        self,
        kind: str,
        hnsw: Any,
        *,
        M: int,  # noqa: N803 - hnswlib's name for the graph degree
        ef_construction: int,
        seed: int,
        ef_search: int | None,
    ) -> None:
        self._kind = kind
        self._dim = vector_dim(kind)
        self._hnsw = hnsw
        self._M = M
        self._ef_construction = ef_construction
        self._seed = seed
        self._ef_search = ef_search
        self._lock = ReadWriteLock()
        self._broken: str | None = None
        self._count = 0
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        capacity = hnsw.get_max_elements()
        self._vectors = np.empty((capacity, self._dim), dtype=np.float32)
        self._labels = np.full(capacity, -1, dtype=np.int8)
        self._attributes = np.full((capacity, len(ATTRIBUTE_NAMES)), np.nan, dtype=np.float64)
        self._diameters = np.full(capacity, np.nan, dtype=np.float64)
        self._probabilities = np.full(capacity, np.nan, dtype=np.float64)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        kind: str,
        capacity: int = 1024,
        ef_construction: int = 200,
        M: int = 16,  # noqa: N803 - hnswlib's name for the graph degree
        seed: int = 100,
        ef_search: int | None = None,
    ) -> AttributeIndex:
        """A new, empty index.

        Args:
            kind: ``"attributes"`` (6-d) or ``"machine_expert"`` (2-d); see
                :mod:`nodule_edge.index.vectors`.
            capacity: Initial number of slots; :meth:`add` grows it as needed.
            ef_construction: HNSW build breadth (higher: better graph, slower build).
            M: HNSW graph degree.
            seed: Seed of hnswlib's level generator, for reproducible graphs.
            ef_search: Query breadth floor. ``None`` uses ``max(64, 2 * k)`` per query; an integer
                uses ``max(ef_search, k)``.

        Returns:
            The empty index.

        Raises:
            IndexError_: Unknown kind or a non-positive parameter.
        """
        dim = vector_dim(kind)
        for name, value in (
            ("capacity", capacity),
            ("ef_construction", ef_construction),
            ("M", M),
        ):
            if not _is_positive_int(value):
                raise IndexError_(f"{name} must be a positive integer, got {value!r}")
        if ef_search is not None and not _is_positive_int(ef_search):
            raise IndexError_(f"ef_search must be a positive integer or None, got {ef_search!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise IndexError_(f"seed must be a non-negative integer, got {seed!r}")
        hnsw = hnswlib.Index(space=_SPACE, dim=dim)
        hnsw.init_index(
            max_elements=int(capacity),
            M=int(M),
            ef_construction=int(ef_construction),
            random_seed=int(seed),
        )
        return cls(
            kind,
            hnsw,
            M=int(M),
            ef_construction=int(ef_construction),
            seed=int(seed),
            ef_search=None if ef_search is None else int(ef_search),
        )

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        """The vector kind: ``"attributes"`` or ``"machine_expert"``."""
        return self._kind

    @property
    def dim(self) -> int:
        """Vector dimension (6 or 2)."""
        return self._dim

    @property
    def capacity(self) -> int:
        """Slots allocated in the HNSW graph (grows on :meth:`add`)."""
        return int(self._hnsw.get_max_elements())

    @property
    def vectors(self) -> np.ndarray:
        """A copy of the stored vectors ``[len(self), dim]``, row ``i`` = ``ids[i]``."""
        with self._lock.read():
            return self._vectors[: self._count].copy()

    @property
    def ids(self) -> tuple[str, ...]:
        """Entry ids in insertion order."""
        with self._lock.read():
            return tuple(self._ids)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._row_of

    def __repr__(self) -> str:
        return f"AttributeIndex(kind={self._kind!r}, entries={self._count}, M={self._M})"

    # ------------------------------------------------------------------ mutation

    def add(
        self,
        entries: Sequence[IndexEntry],
        vectors: np.ndarray | None = None,
        *,
        num_threads: int = 1,
    ) -> None:
        """Add entries; all or nothing.

        Args:
            entries: The new entries; ids must be new and unique.
            vectors: ``[len(entries), dim]`` vectors in entry order. ``None`` builds them from the
                entries' metadata with :func:`~nodule_edge.index.vector_for`.
            num_threads: hnswlib build threads. The default 1 keeps the graph reproducible for a
                given seed and insertion order; more threads build faster but not reproducibly.

        Raises:
            IndexError_: A duplicate id (named), wrong vector shape, non-finite values, or an
                entry that is not an :class:`IndexEntry`.
        """
        self._check_usable()
        entries = list(entries)
        for entry in entries:
            if not isinstance(entry, IndexEntry):
                raise IndexError_(f"index entries must be IndexEntry, got {type(entry).__name__}")
        if vectors is None:
            batch = _entry_vectors(self._kind, entries)
        else:
            batch = self._as_vectors(vectors, what="vectors to add")
            if batch.shape[0] != len(entries):
                raise IndexError_(f"got {len(entries)} entries but {batch.shape[0]} vectors; they must match")
        if not entries:
            return
        seen: set[str] = set()
        for entry in entries:
            if entry.id in seen:
                raise IndexError_(f"duplicate index entry id {entry.id!r} within the added batch")
            seen.add(entry.id)
        if not _is_positive_int(num_threads) and num_threads != -1:
            raise IndexError_(f"num_threads must be a positive integer or -1, got {num_threads!r}")

        with self._lock.write():
            for entry in entries:
                if entry.id in self._row_of:
                    raise IndexError_(f"index entry id {entry.id!r} is already in the index")
            start = self._count
            stop = start + len(entries)
            self._ensure_capacity(stop)
            rows = np.arange(start, stop, dtype=np.int64)
            try:
                self._hnsw.add_items(batch, rows, num_threads=int(num_threads))
            except RuntimeError as exc:  # pragma: no cover - only on allocation failure
                self._broken = f"adding {len(entries)} entries failed ({exc})"
                raise IndexError_(f"hnswlib could not add the entries: {exc}") from exc
            self._vectors[start:stop] = batch
            for row, entry in zip(range(start, stop), entries, strict=True):
                self._ids.append(entry.id)
                self._row_of[entry.id] = row
                self._labels[row] = -1 if entry.label is None else entry.label
                if entry.attributes is not None:
                    self._attributes[row] = attribute_array(entry.attributes)
                if entry.diameter_mm is not None:
                    self._diameters[row] = entry.diameter_mm
                if entry.malignancy_probability is not None:
                    self._probabilities[row] = entry.malignancy_probability
            self._count = stop
        logger.debug("added %d entries to the %s index (now %d)", len(entries), self._kind, stop)

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self.capacity
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        self._hnsw.resize_index(new_capacity)
        self._vectors = _grow(self._vectors, new_capacity, np.nan)
        self._labels = _grow(self._labels, new_capacity, -1)
        self._attributes = _grow(self._attributes, new_capacity, np.nan)
        self._diameters = _grow(self._diameters, new_capacity, np.nan)
        self._probabilities = _grow(self._probabilities, new_capacity, np.nan)
        logger.debug("resized the %s index from %d to %d slots", self._kind, capacity, new_capacity)

    # ------------------------------------------------------------------ queries

    def query(
        self,
        vectors: np.ndarray,
        k: int = DEFAULT_K,
        exclude_ids: Iterable[str] | None = None,
    ) -> list[list[Neighbour]]:
        """The ``k`` nearest entries of each query vector, nearest first.

        Args:
            vectors: Query vectors ``[Q, dim]`` (a single ``[dim]`` vector is taken as ``Q = 1``),
                built with :func:`~nodule_edge.index.vectors.vector_for`.
            k: Neighbours per query. Fewer are returned when the index holds fewer entries
                (after exclusion); an empty index gives ``Q`` empty lists rather than an error,
                so that a site without history simply shows no similar nodules.
            exclude_ids: Ids never returned (e.g. the query nodule itself in evaluation); ids not
                in the index are ignored.

        Returns:
            One list of :class:`Neighbour` per query vector.

        Raises:
            IndexError_: Wrong dimension, non-finite values, or a non-positive ``k``.
        """
        self._check_usable()
        if not _is_positive_int(k):
            raise IndexError_(f"k must be a positive integer, got {k!r}")
        queries = self._as_vectors(vectors, what="query vectors", allow_1d=True)
        if isinstance(exclude_ids, str):
            raise IndexError_("exclude_ids must be a collection of ids, not a single string")
        excluded_ids = frozenset(exclude_ids or ())
        with self._lock.read():
            plan = self._plan(int(k), excluded_ids)
            if plan.k_eff == 0:
                return [[] for _ in range(queries.shape[0])]
            if int(self._hnsw.ef) == plan.ef:
                return self._search(queries, plan)
        # set_ef must not race with running queries, so a change of breadth runs exclusively.
        with self._lock.write():
            plan = self._plan(int(k), excluded_ids)
            if plan.k_eff == 0:
                return [[] for _ in range(queries.shape[0])]
            self._hnsw.set_ef(plan.ef)
            return self._search(queries, plan)

    @staticmethod
    def retrieval_score(neighbours: Sequence[Neighbour]) -> float | None:
        """Diagnosis score of one query: the mean label of the neighbours whose label is known.

        Args:
            neighbours: One query's result from :meth:`query`.

        Returns:
            A value in [0, 1] (the fraction of malignant neighbours), or ``None`` when no
            neighbour has a known label.
        """
        labels = [n.label for n in neighbours if n.label is not None]
        if not labels:
            return None
        return float(sum(labels)) / len(labels)

    def _plan(self, k: int, excluded_ids: frozenset[str]) -> _Plan:
        excluded = frozenset(self._row_of[i] for i in excluded_ids if i in self._row_of)
        k_eff = min(k + len(excluded), self._count)
        if self._ef_search is None:
            ef = max(_MIN_EF_SEARCH, 2 * k_eff)
        else:
            ef = max(self._ef_search, k_eff)
        return _Plan(k=k, k_eff=k_eff, ef=ef, excluded=excluded)

    def _search(self, queries: np.ndarray, plan: _Plan) -> list[list[Neighbour]]:
        # Concurrency comes from the callers' threads; one hnswlib thread per call avoids
        # oversubscribing the CPU (and hnswlib's thread pool start-up on single queries).
        threads = 1 if queries.shape[0] < 64 else -1
        try:
            rows, squared = self._hnsw.knn_query(queries, k=plan.k_eff, num_threads=threads)
            distances = np.sqrt(np.maximum(squared.astype(np.float64), 0.0))
        except RuntimeError as exc:
            # hnswlib raises when the graph yields fewer than k results (it can with many
            # duplicate vectors); the exact search always answers, so fall back to it.
            logger.warning("HNSW search returned too few results (%s); using exact search", exc)
            rows, distances = exact_search(self._vectors[: self._count], queries, plan.k_eff)
        rows = np.asarray(rows, dtype=np.int64)
        if plan.excluded:
            keep = ~np.isin(rows, np.fromiter(plan.excluded, dtype=np.int64))
            # Every row keeps at least k entries (or all that are left); cut each to k.
            rows_list = [r[m][: plan.k] for r, m in zip(rows, keep, strict=True)]
            distance_list = [d[m][: plan.k] for d, m in zip(distances, keep, strict=True)]
        else:
            rows_list = list(rows[:, : plan.k])
            distance_list = list(distances[:, : plan.k])
        return [self._neighbours(r, d) for r, d in zip(rows_list, distance_list, strict=True)]

    def _neighbours(self, rows: np.ndarray, distances: np.ndarray) -> list[Neighbour]:
        # Gathering the metadata columns once per query keeps per-neighbour work to pure Python.
        labels = self._labels[rows].tolist()
        attributes = self._attributes[rows]
        known = (~np.isnan(attributes[:, 0])).tolist()
        attribute_rows = attributes.tolist()
        diameters = self._diameters[rows].tolist()
        return [
            Neighbour(
                id=self._ids[row],
                distance=distance,
                label=None if label < 0 else label,
                attributes=dict(zip(ATTRIBUTE_NAMES, ratings, strict=True)) if has else None,
                diameter_mm=None if math.isnan(diameter) else diameter,
            )
            for row, distance, label, ratings, has, diameter in zip(
                rows.tolist(),
                distances.tolist(),
                labels,
                attribute_rows,
                known,
                diameters,
                strict=True,
            )
        ]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index to ``directory`` atomically (the format: :mod:`nodule_edge.index.format`).

        The files are written into a temporary directory beside the target, flushed to disk, and
        only then moved into place. An existing index directory at the target is replaced after
        the new one is complete; any other non-empty directory is refused.

        Args:
            directory: Target directory.

        Returns:
            The target directory.

        Raises:
            OutputError: The target is a file or a non-index directory, or writing failed
                (nothing partial is left at the target).
        """
        self._check_usable()
        target = Path(directory)
        _check_replaceable(target)
        with staged_folder(target, overwrite=True, what="index") as tmp:
            with self._lock.read():
                self._write_files(tmp)
            write_checksums(tmp)
        logger.info("saved %s index with %d entries to %s", self._kind, self._count, target)
        return target

    def _write_files(self, tmp: Path) -> None:
        n = self._count
        entries = entries_payload(
            kind=self._kind,
            dim=self._dim,
            params={
                "M": self._M,
                "ef_construction": self._ef_construction,
                "seed": self._seed,
                "ef_search": self._ef_search,
            },
            ids=self._ids[:n],
            labels=self._labels[:n],
            attributes=self._attributes[:n],
            diameter_mm=self._diameters[:n],
            malignancy_probability=self._probabilities[:n],
        )
        write_data_files(tmp, self._hnsw, self._vectors[:n], entries)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> AttributeIndex:
        """Read an index written by :meth:`save`, verifying checksums and consistency first.

        The whole index (graph, vectors and metadata) is read into memory here; nothing is
        read later. See :func:`nodule_edge.index.format.read_index` for the checks.

        Args:
            directory: The index directory.

        Returns:
            The index, ready for queries and further :meth:`add` calls.

        Raises:
            IndexError_: The directory or a file is missing, a checksum does not match
                (corrupted, truncated or modified file), the format version is unknown, or the
                files disagree with one another (entry count, dimension, vectors). The message
                names the file.
        """
        root = Path(directory)
        stored = read_index(root)
        meta, params = stored.meta, stored.meta["params"]
        index = cls(
            meta["kind"],
            stored.hnsw,
            M=params["M"],
            ef_construction=params["ef_construction"],
            seed=params["seed"],
            ef_search=params["ef_search"],
        )
        index._fill_loaded(meta, stored.vectors)
        logger.info("loaded %s index with %d entries from %s", meta["kind"], meta["count"], root)
        return index

    def _fill_loaded(self, meta: dict[str, Any], vectors: np.ndarray) -> None:
        count = meta["count"]
        if self._vectors.shape[0] < count:  # defensive: load_index sizes capacity >= count
            self._ensure_capacity(count)
        self._vectors[:count] = vectors
        self._ids = list(meta["ids"])
        self._row_of = {entry_id: row for row, entry_id in enumerate(self._ids)}
        self._labels[:count] = [-1 if v is None else v for v in meta["labels"]]
        known = [row for row, ratings in enumerate(meta["attributes"]) if ratings is not None]
        if known:
            self._attributes[known] = [meta["attributes"][row] for row in known]
        self._diameters[:count] = [np.nan if v is None else v for v in meta["diameter_mm"]]
        self._probabilities[:count] = [np.nan if v is None else v for v in meta["malignancy_probability"]]
        self._count = count

    # ------------------------------------------------------------------ helpers

    def _as_vectors(self, vectors: np.ndarray, *, what: str, allow_1d: bool = False) -> np.ndarray:
        try:
            # Values beyond float32 become inf here and are rejected just below.
            with np.errstate(over="ignore"):
                array = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise IndexError_(f"{what} must be numeric arrays: {exc}") from exc
        if allow_1d and array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self._dim:
            raise IndexError_(
                f"{what} must have shape [N, {self._dim}] for the {self._kind!r} index, got {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise IndexError_(f"{what} contain non-finite values (NaN/inf or beyond float32)")
        return np.ascontiguousarray(array)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise IndexError_(f"the index is inconsistent after a failed operation: {self._broken}")


# ---------------------------------------------------------------------- module helpers


def _grow(array: np.ndarray, capacity: int, fill: float) -> np.ndarray:
    grown = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown

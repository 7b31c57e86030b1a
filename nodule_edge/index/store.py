"""The similar-nodule index: HNSW over attribute or machine+expert vectors, plus nodule metadata.

Retrieval follows Zhang et al.: the K nearest historical nodules by Euclidean distance, and the
diagnosis score is the mean malignancy label of those with a known label (K = 20 by default).

Thread safety: any number of threads may call :meth:`AttributeIndex.query` at once; ``add`` (and
``save``) exclude queries for as long as they change the graph. See :mod:`._rwlock`.

On-disk format (a directory, written by :meth:`AttributeIndex.save`; nothing in it is pickled):

``index.bin``
    hnswlib's own ``save_index`` file. Element label ``i`` is row ``i`` of the other files.
``vectors.npy``
    float32 ``[count, dim]``, the stored vectors (read with ``allow_pickle=False``).
``entries.json``
    Format name and version, ``kind``, ``dim``, HNSW parameters, ``count`` and the metadata in
    columns: ``ids``, ``labels`` (0, 1 or null), ``attributes`` (six ratings or null, in
    ``attribute_names`` order), ``diameter_mm`` and ``malignancy_probability`` (number or null).
``checksums.json``
    SHA-256 of each of the three files above. :meth:`AttributeIndex.load` verifies every checksum
    before parsing anything, so hnswlib never reads bytes that were not written by ``save``.
    This detects corruption and accidental edits, not a deliberate forgery that also rewrites
    ``checksums.json``.

Any other file in the directory is ignored (with a warning): it cannot influence what is loaded,
because only the four files above are read, and refusing would break on harmless debris such
as editor backups or a README placed next to the index.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from nodule_edge._files import sha256_file, staged_folder
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import IndexError_, OutputError
from nodule_edge.index._rwlock import ReadWriteLock
from nodule_edge.index.vectors import attribute_array, exact_search, vector_dim, vector_for

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
FORMAT_NAME = "nodule-edge-similar-nodule-index"
FORMAT_VERSION = 1

INDEX_FILE = "index.bin"
VECTORS_FILE = "vectors.npy"
ENTRIES_FILE = "entries.json"
CHECKSUMS_FILE = "checksums.json"
_DATA_FILES = (INDEX_FILE, VECTORS_FILE, ENTRIES_FILE)
_SPACE = "l2"
# Query breadth: HNSW recall rises with ef; 64 measured >= 0.99 recall at k=20 on 6-d data while
# costing little, and 2k keeps the candidate list well above k for large k.
_MIN_EF_SEARCH = 64


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
                raise IndexError_(
                    f"index entry {self.id!r}: label must be 0, 1 or None, got {self.label!r}"
                )
            object.__setattr__(self, "label", int(self.label))
        if self.attributes is not None:
            try:
                ratings = attribute_array(self.attributes)
            except IndexError_ as exc:
                raise IndexError_(f"index entry {self.id!r}: {exc}") from None
            object.__setattr__(
                self, "attributes", dict(zip(ATTRIBUTE_NAMES, ratings.tolist(), strict=True))
            )
        if self.diameter_mm is not None:
            diameter = _as_float(self.diameter_mm)
            if diameter is None or not math.isfinite(diameter) or diameter <= 0:
                raise IndexError_(
                    f"index entry {self.id!r}: diameter_mm must be a positive number, "
                    f"got {self.diameter_mm!r}"
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


@dataclass
class _Plan:
    k: int
    k_eff: int
    ef: int
    excluded: frozenset[int] = field(default_factory=frozenset)


class AttributeIndex:
    """Approximate nearest-neighbour index of historical nodules (hnswlib, Euclidean).

    Create with :meth:`create` or :meth:`load`, not the constructor.
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
                raise IndexError_(
                    f"got {len(entries)} entries but {batch.shape[0]} vectors; they must match"
                )
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
        return [
            self._neighbours(r, d) for r, d in zip(rows_list, distance_list, strict=True)
        ]

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
        """Write the index to ``directory`` atomically (see the module docstring for the format).

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
            checksums = {name: sha256_file(tmp / name) for name in _DATA_FILES}
            _write_json(tmp / CHECKSUMS_FILE, {"format_version": FORMAT_VERSION, "files": checksums})
        logger.info("saved %s index with %d entries to %s", self._kind, self._count, target)
        return target

    def _write_files(self, tmp: Path) -> None:
        n = self._count
        self._hnsw.save_index(str(tmp / INDEX_FILE))
        with open(tmp / VECTORS_FILE, "wb") as fh:
            np.save(fh, np.ascontiguousarray(self._vectors[:n]), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        attributes: list[list[float] | None] = [
            None if np.isnan(row[0]) else row.tolist() for row in self._attributes[:n]
        ]
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": self._kind,
            "dim": self._dim,
            "space": _SPACE,
            "count": n,
            "params": {
                "M": self._M,
                "ef_construction": self._ef_construction,
                "seed": self._seed,
                "ef_search": self._ef_search,
            },
            "attribute_names": list(ATTRIBUTE_NAMES),
            "ids": self._ids[:n],
            "labels": [None if v < 0 else int(v) for v in self._labels[:n].tolist()],
            "attributes": attributes,
            "diameter_mm": _nan_to_none(self._diameters[:n]),
            "malignancy_probability": _nan_to_none(self._probabilities[:n]),
        }
        _write_json(tmp / ENTRIES_FILE, meta)
        # hnswlib wrote index.bin with plain stdio; make it durable like the others.
        with open(tmp / INDEX_FILE, "rb") as fh:
            os.fsync(fh.fileno())

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> AttributeIndex:
        """Read an index written by :meth:`save`, verifying checksums and consistency first.

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
        if not root.is_dir():
            raise IndexError_(f"index directory {root} does not exist or is not a directory")
        _verify_checksums(root)
        meta = _read_entries(root / ENTRIES_FILE)
        kind, dim, count = meta["kind"], meta["dim"], meta["count"]

        vectors_path = root / VECTORS_FILE
        try:
            vectors = np.load(vectors_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexError_(f"cannot read index vectors {vectors_path}: {exc}") from exc
        if vectors.dtype != np.float32 or vectors.shape != (count, dim):
            raise IndexError_(
                f"{vectors_path} holds {vectors.dtype} {vectors.shape}, but {ENTRIES_FILE} "
                f"describes float32 ({count}, {dim})"
            )
        if not np.all(np.isfinite(vectors)):
            raise IndexError_(f"{vectors_path} contains non-finite values")

        index_path = root / INDEX_FILE
        params = meta["params"]
        hnsw = hnswlib.Index(space=_SPACE, dim=dim)
        try:
            hnsw.load_index(str(index_path), max_elements=max(count, 1))
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise IndexError_(f"hnswlib cannot read {index_path}: {exc}") from exc
        if hnsw.element_count != count:
            raise IndexError_(
                f"{index_path} holds {hnsw.element_count} elements, but {ENTRIES_FILE} "
                f"lists {count} entries"
            )
        if int(hnsw.M) != params["M"] or int(hnsw.ef_construction) != params["ef_construction"]:
            raise IndexError_(
                f"{index_path} was built with M={hnsw.M}, ef_construction={hnsw.ef_construction}, "
                f"but {ENTRIES_FILE} records {params}"
            )
        if count:
            labels = np.sort(np.asarray(hnsw.get_ids_list(), dtype=np.int64))
            if not np.array_equal(labels, np.arange(count)):
                raise IndexError_(f"{index_path} element labels are not 0..{count - 1}")
            stored = np.asarray(hnsw.get_items(np.arange(count)), dtype=np.float32)
            if not np.array_equal(stored, vectors):
                raise IndexError_(f"{index_path} and {vectors_path} hold different vectors")

        index = cls(
            kind,
            hnsw,
            M=params["M"],
            ef_construction=params["ef_construction"],
            seed=params["seed"],
            ef_search=params["ef_search"],
        )
        index._fill_loaded(meta, vectors)
        logger.info("loaded %s index with %d entries from %s", kind, count, root)
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
        self._probabilities[:count] = [
            np.nan if v is None else v for v in meta["malignancy_probability"]
        ]
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
                f"{what} must have shape [N, {self._dim}] for the {self._kind!r} index, "
                f"got {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise IndexError_(f"{what} contain non-finite values (NaN/inf or beyond float32)")
        return np.ascontiguousarray(array)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise IndexError_(f"the index is inconsistent after a failed operation: {self._broken}")


# ---------------------------------------------------------------------- module helpers


def _is_positive_int(value: object) -> bool:
    return bool(
        not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0
    )


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]  # any JSON value; float() decides, errors below
    except (TypeError, ValueError):
        return None


def _grow(array: np.ndarray, capacity: int, fill: float) -> np.ndarray:
    grown = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, allow_nan=False, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())


def _check_replaceable(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputError(f"cannot save the index to {target}: it exists and is not a directory")
    if target.is_dir():
        names = {p.name for p in target.iterdir()}
        if names and CHECKSUMS_FILE not in names and ENTRIES_FILE not in names:
            raise OutputError(
                f"refusing to replace {target}: it is a non-empty directory that does not hold "
                f"a nodule-edge index"
            )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise IndexError_(f"index file missing: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexError_(f"index file {path} is not valid JSON: {exc}") from exc


def _verify_checksums(root: Path) -> None:
    checksums_path = root / CHECKSUMS_FILE
    payload = _read_json(checksums_path)
    files = payload.get("files") if isinstance(payload, dict) else None
    if (
        not isinstance(payload, dict)
        or payload.get("format_version") != FORMAT_VERSION
        or not isinstance(files, dict)
        or set(files) != set(_DATA_FILES)
        or not all(isinstance(v, str) and len(v) == 64 for v in files.values())
    ):
        raise IndexError_(
            f"{checksums_path} is malformed: expected format_version {FORMAT_VERSION} and "
            f"SHA-256 entries for {list(_DATA_FILES)}"
        )
    for name in _DATA_FILES:
        path = root / name
        if not path.is_file():
            raise IndexError_(f"index file missing: {path}")
        if sha256_file(path) != files[name]:
            raise IndexError_(
                f"checksum mismatch for {path}: the file is corrupted, truncated or was modified "
                f"after saving (or {CHECKSUMS_FILE} was)"
            )
    extra = sorted(p.name for p in root.iterdir() if p.name not in {*_DATA_FILES, CHECKSUMS_FILE})
    if extra:
        logger.warning("ignoring unexpected files in index directory %s: %s", root, extra)


def _read_entries(path: Path) -> dict[str, Any]:
    meta = _read_json(path)

    def bad(reason: str) -> IndexError_:
        return IndexError_(f"{path} is inconsistent: {reason}")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise bad(f"not a {FORMAT_NAME} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexError_(
            f"{path} has index format version {meta.get('format_version')!r}; this nodule-edge "
            f"reads version {FORMAT_VERSION}"
        )
    kind = meta.get("kind")
    try:
        dim = vector_dim(kind)  # type: ignore[arg-type]  # untrusted JSON; vector_dim rejects a non-kind
    except IndexError_ as exc:
        raise bad(str(exc)) from None
    if meta.get("dim") != dim or meta.get("space") != _SPACE:
        raise bad(f"dim {meta.get('dim')!r} / space {meta.get('space')!r} do not fit kind {kind!r}")
    if meta.get("attribute_names") != list(ATTRIBUTE_NAMES):
        raise bad(f"attribute_names {meta.get('attribute_names')!r} != {list(ATTRIBUTE_NAMES)}")
    params = meta.get("params")
    if (
        not isinstance(params, dict)
        or not all(_is_positive_int(params.get(p)) for p in ("M", "ef_construction"))
        or not isinstance(params.get("seed"), int)
        or not (params.get("ef_search") is None or _is_positive_int(params.get("ef_search")))
    ):
        raise bad(f"bad params {params!r}")
    count = meta.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise bad(f"bad count {count!r}")
    columns = ("ids", "labels", "attributes", "diameter_mm", "malignancy_probability")
    for column in columns:
        if not isinstance(meta.get(column), list) or len(meta[column]) != count:
            raise bad(f"column {column!r} does not hold {count} values")
    ids = meta["ids"]
    if not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != count:
        raise bad("ids must be unique non-empty strings")
    if not all(v is None or (type(v) is int and v in (0, 1)) for v in meta["labels"]):
        raise bad("labels must be 0, 1 or null")
    ratings = [r for r in meta["attributes"] if r is not None]
    if ratings:
        if not all(isinstance(r, list) and len(r) == len(ATTRIBUTE_NAMES) for r in ratings):
            raise bad(f"attributes must be null or lists of {len(ATTRIBUTE_NAMES)} ratings")
        array = _numeric_column(ratings, "attributes", bad)
        if not np.all(np.isfinite(array)) or array.min() < 1.0 or array.max() > 5.0:
            raise bad("attribute ratings must be finite and within 1–5")
    diameters = _numeric_column(meta["diameter_mm"], "diameter_mm", bad)
    if np.any(~np.isnan(diameters) & ~(np.isfinite(diameters) & (diameters > 0))):
        raise bad("diameter_mm must be null or positive numbers")
    probabilities = _numeric_column(meta["malignancy_probability"], "malignancy_probability", bad)
    if np.any(~np.isnan(probabilities) & ~((probabilities >= 0) & (probabilities <= 1))):
        raise bad("malignancy_probability must be null or within [0, 1]")
    return meta


def _numeric_column(values: list[Any], name: str, bad: Any) -> np.ndarray:
    """A JSON column as float64 with null -> NaN; booleans and strings are rejected."""

    def number(v: Any) -> float:
        if v is None:
            return math.nan
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"{name} holds a non-number {v!r}")
        return float(v)

    return np.array(
        [[number(x) for x in v] if isinstance(v, list) else number(v) for v in values],
        dtype=np.float64,
    )

"""The similar-nodule index on disk: writing, verifying and parsing its four files.

:class:`~nodule_edge.index.store.AttributeIndex` keeps the graph and the metadata in memory; its
``save`` and ``load`` delegate the files to this module. Nothing in the format is pickled.

On-disk format (a directory):

``index.bin``
    hnswlib's own ``save_index`` file. Element label ``i`` is row ``i`` of the other files.
``vectors.npy``
    float32 ``[count, dim]``, the stored vectors (read with ``allow_pickle=False``).
``entries.json``
    Format name and version, ``kind``, ``dim``, HNSW parameters, ``count`` and the metadata in
    columns: ``ids``, ``labels`` (0, 1 or null), ``attributes`` (six ratings or null, in
    ``attribute_names`` order), ``diameter_mm`` and ``malignancy_probability`` (number or null).
``checksums.json``
    SHA-256 of each of the three files above. :func:`read_index` verifies every checksum before
    parsing anything, so hnswlib never reads bytes that were not written by ``save``. This
    detects corruption and accidental edits, not a deliberate forgery that also rewrites
    ``checksums.json``.

Any other file in the directory is ignored (with a warning): it cannot influence what is loaded,
because only the four files above are read, and refusing would break on harmless debris such
as editor backups or a README placed next to the index.

Atomic replacement and hashing go through :mod:`nodule_edge._files` (``staged_folder``,
``sha256_file``); the writers here only fill the staging directory and make each file durable.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from nodule_edge._files import sha256_file
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import IndexError_, OutputError
from nodule_edge.index.vectors import vector_dim

__all__ = [
    "CHECKSUMS_FILE",
    "ENTRIES_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "VECTORS_FILE",
    "StoredIndex",
    "entries_payload",
    "read_index",
    "write_checksums",
    "write_data_files",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "nodule-edge-similar-nodule-index"
FORMAT_VERSION = 1

INDEX_FILE = "index.bin"
VECTORS_FILE = "vectors.npy"
ENTRIES_FILE = "entries.json"
CHECKSUMS_FILE = "checksums.json"
_DATA_FILES = (INDEX_FILE, VECTORS_FILE, ENTRIES_FILE)
#: hnswlib's distance space: squared Euclidean (the index reports the square root).
_SPACE = "l2"


@dataclass(frozen=True)
class StoredIndex:
    """What :func:`read_index` found: verified, mutually consistent parts of a saved index.

    Attributes:
        meta: The parsed ``entries.json`` (kind, dim, count, params and the metadata columns).
        vectors: float32 ``[count, dim]``, equal to the vectors inside ``hnsw``.
        hnsw: The loaded ``hnswlib.Index``.
    """

    meta: dict[str, Any]
    vectors: np.ndarray
    hnsw: Any


# ---------------------------------------------------------------------- writing


def entries_payload(
    *,
    kind: str,
    dim: int,
    params: dict[str, Any],
    ids: list[str],
    labels: np.ndarray,
    attributes: np.ndarray,
    diameter_mm: np.ndarray,
    malignancy_probability: np.ndarray,
) -> dict[str, Any]:
    """The content of ``entries.json`` from the index's in-memory columns.

    Args:
        kind: Vector kind.
        dim: Vector dimension.
        params: ``M``, ``ef_construction``, ``seed`` and ``ef_search``.
        ids: Entry ids, row order.
        labels: int8 ``[count]``, -1 for unknown.
        attributes: float64 ``[count, 6]``, NaN rows for unknown.
        diameter_mm: float64 ``[count]``, NaN for unknown.
        malignancy_probability: float64 ``[count]``, NaN for unknown.

    Returns:
        A JSON-serialisable dictionary (nulls for unknown values).
    """
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "dim": dim,
        "space": _SPACE,
        "count": len(ids),
        "params": params,
        "attribute_names": list(ATTRIBUTE_NAMES),
        "ids": list(ids),
        "labels": [None if v < 0 else int(v) for v in labels.tolist()],
        "attributes": [None if np.isnan(row[0]) else row.tolist() for row in attributes],
        "diameter_mm": _nan_to_none(diameter_mm),
        "malignancy_probability": _nan_to_none(malignancy_probability),
    }


def write_data_files(folder: Path, hnsw: Any, vectors: np.ndarray, entries: dict[str, Any]) -> None:
    """Write ``index.bin``, ``vectors.npy`` and ``entries.json`` into ``folder``.

    :func:`nodule_edge._files.staged_folder` fsyncs them before the folder is swapped in.

    Args:
        folder: A staging directory (from :func:`nodule_edge._files.staged_folder`).
        hnsw: The ``hnswlib.Index``.
        vectors: float32 ``[count, dim]``.
        entries: From :func:`entries_payload`.
    """
    hnsw.save_index(str(folder / INDEX_FILE))
    with open(folder / VECTORS_FILE, "wb") as fh:
        np.save(fh, np.ascontiguousarray(vectors), allow_pickle=False)
    _write_json(folder / ENTRIES_FILE, entries)


def write_checksums(folder: Path) -> None:
    """Write ``checksums.json``: the SHA-256 of each data file already in ``folder``."""
    checksums = {name: sha256_file(folder / name) for name in _DATA_FILES}
    _write_json(folder / CHECKSUMS_FILE, {"format_version": FORMAT_VERSION, "files": checksums})


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, allow_nan=False, separators=(",", ":"))


def _check_replaceable(target: Path) -> None:
    """Refuse a target that is a file, a link or a non-empty directory without an index.

    Raises:
        OutputError: The target cannot be replaced by an index directory.
    """
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputError(f"cannot save the index to {target}: it exists and is not a directory")
    if target.is_dir():
        names = {p.name for p in target.iterdir()}
        if names and CHECKSUMS_FILE not in names and ENTRIES_FILE not in names:
            raise OutputError(
                f"refusing to replace {target}: it is a non-empty directory that does not hold a nodule-edge index"
            )


# ---------------------------------------------------------------------- reading


def read_index(root: Path) -> StoredIndex:
    """Read a saved index, verifying checksums first and then that the files agree.

    Args:
        root: The index directory.

    Returns:
        The parsed metadata, the vectors and the loaded HNSW graph.

    Raises:
        IndexError_: The directory or a file is missing, a checksum does not match, the format
            version is unknown, or the files disagree with one another (entry count, dimension,
            vectors, HNSW parameters). The message names the file.
    """
    if not root.is_dir():
        raise IndexError_(f"index directory {root} does not exist or is not a directory")
    _verify_checksums(root)
    meta = _read_entries(root / ENTRIES_FILE)
    dim, count = meta["dim"], meta["count"]

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
        raise IndexError_(f"{index_path} holds {hnsw.element_count} elements, but {ENTRIES_FILE} lists {count} entries")
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
    return StoredIndex(meta=meta, vectors=vectors, hnsw=hnsw)


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


# ---------------------------------------------------------------------- value checks


def _is_positive_int(value: object) -> bool:
    return bool(not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0)


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]  # any JSON value; float() decides, errors below
    except (TypeError, ValueError):
        return None


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]

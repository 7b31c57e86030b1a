"""The similar-nodule index: correctness against exact search, persistence, errors, threads."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import IndexError_, OutputError
from nodule_edge.index import (
    AttributeIndex,
    IndexEntry,
    evaluate_retrieval,
    exact_search,
    vector_for,
)

FILES = ("index.bin", "vectors.npy", "entries.json", "checksums.json")


def _entries(rng: np.random.Generator, n: int, start: int = 0) -> list[IndexEntry]:
    ratings = rng.uniform(1.0, 5.0, size=(n, 6))
    return [
        IndexEntry(
            id=f"n{start + i}",
            label=None if i % 7 == 3 else int(rng.integers(0, 2)),
            attributes=ratings[i].tolist(),
            diameter_mm=float(rng.uniform(3, 30)) if i % 5 else None,
            malignancy_probability=float(rng.uniform(0, 1)),
        )
        for i in range(n)
    ]


def _built(n: int = 600, seed: int = 0, kind: str = "attributes") -> AttributeIndex:
    rng = np.random.default_rng(seed)
    index = AttributeIndex.create(kind, capacity=64, seed=7)
    index.add(_entries(rng, n))
    return index


def _ids(results) -> list[list[str]]:
    return [[n.id for n in row] for row in results]


def _rewrite_checksums(root: Path) -> None:
    payload = json.loads((root / "checksums.json").read_text())
    for name in payload["files"]:
        payload["files"][name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    (root / "checksums.json").write_text(json.dumps(payload))


# ---------------------------------------------------------------------- vectors


def test_vector_for_attributes_keeps_the_rating_scale_in_name_order() -> None:
    ratings = {name: float(i + 1) for i, name in enumerate(ATTRIBUTE_NAMES[:5])}
    ratings["malignancy"] = 4.5
    vector = vector_for("attributes", ratings)
    assert vector.dtype == np.float32
    np.testing.assert_array_equal(vector, [1, 2, 3, 4, 5, 4.5])
    np.testing.assert_array_equal(vector_for("attributes", [1, 2, 3, 4, 5, 4.5]), vector)


def test_vector_for_machine_expert_scales_the_rating_to_unit() -> None:
    vector = vector_for("machine_expert", [3, 3, 3, 3, 3, 4.0], malignancy_probability=0.9)
    np.testing.assert_allclose(vector, [0.9, 0.75])
    np.testing.assert_allclose(vector_for("machine_expert", [1] * 6, 0.0), [0.0, 0.0])
    np.testing.assert_allclose(vector_for("machine_expert", [5] * 6, 1.0), [1.0, 1.0])


@pytest.mark.parametrize(
    ("kind", "attributes", "probability", "message"),
    [
        ("embedding", [3] * 6, None, "unknown index vector kind"),
        ("attributes", [3] * 5, None, "6 ratings"),
        ("attributes", [3, 3, 3, 3, 3, 6], None, "within 1–5"),
        ("attributes", [3, 3, 3, 3, 3, float("nan")], None, "within 1–5"),
        ("attributes", {"subtlety": 3}, None, "exactly the keys"),
        ("machine_expert", [3] * 6, None, "needs a malignancy_probability"),
        ("machine_expert", [3] * 6, 1.5, "within \\[0, 1\\]"),
    ],
)
def test_vector_for_rejects_bad_input(kind, attributes, probability, message) -> None:
    with pytest.raises(IndexError_, match=message):
        vector_for(kind, attributes, probability)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label": 2}, "label must be 0, 1 or None"),
        ({"label": True}, "label must be 0, 1 or None"),
        ({"diameter_mm": -1.0}, "diameter_mm"),
        ({"malignancy_probability": 1.2}, "malignancy_probability"),
        ({"attributes": [3] * 7}, "'bad'.*6 ratings"),
    ],
)
def test_index_entry_validates_metadata(kwargs, message) -> None:
    with pytest.raises(IndexError_, match=message):
        IndexEntry(id="bad", **kwargs)


def test_add_without_vectors_names_the_entry_missing_a_probability() -> None:
    entries = [
        IndexEntry("a", attributes=[3] * 6, malignancy_probability=0.2),
        IndexEntry("b", attributes=[3] * 6),
    ]
    index = AttributeIndex.create("machine_expert")
    with pytest.raises(IndexError_, match="'b'"):
        index.add(entries)
    assert len(index) == 0  # all or nothing
    index.add(entries[:1])
    np.testing.assert_allclose(index.vectors, [[0.2, 0.5]])


# ---------------------------------------------------------------------- exact search


def test_exact_search_matches_a_full_sort() -> None:
    rng = np.random.default_rng(1)
    db = rng.normal(size=(300, 6))
    queries = rng.normal(size=(17, 6))
    indices, distances = exact_search(db, queries, k=12)
    full = np.linalg.norm(queries[:, None, :] - db[None, :, :], axis=2)
    np.testing.assert_array_equal(indices, np.argsort(full, axis=1, kind="stable")[:, :12])
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :12], rtol=1e-12)
    assert exact_search(db[:5], queries, k=12)[0].shape == (17, 5)


# ---------------------------------------------------------------------- add / query


def test_query_matches_exact_search_with_euclidean_distances() -> None:
    rng = np.random.default_rng(2)
    entries = _entries(rng, 2000)
    vectors = np.stack([vector_for("attributes", e.attributes) for e in entries])
    index = AttributeIndex.create("attributes", seed=3)
    index.add(entries, vectors)
    queries = rng.uniform(1, 5, size=(40, 6)).astype(np.float32)
    results = index.query(queries, k=20)
    exact_idx, exact_dist = exact_search(vectors, queries, 20)
    for row, neighbours in enumerate(results):
        assert len(neighbours) == 20
        assert [n.id for n in neighbours] == [entries[i].id for i in exact_idx[row]]
        np.testing.assert_allclose([n.distance for n in neighbours], exact_dist[row], rtol=1e-5)
    first = results[0][0]
    source = entries[int(first.id[1:])]
    assert first.label == source.label
    assert first.attributes == pytest.approx(source.attributes)
    assert first.diameter_mm == source.diameter_mm


def test_distances_are_euclidean_not_squared() -> None:
    index = AttributeIndex.create("attributes")
    vectors = np.array([[1] * 6, [4, 5, 1, 1, 1, 1]])  # 3-4-5 triangle: squared would be 25
    index.add([IndexEntry("origin", 0), IndexEntry("far", 1)], vectors)
    (neighbours,) = index.query(np.array([1.0] * 6), k=2)
    assert [n.id for n in neighbours] == ["origin", "far"]
    assert [n.distance for n in neighbours] == [0.0, pytest.approx(5.0)]


def test_hnsw_recall_against_exact_is_at_least_95_percent() -> None:
    rng = np.random.default_rng(4)
    vectors = rng.uniform(1, 5, size=(5000, 6)).astype(np.float32)
    index = AttributeIndex.create("attributes", seed=5)
    index.add([IndexEntry(f"r{i}") for i in range(len(vectors))], vectors)
    queries = rng.uniform(1, 5, size=(200, 6)).astype(np.float32)
    found = index.query(queries, k=20)
    exact_idx, _ = exact_search(vectors, queries, 20)
    hits = sum(len({n.id for n in row} & {f"r{i}" for i in truth}) for row, truth in zip(found, exact_idx, strict=True))
    assert hits / exact_idx.size >= 0.95


def test_exclude_ids_never_returns_the_excluded_and_still_fills_k() -> None:
    index = _built()
    own = index.vectors[10]
    (with_self,) = index.query(own, k=5)
    assert with_self[0].id == "n10" and with_self[0].distance == 0.0
    (without,) = index.query(own, k=5, exclude_ids={"n10", "not-in-index"})
    assert "n10" not in [n.id for n in without]
    assert [n.id for n in without] == [n.id for n in with_self[1:]] + [without[-1].id]
    assert len(without) == 5
    with pytest.raises(IndexError_, match="not a single string"):
        index.query(own, k=5, exclude_ids="n10")


def test_k_larger_than_index_returns_everything_and_exclusions_shrink_it() -> None:
    index = _built(n=6)
    (everything,) = index.query(index.vectors[0], k=20)
    assert sorted(n.id for n in everything) == [f"n{i}" for i in range(6)]
    (rest,) = index.query(index.vectors[0], k=20, exclude_ids={"n0", "n1"})
    assert sorted(n.id for n in rest) == [f"n{i}" for i in range(2, 6)]


def test_incremental_add_across_resize() -> None:
    rng = np.random.default_rng(6)
    index = AttributeIndex.create("attributes", capacity=10)
    first, second = _entries(rng, 8), _entries(rng, 25, start=8)
    index.add(first)
    index.add(second)
    assert len(index) == 33 and index.capacity >= 33
    vectors = np.stack([vector_for("attributes", e.attributes) for e in first + second])
    np.testing.assert_array_equal(index.vectors, vectors)
    queries = rng.uniform(1, 5, size=(10, 6))
    exact_idx, _ = exact_search(vectors, queries, 20)
    assert _ids(index.query(queries, k=20)) == [[f"n{i}" for i in row] for row in exact_idx]


def test_duplicate_ids_are_rejected_naming_the_id_and_leave_the_index_unchanged() -> None:
    index = _built(n=20)
    with pytest.raises(IndexError_, match="'n3' is already in the index"):
        index.add([IndexEntry("new", attributes=[2] * 6), IndexEntry("n3", attributes=[2] * 6)])
    with pytest.raises(IndexError_, match="duplicate index entry id 'x'"):
        index.add([IndexEntry("x", attributes=[2] * 6), IndexEntry("x", attributes=[2] * 6)])
    assert len(index) == 20 and "new" not in index


def test_add_rejects_vectors_that_do_not_fit() -> None:
    index = AttributeIndex.create("attributes")
    entry = IndexEntry("a")
    with pytest.raises(IndexError_, match=r"shape \[N, 6\]"):
        index.add([entry], np.ones((1, 2)))
    with pytest.raises(IndexError_, match="1 entries but 2 vectors"):
        index.add([entry], np.ones((2, 6)))
    with pytest.raises(IndexError_, match="non-finite"):
        index.add([entry], np.full((1, 6), np.nan))
    with pytest.raises(IndexError_, match="non-finite"):
        index.add([entry], np.full((1, 6), 1e300))
    assert len(index) == 0


def test_query_rejects_wrong_dimension_non_finite_and_bad_k() -> None:
    index = _built(n=30)
    with pytest.raises(IndexError_, match=r"shape \[N, 6\].*got \(1, 2\)"):
        index.query(np.ones((1, 2)))
    with pytest.raises(IndexError_, match="non-finite"):
        index.query(np.array([[np.nan] * 6]))
    with pytest.raises(IndexError_, match="k must be a positive integer"):
        index.query(np.ones(6) * 3, k=0)


def test_empty_index_answers_with_empty_lists() -> None:
    index = AttributeIndex.create("machine_expert")
    assert index.query(np.zeros((3, 2))) == [[], [], []]
    assert AttributeIndex.retrieval_score([]) is None
    with pytest.raises(IndexError_, match="shape"):
        index.query(np.zeros((1, 6)))


def test_retrieval_score_is_the_mean_of_known_labels() -> None:
    index = AttributeIndex.create("machine_expert")
    vectors = np.array([[0.1, 0.1], [0.11, 0.1], [0.12, 0.1], [0.13, 0.1], [0.9, 0.9]])
    labels = [1, 0, None, 1, 0]
    index.add([IndexEntry(f"m{i}", label) for i, label in enumerate(labels)], vectors)
    (near,) = index.query(np.array([0.1, 0.1]), k=4)
    assert [n.label for n in near] == [1, 0, None, 1]
    assert index.retrieval_score(near) == pytest.approx(2 / 3)
    (unknown,) = index.query(np.array([0.12, 0.1]), k=1)
    assert index.retrieval_score(unknown) is None


# ---------------------------------------------------------------------- persistence


def test_save_load_round_trip_gives_identical_results(tmp_path: Path) -> None:
    index = _built(kind="machine_expert")
    queries = np.random.default_rng(8).uniform(0, 1, size=(25, 2))
    before = index.query(queries, k=20, exclude_ids={"n1"})
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary directory left over
    loaded = AttributeIndex.load(tmp_path / "idx")
    assert (loaded.kind, len(loaded), loaded.ids) == (index.kind, len(index), index.ids)
    assert loaded.query(queries, k=20, exclude_ids={"n1"}) == before
    loaded.add([IndexEntry("late", 1, [3] * 6, None, 0.5)])
    assert loaded.query(np.array([0.5, 0.5]), k=1)[0][0].id == "late"


def test_empty_index_round_trips(tmp_path: Path) -> None:
    AttributeIndex.create("attributes").save(tmp_path / "empty")
    loaded = AttributeIndex.load(tmp_path / "empty")
    assert len(loaded) == 0 and loaded.query(np.ones(6)) == [[]]


def test_save_replaces_an_existing_index_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "idx"
    _built(n=10).save(target)
    _built(n=40, seed=1).save(target)
    assert len(AttributeIndex.load(target)) == 40
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_save_refuses_a_directory_that_is_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="refusing to replace"):
        _built(n=5).save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        _built(n=5).save(tmp_path / "file")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    root = tmp_path / "idx"
    _built(n=200).save(root)
    return root


@pytest.mark.parametrize("name", FILES)
def test_a_tampered_byte_in_any_file_is_detected(saved: Path, name: str) -> None:
    path = saved / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IndexError_, match=name.replace(".", r"\.")):
        AttributeIndex.load(saved)


@pytest.mark.parametrize("name", FILES)
def test_a_missing_file_is_named(saved: Path, name: str) -> None:
    (saved / name).unlink()
    with pytest.raises(IndexError_, match=rf"missing: .*{name.replace('.', '[.]')}"):
        AttributeIndex.load(saved)


def test_a_truncated_index_file_is_detected(saved: Path) -> None:
    path = saved / "index.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IndexError_, match=r"checksum mismatch for .*index\.bin"):
        AttributeIndex.load(saved)


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(IndexError_, match="does not exist"):
        AttributeIndex.load(tmp_path / "nowhere")


def test_extra_files_are_ignored_with_a_warning(saved: Path, caplog) -> None:
    (saved / "README.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="nodule_edge.index.format"):
        loaded = AttributeIndex.load(saved)
    assert len(loaded) == 200
    assert "README.txt" in caplog.text


def test_consistent_checksums_do_not_hide_inconsistent_files(saved: Path) -> None:
    vectors = np.load(saved / "vectors.npy")
    vectors[0] += 0.5
    np.save(saved / "vectors.npy", vectors)
    _rewrite_checksums(saved)
    with pytest.raises(IndexError_, match="different vectors"):
        AttributeIndex.load(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(count=m["count"] - 1), "does not hold 199 values"),
        (lambda m: m.update(dim=2), "dim 2"),
        (lambda m: m["ids"].__setitem__(1, m["ids"][0]), "unique"),
        (lambda m: m["labels"].__setitem__(0, 3), "labels must be 0, 1 or null"),
        (lambda m: m["attributes"].__setitem__(0, [9] * 6), "within 1–5"),
    ],
)
def test_inconsistent_entries_are_refused(saved: Path, edit, message) -> None:
    meta = json.loads((saved / "entries.json").read_text())
    edit(meta)
    (saved / "entries.json").write_text(json.dumps(meta))
    _rewrite_checksums(saved)
    with pytest.raises(IndexError_, match=message):
        AttributeIndex.load(saved)


def test_entry_count_must_match_the_graph(saved: Path) -> None:
    meta = json.loads((saved / "entries.json").read_text())
    for column in ("ids", "labels", "attributes", "diameter_mm", "malignancy_probability"):
        meta[column] = meta[column][:-1]
    meta["count"] -= 1
    (saved / "entries.json").write_text(json.dumps(meta))
    np.save(saved / "vectors.npy", np.load(saved / "vectors.npy")[:-1])
    _rewrite_checksums(saved)
    with pytest.raises(IndexError_, match=r"index\.bin holds 200 elements"):
        AttributeIndex.load(saved)


# ---------------------------------------------------------------------- threads


def test_eight_threads_querying_match_serial_results() -> None:
    index = _built(n=3000)
    rng = np.random.default_rng(9)
    queries = rng.uniform(1, 5, size=(8, 30, 6)).astype(np.float32)
    serial = [_ids(index.query(q, k=20)) for q in queries]
    results: list[list[list[str]] | None] = [None] * 8
    barrier = threading.Barrier(8)

    def work(slot: int) -> None:
        barrier.wait()
        collected = []
        for _ in range(5):
            # one query at a time so the threads interleave inside hnswlib
            collected = [_ids(index.query(q, k=20))[0] for q in queries[slot]]
        results[slot] = collected

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_queries_during_adds_see_a_consistent_index() -> None:
    rng = np.random.default_rng(10)
    index = AttributeIndex.create("attributes", capacity=8)
    index.add(_entries(rng, 50))
    batches = [_entries(rng, 50, start=50 * (i + 1)) for i in range(10)]
    errors: list[BaseException] = []
    done = threading.Event()

    def reader(seed: int) -> None:
        local = np.random.default_rng(seed)  # Generators are not thread-safe
        try:
            while not done.is_set():
                for row in index.query(local.uniform(1, 5, size=(4, 6)), k=20):
                    assert len(row) == 20 and all(n.id in index for n in row)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in readers:
        t.start()
    for batch in batches:
        index.add(batch)
    done.set()
    for t in readers:
        t.join()
    assert errors == [] and len(index) == 550


# ---------------------------------------------------------------------- evaluation


def test_evaluate_retrieval_separates_separable_clusters_and_excludes_groups() -> None:
    rng = np.random.default_rng(12)
    benign = rng.normal([0.2, 0.2], 0.05, size=(40, 2))
    malignant = rng.normal([0.8, 0.8], 0.05, size=(40, 2))
    vectors = np.clip(np.vstack([benign, malignant]), 0, 1)
    labels = [0] * 40 + [1] * 40
    ids = [f"e{i}" for i in range(80)]
    result = evaluate_retrieval("machine_expert", vectors, labels, ids, k=10)
    assert (result.n_evaluated, result.n_positive, result.n_negative) == (80, 40, 40)
    assert result.auc == 1.0 and result.accuracy == 1.0

    # Each "patient" holds one benign and one malignant nodule at the same place: excluding only
    # the nodule itself lets the other one vote, excluding the patient does not.
    twins = np.repeat(rng.uniform(0, 1, size=(30, 2)), 2, axis=0)
    twin_labels = [0, 1] * 30
    twin_ids = [f"t{i}" for i in range(60)]
    patients = [f"p{i // 2}" for i in range(60)]
    by_nodule = evaluate_retrieval("machine_expert", twins, twin_labels, twin_ids, k=1)
    by_patient = evaluate_retrieval("machine_expert", twins, twin_labels, twin_ids, k=1, groups=patients)
    assert by_nodule.auc == 0.0  # the twin always has the opposite label
    assert by_patient.auc != 0.0


@pytest.mark.realdata
def test_attribute_retrieval_on_lidc_reader_means(lidc_voi_dir: Path) -> None:
    with open(lidc_voi_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if float(r["malignancy_mean"]) != 3.0]
    vectors = np.array([[float(r[f"{a}_mean"]) for a in ATTRIBUTE_NAMES] for r in rows])
    labels = [int(float(r["malignancy_mean"]) > 3.0) for r in rows]
    result = evaluate_retrieval(
        "attributes",
        vectors,
        labels,
        [r["voi_id"] for r in rows],
        k=20,
        groups=[r["patient_id"] for r in rows],
    )
    assert result.n_evaluated == len(rows) == 581
    # The vector holds the malignancy rating the label is derived from, so this is an upper
    # bound, not a diagnostic accuracy; it still fails if retrieval or scoring breaks.
    assert result.auc is not None and result.auc > 0.95

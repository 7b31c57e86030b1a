"""Similar-nodule index: single-query latency (k = 20) of HNSW against exact numpy search.

Sizes: 1k and 100k six-dimensional attribute vectors by default; set ``NODULE_EDGE_BENCH_FULL=1``
to add 1M (its build takes minutes). Each size is built once per session, saved under a
session-scoped temporary directory and reloaded from there if pytest needs it again; the build,
save and load times are attached to every benchmark of that size as ``extra_info``.

Run: ``pytest benches/bench_index.py --benchmark-columns=min,median,mean,stddev,rounds``
(add ``--benchmark-json=out.json`` to keep the build times, or ``-o log_cli=true
--log-cli-level=INFO`` to see them).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nodule_edge.index import AttributeIndex, IndexEntry, exact_search

logger = logging.getLogger(__name__)

FULL = os.environ.get("NODULE_EDGE_BENCH_FULL") == "1"
SIZES = [1_000, 100_000, *([1_000_000] if FULL else [])]
K = 20
N_QUERIES = 1024


@dataclass
class Built:
    """One benchmarked database."""

    index: AttributeIndex
    vectors: np.ndarray
    queries: np.ndarray
    info: dict[str, float | int | bool]


def _database(n: int) -> tuple[np.ndarray, np.ndarray, list[IndexEntry]]:
    rng = np.random.default_rng(n)
    vectors = rng.uniform(1.0, 5.0, size=(n, 6)).astype(np.float32)
    queries = rng.uniform(1.0, 5.0, size=(N_QUERIES, 6)).astype(np.float32)
    labels = rng.integers(0, 2, size=n).tolist()
    entries = [IndexEntry(id=f"b{i}", label=labels[i]) for i in range(n)]
    return vectors, queries, entries


@pytest.fixture(scope="session")
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where built indexes are kept for the rest of the session."""
    return tmp_path_factory.mktemp("index-cache")


@pytest.fixture(scope="session", params=SIZES, ids=lambda n: f"n={n}")
def built(request: pytest.FixtureRequest, index_cache: Path) -> Built:
    """The index of one size: built and saved on first use, loaded from the cache afterwards."""
    n = request.param
    vectors, queries, entries = _database(n)
    directory = index_cache / f"attributes-{n}"
    info: dict[str, float | int | bool] = {"n": n, "k": K, "from_cache": directory.exists()}
    if directory.exists():
        start = time.perf_counter()
        index = AttributeIndex.load(directory)
        info["load_s"] = time.perf_counter() - start
    else:
        index = AttributeIndex.create("attributes", capacity=n, seed=1)
        start = time.perf_counter()
        index.add(entries, vectors, num_threads=-1)
        info["build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        index.save(directory)
        info["save_s"] = time.perf_counter() - start
        start = time.perf_counter()
        AttributeIndex.load(directory)
        info["load_s"] = time.perf_counter() - start
    logger.info("index n=%d: %s", n, info)
    return Built(index=index, vectors=vectors, queries=queries, info=info)


def _cycling(queries: np.ndarray, call: Callable[[np.ndarray], object]) -> Callable[[], object]:
    # A different query each round, so no round is served from a warm cache of the last one.
    rows = itertools.cycle(range(len(queries)))

    def run() -> object:
        return call(queries[next(rows)][None, :])

    return run


def test_hnsw_query_latency(benchmark, built: Built) -> None:
    """AttributeIndex.query: one vector, k = 20, Neighbour objects included."""
    benchmark.extra_info.update(built.info)
    result = benchmark.pedantic(
        _cycling(built.queries, lambda q: built.index.query(q, k=K)),
        warmup_rounds=200,
        rounds=3000,
    )
    assert len(result[0]) == K


def test_exact_numpy_query_latency(benchmark, built: Built) -> None:
    """exact_search (float64 brute force): one vector, k = 20, same database."""
    benchmark.extra_info.update(built.info)
    n = len(built.vectors)
    rounds = int(np.clip(20_000_000 // n, 20, 3000))
    result = benchmark.pedantic(
        _cycling(built.queries, lambda q: exact_search(built.vectors, q, K)),
        warmup_rounds=max(2, rounds // 10),
        rounds=rounds,
    )
    assert result[0].shape == (1, K)

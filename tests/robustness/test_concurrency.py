"""One NoduleInferer shared by 8 threads gives exactly the serial results.

Two runs: the real ONNX engine (fewer calls: each costs a model run on a busy CPU), and the
stand-in engine for many calls, which stresses the parts that are pure Python and C extensions
(study reading, patch building, index queries with and without exclusions).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

THREADS = 8

# (voxels, worlds, exclude_ids): single points, a world point, a two-point batch, exclusions.
CALLS = [
    ([(62, 90, 24)], [], None),
    ([(100, 80, 20)], [], {"SYN-0000_R_1"}),
    ([], [(43.4, 63.0, 30.0)], None),
    ([(62, 90, 24), (80, 100, 30)], [], {"SYN-0001_R_1", "SYN-0002_R_1"}),
    ([(120, 60, 10)], [], {"SYN-0003_R_1", "SYN-0004_R_1", "SYN-0005_R_1"}),
]


def _snapshot(result) -> list[dict]:
    out = []
    for n in result.nodules:
        p = n.prediction
        out.append(
            {
                "xyz": n.xyz_voxel,
                "world": n.world_lps_mm,
                "slice": n.center_slice,
                "prob": p.malignancy_probability,
                "attributes": dict(p.attributes),
                "attention": (p.nodule_attention, p.background_attention, p.trustworthy),
                "similar": [(s.id, s.distance) for s in p.similar],
                "score": p.retrieval_score,
                "measures": (n.volume_mm3, n.longest_axial_diameter_mm),
                "patch": n.patch.copy(),
                "segmentation": p.segmentation.copy(),
                "saliency": p.saliency.copy(),
                "embedding": p.embedding.copy(),
            }
        )
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            if isinstance(x[key], np.ndarray):
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            else:
                assert x[key] == y[key], key


def _run_threaded(inferer, study, calls_per_thread: int) -> list[tuple[int, list[dict]]]:
    start = threading.Barrier(THREADS)

    def worker(t: int) -> list[tuple[int, list[dict]]]:
        start.wait()
        done = []
        for i in range(calls_per_thread):
            c = (t + i) % len(CALLS)
            voxels, worlds, exclude = CALLS[c]
            done.append((c, _snapshot(inferer.infer(study, voxels=voxels, worlds=worlds, exclude_ids=exclude))))
        return done

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(worker, t) for t in range(THREADS)]
        return [item for f in futures for item in f.result()]


@pytest.mark.parametrize("engine", ["real", "fake"])
def test_threads_equal_serial(engine, real_inferer, fake_inferer, demo_study):
    inferer = real_inferer if engine == "real" else fake_inferer
    folder, _ = demo_study
    # A shared opened study (immutable) and a path (each call opens its own) both occur in practice.
    study = inferer.open(folder)
    serial = [_snapshot(inferer.infer(folder, voxels=v, worlds=w, exclude_ids=e)) for v, w, e in CALLS]
    per_thread = 2 if engine == "real" else 6
    results = _run_threaded(inferer, study, per_thread)
    assert len(results) == THREADS * per_thread
    assert {c for c, _ in results} == set(range(len(CALLS)))
    for c, snap in results:
        _assert_same(snap, serial[c])
    if engine == "fake":
        results = _run_threaded(inferer, folder, 2)
        for c, snap in results:
            _assert_same(snap, serial[c])


def test_exclusions_do_not_leak_between_threads(fake_inferer, demo_study):
    """Concurrent calls with different exclude_ids each see exactly their own exclusions."""
    folder, voxel = demo_study
    study = fake_inferer.open(folder)
    ids = sorted(fake_inferer.index.ids)
    start = threading.Barrier(THREADS)

    def worker(t: int) -> list[tuple[set[str], list[str]]]:
        start.wait()
        out = []
        for i in range(10):
            excluded = {ids[(t + i) % len(ids)], ids[(t * 3 + i) % len(ids)]}
            similar = fake_inferer.infer(study, voxels=[voxel], exclude_ids=excluded).nodules[0].prediction.similar
            out.append((excluded, [s.id for s in similar]))
        return out

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for f in [pool.submit(worker, t) for t in range(THREADS)] for r in f.result()]
    for excluded, similar in results:
        assert not excluded & set(similar)
        assert len(similar) == min(fake_inferer.top_k, len(ids) - len(excluded))

"""Time the runtime's box step (nodule_extent + bound_to_nodule) against an earlier patch.py.

On first-pass segmentations of every 7th LIDC VOI (the shipped bundle's ``cpu-fast`` segmentation
pass) and their cubes, min of five rounds. Checks the two give identical boxes and cubes first.

Run from the repository root::

    git show 8088d0c:nodule_edge/patch.py > /tmp/patch_before.py
    .venv/bin/python docs/measurements/bound_timing.py /tmp/patch_before.py
"""

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from nodule_edge import patch as current
from nodule_edge.runtime import load_bundle
from nodule_edge.runtime.engines import create_engine
from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

loader = importlib.util.spec_from_file_location("patch_before", sys.argv[1])
before = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
sys.modules["patch_before"] = before
loader.loader.exec_module(before)  # type: ignore[union-attr]
records = read_unsure_manifest(Path(sys.argv[2]) if len(sys.argv) > 2 else Path("../shared/data/lidc_voi"))
cache = build_patch_cache(records, cache_dir="cache")
engine = create_engine(load_bundle(), "cpu-fast")
spec = engine.metadata.patch_spec
cubes = [np.asarray(cache.images[i : i + 1], np.float32) for i in range(0, len(records), 7)]
segs = [engine.segment(x)[0] for x in cubes]
for x, s in zip(cubes, segs, strict=True):
    a, fa = before.bound_to_nodule(x[0], s, spec)
    b, fb = current.bound_to_nodule(x[0], s, spec)
    if fa != fb or not np.array_equal(a, b):
        raise SystemExit("the two versions bound a cube differently")
times: dict[str, list[float]] = {"before": [], "now": []}
for _ in range(5):
    for name, module in (("before", before), ("now", current)):
        t0 = time.perf_counter()
        for x, s in zip(cubes, segs, strict=True):
            module.bound_to_nodule(x[0], s, spec)
        times[name].append((time.perf_counter() - t0) / len(cubes))
print(f"{len(cubes)} first-pass segmentations, identical boxes and cubes")
for name, t in times.items():
    print(f"{name:7s} {1e3 * min(t):.2f} ms per nodule")

"""Labelling the first pass's segmentation: this checkout's connected components against an older one.

The runtime draws the nodule's box from the connected component at the centre of the first pass's
segmentation (``nodule_edge.patch.nodule_extent``, 26-connectivity). This runs the shipped bundle's
``cpu-fast`` first pass on every 7th LIDC VOI (97 cubes), thresholds at the box threshold, and
times ``connected_components`` from this checkout against the same function at a git revision, in
alternating rounds; it also checks that both give the same labels.

Run from the repository root (training paused, nothing else running)::

    git show 8a748c0:nodule_edge/components.py > /tmp/components_before.py
    .venv/bin/python docs/measurements/components_timing.py /tmp/components_before.py
"""

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from nodule_edge.components import connected_components
from nodule_edge.runtime import load_bundle
from nodule_edge.runtime.engines import create_engine
from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

spec_file = importlib.util.spec_from_file_location("components_before", sys.argv[1])
before = importlib.util.module_from_spec(spec_file)  # type: ignore[arg-type]
spec_file.loader.exec_module(before)  # type: ignore[union-attr]
records = read_unsure_manifest(Path("../shared/data/lidc_voi"))
cache = build_patch_cache(records, cache_dir="cache")
engine = create_engine(load_bundle(), "cpu-fast")
threshold = engine.metadata.patch_spec.nodule_box.threshold
masks = [
    engine.segment(np.asarray(cache.images[i : i + 1], np.float32))[0] >= threshold for i in range(0, len(records), 7)
]
largest = sorted(range(len(masks)), key=lambda i: int(masks[i].sum()))[-5:]
for m in masks:
    np.testing.assert_array_equal(
        connected_components(m, fully_connected=True), before.connected_components(m, fully_connected=True)
    )
print(f"{len(masks)} masks, labels identical; foreground voxels median {int(np.median([m.sum() for m in masks]))}")
for _ in range(2):
    for name, label in (("before", before.connected_components), ("now", connected_components)):
        ms = []
        for m in masks:
            t0 = time.perf_counter()
            label(m, fully_connected=True)
            ms.append(1e3 * (time.perf_counter() - t0))
        ms_a = np.array(ms)
        print(
            f"{name:7s} median {np.median(ms_a):.2f} ms, mean {ms_a.mean():.2f} ms, five largest mean {ms_a[largest].mean():.1f} ms"
        )

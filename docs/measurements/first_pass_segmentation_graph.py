"""What the runtime's segmentation-graph first pass changes, on every LIDC VOI (README, Performance).

The runtime's first pass only draws the nodule's box. ``cpu-fast`` runs it on the exported graph
cut to its ``segmentation`` output (:meth:`nodule_edge.runtime.engines.Engine.segment`); the cut
is compiled separately in bf16, so its rounding can differ from the full graph's. This runs the
shipped bundle's ``cpu-fast`` engine over all VOIs (whole cubes, as ``benches/cpu_engines.py``
reads them) both ways and reports how many boxes differ and how far the answers move. It also
times the two paths on the same engine in interleaved rounds, beside one pass of the 0.1 model
(the whole-cube model that issue 11's latency allowance is measured against: at most 25 % more
than its batch-1 latency), compiled the same way.

Run from the repository root::

    git show 72580b0:nodule_edge/assets/bundle/model.onnx > /tmp/model_0.1.onnx
    .venv/bin/python docs/measurements/first_pass_segmentation_graph.py ../shared/data/lidc_voi /tmp/model_0.1.onnx
"""

import sys
import time
from pathlib import Path

import numpy as np

from nodule_edge.patch import nodule_extent, run_nodule_bounded
from nodule_edge.runtime import load_bundle
from nodule_edge.runtime.engines import create_engine
from nodule_edge.runtime.engines.openvino import CpuFastEngine
from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

voi_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/lidc_voi")
old_model = CpuFastEngine(Path(sys.argv[2]), "cpu-fast") if len(sys.argv) > 2 else None
records = read_unsure_manifest(voi_dir)
cache = build_patch_cache(records, cache_dir="cache")
engine = create_engine(load_bundle(), "cpu-fast")
spec = engine.metadata.patch_spec
threshold = spec.nodule_box.threshold
boxes_differ = 0
found_differ = 0
dp, dr = [], []
for i in range(len(records)):
    x = np.asarray(cache.images[i : i + 1], np.float32)
    cut, full = engine.segment(x)[0], engine.run(x)["segmentation"][0]
    a, b = nodule_extent(cut, threshold), nodule_extent(full, threshold)
    if (a is None) != (b is None):
        found_differ += 1
    elif a is not None and b is not None and not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])):
        boxes_differ += 1
    new, _ = run_nodule_bounded(engine.run, x, spec, segment=engine.segment)
    old, _ = run_nodule_bounded(engine.run, x, spec)
    dp.append(abs(float(new["malignancy_probability"][0]) - float(old["malignancy_probability"][0])))
    dr.append(float(np.abs(new["attributes"] - old["attributes"]).max()))
dp_a, dr_a = np.array(dp), np.array(dr)
print(f"{len(records)} VOIs: boxes differ {boxes_differ}, nodule found by one pass only {found_differ}")
print(f"|Δp|: max {dp_a.max():.4f}, mean {dp_a.mean():.5f}, >0.01 for {(dp_a > 0.01).sum()}")
print(f"max |Δ rating|: max {dr_a.max():.3f}, mean {dr_a.mean():.4f}")

# Ten nodules spread over the list (sizes as they come); each round runs every path on all ten.
sample = [np.asarray(cache.images[i : i + 1], np.float32) for i in range(0, len(records), len(records) // 10)][:10]
calls = {
    "one pass": lambda x: engine.run(x),
    "two passes, segmentation graph first": lambda x: run_nodule_bounded(engine.run, x, spec, segment=engine.segment),
    "two passes, full first": lambda x: run_nodule_bounded(engine.run, x, spec),
}
if old_model is not None:
    calls["0.1 model, one pass"] = lambda x: old_model.run(x)
times: dict[str, list[float]] = {name: [] for name in calls}
for call in calls.values():
    call(sample[0])
for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 7):
    for name, call in calls.items():
        t0 = time.perf_counter()
        for x in sample:
            call(x)
        times[name].append((time.perf_counter() - t0) / len(sample))
base = float(np.median(times["one pass"]))
for name, t in times.items():
    line = f"{name:38s} {1e3 * np.median(t):6.1f} ms per nodule  {np.median(t) / base:.2f}× one pass"
    if old_model is not None:
        line += f"  {np.median(t) / np.median(times['0.1 model, one pass']):.2f}× the 0.1 model's pass"
    print(line)

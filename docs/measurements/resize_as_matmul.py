"""What the export's trilinear-resize rewrite changes, on every LIDC VOI (README, Performance).

``nodule_edge.export.graph_rewrites.trilinear_resize_as_matmul`` replaces the graph's two
trilinear ``Resize`` nodes (the decoder's 16³ → 32³, the Grad-CAM's 16³ → 64³) by interpolation
matrices. This applies it to the shipped bundle's ``model.onnx`` (a temporary copy), runs both on
``cpu-fast`` along the runtime path (segmentation graph first, then the bounded cube) over all
VOIs, and reports how far the answers move; then times one pass and the runtime path of both in
interleaved rounds beside one pass of the 0.1 model (issue 11's latency reference).

Run from the repository root::

    git show 72580b0:nodule_edge/assets/bundle/model.onnx > /tmp/model_0.1.onnx
    .venv/bin/python docs/measurements/resize_as_matmul.py ../shared/data/lidc_voi /tmp/model_0.1.onnx
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from nodule_edge.export.graph_rewrites import trilinear_resize_as_matmul
from nodule_edge.patch import nodule_extent, run_nodule_bounded
from nodule_edge.runtime import load_bundle
from nodule_edge.runtime.engines.openvino import CpuFastEngine
from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

voi_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/lidc_voi")
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
records = read_unsure_manifest(voi_dir)
cache = build_patch_cache(records, cache_dir="cache")
shipped = load_bundle().path("onnx_fp32")
with tempfile.TemporaryDirectory() as tmp:
    rewritten_path = Path(tmp) / "model.onnx"
    onnx.save(trilinear_resize_as_matmul(onnx.load(str(shipped))), str(rewritten_path))
    engines = {"Resize": CpuFastEngine(shipped, "cpu-fast"), "MatMul": CpuFastEngine(rewritten_path, "cpu-fast")}
    old_model = CpuFastEngine(Path(sys.argv[2]), "cpu-fast") if len(sys.argv) > 2 else None
    spec = engines["Resize"].metadata.patch_spec

    def path(engine: CpuFastEngine, x: np.ndarray) -> dict[str, np.ndarray]:
        return run_nodule_bounded(engine.run, x, spec, segment=engine.segment)[0]

    keys = ("malignancy_probability", "attributes", "saliency", "segmentation", "nodule_attention")
    worst = {k: [] for k in keys}
    boxes_differ = 0
    for i in range(len(records)):
        x = np.asarray(cache.images[i : i + 1], np.float32)
        a, b = (path(e, x) for e in engines.values())
        for k in keys:
            worst[k].append(float(np.abs(a[k] - b[k]).max()))
        box_a, box_b = (nodule_extent(e.segment(x)[0], spec.nodule_box.threshold) for e in engines.values())
        boxes_differ += int(str(box_a) != str(box_b))
    print(f"{len(records)} VOIs, runtime path, cpu-fast: first-pass boxes differ for {boxes_differ}")
    for k, v in worst.items():
        arr = np.array(v)
        print(f"  max |Δ {k}|: max {arr.max():.4f}, mean {arr.mean():.5f}")

    sample = [np.asarray(cache.images[i : i + 1], np.float32) for i in range(0, len(records), len(records) // 10)][:10]
    calls = {}
    for name, engine in engines.items():
        calls[f"one pass ({name})"] = engine.run
        calls[f"runtime path ({name})"] = lambda x, e=engine: path(e, x)
    if old_model is not None:
        calls["0.1 model, one pass"] = old_model.run
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(sample[0])
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for x in sample:
                call(x)
            times[name].append((time.perf_counter() - t0) / len(sample))
    for name, t in times.items():
        line = f"{name:28s} {1e3 * np.median(t):6.1f} ms per nodule"
        if old_model is not None:
            line += f"  {np.median(t) / np.median(times['0.1 model, one pass']):.2f}× the 0.1 model's pass"
        print(line)

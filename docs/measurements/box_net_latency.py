"""The runtime path's latency with a box net as its first pass (docs/measurements/runtime_path_latency.md).

Exports a box net checkpoint (``nodule_edge.train.first_pass``; the timing does not depend on its
weights) and the shipped bundle's model with the export's graph rewrites into a temporary folder,
loads both on ``cpu-fast`` the way a bundle with ``first_pass.onnx`` is loaded, and times in
interleaved rounds on ten VOIs spread over the list: the box net's pass, the model's
segmentation-graph pass, one full pass, the runtime path with either first pass, and one pass of
the 0.1 model (issue 11's latency reference).

Run from the repository root::

    git show 72580b0:nodule_edge/assets/bundle/model.onnx > /tmp/model_0.1.onnx
    .venv/bin/python docs/measurements/box_net_latency.py runs/shipped/fold0/box_net.safetensors /tmp/model_0.1.onnx

or, with the bundle's own ``first_pass.onnx`` instead of an exported checkpoint::

    .venv/bin/python docs/measurements/box_net_latency.py bundle /tmp/model_0.1.onnx
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from nodule_edge.export.graph_rewrites import trilinear_resize_as_matmul
from nodule_edge.export.onnx_export import export_box_net_onnx
from nodule_edge.outline import runtime_finish
from nodule_edge.patch import run_nodule_bounded
from nodule_edge.runtime import load_bundle
from nodule_edge.runtime.engines.openvino import CpuFastEngine
from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

box_net_checkpoint, old_model_path = Path(sys.argv[1]), Path(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
records = read_unsure_manifest(Path("../shared/data/lidc_voi"))
cache = build_patch_cache(records, cache_dir="cache")
bundle = load_bundle()
with tempfile.TemporaryDirectory() as tmp:
    model_path, first_path = Path(tmp) / "model.onnx", Path(tmp) / "first_pass.onnx"
    onnx.save(trilinear_resize_as_matmul(onnx.load(str(bundle.path("onnx_fp32")))), str(model_path))
    metadata = CpuFastEngine(model_path, "cpu-fast").metadata
    spec, finish = metadata.patch_spec, runtime_finish(metadata.patch_spec, metadata.outline_head)
    if str(box_net_checkpoint) == "bundle":
        first_path = bundle.path("first_pass")  # the shipped box net as exported
    else:
        export_box_net_onnx(box_net_checkpoint, first_path, spec=spec, model_version=bundle.model_version)
    with_box_net = CpuFastEngine(model_path, "cpu-fast", first_pass=first_path)
    own = CpuFastEngine(model_path, "cpu-fast")
    old = CpuFastEngine(old_model_path, "cpu-fast")
    sample = [np.asarray(cache.images[i : i + 1], np.float32) for i in range(0, len(records), len(records) // 10)][:10]
    calls = {
        "box net pass": with_box_net.segment,
        "segmentation-graph pass": own.segment,
        "one full pass": own.run,
        "runtime path, box net first": lambda x: run_nodule_bounded(
            with_box_net.run, x, spec, segment=with_box_net.segment, finish=finish
        ),
        "runtime path, own first pass": lambda x: run_nodule_bounded(
            own.run, x, spec, segment=own.segment, finish=finish
        ),
        "0.1 model, one pass": old.run,
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(sample[0])
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for x in sample:
                call(x)
            times[name].append((time.perf_counter() - t0) / len(sample))
    reference = float(np.median(times["0.1 model, one pass"]))
    for name, t in times.items():
        print(
            f"{name:30s} {1e3 * np.median(t):6.1f} ms per nodule  {np.median(t) / reference:.2f}× the 0.1 model's pass"
        )

"""What a cheaper first pass could save (issue 11, latency of the two-pass runtime).

The first pass only draws the nodule's box from its segmentation. This times, with OpenVINO on one
thread and bf16 inference precision, the shipped graph against the same graph cut to the
``segmentation`` output (``onnx.utils.Extractor``), in bf16 and from the INT8 (QDQ) file, in
interleaved rounds on one random patch.

Run from the repository root: ``.venv/bin/python docs/measurements/first_pass_variants.py [ROUNDS]``
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
from onnx.utils import Extractor

BUNDLE = Path("nodule_edge/assets/bundle")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
tmp = Path(tempfile.mkdtemp())
paths = {"full bf16": BUNDLE / "model.onnx", "full int8": BUNDLE / "model.int8.onnx"}
for name, source in (("segmentation-only bf16", "model.onnx"), ("segmentation-only int8", "model.int8.onnx")):
    cut = Extractor(onnx.load(BUNDLE / source)).extract_model(["patch"], ["segmentation"])
    onnx.save(cut, tmp / f"{name.replace(' ', '_')}.onnx")
    paths[name] = tmp / f"{name.replace(' ', '_')}.onnx"
core = ov.Core()
config = {"INFERENCE_NUM_THREADS": "1", "INFERENCE_PRECISION_HINT": "bf16"}
requests = {n: core.compile_model(str(p), "CPU", config).create_infer_request() for n, p in paths.items()}
x = np.random.default_rng(0).random((1, 2, 64, 64, 64), dtype=np.float32)
for r in requests.values():
    r.infer({"patch": x})
times: dict[str, list[float]] = {n: [] for n in requests}
for _ in range(rounds):
    for n, r in requests.items():
        t0 = time.perf_counter()
        r.infer({"patch": x})
        times[n].append(time.perf_counter() - t0)
base = float(np.median(times["full bf16"]))
for n, t in times.items():
    print(f"{n:24s} {1e3 * np.median(t):6.1f} ms  {np.median(t) / base:.2f}× the full bf16 pass")

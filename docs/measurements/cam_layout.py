"""The Grad-CAM channel sum as a matrix product: whole training steps, interleaved in one run.

``benches/bench_training.py``'s steps (same seeded patches, batch 8 sure + 4 unsure, bf16 autocast,
channels_last_3d) for the 0.1 loop (``before``), today's loop with the contiguous GroupNorm copy
(``now_contiguous_gn``) and the same with the Grad-CAM's channel sum as a float32 matrix product
(``nodule_edge.train.model.channel_weighted_sum``, ``cam_as_matmul``). Rounds alternate so that
noise from other jobs falls on all variants alike; medians per variant and their ratios are
printed. Also checks, on one batch, that the two CAM paths agree.

Run from the repository root with nothing else on the CPU (training paused)::

    NODULE_EDGE_BENCH_FULL=1 PYTHONPATH=. .venv/bin/python docs/measurements/cam_layout.py 5
"""

import statistics
import sys
import time

import torch

from benches.bench_training import _loop
from nodule_edge.train.model import CollaborativeNet, channel_weighted_sum

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.manual_seed(0)
features = torch.randn(12, 128, 16, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
weights = torch.randn(12, 128)
with torch.autocast("cpu", dtype=torch.bfloat16):
    broadcast = channel_weighted_sum(weights, features)
    matmul = channel_weighted_sum(weights, features, as_matmul=True)
print(f"CAM paths: max |difference| {float((broadcast - matmul).abs().max()):.2e} of max {float(broadcast.abs().max()):.1f}")

steps = {"before": _loop("before"), "now_contiguous_gn": _loop("now_contiguous_gn")}
variants = {"before": False, "now_contiguous_gn": False, "now_contiguous_gn+cam_as_matmul": True}
times: dict[str, list[float]] = {v: [] for v in variants}
for _ in range(rounds):
    for variant, as_matmul in variants.items():
        CollaborativeNet.cam_as_matmul = as_matmul
        step = steps[variant.split("+")[0]]
        start = time.perf_counter()
        step()
        times[variant].append(time.perf_counter() - start)
CollaborativeNet.cam_as_matmul = False
before = statistics.median(times["before"])
for variant, values in times.items():
    median = statistics.median(values)
    print(f"{variant:34s} median {median:.3f} s per step ({', '.join(f'{v:.3f}' for v in values)}), "
          f"{before / median:.2f}x the 0.1 loop")

"""GroupNorm in training's channels-last layout against the same norm on a contiguous copy (issue 11).

Training on CPU runs bf16 autocast in the channels_last_3d layout (oneDNN's fast convolutions).
PyTorch's channels-last GroupNorm backward is slow for groups of a few channels, so the model's
``_ConvNorm`` can normalise groups of at most ``_CONTIGUOUS_GROUPNORM_MAX_GROUP`` channels on a
contiguous copy (``[train] contiguous_groupnorm``). This prints, for the GroupNorm shapes of the model shipped when it
was measured (widths 24/48/96/128, ``docs/ablations/wide_widths``) at training's batch of 12: forward + backward in ms,
channels-last against the contiguous copy (medians of interleaved rounds); then whole optimisation steps of
``benches/bench_training.py``'s loops, the 0.1 loop (``before``), that model's with every norm channels-last
(``plain``, ``wide``) and with the copy (``copy``).

Run from the repository root with training paused: ``PYTHONPATH=. .venv/bin/python
docs/measurements/groupnorm_layout.py [ROUNDS]``
"""

import statistics
import sys
import time

import torch
from torch import nn

import benches.bench_training as bench

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
torch.set_num_threads(2)
CL = torch.channels_last_3d


def norm_step(norm: nn.GroupNorm, x: torch.Tensor, grad: torch.Tensor, copy: bool) -> None:
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.contiguous()).contiguous(memory_format=CL) if copy else norm(x)
    y.backward(grad)


print("GroupNorm forward + backward, bf16, batch 12 (ms, median)")
for channels, size in ((24, 32), (48, 16), (96, 16), (128, 16)):
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, channels)
    shape = (12, channels, size, size, size)
    x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=CL)
    times: dict[str, list[float]] = {"channels-last": [], "contiguous copy": []}
    for _ in range(2):
        norm_step(norm, x, grad, False)
        norm_step(norm, x, grad, True)
    for _ in range(rounds):
        for name in times:
            t = time.perf_counter()
            norm_step(norm, x, grad, name == "contiguous copy")
            times[name].append(time.perf_counter() - t)
    cells = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in times.items())
    print(f"  {channels:3d} channels at {size}³ ({channels // 8} per group): {cells}")

print("Training step, 8 sure + 4 unsure patches (s, median)")
steps = {"before": bench._loop("before"), "plain": bench._loop("wide"), "copy": bench._loop("wide", contiguous_groupnorm=True)}
step_times: dict[str, list[float]] = {name: [] for name in steps}
for _ in range(rounds):
    for name, step in steps.items():
        t = time.perf_counter()
        step()
        step_times[name].append(time.perf_counter() - t)
medians = {k: statistics.median(v) for k, v in step_times.items()}
print("  " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
print(
    f"  before / plain {medians['before'] / medians['plain']:.2f}x, before / copy {medians['before'] / medians['copy']:.2f}x"
)

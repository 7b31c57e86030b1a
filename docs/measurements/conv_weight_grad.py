"""Where a bf16 convolution's backward goes on CPU, and three rewrites of its weight gradient.

The training step's convolution backward takes 9-10x its forward at 16³ with 96-128 channels
(README, "Training speed"). This splits it into the input and the weight gradient
(``aten.convolution_backward`` with one output mask at a time) for the backbone's 16³ layers
(batch 12, bf16, channels-last 3-D; one thread, or as many as the first argument says), and times three ways to compute the weight
gradient from the same tensors, each checked against aten (relative error):

- offsets: 27 GEMMs, one per kernel tap, over shifted views of the padded input;
- im2col: one GEMM over all 27 taps gathered into one matrix;
- as-conv: a convolution with batch and channels swapped (the output gradient as the kernel).

Run from the repository root (nothing else running)::

    .venv/bin/python docs/measurements/conv_weight_grad.py      # one thread
    .venv/bin/python docs/measurements/conv_weight_grad.py 2    # two, as training runs here
"""

import sys
import time

import torch
import torch.nn.functional as F

BATCH, SIZE, ROUNDS = 12, 16, 3
LAYERS = ((128, 128, 4), (96, 128, 4), (48, 96, 2))  # (in, out, dilation): block 3, its first conv, block 2


def best_ms(fn) -> float:  # noqa: ANN001 - any zero-argument callable
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def grad(gy, x, w, dil: int, mask: list[bool]):  # noqa: ANN001, ANN201 - tensors
    return torch.ops.aten.convolution_backward(gy, x, w, None, [1] * 3, [dil] * 3, [dil] * 3, False, [0] * 3, 1, mask)


def shifted_views(x, dil: int):  # noqa: ANN001, ANN201 - tensors
    """The padded channels-last input under each of the 27 kernel taps: ((a, b, c), [N, D, H, W, C] view)."""
    xp = F.pad(x, (dil,) * 6).permute(0, 2, 3, 4, 1)
    for a in range(3):
        for b in range(3):
            for c in range(3):
                yield (a, b, c), xp[:, a * dil : a * dil + SIZE, b * dil : b * dil + SIZE, c * dil : c * dil + SIZE, :]


def output_grad_rows(gy):  # noqa: ANN001, ANN201 - tensors
    """The output gradient as [C_out, N·D·H·W] (a free view of a channels-last tensor, transposed)."""
    return gy.permute(0, 2, 3, 4, 1).reshape(-1, gy.shape[1]).t()


def by_offsets(gy, x, dil: int):  # noqa: ANN001, ANN201 - tensors
    cout, cin = gy.shape[1], x.shape[1]
    g = output_grad_rows(gy)
    out = torch.empty(3, 3, 3, cout, cin)
    for tap, view in shifted_views(x, dil):
        out[tap] = g @ view.reshape(-1, cin)
    return out.permute(3, 4, 0, 1, 2)


def by_im2col(gy, x, dil: int):  # noqa: ANN001, ANN201 - tensors
    cout, cin = gy.shape[1], x.shape[1]
    cols = torch.empty(BATCH, SIZE, SIZE, SIZE, 3, 3, 3, cin, dtype=x.dtype)
    for (a, b, c), view in shifted_views(x, dil):
        cols[..., a, b, c, :] = view
    g = output_grad_rows(gy)
    return (g @ cols.reshape(-1, 27 * cin)).reshape(cout, 3, 3, 3, cin).permute(0, 4, 1, 2, 3)


def as_conv(gy, x, dil: int):  # noqa: ANN001, ANN201 - tensors
    cl = torch.channels_last_3d
    xi = F.pad(x, (dil,) * 6).transpose(0, 1).contiguous(memory_format=cl)
    return F.conv3d(xi, gy.transpose(0, 1).contiguous(memory_format=cl), stride=dil).transpose(0, 1)


def time_layer(cin: int, cout: int, dil: int) -> str:
    cl = torch.channels_last_3d
    x = torch.randn(BATCH, cin, SIZE, SIZE, SIZE).bfloat16().contiguous(memory_format=cl)
    w = torch.randn(cout, cin, 3, 3, 3).bfloat16().contiguous(memory_format=cl)
    gy = torch.randn_like(F.conv3d(x, w, padding=dil, dilation=dil))
    reference = grad(gy, x, w, dil, [False, True, False])[1].float()
    row = {
        "forward": best_ms(lambda: F.conv3d(x, w, padding=dil, dilation=dil)),
        "input grad": best_ms(lambda: grad(gy, x, w, dil, [True, False, False])),
        "weight grad (aten)": best_ms(lambda: grad(gy, x, w, dil, [False, True, False])),
    }
    errors = {}
    for name, fn in (("offsets", by_offsets), ("im2col", by_im2col), ("as-conv", as_conv)):
        result = fn(gy, x, dil).float()
        errors[name] = float((result - reference).norm() / reference.norm())
        row[name] = best_ms(lambda fn=fn: fn(gy, x, dil))
    cells = ", ".join(f"{k} {v:.0f}" for k, v in row.items())
    return f"{cin}->{cout} dilation {dil}: {cells}; rel. errors " + ", ".join(f"{k} {v:.0e}" for k, v in errors.items())


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {threads} thread(s), batch {BATCH}, {SIZE}³, bf16, channels-last; best of {ROUNDS}, ms"
    )
    for layer in LAYERS:
        print(time_layer(*layer), flush=True)


if __name__ == "__main__":
    main()

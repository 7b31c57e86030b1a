"""Training speed: the loop shipped before the nodule-bounded model against today's, in one run.

Both loops take the same optimisation steps on the same seeded float16 patches (batch 8 sure +
4 unsure, 64³, bf16 autocast where the CPU runs it natively), from the cached patch to the
optimiser step: conversion, augmentation, forward, the four losses, backward, AdamW.

* ``before``: the 3.8 M-parameter model with the papers' 16³ segmentation head, NCDHW layout,
  z-context truncation and per-sample axis permutations, flips and rotations (commit 31f75e2).
* ``wide``: the loop shipped from the nodule-bounded model until 2026-12-05 (stem and residual
  blocks 24/48/96/128, U-Net-style decoder at 32³ with depth-to-space, channels_last_3d, in-plane
  augmentation and the nodule box; ``docs/ablations/wide_widths``).
* ``now``: the shipped loop, read from ``configs/shipped.toml`` (``nodule_edge.train.trainer``):
  ``wide`` with the narrower network (16/32/64/96) and ``[train] contiguous_groupnorm`` (small
  GroupNorms on a contiguous copy; the same function, other rounding).

Seconds per epoch are the step time × 47 steps (fold 0 of ``configs/shipped.toml``: 438 training
nodules, 371 labelled, batches of 8). ``make bench-full`` runs it; the ratio is printed by
``python benches/ratios.py .benchmarks/full.json --table``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from benches.conftest import FULL

torch = pytest.importorskip("torch", reason="training benchmarks need the train extra")
# The imports below need torch: they follow the skip (E402 by design).

import numpy as np  # noqa: E402 - after the skip
import torch.nn.functional as F  # noqa: E402 - after the skip

from nodule_edge.patch import DEFAULT_PATCH_SPEC  # noqa: E402 - after the skip
from nodule_edge.train.config import load_config  # noqa: E402 - after the skip
from nodule_edge.train.losses import LossWeights, total_loss  # noqa: E402 - after the skip
from nodule_edge.train.model import (  # noqa: E402 - after the skip
    LEGACY_MODEL_CONFIG,
    CollaborativeNet,
    ModelConfig,
    use_contiguous_groupnorm,
)
from nodule_edge.train.trainer import (  # noqa: E402 - after the skip
    augment,
    bf16_enabled,
    bound_batch,
    channels_last_enabled,
    model_config_from,
)

pytestmark = pytest.mark.skipif(not FULL, reason="training benchmark: NODULE_EDGE_BENCH_FULL=1 (make bench-full)")

STEPS_PER_EPOCH = 47
BATCH_SURE, BATCH_UNSURE = 8, 4
STEPS = 3
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shipped.toml"
WIDE_WIDTHS = (24, 48, 96, 128)


def _data(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    size = DEFAULT_PATCH_SPEC.size
    images = rng.random((n, 2, size, size, size), dtype=np.float32).astype(np.float16)
    z, y, x = np.meshgrid(*(np.arange(size) - size / 2 + 0.5,) * 3, indexing="ij")
    masks = np.stack([((z**2 + y**2 + x**2) <= (4 + i % 12) ** 2) for i in range(n)]).astype(np.float16)
    return images, masks


def _augment_before(
    images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmentation of commit 31f75e2: z truncation for half the samples, any axis order."""
    out_i, out_m = [], []
    size = images.shape[-1]
    z = (torch.arange(size, dtype=torch.float32) - (size / 2 - 0.5)) * 0.5
    for img, msk in zip(images, masks):
        if torch.rand(1, generator=gen).item() < 0.5:
            half = 2.0 + torch.rand(1, generator=gen).item() * (size * 0.5 - 4.0) / 2
            keep = (z.abs() <= half).view(-1, 1, 1)
            img, msk = img * keep, msk * keep
        perm = torch.randperm(3, generator=gen).tolist()
        img, msk = img.permute(0, *(p + 1 for p in perm)), msk.permute(*perm)
        for axis in range(3):
            if torch.rand(1, generator=gen).item() < 0.5:
                img, msk = img.flip(axis + 1), msk.flip(axis)
        k = int(torch.randint(0, 4, (1,), generator=gen))
        out_i.append(torch.rot90(img, k, (2, 3)))
        out_m.append(torch.rot90(msk, k, (1, 2)))
    return torch.stack(out_i).contiguous(), torch.stack(out_m).contiguous()


def _loop(variant: str, contiguous_groupnorm: bool | None = None):  # noqa: ANN202 - returns the step closure
    """One optimisation step of ``variant``; ``contiguous_groupnorm`` overrides the variant's own
    GroupNorm layout (None: ``wide`` without the copy, ``now`` as the shipped config says)."""
    torch.set_num_threads(2)
    device = torch.device("cpu")
    bf16 = bf16_enabled("auto", device)
    images_np, masks_np = _data()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if variant == "before":
        model = CollaborativeNet(ModelConfig(**LEGACY_MODEL_CONFIG))  # type: ignore[arg-type]
        channels_last = False
    else:
        shipped = load_config(SHIPPED_CONFIG)
        config = model_config_from(shipped)
        if variant == "wide":
            config = dataclasses.replace(config, widths=WIDE_WIDTHS)
        model = CollaborativeNet(config)
        channels_last = channels_last_enabled("auto", device, bf16)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        if contiguous_groupnorm is None:
            contiguous_groupnorm = variant == "now" and shipped.train.contiguous_groupnorm
        if contiguous_groupnorm:
            use_contiguous_groupnorm(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    n = BATCH_SURE + BATCH_UNSURE

    def step() -> None:
        idx = rng.choice(len(images_np), n, replace=False)
        images = torch.from_numpy(images_np[idx].astype(np.float32))
        masks = torch.from_numpy(masks_np[idx].astype(np.float32))
        if variant == "before":
            images, masks = _augment_before(images, masks, gen)
            target = F.avg_pool3d(masks.unsqueeze(1), 4)
        else:
            images, masks = augment(images, masks, gen)
            images = bound_batch(
                images, masks, torch.ones(n, dtype=torch.bool), DEFAULT_PATCH_SPEC.nodule_box, 0.5, gen, 0.2
            )
            target = masks.unsqueeze(1)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        label_mask = torch.tensor([True] * BATCH_SURE + [False] * BATCH_UNSURE)
        loss, _ = total_loss(
            out,
            labels=torch.tensor([0, 1] * (n // 2)),
            label_mask=label_mask,
            masks=target,
            mask_present=torch.ones(n, dtype=torch.bool),
            attributes=torch.rand(n, 6, generator=gen),
            attr_present=torch.ones(n, dtype=torch.bool),
            weights=LossWeights(),
            use_debug=True,
            use_attributes=True,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN primitive creation
    return step


@pytest.mark.parametrize("variant", ["before", "wide", "now"])
def test_training_step(benchmark, variant: str) -> None:
    step = _loop(variant)
    benchmark.pedantic(step, rounds=STEPS, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["seconds_per_epoch"] = round(median * STEPS_PER_EPOCH, 1)
    benchmark.extra_info["samples_per_step"] = BATCH_SURE + BATCH_UNSURE

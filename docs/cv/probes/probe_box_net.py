"""Can a small segmentation-only network draw the runtime's nodule box as well as the full model?

The runtime's first pass only draws the nodule's box (README, "The model and its patch"); with the
full model it costs about two thirds of the second pass, and the runtime path is 1.6x the 0.1
model's one pass (issue 11 allows 1.25x). This probe trains a thin network with the full model's
layout (stem, three residual blocks, the 0.5 mm decoder) on segmentation alone, on one fold's
training nodules, whole cubes as the first pass reads them, and compares on the fold's test
nodules: box error against the readers' box (voxels per side), Dice, and, when the fold's full
model is in runs/shipped/foldK, the runtime path's AUC and path parity with either first pass.

Usage: .venv/bin/python docs/cv/probes/probe_box_net.py K [EPOCHS] [WIDTHS] [THREADS]
  e.g. probe_box_net.py 0 20 8,16,32,32; EPOCHS 0 loads runs/probes/box_net_foldK.safetensors
Writes runs/probes/box_net_foldK.safetensors and prints the comparison.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa: F401,F403,E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from nodule_edge.metrics import roc_auc  # noqa: E402
from nodule_edge.patch import nodule_extent, run_nodule_bounded  # noqa: E402
from nodule_edge.train.losses import dice_loss  # noqa: E402
from nodule_edge.train.model import _conv_gn, _ResidualBlock, _UNetDecoder  # noqa: E402
from nodule_edge.train.trainer import augment, predict, reference_bounded  # noqa: E402

fold = int(sys.argv[1]) if len(sys.argv) > 1 else 0
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
widths = tuple(int(w) for w in (sys.argv[3] if len(sys.argv) > 3 else "8,16,32,32").split(","))
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
torch.set_num_threads(threads)


class BoxNet(nn.Module):
    def __init__(self, widths, groups=4, in_channels=2):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = _conv_gn(in_channels, w0, 7, groups, stride=2)
        self.block1 = _ResidualBlock(w0, w1, groups, stride=2, dilation=1)
        self.block2 = _ResidualBlock(w1, w2, groups, stride=1, dilation=2)
        self.block3 = _ResidualBlock(w2, w3, groups, stride=1, dilation=4)
        self.seg_head = _UNetDecoder(w3, w0, in_channels, (w0, w1), groups)

    def forward(self, x):
        stem = F.relu(self.stem(x))
        feats = self.block3(self.block2(self.block1(stem)))
        return torch.sigmoid(self.seg_head(feats, stem, x))


cfg, ds, spec = setup()
train_idx, val_idx, test_idx = fold_split(ds, cfg, fold)
fit_idx = np.concatenate([train_idx, val_idx])
fit_idx = fit_idx[ds.cache.has_mask[fit_idx]]
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
rng = np.random.default_rng(0)
net = BoxNet(widths).to(memory_format=torch.channels_last_3d)
print(f"fold {fold}: box net {widths}, {sum(p.numel() for p in net.parameters())} parameters, "
      f"{len(fit_idx)} training cubes, {epochs} epochs", flush=True)
opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
batch = 8
steps = math.ceil(len(fit_idx) / batch)
if epochs == 0:
    net.load_state_dict(load_file(str(OUT / f"box_net_fold{fold}.safetensors")))
for epoch in range(epochs):
    lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    for g in opt.param_groups:
        g["lr"] = lr
    order = rng.permutation(fit_idx)
    t0, total = time.time(), 0.0
    net.train()
    for s in range(steps):
        idx = np.sort(order[s * batch:(s + 1) * batch])
        x = torch.from_numpy(ds.cache.images[idx].astype(np.float32))
        m = torch.from_numpy(ds.cache.masks[idx].astype(np.float32))
        x, m = augment(x, m, gen)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seg = net(x)
        seg = seg.float()[:, 0]
        loss = dice_loss(seg, m).mean() + F.binary_cross_entropy(seg.clamp(1e-6, 1 - 1e-6), m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    print(f"epoch {epoch + 1}/{epochs} {time.time() - t0:.1f}s seg loss {total / steps:.3f}", flush=True)
OUT.mkdir(parents=True, exist_ok=True)
if epochs:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(OUT / f"box_net_fold{fold}.safetensors"))

net.eval()
test = test_idx[ds.cache.has_mask[test_idx]]


def box_net_segment(x: np.ndarray) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(x), 16):
            t = torch.from_numpy(np.asarray(x[s:s + 16], np.float32)).contiguous(memory_format=torch.channels_last_3d)
            out.append(net(t)[:, 0].float().numpy())
    return np.concatenate(out)


def box_errors(segs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    errs = []
    for seg, i in zip(segs, idx):
        ref = nodule_extent(ds.cache.masks[i].astype(np.float32), 0.5)
        got = nodule_extent(seg, spec.nodule_box.threshold)
        if ref is None:
            continue
        if got is None:
            errs.append(np.full(6, 64.0))
            continue
        errs.append(np.abs(np.concatenate([got[0] - ref[0], got[1] - ref[1]])))
    return np.asarray(errs)


def dice(segs: np.ndarray, idx: np.ndarray) -> float:
    m = ds.cache.masks[idx].astype(np.float32) >= 0.5
    p = segs >= 0.5
    return float(np.mean(2 * (p & m).sum((1, 2, 3)) / np.maximum(p.sum((1, 2, 3)) + m.sum((1, 2, 3)), 1)))


def report(name: str, segs: np.ndarray) -> None:
    e = box_errors(segs, test)
    inplane = e[:, [1, 2, 4, 5]]
    print(f"{name:22s} Dice {dice(segs, test):.3f} | box error per side: z mean {e[:, [0, 3]].mean():.2f}, "
          f"in-plane mean {inplane.mean():.2f}, median {np.median(inplane):.1f}, p90 {np.percentile(inplane, 90):.1f}; "
          f"boxes within 1 voxel on every side {np.mean(e.max(1) <= 1):.0%}", flush=True)


t0 = time.time()
box_segs = box_net_segment(ds.cache.images[test])
print(f"box net on {len(test)} test cubes: {time.time() - t0:.1f}s", flush=True)
report("box net", box_segs)

checkpoint = ROOT / f"runs/shipped/fold{fold}/refit.safetensors"
if not checkpoint.is_file():
    print(f"no full model at {checkpoint}: runtime-path comparison skipped")
    sys.exit(0)
model, _ = fold_model(fold)
torch.set_num_threads(threads)
labelled = test_idx[ds.labels[test_idx] >= 0]


def full_run(patches: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    out = predict(model, ds, idx, DEVICE, False, images=patches)
    out["segmentation"] = out["segmentation64"].astype(np.float32)
    return out


full_segs = full_run(np.asarray(ds.cache.images[test], np.float32), test)["segmentation"]
report("full model first pass", full_segs)
source = np.asarray(ds.cache.images[labelled], np.float32)
y = ds.labels[labelled]
ref_p = np.asarray(full_run(np.asarray(reference_bounded(ds, labelled, spec), np.float32), labelled)["malignancy_probability"])
for name, segment in (("full model first pass", None), ("box net first pass", box_net_segment)):
    out, found = run_nodule_bounded(lambda p: full_run(p, labelled), source, spec, segment=segment)
    p = np.asarray(out["malignancy_probability"])
    print(f"{name:22s} runtime-path AUC {roc_auc(y, p):.3f} (readers' box {roc_auc(y, ref_p):.3f}, diameter "
          f"{roc_auc(y, ds.diameters[labelled]):.3f}), path parity {np.abs(p - ref_p).mean():.3f}, "
          f"no nodule found {int((~found).sum())}", flush=True)

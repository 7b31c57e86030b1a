"""Shared loading for the issue-11 probes (reuses the repo's dataset, splits and checkpoints).

fold_model and fold_json read the same run: the shipped narrow network's folds with the head step
from before the outline term (docs/ablations/no_outline_term, which was docs/cv until the term
shipped; its refits were copied aside as runs/shipped/foldK/refit.no_outline_term.safetensors then,
and the command in that folder's README writes them again). Outputs recorded before 2026-12-05 were
measured on the networks shipped then (the wider ones of docs/ablations/wide_widths, or earlier:
docs/cv/README.md says which per item); runs/ no longer holds those checkpoints, so rerunning such
a probe now measures the narrow network."""
from __future__ import annotations

import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import json
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from nodule_edge.train.config import load_config
from nodule_edge.train.trainer import load_dataset, load_checkpoint, patch_spec_from, split_fold

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "runs/probes"
DEVICE = torch.device("cpu")


def setup():
    cfg = load_config(ROOT / "configs/shipped.toml")
    ds = load_dataset(cfg)
    spec = patch_spec_from(cfg)
    return cfg, ds, spec


def fold_split(ds, cfg, fold):
    return split_fold(ds, cfg, fold)


def fold_model(fold):
    model, meta = load_checkpoint(ROOT / f"runs/shipped/fold{fold}/refit.no_outline_term.safetensors")
    model.eval()
    return model, meta


def fold_json(fold):
    return json.loads((ROOT / f"docs/ablations/no_outline_term/fold{fold}.json").read_text())


def box_net_fold_arrays(ds, name, measure, note):
    """For each shipped fold: ``measure(segmentation [n, S, S, S], cubes [n, C, S, S, S]) -> [n, k]``
    of the fold's box net on the whole cubes of the training-fold (``fit``) and test nodules that
    probe_box_outline_head.py cached, in batches of 32; stored as runs/probes/NAME_foldK.npz
    (``fit``, ``test``) and not computed again once there."""
    from nodule_edge.train.first_pass import box_net_segmenter, load_box_net

    for fold in range(5):
        path = OUT / f"{name}_fold{fold}.npz"
        if path.exists():
            continue
        cached = np.load(OUT / f"box_outline_head_fold{fold}.npz")
        segment = box_net_segmenter(load_box_net(ROOT / f"runs/shipped/fold{fold}/box_net.safetensors")[0])
        out = {}
        for part in ("fit", "test"):
            idx = cached[f"{part}_index"]
            rows = []
            for s in range(0, len(idx), 32):
                cubes = np.asarray(ds.cache.images[idx[s:s + 32]], np.float32)
                rows.append(measure(segment(cubes), cubes))
            out[part] = np.concatenate(rows)
        np.savez(path, **out)
        print(f"fold {fold}: {note}", flush=True)

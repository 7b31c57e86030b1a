"""Train the shipped config's box nets alone, fold by fold, without the fold networks.

    .venv/bin/python docs/cv/probes/train_box_nets.py OUT_DIR [FOLD ...] [--set KEY=VALUE ...]

Each fold's box net is trained as `nodule-edge train configs/shipped.toml` trains it after the
fold's network (nodule_edge.train.run._first_pass: the config's [first_pass] section, the training
fold's nodules with their validation patients, the config's seed, bf16 and channels-last as the
machine's "auto" gives), and written to OUT_DIR/foldK/box_net.safetensors (a finished one is not
trained again). `--set first_pass.epochs=40` and the like train a variant. The box net does not
read the network, so the outline probes (probe_outline_threshold.py) can run before the fold
networks exist. Its sidecar has the same key as run.py's: copied to runs/shipped/foldK/, a later
`nodule-edge train` would reuse it instead of training its own, so copy only box nets trained on
the machine kind the networks train on (bf16 on AMX Xeons, fp32 elsewhere round differently)."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np
import torch

from nodule_edge.train.config import load_config
from nodule_edge.train.first_pass import train_box_net
from nodule_edge.train.trainer import bf16_enabled, channels_last_enabled, load_dataset, split_fold

ROOT = Path(__file__).resolve().parents[3]

args = sys.argv[1:]
out_dir = Path(args.pop(0))
overrides = {}
for i, a in enumerate(args):
    if a == "--set":
        key, value = args[i + 1].split("=", 1)
        overrides[key] = tomllib.loads(f"v = {value}")["v"]
folds = [int(a) for i, a in enumerate(args) if a != "--set" and (i == 0 or args[i - 1] != "--set")]
cfg = load_config(ROOT / "configs/shipped.toml", overrides)
torch.set_num_threads(cfg.train.threads)
ds = load_dataset(cfg)
device = torch.device("cpu")
bf16 = bf16_enabled(cfg.train.bf16, device)
for fold in folds or range(cfg.cv.folds):
    train_idx, val_idx, _ = split_fold(ds, cfg, fold)
    fit_idx = np.concatenate([train_idx, val_idx])
    _, info = train_box_net(
        cfg.first_pass, ds.cache.images, ds.cache.masks, ds.cache.has_mask, fit_idx,
        out_dir / f"fold{fold}/box_net.safetensors", seed=cfg.train.seed, bf16=bf16,
        channels_last=channels_last_enabled(cfg.train.channels_last, device, bf16), device=device,
        progress=lambda line, fold=fold: print(f"fold {fold}: {line}", flush=True),
    )
    print(f"fold {fold}: box net {info['checkpoint']} ({info.get('train_seconds', 'reused')} s)", flush=True)

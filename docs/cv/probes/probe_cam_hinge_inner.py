"""Does the Grad-CAM-hinge head of probe_cam_hinge.py hold up without the test folds choosing it?
From the forward passes that probe_cam_hinge.py cached (runs/probes/cam_hinge_RUN_foldK.npz; no
network is run), two readings per fold, each paired with the run's recorded folds
(docs/ablations/RUN/foldK.json, same nodules; paired bootstrap within folds, 2000 draws):
  fixed:    the setting probe_cam_hinge.py liked (L2 1e-3, hinge 1, logit parity 1, margin 0.02;
            cam_hinge_fit.CAM_HINGE), fitted on the whole training fold;
  inner CV: one of 12 settings (L2 1e-3 / 1e-2 x hinge 1 / 3 x parity 0.5 / 1 / 2) chosen per fold
            by 3 patient-grouped inner folds of the training fold: the best inner AUC among the
            settings whose inner Grad-CAM-on-nodule fraction is >= 0.92 and inner path parity
            <= 0.02 (both a margin inside the model card's bounds, 0.90 and 0.03), then refitted on
            the whole training fold. The test fold never enters the choice.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_cam_hinge_inner.py RUN FOLD [FOLD...]
(output of lr_warmup 0 1 2 3 4 and contiguous_groupnorm 0: cam_hinge_inner.txt)"""
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "docs/cv/probes"))
torch.set_num_threads(1)
from cam_hinge_fit import CAM_HINGE, CamHingeSettings, fit_cam_hinge_classifier  # noqa: E402
from linear import summary_line  # noqa: E402

from nodule_edge.metrics import roc_auc  # noqa: E402
from nodule_edge.train.config import load_config  # noqa: E402
from nodule_edge.train.data import patient_folds  # noqa: E402
from nodule_edge.train.evaluation import _paired_interval  # noqa: E402
from nodule_edge.train.trainer import load_dataset, split_fold  # noqa: E402

run = sys.argv[1]; folds = [int(v) for v in sys.argv[2:]]
GRID = [CamHingeSettings(l2=a, cam_weight=b, parity_weight=c) for a, b, c in itertools.product([1e-3, 1e-2], [1.0, 3.0], [0.5, 1.0, 2.0])]
MIN_CAM, MAX_PARITY = 0.92, 0.02
cfg = load_config(ROOT / f"configs/ablations/{run}.toml"); ds = load_dataset(cfg)
sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731


def apply(w, b, h, r, d):
    z = h @ w + b
    return z, r @ w + b, np.sign(z) * (d @ w[: d.shape[1]]) > 0


out = {name: {k: [] for k in ("y", "z", "zref", "cam", "ref", "fold")} for name in ("fixed", "inner CV")}
for k in folds:
    tr, va, te = split_fold(ds, cfg, k); idx = np.concatenate([tr, va])
    f = {a: (v if v.dtype == bool else v.astype(np.float64)) for a, v in np.load(ROOT / f"runs/probes/cam_hinge_{run}_fold{k}.npz").items()}
    y = ds.labels[idx]; ok = (y >= 0) & f["has_tr"]
    recorded = json.loads((ROOT / f"docs/ablations/{run}/fold{k}.json").read_text())["predictions"]
    if list(recorded["index"]) != list(te):
        raise SystemExit(f"fold {k}: the recorded fold holds other nodules")
    p = np.clip(np.asarray(recorded["probability"]), 1e-7, 1 - 1e-7); ref = np.log(p / (1 - p))
    inner = np.asarray(patient_folds([ds.patients[i] for i in idx], 3, 0))
    scores = []
    for s in GRID:
        z, zr, on = np.zeros(len(idx)), np.zeros(len(idx)), np.zeros(len(idx), bool)
        for j in range(3):
            w, b, _ = fit_cam_hinge_classifier(f["h_tr"], f["r_tr"], f["d_tr"], y, np.flatnonzero(ok & (inner != j)), s)
            t = inner == j
            z[t], zr[t], on[t] = apply(w, b, f["h_tr"][t], f["r_tr"][t], f["d_tr"][t])
        scores.append((roc_auc(y[ok], z[ok]), on[ok].mean(), np.abs(sig(z) - sig(zr))[ok].mean()))
    allowed = [i for i, (_, cam, par) in enumerate(scores) if cam >= MIN_CAM and par <= MAX_PARITY]
    chosen = GRID[max(allowed, key=lambda i: scores[i][0])] if allowed else CAM_HINGE
    print(f"fold {k}: inner CV (AUC, CAM, parity) by L2/hinge/parity: "
          + "; ".join(f"{s.l2:g}/{s.cam_weight:g}/{s.parity_weight:g} {a:.3f} {c:.2f} {q:.3f}" for s, (a, c, q) in zip(GRID, scores)))
    print(f"  chosen {chosen.l2:g}/{chosen.cam_weight:g}/{chosen.parity_weight:g}" + ("" if allowed else " (none passed the gates: the fixed setting)"))
    lt = ds.labels[te] >= 0
    for name, s in (("fixed", CAM_HINGE), ("inner CV", chosen)):
        w, b, _ = fit_cam_hinge_classifier(f["h_tr"], f["r_tr"], f["d_tr"], y, np.flatnonzero(ok), s)
        z, zr, on = apply(w, b, f["h_te"], f["r_te"], f["d_te"])
        o = out[name]
        o["y"] += list(ds.labels[te]); o["z"] += list(z); o["zref"] += list(zr); o["cam"] += list(np.where(f["has_te"], on, np.nan))
        o["ref"] += list(ref); o["fold"] += [k] * len(te)
        print(f"  {name}: fold AUC {roc_auc(ds.labels[te][lt], z[lt]):.3f} (recorded {roc_auc(ds.labels[te][lt], ref[lt]):.3f}), "
              f"CAM {np.nanmean(np.where(f['has_te'], on, np.nan)):.3f}", flush=True)

for name, o in out.items():
    y, z, ref, fold = (np.asarray(o[a]) for a in ("y", "z", "ref", "fold")); lab = y >= 0
    low, high = _paired_interval(roc_auc, y[lab], z[lab], ref[lab], fold[lab], 2000, 0)
    print(summary_line(f"{run} folds {folds} {name}", o["y"], o["z"], o["zref"], o["cam"]))
    print(f"  recorded {roc_auc(y[lab], ref[lab]):.3f}; paired {roc_auc(y[lab], z[lab]) - roc_auc(y[lab], ref[lab]):+.3f} [{low:+.3f}, {high:+.3f}]")

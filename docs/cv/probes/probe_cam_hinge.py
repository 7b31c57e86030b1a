"""Can a linear classifier on the head inputs keep most of the plain logistic's ranking while its
Grad-CAM stays on the nodule and the two paths agree? On a run's fold networks in runs/ (no
retraining), fit on the training fold (labelled nodules; standardised runtime-path head inputs:
128 pooled fusion features + 6 segmentation statistics, no embedding):
  mean BCE + l2 |w|^2
  + lam_cam * mean_n relu(margin - s_n * (w_f . d_n) / |w_f|)   (d_n: mean fusion features inside
      minus outside the readers' mask at 16^3, the evaluation's CAM check; s_n = sign of the current
      logit, as the map's sign follows p - 0.5; a hinge, so the check holds with a margin)
  + lam_par * mean_n |z_n(runtime path) - z_n(readers' box)|   (path parity in logits)
by Adam from the plain logistic (500 steps). On the test fold: runtime-path AUC, readers'-box AUC,
path parity (probabilities), Grad-CAM on the nodule as the evaluation takes it. Pooled over the
folds given. The test folds are in view: a probe, not a selection.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_cam_hinge.py RUN FOLD [FOLD...]
(output of lr_warmup 0 1 2 3 4: cam_hinge.txt)"""
import sys, time, itertools
from pathlib import Path
import numpy as np, torch
ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "docs/cv/probes"))
torch.set_num_threads(1)
from nodule_edge.metrics import roc_auc
from nodule_edge.train.config import load_config
from nodule_edge.train.checkpoints import load_checkpoint
from nodule_edge.train.first_pass import load_box_net, box_net_segmenter
from nodule_edge.train.trainer import (load_dataset, patch_spec_from, split_fold, predict, predict_runtime_path,
                                       reference_bounded, evaluated_checkpoint)
from linear import summary_line  # noqa: E402
from cam_hinge_fit import CamHingeSettings, cam_difference, fit_cam_hinge_classifier  # noqa: E402

run = sys.argv[1]; folds = [int(v) for v in sys.argv[2:]]
L2 = 1e-3  # about the inner-CV choice of probe_plain_logistic.py (C = 1 on ~470 nodules)
SETTINGS = [(0.0, 0.0)] + list(itertools.product([1.0, 3.0, 10.0], [0.0, 1.0]))
MARGIN = 0.02
cfg = load_config(ROOT / f"configs/ablations/{run}.toml")
ds = load_dataset(cfg); spec = patch_spec_from(cfg); dev = torch.device("cpu")


def inside_minus_outside(feats, idx):
    m16 = ds.cache.masks[idx].astype(np.float32).reshape(len(idx), 16, 4, 16, 4, 16, 4).mean((2, 4, 6)).reshape(len(idx), -1)
    return cam_difference(feats, m16), ds.cache.has_mask[idx]


def paths(model, seg, idx, width):
    out = predict_runtime_path(model, ds, idx, dev, spec, segment=seg, with_features=True)[0]
    ref = predict(model, ds, idx, dev, False, images=reference_bounded(ds, idx, spec))["classifier_input"][:, :width]
    d, has = inside_minus_outside(out.pop("features"), idx)
    return out["classifier_input"][:, :width], ref, d, has


res = {s: {k: [] for k in ("y", "z", "zref", "cam")} for s in SETTINGS}
for k in folds:
    t0 = time.time()
    dd = ROOT / f"runs/ablations/{run}/fold{k}"
    tr, va, te = split_fold(ds, cfg, k); idx = np.concatenate([tr, va])
    model, _ = load_checkpoint(dd / evaluated_checkpoint(cfg, cfg.cv.evaluate)); model.eval()
    seg = box_net_segmenter(load_box_net(dd / "box_net.safetensors")[0])
    c = model.feature_channels; width = c + model.n_seg_features
    cache = ROOT / f"runs/probes/cam_hinge_{run}_fold{k}.npz"  # the forward passes, kept for reruns
    if cache.exists():
        z_ = np.load(cache); h_tr, r_tr, d_tr, has_tr, h_te, r_te, d_te, has_te = (z_[a] for a in z_.files)
    else:
        h_tr, r_tr, d_tr, has_tr = paths(model, seg, idx, width)
        h_te, r_te, d_te, has_te = paths(model, seg, te, width)
        np.savez(cache, h_tr=h_tr, r_tr=r_tr, d_tr=d_tr, has_tr=has_tr, h_te=h_te, r_te=r_te, d_te=d_te, has_te=has_te)
    h_tr, r_tr, d_tr, h_te, r_te, d_te = (a.astype(np.float64) for a in (h_tr, r_tr, d_tr, h_te, r_te, d_te))
    rows = np.flatnonzero((ds.labels[idx] >= 0) & has_tr)
    print(f"fold {k}: features {time.time() - t0:.0f}s", flush=True)
    for lam_cam, lam_par in SETTINGS:
        # BCE + L2 from zero, the hinge and the parity penalty joining after 300 of 800 Adam steps.
        settings = CamHingeSettings(l2=L2, cam_weight=lam_cam, cam_margin=MARGIN, parity_weight=lam_par)
        w, b, _ = fit_cam_hinge_classifier(h_tr, r_tr, d_tr, ds.labels[idx], rows, settings)
        z = h_te @ w + b; zr = r_te @ w + b
        on = np.sign(z) * (d_te @ w[:c]) > 0
        r = res[(lam_cam, lam_par)]
        r["y"] += list(ds.labels[te]); r["z"] += list(z); r["zref"] += list(zr); r["cam"] += list(np.where(has_te, on, np.nan))
        lt = ds.labels[te] >= 0
        print(f"  lam_cam {lam_cam} lam_par {lam_par}: fold AUC {roc_auc(ds.labels[te][lt], z[lt]):.3f}, CAM {np.nanmean(np.where(has_te, on, np.nan)):.3f}", flush=True)

for s, r in res.items():
    print(summary_line(f"lam_cam {s[0]:4} lam_par {s[1]:3}", r["y"], r["z"], r["zref"], r["cam"]))

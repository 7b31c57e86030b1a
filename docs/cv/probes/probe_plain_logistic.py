"""How much ranking does the shipped head step give up for Grad-CAM and path parity? On a run's five
fold networks in runs/ (no retraining), a plain L2 logistic regression of the label on the
runtime path's standardised head inputs (128 pooled fusion features + 6 segmentation statistics,
no attribute embedding; C from a grid by 5-fold patient-grouped inner CV on the training fold's
labelled nodules) against the recorded probabilities (the shipped "debugged" head step). For each
C on the test fold: runtime-path AUC, readers'-box AUC, path parity (mean |dp| between the two
paths) and the Grad-CAM check as the evaluation takes it (soft mean of the map inside the readers'
mask at 16^3 above its mean outside; the map of a linear head is sign(p - 0.5) * sum_c w_c f_c with
w_c = coef_c / sd_c, and a positive affine normalisation does not change the comparison).
Pooled over folds. Helpers (logistic regression, grouped folds) in linear.py.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_plain_logistic.py [RUN]
(output of lr_warmup: plain_logistic.txt)"""
import sys, json, time
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
from linear import LogisticRegression, inner_best, summary_line  # noqa: E402

run = sys.argv[1] if len(sys.argv) > 1 else "lr_warmup"
GRID = [0.01, 0.1, 1.0, 10.0, 100.0]
cfg = load_config(ROOT / f"configs/ablations/{run}.toml")
ds = load_dataset(cfg); spec = patch_spec_from(cfg); dev = torch.device("cpu")
patients = np.array(ds.patients)
rows = {c: {k: [] for k in ("y", "z", "zref", "cam_on", "p_rec")} for c in GRID + ["chosen"]}
for k in range(5):
    t0 = time.time()
    d = ROOT / f"runs/ablations/{run}/fold{k}"
    rec = json.loads((ROOT / f"docs/ablations/{run}/fold{k}.json").read_text())
    p_rec = dict(zip(rec["predictions"]["index"], rec["predictions"]["probability"]))
    tr, va, te = split_fold(ds, cfg, k); idx = np.concatenate([tr, va])
    model, _ = load_checkpoint(d / evaluated_checkpoint(cfg, cfg.cv.evaluate)); model.eval()
    seg = box_net_segmenter(load_box_net(d / "box_net.safetensors")[0])
    c_feat = model.feature_channels; width = c_feat + model.n_seg_features
    h_tr = predict_runtime_path(model, ds, idx, dev, spec, segment=seg)[0]["classifier_input"][:, :width]
    test = predict_runtime_path(model, ds, te, dev, spec, segment=seg, with_features=True)[0]
    h_te, feats = test["classifier_input"][:, :width], test["features"]  # feats [N, C, 16^3]
    h_ref = predict(model, ds, te, dev, False, images=reference_bounded(ds, te, spec))["classifier_input"][:, :width]
    mu, sd = h_tr.mean(0), h_tr.std(0) + 1e-6
    lab = ds.labels[idx] >= 0
    x_tr, y_tr = ((h_tr - mu) / sd)[lab], ds.labels[idx][lab]
    chosen = inner_best(lambda a: LogisticRegression(C=a), x_tr, y_tr, patients[idx][lab], GRID,
                        lambda y, m, x: roc_auc(y, m.decision_function(x)))
    masks = ds.cache.masks[te].astype(np.float32)
    m16 = masks.reshape(len(te), 16, 4, 16, 4, 16, 4).mean((2, 4, 6)).reshape(len(te), -1)
    has = ds.cache.has_mask[te]
    for c in GRID:
        m = LogisticRegression(C=c).fit(x_tr, y_tr)
        z, zref = m.decision_function((h_te - mu) / sd), m.decision_function((h_ref - mu) / sd)
        w = m.w[:c_feat] / sd[:c_feat]
        cam = np.sign(z)[:, None] * np.einsum("c,ncv->nv", w, feats)
        inside = (cam * m16).sum(1) / np.maximum(m16.sum(1), 1e-8)
        outside = (cam * (1 - m16)).sum(1) / np.maximum((1 - m16).sum(1), 1e-8)
        for key in [c] + (["chosen"] if c == chosen else []):
            r = rows[key]
            r["y"] += list(ds.labels[te]); r["z"] += list(z); r["zref"] += list(zref)
            r["cam_on"] += list(np.where(has, inside > outside, np.nan)); r["p_rec"] += [p_rec[int(i)] for i in te]
    print(f"fold {k}: inner-CV C {chosen}; {time.time() - t0:.0f}s", flush=True)

for key, r in rows.items():
    print(summary_line(f"C {key}", r["y"], r["z"], r["zref"], r["cam_on"]))
r = rows["chosen"]; y = np.array(r["y"]); lab = y >= 0
print(f"recorded (shipped head step): runtime AUC {roc_auc(y[lab], np.array(r['p_rec'])[lab]):.3f}")

"""Probe B, part 2: nested stacking of the CNN logit with radiomics features.

For each test fold f, an L2 logistic regression (nodule_edge.train.head.fit_logistic, standardised
inputs, L2 chosen from {0.1, 1, 10, 100} by leave-one-fold-out over the four training folds) is fitted
on the out-of-fold rows of the other four folds and scores fold f. Folds are the shipped CV's
patient-disjoint folds.
Usage: .venv/bin/python docs/cv/probes/stack.py   (needs radiomics.npz, paths_foldK.npz)
Writes runs/probes/stack_summary.json and stack_scores.npz
"""
from __future__ import annotations

import json, sys
from pathlib import Path
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from nodule_edge.metrics import roc_auc
from nodule_edge.train.head import fit_logistic

OUT = Path(__file__).resolve().parents[3] / "runs" / "probes"
ROOT = Path(__file__).resolve().parents[3]
L2S = (0.1, 1.0, 10.0, 100.0)

rad = np.load(OUT / "radiomics.npz")
names = list(rad["names"])
idx = rad["index"]; fold = rad["fold"]; y = rad["labels"]
pos = {int(i): j for j, i in enumerate(idx)}
logit = np.full(len(idx), np.nan); logit_flip4 = logit.copy(); logit_flip8 = logit.copy(); logit_ref = logit.copy()
for k in range(5):
    d = np.load(OUT / f"paths_fold{k}.npz")
    rows = [pos[int(i)] for i in d["index"]]
    logit[rows] = d["runtime_default"]; logit_ref[rows] = d["reference_box"]
    logit_flip8[rows] = d["flip_logits_runtime"].mean(1); logit_flip4[rows] = d["flip_logits_runtime"][:, [0, 2, 4, 6]].mean(1)


def transform(f):
    f = f.copy()
    f[:, 0] = np.log(np.maximum(f[:, 0], 0.5))  # log Feret diameter
    return f


pred = transform(rad["pred"]); reader = transform(rad["reader"])
manifest_diam = np.log(rad["diameters"])[:, None]
reader_md = np.c_[manifest_diam, reader[:, 1:]]  # readers' features with the manifest diameter (as the earlier radiomics probe)
sets = {
    "logit_runtime": logit[:, None],
    "pred_features": pred,
    "logit_runtime+pred_features": np.c_[logit, pred],
    "logit_flip4+pred_features": np.c_[logit_flip4, pred],
    "logit_flip8+pred_features": np.c_[logit_flip8, pred],
    "reader_features": reader,
    "logit_runtime+reader_features": np.c_[logit, reader],
    "reader_features_manifest_diameter": reader_md,
    "logit_runtime+reader_features_manifest_diameter": np.c_[logit, reader_md],
    "logit_reference_box": logit_ref[:, None],
    "logit_reference_box+reader_features": np.c_[logit_ref, reader],
    "log_manifest_diameter": manifest_diam,
}
lab = y >= 0


def fit_predict(xtr, ytr, xte, l2):
    mu = np.nanmean(xtr, 0); sd = np.nanstd(xtr, 0); sd = np.where(sd > 1e-8, sd, 1.0)
    ztr = np.nan_to_num((xtr - mu) / sd); zte = np.nan_to_num((xte - mu) / sd)  # NaN (empty mask) -> training mean
    w, b = fit_logistic(ztr, ytr.astype(np.float64), l2)
    return zte @ w + b, w


def choose_l2(x, yy, ff):
    best, scores = None, {}
    for l2 in L2S:
        s = np.empty(len(yy))
        for g in np.unique(ff):
            s[ff == g], _ = fit_predict(x[ff != g], yy[ff != g], x[ff == g], l2)
        scores[l2] = roc_auc(yy, s)
    best = max(scores, key=scores.get)
    return best, scores


fjd = {k: json.loads((ROOT / f"docs/cv/fold{k}.json").read_text())["baseline_diameter"]["auc"] for k in range(5)}
summary, out_scores = {}, {}
for name, x in sets.items():
    score = np.full(len(idx), np.nan); per, chosen, weights = {}, {}, {}
    for k in range(5):
        tr = lab & (fold != k); te = lab & (fold == k)
        l2, _ = choose_l2(x[tr], y[tr], fold[tr])
        score[te], w = fit_predict(x[tr], y[tr], x[te], l2)
        per[k] = roc_auc(y[te], score[te]); chosen[k] = l2; weights[k] = w.round(3).tolist()
    pooled = roc_auc(y[lab], score[lab])
    summary[name] = {"pooled_auc": pooled, "per_fold": per, "mean_fold": float(np.mean(list(per.values()))),
                     "folds_above_diameter": int(sum(per[k] > fjd[k] for k in range(5))), "l2": chosen, "weights_standardised": weights,
                     "available_at_runtime": not ("reader" in name or "manifest" in name or "reference" in name)}
    out_scores[name] = score
summary["_raw_logit_runtime_pooled"] = roc_auc(y[lab], logit[lab])
summary["_n_labelled"] = int(lab.sum())
summary["_feature_names"] = names
summary["_empty_pred_masks"] = int(np.isnan(rad["pred"][:, 0]).sum())
summary["_single_feature_auc_pred"] = {n: roc_auc(y[lab], np.nan_to_num(pred[lab, j], nan=np.nanmedian(pred[:, j]))) for j, n in enumerate(names)}
summary["_single_feature_auc_reader"] = {n: roc_auc(y[lab], reader[lab, j]) for j, n in enumerate(names)}
summary["_feature_corr_pred_vs_reader"] = {n: float(np.corrcoef(np.nan_to_num(pred[:, j], nan=np.nanmedian(pred[:, j])), reader[:, j])[0, 1]) for j, n in enumerate(names)}
summary["_dice_pred_vs_reader_mean"] = float(rad["dice"].mean())
(OUT / "stack_summary.json").write_text(json.dumps(summary, indent=1, default=float))
np.savez(OUT / "stack_scores.npz", index=idx, fold=fold, labels=y, **out_scores)
print(f"{'stack':50s} pooled  f0    f1    f2    f3    f4    mean  >diam runtime?")
for name in sets:
    v = summary[name]
    print(f"{name:50s} {v['pooled_auc']:.3f}  " + " ".join(f"{v['per_fold'][k]:.3f}" for k in range(5)) + f" {v['mean_fold']:.3f}  {v['folds_above_diameter']}/5   {v['available_at_runtime']}  l2={list(v['l2'].values())}")
for k in ("_raw_logit_runtime_pooled", "_n_labelled", "_empty_pred_masks", "_dice_pred_vs_reader_mean"):
    print(k, summary[k])
for k in ("_single_feature_auc_pred", "_single_feature_auc_reader", "_feature_corr_pred_vs_reader"):
    print(k, {n: round(v, 3) for n, v in summary[k].items()})

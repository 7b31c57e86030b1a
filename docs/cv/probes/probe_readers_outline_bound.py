"""How far would the shipped model get if it knew what the readers' outline knows? From the
fold files of docs/ablations/no_outline_term (the shipped model then, docs/cv) and docs/ablations/network_seed1 (a second training
of the same recipe) and the 7 radiomics features of the readers' masks
(runs/probes/reader_radiomics.npz, written by probe_soft_labels_radiomics.py), no network run.

Each row is pooled out of fold over the shipped CV's five folds (581 labelled nodules): the
recorded logits alone, or an L2 logistic regression (fitted per fold on the training folds'
labelled nodules, inputs standardised on them) of the recorded logit plus readers'-mask
features. The readers' features are not available at run time and the same readers rated the
malignancy behind the proxy label: these rows bound what a better outline could add, they are
not models. Paired 95 % bootstrap intervals against the shipped logit resample nodules within
folds (2000 draws), as cv-compare does.
Usage: .venv/bin/python docs/cv/probes/probe_readers_outline_bound.py   (output: readers_outline_bound.txt)"""
import csv, json, sys
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "docs/cv/probes"))
from nodule_edge.metrics import roc_auc
import linear  # noqa: E402

L2 = 1.0
rows = list(csv.DictReader(open(ROOT.parent / "shared/data/lidc_voi/manifest.csv")))
radiomics_path = ROOT / "runs/probes/reader_radiomics.npz"
if not radiomics_path.exists():
    sys.exit(f"{radiomics_path} is missing: run docs/cv/probes/probe_soft_labels_radiomics.py first")
R = np.load(radiomics_path)["f"]  # feret mm, log volume, HU mean, sd, p90, solid fraction, compactness


def run_logits(folder):
    out = {}
    for k in range(5):
        pred = json.loads((ROOT / folder / f"fold{k}.json").read_text())["predictions"]
        for i, p in zip(pred["index"], pred["probability"]):
            p = min(max(p, 1e-7), 1 - 1e-7)
            out[i] = (k, np.log(p / (1 - p)))
    return out


shipped, seed1 = run_logits("docs/ablations/no_outline_term"), run_logits("docs/ablations/network_seed1")
idx = np.array([i for i in sorted(shipped) if float(rows[i]["malignancy_mean"]) != 3])
y = np.array([float(rows[i]["malignancy_mean"]) > 3 for i in idx], dtype=float)
fold = np.array([shipped[i][0] for i in idx])
z = np.array([shipped[i][1] for i in idx])
z_seed1 = np.array([seed1[i][1] for i in idx])
diameter = np.log(np.array([float(rows[i]["diameter_mm"]) for i in idx]))
F = R[idx].copy()
F[:, 0] = np.log(np.maximum(F[:, 0], 0.5))
calcified = np.array([rows[i]["calcification_maxvote"] != "6" for i in idx])


def out_of_fold(x):
    return linear.out_of_fold(x, y, fold, L2)


def paired(score, reference):
    return linear.paired_interval(y, score, reference, fold)


scores = {
    "shipped logit (docs/cv)": z,
    "network_seed1 logit": z_seed1,
    "mean of the two logits": z + z_seed1,
    "readers' diameter alone (manifest)": diameter,
    "readers'-mask radiomics, 7 features": out_of_fold(F),
    "logit + readers' diameter": out_of_fold(np.c_[z, diameter]),
    "logit + readers' log volume": out_of_fold(np.c_[z, F[:, 1]]),
    "logit + readers' in-plane Feret diameter": out_of_fold(np.c_[z, F[:, 0]]),
    "logit + readers' HU mean, sd, p90": out_of_fold(np.c_[z, F[:, 2:5]]),
    "logit + readers' Feret + HU mean, sd, p90": out_of_fold(np.c_[z, F[:, [0, 2, 3, 4]]]),
    "logit + all 7 readers'-mask features": out_of_fold(np.c_[z, F]),
}
print(f"{len(y)} labelled nodules ({int(y.sum())} malignant), {int((~calcified).sum())} not calcified; L2 {L2}")
print(f"{'score':44s} {'pooled AUC':>10s}  {'paired vs shipped [95 % CI]':>30s}  {'not calcified':>13s}")
for name, s in scores.items():
    a = roc_auc(y, s)
    lo, hi = paired(s, z)
    print(f"{name:44s} {a:10.3f}  {a - roc_auc(y, z):+8.3f} [{lo:+.3f}, {hi:+.3f}]      {roc_auc(y[~calcified], s[~calcified]):13.3f}")

"""Does a linear model fitted to soft malignancy targets of every rated nodule rank better than one
fitted to the sure nodules' 0/1 labels? On the 7 radiomics features of the readers' masks
(radiomics_features.py), an L2 logistic regression per fold of the shipped CV, pooled out of fold.
Targets: the proxy labels (sure nodules only); the share of readers rating 4-5 (3 counts half);
(mean rating - 1) / 4; sigmoid(2 (mean rating - 3)) -- the last three on every rated nodule.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_soft_labels_radiomics.py
(output: soft_labels_radiomics.txt)"""
import sys, json, csv
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "docs/cv/probes")); sys.path.insert(0, str(ROOT))
from common import setup  # noqa
from radiomics_features import features, VOX  # noqa
import dataclasses, SimpleITK as sitk
from nodule_edge.patch import resample_hu
from nodule_edge.metrics import roc_auc
from nodule_edge.train.head import fit_logistic

out = ROOT / "runs/probes/reader_radiomics.npz"
out.parent.mkdir(parents=True, exist_ok=True)
cfg, ds, spec = setup()
rows = list(csv.DictReader(open(ROOT.parent / "shared/data/lidc_voi/manifest.csv")))
mean = np.array([float(r["malignancy_mean"]) for r in rows])
readers = [[int(v) for v in r["malignancy_readers"].split()] for r in rows]
fold = np.full(len(rows), -1)
for k in range(5):
    for i in json.loads((ROOT / f"docs/cv/fold{k}.json").read_text())["predictions"]["index"]:
        fold[i] = k
if out.exists():
    F = np.load(out)["f"]
else:
    whole = dataclasses.replace(spec, nodule_box=None)
    F = []
    for i, rec in enumerate(ds.records):
        hu = resample_hu(sitk.ReadImage(str(rec.image_path)), rec.center_lps_mm, whole)
        m = ds.cache.masks[i].astype(np.float32) >= 0.5
        F.append(features(m, hu) if ds.cache.has_mask[i] else np.full(7, np.nan))
    F = np.array(F); np.savez(out, f=F)
F[:, 0] = np.log(np.maximum(F[:, 0], 0.5))
ok = ~np.isnan(F).any(1)
y = ds.labels
frac = np.array([(np.sum(np.array(r) > 3) + 0.5 * np.sum(np.array(r) == 3)) / len(r) for r in readers])
soft_mean = np.clip((mean - 1) / 4, 0, 1)
targets = {"binary_sure": None, "frac_readers_all": frac, "mean_scaled_all": soft_mean,
           "sigmoid_mean_all": 1 / (1 + np.exp(-2 * (mean - 3)))}
for l2 in (0.1, 1.0, 10.0):
    res = {}
    for name, t in targets.items():
        s = np.full(len(y), np.nan)
        for k in range(5):
            tr = (fold != k) & ok & (fold >= 0); te = (fold == k) & ok
            if t is None:
                tr &= y >= 0; tt = y[tr].astype(float)
            else:
                tt = t[tr]
            mu, sd = F[tr].mean(0), F[tr].std(0)
            w, b = fit_logistic((F[tr] - mu) / sd, tt, l2)
            s[te] = ((F[te] - mu) / sd) @ w + b
        lab = (y >= 0) & ok
        res[name] = round(float(roc_auc(y[lab], s[lab])), 4)
    print("l2", l2, res, flush=True)

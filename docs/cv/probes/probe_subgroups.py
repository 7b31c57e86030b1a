"""Where the shipped model's pooled held-out AUC comes from: calcified against non-calcified
nodules, diameter bins and slice spacing, against the readers' diameter, from docs/cv/fold*.json
alone (no network is run). Labels: malignancy_mean > 3 -> 1, < 3 -> 0 (= 3 left out).
Calcified: calcification_maxvote != 6 (LIDC: 6 = absent).
Usage: .venv/bin/python docs/cv/probes/probe_subgroups.py   (output: subgroups.txt)"""
import csv, json
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[3]
import sys; sys.path.insert(0, str(ROOT))
from nodule_edge.metrics import roc_auc

rows = list(csv.DictReader(open(ROOT.parent / "shared/data/lidc_voi/manifest.csv")))
idx, p, vol = [], [], []
for k in range(5):
    pred = json.loads((ROOT / f"docs/cv/fold{k}.json").read_text())["predictions"]
    idx += pred["index"]; p += pred["probability"]; vol += pred["volume_mm3"]
idx, p, vol = np.array(idx), np.array(p), np.array(vol)
mal = np.array([float(rows[i]["malignancy_mean"]) for i in idx])
keep = mal != 3
idx, p, vol, mal = idx[keep], p[keep], vol[keep], mal[keep]
y = (mal > 3).astype(int)
diam = np.array([float(rows[i]["diameter_mm"]) for i in idx])
calc = np.array([rows[i]["calcification_maxvote"] != "6" for i in idx])
dz = np.array([float(rows[i]["spacing_mm"].split("x")[2]) for i in idx])


def line(name, sel):
    n, pos = int(sel.sum()), int(y[sel].sum())
    s = f"{name:28s} n={n:3d} malignant={pos:3d}"
    if 0 < pos < n:
        s += f"  AUC model {roc_auc(y[sel], p[sel]):.3f}  diameter {roc_auc(y[sel], diam[sel]):.3f}  predicted volume {roc_auc(y[sel], vol[sel]):.3f}"
    print(s)


line("all labelled", np.ones_like(y, bool))
line("calcified", calc)
line("not calcified", ~calc)
for lo, hi in [(0, 6), (6, 10), (10, 15), (15, 20), (20, 99)]:
    line(f"not calcified, {lo}-{hi} mm", ~calc & (diam > lo) & (diam <= hi))
line("not calcified, slices <= 1.3 mm", ~calc & (dz <= 1.3))
line("not calcified, slices > 1.3 mm", ~calc & (dz > 1.3))
print(f"mean probability: calcified benign {p[calc & (y == 0)].mean():.3f}, not calcified benign "
      f"{p[~calc & (y == 0)].mean():.3f}, not calcified malignant {p[~calc & (y == 1)].mean():.3f}")

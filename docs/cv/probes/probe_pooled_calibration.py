"""Why is the pooled out-of-fold AUC below the mean of the fold AUCs, and are the probabilities
calibrated? From the fold files alone (docs/cv/foldK.json or DIR/foldK.json: held-out probability
on the runtime path per manifest row; LIDC proxy labels).

  - each fold's AUC, its logits' mean and sd, the share of malignant nodules;
  - pooled AUC, the mean of the fold AUCs, and the pooled AUC after standardising each fold's
    logits by that fold's own mean and sd (this reads each test fold's distribution, which one final
    model never has: a measure of what the folds' different logit scales cost the pooled figure,
    not a rule the runtime could use);
  - Brier score, expected calibration error (10 equal-width bins) and log loss of the probabilities,
    then the same after a temperature fitted by log loss on the other four folds (grid 0.30-3.00).

Usage: .venv/bin/python docs/cv/probes/probe_pooled_calibration.py [DIR]   (output pooled_calibration.txt)"""
import csv
import json
import sys
from pathlib import Path

import numpy as np

from nodule_edge.metrics import roc_auc

ROOT = Path(__file__).resolve().parents[3]
folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/cv"
rows = list(csv.DictReader(open(ROOT.parent / "shared/data/lidc_voi/manifest.csv")))
rating = np.array([float(r["malignancy_mean"]) for r in rows])
sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731


def log_loss(y, z):
    p = np.clip(sigmoid(z), 1e-9, 1 - 1e-9)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def ece(y, p, bins=10):
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum((which == b).mean() * abs(y[which == b].mean() - p[which == b].mean()) for b in range(bins) if (which == b).any()))


ys, zs = [], []
lines = [f"fold files: {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}"]
for k in range(5):
    pred = json.loads((folder / f"fold{k}.json").read_text())["predictions"]
    idx, p = np.asarray(pred["index"]), np.clip(np.asarray(pred["probability"]), 1e-7, 1 - 1e-7)
    labelled = rating[idx] != 3
    y, z = (rating[idx][labelled] > 3).astype(float), np.log(p / (1 - p))[labelled]
    ys.append(y), zs.append(z)
    lines.append(f"fold {k}: AUC {roc_auc(y, z):.3f}, logit mean {z.mean():+.2f} sd {z.std():.2f}, malignant {y.mean():.2f} of {len(y)}")
y, z = np.concatenate(ys), np.concatenate(zs)
fold = np.concatenate([np.full(len(v), k) for k, v in enumerate(ys)])
standardised = np.concatenate([(v - v.mean()) / v.std() for v in zs])
lines.append(f"pooled AUC {roc_auc(y, z):.3f}; mean of the fold AUCs {np.mean([roc_auc(a, b) for a, b in zip(ys, zs)]):.3f}; "
             f"pooled after standardising each fold's logits by its own mean and sd {roc_auc(y, standardised):.3f}")
grid = np.linspace(0.3, 3.0, 271)
tempered = z.copy()
temperatures = []
for k in range(5):
    t = min(grid, key=lambda t: log_loss(y[fold != k], z[fold != k] / t))
    tempered[fold == k] = z[fold == k] / t
    temperatures.append(t)
for name, v in (("as recorded", z), ("temperature from the other folds", tempered)):
    lines.append(f"{name}: Brier {((sigmoid(v) - y) ** 2).mean():.4f}, ECE {ece(y, sigmoid(v)):.4f}, log loss {log_loss(y, v):.4f}, "
                 f"pooled AUC {roc_auc(y, v):.3f}")
lines.append("temperatures (leave one fold out): " + " ".join(f"{t:.2f}" for t in temperatures))
print("\n".join(lines))
Path(__file__).with_name("pooled_calibration.txt").write_text("\n".join(lines) + "\n")

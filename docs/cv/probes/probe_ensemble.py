"""Would averaging the held-out logits of differently trained runs lift the pooled AUC?

Reads the recorded per-nodule runtime-path probabilities of five runs (all five folds each), pools
them, and scores each run, each pair's mean logit and the mean of all five on the 581 labelled
nodules (LIDC proxy labels). No network is run.
Usage: .venv/bin/python docs/cv/probes/probe_ensemble.py   (output: ensemble.txt)
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from nodule_edge.metrics import roc_auc  # noqa: E402
from nodule_edge.train.data import read_unsure_manifest  # noqa: E402

RUNS = ["ablations/wide_widths", "ablations/box_net_epochs40", "ablations/epochs20_box_net", "ablations/weight_ema", "ablations/lr_warmup"]


def pooled_logits(run: str) -> tuple[np.ndarray, np.ndarray]:
    index, prob = [], []
    for k in range(5):
        pred = json.loads((ROOT / "docs" / run / f"fold{k}.json").read_text())["predictions"]
        index += pred["index"]
        prob += pred["probability"]
    order = np.argsort(index)
    p = np.clip(np.asarray(prob)[order], 1e-6, 1 - 1e-6)
    return np.asarray(index)[order], np.log(p / (1 - p))


records = read_unsure_manifest(ROOT.parent / "shared/data/lidc_voi")
logits = {}
for run in RUNS:
    index, logits[run] = pooled_logits(run)
labels = np.array([-1 if records[i].label is None else records[i].label for i in index])
lab = labels >= 0
print(f"{lab.sum()} labelled nodules, five folds pooled")
for run in RUNS:
    print(f"{run}: {roc_auc(labels[lab], logits[run][lab]):.4f}")
for a, b in itertools.combinations(RUNS, 2):
    print(f"mean logit of {a} and {b}: {roc_auc(labels[lab], (logits[a] + logits[b])[lab]):.4f}")
print(f"mean logit of all five: {roc_auc(labels[lab], sum(logits.values())[lab]):.4f}")

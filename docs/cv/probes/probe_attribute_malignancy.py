"""Held-out AUC of the classifier's logit against the attribute head's malignancy rating (the
readout step's fit to every rated nodule's mean rating, L1, with the skip) and the sum of the two
z-scores, on the fold networks still in runs/ (runtime path, their box nets). Each fold's
probabilities are checked against its recorded foldK.json first.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_attribute_malignancy.py
(output: attribute_malignancy.txt)"""
import sys, json
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "docs/cv/probes")); sys.path.insert(0, str(ROOT))
from common import setup, DEVICE  # noqa
from nodule_edge.metrics import roc_auc
from nodule_edge.train.checkpoints import load_checkpoint
from nodule_edge.train.first_pass import load_box_net, box_net_segmenter
from nodule_edge.train.trainer import predict_runtime_path

cfg, ds, spec = setup()
for run, folds in [("weight_ema", [0, 1, 2]), ("lr_warmup", [0, 1, 2]), ("box_net_epochs40", [4])]:
    for k in folds:
        d = ROOT / f"runs/ablations/{run}/fold{k}"
        rec = json.loads((ROOT / f"docs/ablations/{run}/fold{k}.json").read_text())
        idx = np.array(rec["predictions"]["index"])
        model, _ = load_checkpoint(d / "refit.safetensors"); model.eval()
        net, _ = load_box_net(d / "box_net.safetensors")
        out, _ = predict_runtime_path(model, ds, idx, DEVICE, spec, segment=box_net_segmenter(net))
        p = out["malignancy_probability"].ravel()
        dev = np.abs(p - np.array(rec["predictions"]["probability"])).max()
        att = out["attributes"][:, -1]
        y = ds.labels[idx]; lab = y >= 0
        lg = np.log(p / (1 - p))
        z = lambda v: (v - v[lab].mean()) / v[lab].std()
        np.savez(ROOT / f"runs/probes/attr_{run}_fold{k}.npz", index=idx, p=p, attributes=out["attributes"])
        print(run, k, "max|dp| vs json", round(float(dev), 5), "logit", round(roc_auc(y[lab], lg[lab]), 4),
              "attr_malig", round(roc_auc(y[lab], att[lab]), 4), "sum z", round(roc_auc(y[lab], (z(lg) + z(att))[lab]), 4), flush=True)

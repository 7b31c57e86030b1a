"""What does the trained network know, and what does its classifier use? (docs/cv/README.md)

Loads a fold's checkpoint from a `nodule-edge train configs/shipped.toml` run, computes on the
training and test patients of that fold (training path: box of the reference mask) the classifier
inputs (pooled features, segmentation statistics, attribute embedding), and fits L2 logistic
probes on the training nodules to score the test nodules. Run from the repository root:

    python docs/cv/probe_classifier.py 0        # fold 0; needs runs/shipped/fold0/last.safetensors

Its output for fold 0 of the 12-epoch CV is docs/cv/probe_fold0.txt.
"""

import sys

import numpy as np
import torch

from nodule_edge.metrics import roc_auc
from nodule_edge.train.config import load_config
from nodule_edge.train.head import fit_logistic
from nodule_edge.train.model import SEG_FEATURE_NAMES, segmentation_statistics
from nodule_edge.train.trainer import load_checkpoint, load_dataset, patch_spec_from, reference_bounded, split_fold

fold = int(sys.argv[1]) if len(sys.argv) > 1 else 0
torch.set_num_threads(1)
cfg = load_config("configs/shipped.toml")
ds = load_dataset(cfg)
spec = patch_spec_from(cfg)
train, val, test = split_fold(ds, cfg, fold)
model, _ = load_checkpoint(f"runs/shipped/fold{fold}/last.safetensors")


def features(idx: np.ndarray) -> list[np.ndarray]:
    images = reference_bounded(ds, idx, spec)
    out: list[list[np.ndarray]] = [[], [], [], [], []]
    with torch.no_grad():
        for s in range(0, len(idx), 16):
            x = torch.from_numpy(images[s : s + 16].astype(np.float32))
            o = model(x)
            reference = torch.from_numpy(ds.cache.masks[idx[s : s + 16]].astype(np.float32))[:, None]
            for k, v in enumerate((o.features.mean((2, 3, 4)), segmentation_statistics(o.segmentation, x, 0.5), segmentation_statistics(reference, x, 0.5), o.embedding, o.malignancy_logit)):
                out[k].append(v.numpy())
    return [np.concatenate(v) for v in out]


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    mean, sd = x_train.mean(0), x_train.std(0) + 1e-6
    w, b = fit_logistic((x_train - mean) / sd, y_train, l2)
    return (x_train - mean) / sd @ w + b, (x_test - mean) / sd @ w + b


p_tr, s_tr, r_tr, e_tr, z_tr = features(train)
p_te, s_te, r_te, e_te, z_te = features(test)
y_tr, y_te = ds.labels[train], ds.labels[test]
a, b = y_tr >= 0, y_te >= 0
print(f"fold {fold}: the model's logit: training AUC {roc_auc(y_tr[a], z_tr[a]):.3f}, test {roc_auc(y_te[b], z_te[b]):.3f}; diameter test {roc_auc(y_te[b], ds.diameters[test][b]):.3f}")
for name, xtr, xte in [
    ("statistics of the predicted segmentation", s_tr, s_te),
    ("statistics of the reference mask", r_tr, r_te),
    ("pooled CNN features", p_tr, p_te),
    ("attribute embedding", e_tr, e_te),
    ("pooled features + statistics", np.c_[p_tr, s_tr], np.c_[p_te, s_te]),
]:
    for l2 in (1.0, 30.0):
        fit_tr, fit_te = probe(xtr[a], y_tr[a], xte[b], l2)
        print(f"probe {name:42s} L2 {l2:4.0f}: training AUC {roc_auc(y_tr[a], fit_tr):.3f}, test {roc_auc(y_te[b], fit_te):.3f}")
for i, name in enumerate(SEG_FEATURE_NAMES):
    print(f"  {name:24s} test AUC alone: predicted segmentation {roc_auc(y_te[b], s_te[b, i]):.3f}, reference mask {roc_auc(y_te[b], r_te[b, i]):.3f}")
c = model.feature_channels
w = model.cls.weight[0].detach().numpy()
contributions = np.c_[p_te @ w[:c], s_te @ w[c : c + 6], e_te @ w[c + 6 :]]
print("spread (sd) of the logit's parts on the test fold: pooled features, statistics, embedding:", contributions.std(0).round(3))

"""Paired bootstrap (nodules resampled within folds, 2000 draws) of pooled-AUC differences vs the
shipped runtime path, and one aligned per-nodule file of every score.
Usage: .venv/bin/python docs/cv/probes/bootstrap.py   Writes per_nodule_all.npz, bootstrap.json
"""
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from nodule_edge.metrics import roc_auc

OUT = Path(__file__).resolve().parents[3] / "runs" / "probes"
st = dict(np.load(OUT / "stack_scores.npz"))
idx = st["index"]; pos = {int(i): j for j, i in enumerate(idx)}
cols = {}
for k in range(5):
    d = np.load(OUT / f"paths_fold{k}.npz")
    rows = [pos[int(i)] for i in d["index"]]
    for name in json.loads(str(d["rules"])):
        if name.startswith("flip"):
            continue
        cols.setdefault(name, np.full(len(idx), np.nan))[rows] = d[name]
    cols.setdefault("flips8_runtime", np.full(len(idx), np.nan))[rows] = d["flip_logits_runtime"].mean(1)
    cols.setdefault("flips4_inplane_runtime", np.full(len(idx), np.nan))[rows] = d["flip_logits_runtime"][:, [0, 2, 4, 6]].mean(1)
for name, v in st.items():
    if name not in ("index", "fold", "labels"):
        cols["stack:" + name] = v
np.savez(OUT / "per_nodule_all.npz", index=idx, fold=st["fold"], labels=st["labels"], **cols)
y = st["labels"]; lab = y >= 0; fold = st["fold"]
rng = np.random.default_rng(0)
base = "runtime_default"
res = {}
names = ["reference_box", "third_pass", "thr0.4", "margin-1vox", "flips8_runtime", "flips4_inplane_runtime",
         "stack:pred_features", "stack:logit_runtime+pred_features", "stack:logit_runtime", "stack:reader_features", "stack:logit_runtime+reader_features"]
li = np.flatnonzero(lab)
draws = []
for _ in range(2000):
    draws.append(np.concatenate([rng.choice(li[fold[li] == k], (fold[li] == k).sum()) for k in range(5)]))
b0 = np.array([roc_auc(y[s], cols[base][s]) for s in draws])
for n in names:
    bn = np.array([roc_auc(y[s], cols[n][s]) for s in draws])
    dlt = bn - b0
    res[n] = {"delta_pooled_auc": roc_auc(y[lab], cols[n][lab]) - roc_auc(y[lab], cols[base][lab]),
              "ci95": [float(np.percentile(dlt, 2.5)), float(np.percentile(dlt, 97.5))], "p_le_0": float((dlt <= 0).mean())}
    print(f"{n:42s} dAUC {res[n]['delta_pooled_auc']:+.4f}  95% CI [{res[n]['ci95'][0]:+.4f}, {res[n]['ci95'][1]:+.4f}]  P(d<=0) {res[n]['p_le_0']:.3f}")
print("runtime_default pooled AUC bootstrap sd", float(b0.std()))
res["_runtime_default_pooled_sd"] = float(b0.std())
(OUT / "bootstrap.json").write_text(json.dumps(res, indent=1))

"""Can the heads' inputs estimate the readers' size better than the segmentation does? On a run's
five fold networks in runs/ (no retraining), the runtime path's head inputs (128 pooled fusion
features + 6 segmentation statistics) of the training fold (train + validation nodules, rated 3
included) are regressed on the readers' log diameter (manifest diameter_mm) by ridge regression on
standardised inputs (alpha by 5-fold patient-grouped inner CV); the prediction on the test fold is
ranked against the labels, beside the soft volume the heads read, the recorded probability and
the readers' diameter, for all labelled and for non-calcified nodules (calcification_maxvote 6),
pooled over folds. Also an L2 logistic regression on the same inputs (labels; C by inner CV), and
one on [recorded logit, predicted diameter] (cross-fitted over the other folds' test predictions).
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_size_regression.py [RUN]
(output of lr_warmup: size_regression.txt)"""
import sys, json, csv, time
from pathlib import Path
import numpy as np, torch
ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
from nodule_edge.metrics import roc_auc
sys.path.insert(0, str(ROOT / "docs/cv/probes"))
from linear import Ridge, LogisticRegression, inner_best  # noqa: E402
from nodule_edge.train.config import load_config
from nodule_edge.train.checkpoints import load_checkpoint
from nodule_edge.train.first_pass import load_box_net, box_net_segmenter
from nodule_edge.train.trainer import load_dataset, patch_spec_from, split_fold, predict_runtime_path, evaluated_checkpoint

run = sys.argv[1] if len(sys.argv) > 1 else "lr_warmup"
cfg = load_config(ROOT / f"configs/ablations/{run}.toml")
ds = load_dataset(cfg); spec = patch_spec_from(cfg); dev = torch.device("cpu")
rows = list(csv.DictReader(open(ROOT.parent / "shared/data/lidc_voi/manifest.csv")))
log_diam = np.log([float(r["diameter_mm"]) for r in rows])
calcified = np.array([r["calcification_maxvote"] != "6" for r in rows])
patients = np.array(ds.patients)


out = {k: [] for k in ("index", "pred_logdiam", "logistic", "soft_volume", "p")}
for k in range(5):
    t0 = time.time()
    d = ROOT / f"runs/ablations/{run}/fold{k}"
    rec = json.loads((ROOT / f"docs/ablations/{run}/fold{k}.json").read_text())
    tr, va, te = split_fold(ds, cfg, k); idx = np.concatenate([tr, va])
    model, _ = load_checkpoint(d / evaluated_checkpoint(cfg, cfg.cv.evaluate)); model.eval()
    seg = box_net_segmenter(load_box_net(d / "box_net.safetensors")[0])
    width = model.feature_channels + model.n_seg_features
    h_tr = predict_runtime_path(model, ds, idx, dev, spec, segment=seg)[0]["classifier_input"][:, :width]
    h_te = predict_runtime_path(model, ds, te, dev, spec, segment=seg)[0]["classifier_input"][:, :width]
    mu, sd = h_tr.mean(0), h_tr.std(0) + 1e-6
    x_tr, x_te = (h_tr - mu) / sd, (h_te - mu) / sd
    # Ridge on every training nodule (rated 3 included): the readers' log diameter.
    alpha = inner_best(lambda a: Ridge(alpha=a), x_tr, log_diam[idx], patients[idx], [1, 10, 100, 1000],
                       lambda y, m, x: -np.mean((m.predict(x) - y) ** 2))
    ridge = Ridge(alpha=alpha).fit(x_tr, log_diam[idx])
    lab = ds.labels[idx] >= 0
    c = inner_best(lambda a: LogisticRegression(C=a), x_tr[lab], ds.labels[idx][lab], patients[idx][lab],
                   [0.001, 0.01, 0.1, 1], lambda y, m, x: roc_auc(y, m.decision_function(x)))
    logistic = LogisticRegression(C=c).fit(x_tr[lab], ds.labels[idx][lab])
    pred = ridge.predict(x_te)
    out["index"] += list(te); out["pred_logdiam"] += list(pred); out["logistic"] += list(logistic.decision_function(x_te))
    out["soft_volume"] += list(h_te[:, model.feature_channels])  # log_volume statistic (first of SEG_FEATURE_NAMES)
    p = dict(zip(rec["predictions"]["index"], rec["predictions"]["probability"]))
    out["p"] += [p[int(i)] for i in te]
    r = np.corrcoef(pred, log_diam[te])[0, 1]
    print(f"fold {k}: ridge alpha {alpha}, r(pred, readers' log diameter) on test {r:.3f}; logistic C {c}; {time.time()-t0:.0f}s", flush=True)

o = {a: np.array(b) for a, b in out.items()}
idx = o["index"].astype(int); fold = np.repeat(np.arange(5), [np.sum(np.isin(idx, split_fold(ds, cfg, k)[2])) for k in range(5)])
y = ds.labels[idx]; lab = y >= 0
pp = np.clip(o["p"], 1e-6, 1 - 1e-6); logit = np.log(pp / (1 - pp))
# Cross-fitted stack [logit, predicted diameter]: fitted on the other folds' test predictions.
stack = np.zeros(len(idx))
for k in range(5):
    fit = (fold != k) & lab
    m = LogisticRegression(C=1e6).fit(np.c_[logit, o["pred_logdiam"]][fit], y[fit])
    stack[fold == k] = m.decision_function(np.c_[logit, o["pred_logdiam"]][fold == k])
print(f"test nodules {len(idx)}; r(predicted, readers' log diameter) pooled {np.corrcoef(o['pred_logdiam'], log_diam[idx])[0, 1]:.3f}, "
      f"r(soft volume statistic, readers' log diameter) {np.corrcoef(o['soft_volume'], log_diam[idx])[0, 1]:.3f}")
for name, sel in [("all labelled", lab), ("not calcified", lab & ~calcified[idx])]:
    s = f"{name:14s} n={int(sel.sum())}:"
    for key, v in [("recorded p", o["p"]), ("soft volume stat", o["soft_volume"]), ("ridge diameter", o["pred_logdiam"]),
                   ("logistic on head inputs", o["logistic"]), ("stack logit+ridge", stack), ("readers' diameter", log_diam[idx])]:
        s += f"  {key} {roc_auc(y[sel], v[sel]):.3f}"
    print(s)
np.savez(ROOT / f"runs/probes/size_regression_{run}.npz", **o, stack=stack)

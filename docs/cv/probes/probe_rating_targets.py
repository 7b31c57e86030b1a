"""The shipped head step against the same step with the classifier fitted to the readers' mean
malignancy ratings (`[head] classifier_target = "ratings"`), on a run's fold networks in runs/
(no retraining; the test fold in view). Prints the test fold's runtime-path AUC, readers'-box AUC
and path parity of each; "dev_vs_json" checks the shipped step against the recorded foldK.json.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_rating_targets.py RUN FOLD [FOLD...]
(output of `lr_warmup 0 1`: rating_targets_lr_warmup.txt)"""
import sys, json, copy, dataclasses, time
from pathlib import Path
import numpy as np, torch
ROOT = Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
from nodule_edge.metrics import roc_auc
from nodule_edge.train.config import load_config
from nodule_edge.train.checkpoints import load_checkpoint
from nodule_edge.train.first_pass import load_box_net, box_net_segmenter
from nodule_edge.train.trainer import (load_dataset, patch_spec_from, split_fold, predict, predict_runtime_path,
                                       reference_bounded, evaluated_checkpoint)
from nodule_edge.train.head import refit_heads
from nodule_edge.train.run import head_inputs, head_objective

run = sys.argv[1]; folds = [int(v) for v in sys.argv[2:]]
cfg = load_config(ROOT / f"configs/ablations/{run}.toml")
ds = load_dataset(cfg); spec = patch_spec_from(cfg); dev = torch.device("cpu")
out_all = {}
for k in folds:
    t0 = time.time()
    d = ROOT / f"runs/ablations/{run}/fold{k}"
    rec = json.loads((ROOT / f"docs/ablations/{run}/fold{k}.json").read_text())
    tr, va, te = split_fold(ds, cfg, k); idx = np.concatenate([tr, va])
    base, _ = load_checkpoint(d / evaluated_checkpoint(cfg, cfg.cv.evaluate))
    seg = box_net_segmenter(load_box_net(d / "box_net.safetensors")[0])
    width = base.feature_channels + base.n_seg_features
    inputs = head_inputs(base, ds, idx, dev, spec, seg, with_reference=True)
    test = predict_runtime_path(base, ds, te, dev, spec, segment=seg)[0]
    test_ref = predict(base, ds, te, dev, False, images=reference_bounded(ds, te, spec))
    x_te = torch.from_numpy(test["classifier_input"][:, :width]).float()
    x_ref = torch.from_numpy(test_ref["classifier_input"][:, :width]).float()
    print(f"fold {k}: features in {time.time()-t0:.0f}s", flush=True)
    y = ds.labels[te]; lab = y >= 0
    res = {}
    for name, obj in [("shipped", head_objective(cfg)), ("ratings", dataclasses.replace(head_objective(cfg), rating_targets=True))]:
        m = copy.deepcopy(base)
        info = refit_heads(m, inputs, [ds.patients[i] for i in idx], obj, l2_grid=cfg.head.l2_grid, seed=cfg.train.seed)
        with torch.no_grad():
            def logit(x):
                return m._heads(x[:, : m.feature_channels], x[:, m.feature_channels :])[0].double().numpy()
            lg, lr = logit(x_te), logit(x_ref)
        p = 1 / (1 + np.exp(-lg))
        res[name] = dict(auc=roc_auc(y[lab], lg[lab]), ref_auc=roc_auc(y[lab], lr[lab]),
                         parity=float(np.abs(p - 1 / (1 + np.exp(-lr))).mean()), l2=info["l2"],
                         inner=info["inner_cv_by_l2"], dev_vs_json=float(np.abs(p - np.array(rec["predictions"]["probability"])).max()))
        np.savez(ROOT / f"runs/probes/rt_{run}_fold{k}_{name}.npz", index=te, logit=lg, logit_ref=lr)
        print(k, name, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in res[name].items() if a != "inner"}, flush=True)
    out_all[k] = res
    (ROOT / f"runs/probes/rt_{run}_fold{k}.json").write_text(json.dumps(res, indent=1))

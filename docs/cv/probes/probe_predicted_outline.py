"""The readers'-outline bound of probe_readers_outline_bound.py, with the shipped model's own
outline instead: the same 7 radiomics features (radiomics_features.features) of the runtime
path's segmentation (box net first pass, second pass's 64³ map at p >= 0.5, the 26-connected
component nearest the centre) on HU resampled onto the cube grid, and of the box net's outline of
the whole cube (the runtime's first pass, same rule), for the held-out nodules of
each shipped fold (runs/shipped/foldK/refit.no_outline_term.safetensors with its box_net.safetensors; the
probabilities must reproduce docs/ablations/no_outline_term/foldK.json, docs/cv until the outline term shipped). Then the same out-of-fold L2 logistic stacks
(logit + features), side by side with the readers'-mask features of the same nodules.

Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_predicted_outline.py
(per-fold arrays in runs/probes/predicted_outline_foldK.npz and box_outline_foldK.npz; output:
predicted_outline.txt)"""
import csv, dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa
from radiomics_features import component_nearest_centre, features, outline_features, voi_hu  # noqa
from nodule_edge.metrics import roc_auc
from nodule_edge.train.first_pass import box_net_segmenter, load_box_net
import linear  # noqa: E402
from nodule_edge.train.trainer import predict_runtime_path

cfg, ds, spec = setup()
whole = dataclasses.replace(spec, nodule_box=None)
for fold in range(5):
    path = OUT / f"predicted_outline_fold{fold}.npz"
    if path.exists():
        continue
    _, _, test = fold_split(ds, cfg, fold)
    model, _ = load_checkpoint(ROOT / f"runs/shipped/fold{fold}/refit.no_outline_term.safetensors")
    model.eval()
    segment = box_net_segmenter(load_box_net(ROOT / f"runs/shipped/fold{fold}/box_net.safetensors")[0])
    pred, _ = predict_runtime_path(model, ds, test, DEVICE, spec, segment=segment)
    recorded = json.loads((ROOT / f"docs/ablations/no_outline_term/fold{fold}.json").read_text())["predictions"]
    if list(recorded["index"]) != [int(i) for i in test]:
        sys.exit(f"fold {fold}: test nodules differ from docs/ablations/no_outline_term/fold{fold}.json")
    deviation = float(np.abs(pred["malignancy_probability"] - np.asarray(recorded["probability"])).max())
    f_pred, f_reader = [], []
    for j, i in enumerate(test):
        hu = voi_hu(ds.records[i], whole)
        f_pred.append(features(component_nearest_centre(pred["segmentation64"][j].astype(np.float32) >= 0.5), hu))
        mr = ds.cache.masks[i].astype(np.float32) >= 0.5
        f_reader.append(features(mr, hu) if ds.cache.has_mask[i] else np.full(7, np.nan))
    np.savez(path, index=test, probability=pred["malignancy_probability"], pred=np.array(f_pred),
             reader=np.array(f_reader), max_deviation_from_fold_file=deviation)
    print(f"fold {fold}: {len(test)} nodules, probabilities within {deviation:.1e} of docs/ablations/no_outline_term/fold{fold}.json", flush=True)

# The third outline: the box net's (the runtime's first pass) on the whole cube, which only draws
# the box at run time; its Dice against the readers' mask is higher than the network's own.
for fold in range(5):
    path = OUT / f"box_outline_fold{fold}.npz"
    if path.exists():
        continue
    _, _, test = fold_split(ds, cfg, fold)
    segment = box_net_segmenter(load_box_net(ROOT / f"runs/shipped/fold{fold}/box_net.safetensors")[0])
    seg = segment(np.asarray(ds.cache.images[test], np.float32))
    np.savez(path, index=test, box=outline_features(ds, test, seg, whole))
    print(f"fold {fold}: box net outlines of {len(test)} nodules", flush=True)

rows = list(csv.DictReader(open(ROOT.parent / "shared/data/lidc_voi/manifest.csv")))
parts = [np.load(OUT / f"predicted_outline_fold{k}.npz") for k in range(5)]
idx = np.concatenate([p["index"] for p in parts])
fold = np.concatenate([np.full(len(p["index"]), k) for k, p in enumerate(parts)])
prob = np.clip(np.concatenate([p["probability"] for p in parts]), 1e-7, 1 - 1e-7)
P = np.concatenate([p["pred"] for p in parts]); Rf = np.concatenate([p["reader"] for p in parts])
B = np.concatenate([np.load(OUT / f"box_outline_fold{k}.npz")["box"] for k in range(5)])
mal = np.array([float(rows[i]["malignancy_mean"]) for i in idx])
keep = (mal != 3) & ~np.isnan(P).any(1) & ~np.isnan(Rf).any(1) & ~np.isnan(B).any(1)
dropped = int(((mal != 3) & ~keep).sum())
idx, fold, prob, P, Rf, B, mal = idx[keep], fold[keep], prob[keep], P[keep], Rf[keep], B[keep], mal[keep]
y = (mal > 3).astype(float)
z = np.log(prob / (1 - prob))
P[:, 0], Rf[:, 0], B[:, 0] = (np.log(np.maximum(X[:, 0], 0.5)) for X in (P, Rf, B))
calcified = np.array([rows[i]["calcification_maxvote"] != "6" for i in idx])


def out_of_fold(x, l2=1.0):
    return linear.out_of_fold(x, y, fold, l2)


def paired(score, reference):
    return linear.paired_interval(y, score, reference, fold)


deviation = max(float(p["max_deviation_from_fold_file"]) for p in parts)
print(f"{len(y)} labelled nodules ({int(y.sum())} malignant; {dropped} left out: an empty predicted outline); "
      f"probabilities within {deviation:.1e} of docs/cv")
print("Agreement of each feature, predicted against readers' outline (Pearson r over these nodules):")
for c, name in enumerate(["log Feret", "log volume", "HU mean", "HU sd", "HU p90", "solid fraction", "compactness"]):
    print(f"  {name:15s} r = {np.corrcoef(P[:, c], Rf[:, c])[0, 1]:.3f}   (box net's outline: {np.corrcoef(B[:, c], Rf[:, c])[0, 1]:.3f})")
rows_out = {"shipped logit": z}
for who, X in (("predicted", P), ("box net's", B), ("readers'", Rf)):
    rows_out[f"{who} outline: 7 features alone"] = out_of_fold(X)
    rows_out[f"logit + {who} Feret"] = out_of_fold(np.c_[z, X[:, 0]])
    rows_out[f"logit + {who} Feret + HU mean, sd, p90"] = out_of_fold(np.c_[z, X[:, [0, 2, 3, 4]]])
    rows_out[f"logit + {who} 7 features"] = out_of_fold(np.c_[z, X])
print(f"{'score':48s} {'pooled AUC':>10s}  {'paired vs shipped [95 % CI]':>30s}  {'not calcified':>13s}")
for name, s in rows_out.items():
    a = roc_auc(y, s)
    lo, hi = paired(s, z)
    print(f"{name:48s} {a:10.3f}  {a - roc_auc(y, z):+8.3f} [{lo:+.3f}, {hi:+.3f}]      {roc_auc(y[~calcified], s[~calcified]):13.3f}")
print("One feature swapped: the model's outline with one readers' feature, and the readers' with one of the model's:")
for c, name in enumerate(["Feret", "log volume", "HU mean", "HU sd", "HU p90", "solid fraction", "compactness"]):
    with_readers, with_model = P.copy(), Rf.copy()
    with_readers[:, c], with_model[:, c] = Rf[:, c], P[:, c]
    print(f"  {name:15s} model's 7 with the readers' {roc_auc(y, out_of_fold(with_readers)):.3f}   "
          f"readers' 7 with the model's {roc_auc(y, out_of_fold(with_model)):.3f}")

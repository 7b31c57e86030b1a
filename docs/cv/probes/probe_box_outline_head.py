"""Would the head gain from statistics of the box net's outline? The nested version of the stack in
probe_predicted_outline.py: per shipped fold, everything is fitted on the training fold alone
(its training and validation patients, as the head step), never on other folds' held-out nodules.

For each fold: the shipped network after its head step (runs/shipped/foldK/refit.no_outline_term.safetensors, before the outline term) gives
the runtime-path logit of every training-fold and test nodule (box net first pass, as shipped); the
fold's box net outlines the whole cube (p >= 0.5, component at the centre) and radiomics_features
measures that outline on HU resampled onto the cube grid. An L2 logistic regression of the label
on [logit, statistics] (inputs standardised on the training fold; L2 by 3-fold patient-grouped
inner CV on the training fold) is fitted on the training fold's labelled nodules and scores the
test fold. The training fold's logits are in-sample (the head step was fitted on them), as the
head step's own inputs are.
Statistic sets: all 7 features; four of them (log volume, HU mean, HU sd, solid fraction); the
same with the box net run again on the runtime's bounded cube (what a single-input second-pass
graph could read); and the soft statistics the heads already compute in-graph
(model.segmentation_statistics) of the box net's map, on the whole and on the bounded cube; and
the package's own nodule_edge.outline statistics (HU from the lung window channel, the box of the
component at the centre), which [head] outline_statistics fits.

Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_box_outline_head.py
(per-fold arrays in runs/probes/box_outline_head_foldK.npz; output: box_outline_head.txt)"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa
from radiomics_features import outline_features  # noqa
import linear  # noqa
import dataclasses
from nodule_edge.metrics import roc_auc
from nodule_edge.train.first_pass import box_net_segmenter, load_box_net
from nodule_edge.train.trainer import predict_runtime_path

cfg, ds, spec = setup()
whole = dataclasses.replace(spec, nodule_box=None)
SOFT = [1, 2, 3, 5]
L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)

for fold in range(5):
    path = OUT / f"box_outline_head_fold{fold}.npz"
    if path.exists():
        continue
    train, val, test = fold_split(ds, cfg, fold)
    fit_idx = np.concatenate([train, val])
    model, _ = load_checkpoint(ROOT / f"runs/shipped/fold{fold}/refit.no_outline_term.safetensors")
    model.eval()
    segment = box_net_segmenter(load_box_net(ROOT / f"runs/shipped/fold{fold}/box_net.safetensors")[0])
    out = {}
    for part, idx in (("fit", fit_idx), ("test", test)):
        prob = predict_runtime_path(model, ds, idx, DEVICE, spec, segment=segment)[0]["malignancy_probability"]
        feats = [outline_features(ds, idx[s:s + 32], segment(np.asarray(ds.cache.images[idx[s:s + 32]], np.float32)), whole)
                 for s in range(0, len(idx), 32)]
        out[f"{part}_index"], out[f"{part}_probability"], out[f"{part}_features"] = idx, prob, np.concatenate(feats)
    np.savez(path, **out)
    print(f"fold {fold}: {len(fit_idx)} training-fold and {len(test)} test nodules", flush=True)

# Stage 2: the same outline statistics where a single-input graph could compute them: the box net
# run again on the runtime's bounded cube (the second pass's input), hard features as above, and
# the soft in-graph statistics the heads already read (segmentation_statistics) of the box net's
# map on the whole cube and on the bounded cube.
import torch  # noqa: E402
from nodule_edge.patch import bound_to_nodule  # noqa: E402
from nodule_edge.train.model import segmentation_statistics  # noqa: E402

for fold in range(5):
    path = OUT / f"box_outline_head_extra_fold{fold}.npz"
    if path.exists():
        continue
    cached = np.load(OUT / f"box_outline_head_fold{fold}.npz")
    segment = box_net_segmenter(load_box_net(ROOT / f"runs/shipped/fold{fold}/box_net.safetensors")[0])
    out = {}
    for part in ("fit", "test"):
        idx = cached[f"{part}_index"]
        hard_bounded, soft_whole, soft_bounded = [], [], []
        for s in range(0, len(idx), 32):
            cubes = np.asarray(ds.cache.images[idx[s:s + 32]], np.float32)
            seg = segment(cubes)
            bounded = np.stack([bound_to_nodule(c, g, spec)[0] for c, g in zip(cubes, seg)])
            seg_b = segment(bounded)
            for x, g, store in ((cubes, seg, soft_whole), (bounded, seg_b, soft_bounded)):
                store.append(segmentation_statistics(torch.from_numpy(g[:, None]), torch.from_numpy(x), spec.spacing_mm).numpy())
            hard_bounded.append(outline_features(ds, idx[s:s + 32], seg_b, whole))
        out[f"{part}_hard_bounded"] = np.concatenate(hard_bounded)
        out[f"{part}_soft_whole"] = np.concatenate(soft_whole)
        out[f"{part}_soft_bounded"] = np.concatenate(soft_bounded)
    np.savez(path, **out)
    print(f"fold {fold}: box net statistics on the bounded cube and soft statistics", flush=True)

# Stage 3: the package's outline statistics (nodule_edge.outline, what [head] outline_statistics
# fits and the runtime would compute): the box net's map on the whole cube, the box of the
# component at the centre, HU from the lung window channel.
from nodule_edge.outline import outline_statistics_batch  # noqa: E402

box_net_fold_arrays(ds, "box_outline_package", lambda seg, cubes: outline_statistics_batch(seg, cubes, spec),
                    "package outline statistics")


def prepare(F):
    F = F.copy()
    F[:, 0] = np.log(np.maximum(np.nan_to_num(F[:, 0], nan=0.5), 0.5))
    F[:, 1] = np.nan_to_num(F[:, 1], nan=0.0)
    return np.nan_to_num(F, nan=0.0)  # an empty outline: volume 0, statistics 0 (none on these folds)


logit = linear.logit


def fit_score(x_fit, y_fit, groups, x_test):
    return linear.nested_fit_score(x_fit, y_fit, groups, x_test, L2_GRID)


variants = {"shipped logit": None, "logit + box net's 7 features": list(range(7)),
            "logit + box net's hard log volume, HU mean, sd, solid": SOFT,
            "box net's 7 features alone (no logit)": "alone",
            "logit + 7 features, box net on the bounded cube": ("hard_bounded", list(range(7))),
            "logit + in-graph statistics, box net on the whole cube": ("soft_whole", list(range(6))),
            "logit + in-graph statistics, box net on the bounded cube": ("soft_bounded", list(range(6))),
            "logit + nodule_edge.outline statistics (windowed HU)": ("package", list(range(7))),
            "logit + nodule_edge.outline Feret and log volume": ("package", [0, 1]),
            "logit + nodule_edge.outline Feret": ("package", [0]),
            "logit + nodule_edge.outline without Feret": ("package", list(range(1, 7)))}
scores = {name: [] for name in variants}
labels, folds, chosen = [], [], {name: [] for name in variants}
for fold in range(5):
    d = np.load(OUT / f"box_outline_head_fold{fold}.npz")
    extra = dict(np.load(OUT / f"box_outline_head_extra_fold{fold}.npz"))
    package = np.load(OUT / f"box_outline_package_fold{fold}.npz")
    extra.update(fit_package=package["fit"], test_package=package["test"])
    y_fit_all, y_test_all = ds.labels[d["fit_index"]], ds.labels[d["test_index"]]
    fl, tl = y_fit_all >= 0, y_test_all >= 0
    z_fit, z_test = logit(d["fit_probability"])[fl], logit(d["test_probability"])[tl]
    F_fit, F_test = prepare(d["fit_features"])[fl], prepare(d["test_features"])[tl]
    groups = np.array([ds.patients[i] for i in d["fit_index"][fl]])
    y_fit = y_fit_all[fl].astype(float)
    for name, cols in variants.items():
        if cols is None:
            scores[name].append(z_test)
            continue
        if cols == "alone":
            x_fit, x_test = F_fit, F_test
        elif isinstance(cols, tuple):
            key, c = cols
            G_fit, G_test = extra[f"fit_{key}"][fl], extra[f"test_{key}"][tl]
            if key.startswith("hard"):  # radiomics_features gives the Feret diameter in mm, the package its log
                G_fit, G_test = prepare(G_fit), prepare(G_test)
            x_fit, x_test = np.c_[z_fit, G_fit[:, c]], np.c_[z_test, G_test[:, c]]
        else:
            x_fit, x_test = np.c_[z_fit, F_fit[:, cols]], np.c_[z_test, F_test[:, cols]]
        s, l2 = fit_score(x_fit, y_fit, groups, x_test)
        scores[name].append(s); chosen[name].append(l2)
    labels.append(y_test_all[tl]); folds.append(np.full(int(tl.sum()), fold))
y, fold_of = np.concatenate(labels).astype(float), np.concatenate(folds)
scores = {k: np.concatenate(v) for k, v in scores.items()}
reference = scores["shipped logit"]


def paired(score):
    return linear.paired_interval(y, score, reference, fold_of)


print(f"{len(y)} labelled held-out nodules ({int(y.sum())} malignant); fitted per fold on the training fold only")
print(f"{'score':58s} {'pooled':>7s}  {'paired vs shipped [95 % CI]':>28s}  per fold                          L2 per fold")
for name, s in scores.items():
    a = roc_auc(y, s)
    lo, hi = paired(s)
    per_fold = " ".join(f"{roc_auc(y[fold_of == k], s[fold_of == k]):.3f}" for k in range(5))
    print(f"{name:58s} {a:7.3f}  {a - roc_auc(y, reference):+8.3f} [{lo:+.3f}, {hi:+.3f}]   {per_fold}   {chosen[name]}")

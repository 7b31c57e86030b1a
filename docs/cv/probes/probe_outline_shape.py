"""Would more measurements of the first pass's outline lift the outline term? Nested on the
training folds, as probe_box_outline_head.py (whose cached logits and package statistics it reads):
per shipped fold, the box net outlines every training-fold and test nodule's whole cube, and
besides the package's seven statistics (nodule_edge.outline) these are measured on the same
component (box of the component at the centre, p >= 0.5):
  elongation: sqrt of the middle / largest and smallest / largest eigenvalue of the outline's
    coordinates (mm);
  convexity: per axial slice, the outline's area over the area of its convex hull (voxel
    corners), averaged with the slices' areas as weights (spiculated and lobulated nodules lower);
  boundary softness: log volume at p >= 0.3 minus at p >= 0.7, and the mean probability inside;
  shell: mean HU and the share of voxels above -500 HU in a 2 mm shell just outside the outline
    (spicules and attached vessels).
An L2 logistic regression on [logit, statistics] (L2 by 3-fold patient-grouped inner CV on the
training fold) scores the test fold; the logit is the shipped network's before the outline term
(runs/shipped/foldK/refit.no_outline_term.safetensors, cached by probe_box_outline_head.py).

Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_outline_shape.py
(per-fold arrays in runs/probes/outline_shape_foldK.npz; output: outline_shape.txt)"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa
import linear  # noqa
from nodule_edge.metrics import roc_auc
from nodule_edge.patch import nodule_extent

cfg, ds, spec = setup()
VOXEL = spec.spacing_mm
LOW, HIGH = spec.windows[0]
SHELL = int(round(2.0 / VOXEL))
NAMES = ["elongation_mid", "elongation_min", "convexity", "log_volume_softness", "mean_probability",
         "shell_hu_mean", "shell_dense_fraction"]


def hull_area(points):
    """Area of the convex hull of 2D points (Andrew's monotone chain)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return 0.0
    def half(seq):
        h = []
        for p in seq:
            while len(h) >= 2 and (h[-1][0] - h[-2][0]) * (p[1] - h[-2][1]) - (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0]) <= 0:
                h.pop()
            h.append(p)
        return h
    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1], float)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def convexity(inside):
    areas, hulls = [], []
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    for sl in inside:
        pix = np.argwhere(sl)
        if len(pix) == 0:
            continue
        areas.append(len(pix)); hulls.append(hull_area((pix[:, None, :] + corners[None]).reshape(-1, 2)))
    areas, hulls = np.array(areas, float), np.maximum(np.array(hulls), 1.0)
    return float(np.sum(areas * np.minimum(areas / hulls, 1.0)) / areas.sum())


def dilate(mask, n):
    out = mask.copy()
    for _ in range(n):
        grown = out.copy()
        for a in range(3):
            grown |= np.roll(out, 1, a) | np.roll(out, -1, a)
        out = grown
    return out


def extras(seg, cube):
    extent = nodule_extent(seg, 0.5)
    if extent is None:
        return np.zeros(len(NAMES))
    lo = np.maximum(np.asarray(extent[0]) - SHELL - 1, 0)
    hi = np.minimum(np.asarray(extent[1]) + SHELL + 2, seg.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    s = seg[box]
    inner = tuple(slice(int(a - l), int(b - l + 1)) for a, b, l in zip(extent[0], extent[1], lo))
    inside = np.zeros_like(s, bool)
    inside[inner] = s[inner] >= 0.5
    pts = np.argwhere(inside) * VOXEL
    if len(pts) >= 4:
        ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))[::-1]
        ev = np.maximum(ev, 1e-6)
        mid, low = np.sqrt(ev[1] / ev[0]), np.sqrt(ev[2] / ev[0])
        convex = convexity(inside)
    else:
        mid = low = convex = 1.0
    soft = np.log(max((s[inner] >= 0.3).sum(), 1)) - np.log(max((s[inner] >= 0.7).sum(), 1))
    shell = dilate(inside, SHELL) & ~inside
    hu = LOW + (HIGH - LOW) * np.asarray(cube[0][box], np.float64)
    return np.array([mid, low, convex, soft, float(s[inside].mean()) if inside.any() else 0.0,
                     hu[shell].mean(), float((hu[shell] > -500).mean())])


box_net_fold_arrays(ds, "outline_shape", lambda seg, cubes: np.stack([extras(g, c) for g, c in zip(seg, cubes)]),
                    "outline shape measurements")

L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


logit = linear.logit


def fit_score(x_fit, y_fit, groups, x_test):
    return linear.nested_fit_score(x_fit, y_fit, groups, x_test, L2_GRID)[0]


variants = {"logit + package 7 (the term's inputs)": [],
            "+ elongation, convexity": [0, 1, 2],
            "+ boundary softness, mean probability": [3, 4],
            "+ shell HU mean, shell dense fraction": [5, 6],
            "+ all seven extras": list(range(7))}
scores = {name: [] for name in variants}
labels, folds = [], []
for fold in range(5):
    d = np.load(OUT / f"box_outline_head_fold{fold}.npz")
    package = np.load(OUT / f"box_outline_package_fold{fold}.npz")
    shape = np.load(OUT / f"outline_shape_fold{fold}.npz")
    fl, tl = ds.labels[d["fit_index"]] >= 0, ds.labels[d["test_index"]] >= 0
    groups = np.array([ds.patients[i] for i in d["fit_index"][fl]])
    y_fit = ds.labels[d["fit_index"]][fl].astype(float)
    base_fit = np.c_[logit(d["fit_probability"])[fl], package["fit"][fl]]
    base_test = np.c_[logit(d["test_probability"])[tl], package["test"][tl]]
    for name, cols in variants.items():
        x_fit, x_test = np.c_[base_fit, shape["fit"][fl][:, cols]], np.c_[base_test, shape["test"][tl][:, cols]]
        scores[name].append(fit_score(x_fit, y_fit, groups, x_test))
    labels.append(ds.labels[d["test_index"]][tl]); folds.append(np.full(int(tl.sum()), fold))
y, fold_of = np.concatenate(labels).astype(float), np.concatenate(folds)
scores = {k: np.concatenate(v) for k, v in scores.items()}
reference = scores["logit + package 7 (the term's inputs)"]
lines = [f"{len(y)} labelled held-out nodules ({int(y.sum())} malignant); fitted per fold on the training fold only",
         f"{'score':42s} {'pooled':>7s}  {'paired vs logit + package 7 [95 % CI]':>38s}  per fold"]
for name, s in scores.items():
    a = roc_auc(y, s)
    lo, hi = linear.paired_interval(y, s, reference, fold_of)
    per_fold = " ".join(f"{roc_auc(y[fold_of == k], s[fold_of == k]):.3f}" for k in range(5))
    lines.append(f"{name:42s} {a:7.3f}  {a - roc_auc(y, reference):+8.3f} [{lo:+.3f}, {hi:+.3f}]            {per_fold}")
print("\n".join(lines))
Path(__file__).with_name("outline_shape.txt").write_text("\n".join(lines) + "\n")

"""Can the box net's outline come closer to the readers' without training anything new? The outline
term reads seven statistics of the box net's outline (nodule_edge.outline); the same statistics of
the readers' outline rank the nodules better (0.929 against 0.918-0.920, docs/cv/README.md items 15
and 17), and the Feret diameter is most of the gap (predicted_outline.txt). This probe measures
outlines drawn from the same box net in other ways, all with the package's own function
(nodule_edge.outline.outline_statistics_batch, HU from the lung window of the whole cube):
  tT:       the box net's map at probability >= T (the shipped rule is t0.5);
  flips2:   the mean of the map and the map of the x-flipped cube, flipped back (one more pass);
  flips4:   the same over the four in-plane flips (identity, x, y, both; three more passes);
  openR:    the t0.5 outline opened by a ball of radius R voxels (0.5 mm each), which cuts thin
            attachments (vessels, pleural tags) that the readers leave out and that lengthen
            the Feret diameter;
  readers': the readers' consensus mask on the cube grid (the bound).
Yardsticks, on each fold's held-out nodules: Dice against the readers' mask (the whole map at its
threshold), each statistic's Pearson r with the readers', and the pooled AUC of the seven
statistics alone (an L2 logistic regression fitted on the training fold, L2 by 3-fold
patient-grouped inner CV there; probes/linear.py), paired against t0.5.

It needs only box nets (DIR/foldK/box_net.safetensors, as train_box_nets.py writes them without the
networks) and reads the folds that every DIR has. The first DIR is measured under every rule; each
further DIR (a box-net variant) under the shipped rule t0.5, paired against the first's t0.5.

Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_outline_threshold.py DIR [DIR ...]
(per-fold arrays in runs/probes/outline_threshold_DIRNAME_foldK.npz; output beside this file:
outline_threshold.txt for one DIR, outline_threshold_NAME2[_NAME3...].txt with variants)"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa
import linear  # noqa
from nodule_edge.metrics import roc_auc
from nodule_edge.outline import OUTLINE_FEATURE_NAMES, outline_statistics_batch
from nodule_edge.train.first_pass import box_net_segmenter, load_box_net

cfg, ds, spec = setup()
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
FLIPS = ((), (-1,), (-2,), (-2, -1))  # in-plane flips of [N, S, S, S] maps / [N, C, S, S, S] cubes
L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def at_threshold(t):
    return dataclasses.replace(spec, nodule_box=dataclasses.replace(spec.nodule_box, threshold=t))


def maps_under_flips(segment, cubes, n_flips):
    """[n_flips, n, S, S, S]: the box net's map of each of the first ``n_flips`` flipped cubes, flipped back."""
    out = []
    for axes in FLIPS[:n_flips]:
        x = np.flip(cubes, axis=tuple(a for a in axes)).copy() if axes else cubes
        m = segment(x)
        out.append(np.flip(m, axis=axes).copy() if axes else m)
    return np.stack(out)


def dice(seg, ref):
    inter = (seg & ref).sum(axis=(1, 2, 3))
    return 2 * inter / np.maximum(seg.sum(axis=(1, 2, 3)) + ref.sum(axis=(1, 2, 3)), 1)


VARIANTS = [f"t{t}" for t in THRESHOLDS] + ["flips2", "flips4", "open1", "open2", "readers'"]


def opened(maps, radius):
    """The t0.5 outlines of ``[n, S, S, S]`` maps, opened by a ball of ``radius`` voxels (float 0/1):
    erosion then dilation, each the AND / OR of the outline shifted by every offset in the ball."""
    r = np.arange(-radius, radius + 1)
    offsets = [(a, b, c) for a in r for b in r for c in r if a * a + b * b + c * c <= radius * radius]
    size = maps.shape[-1]

    def shifted(mask, fill, op):
        padded = np.pad(mask, ((0, 0),) + ((radius, radius),) * 3, constant_values=fill)
        out = np.full_like(mask, fill)
        for a, b, c in offsets:
            view = padded[:, radius + a:radius + a + size, radius + b:radius + b + size, radius + c:radius + c + size]
            out = op(out, view)
        return out

    eroded = shifted(maps >= 0.5, True, np.logical_and)
    return shifted(eroded, False, np.logical_or).astype(np.float32)
DIRS = [Path(a) for a in sys.argv[1:]] or [ROOT / "runs/box_nets_epyc"]


def measure_fold(box_dir, fold, variants):
    """The fold's cached arrays of ``variants`` for the box nets of ``box_dir``, computed once; None
    without a box net."""
    path = OUT / f"outline_threshold_{box_dir.name}_fold{fold}.npz"
    box_net = box_dir / f"fold{fold}/box_net.safetensors"
    if not path.exists():
        if not box_net.exists():
            return None
        train_idx, val_idx, test_idx = fold_split(ds, cfg, fold)
        fit_idx = np.concatenate([train_idx, val_idx])
        segment = box_net_segmenter(load_box_net(box_net)[0])
        out = {"fit_index": fit_idx, "test_index": test_idx}
        for part, idx in (("fit", fit_idx), ("test", test_idx)):
            stats = {v: [] for v in variants}
            dices = {v: [] for v in variants if v != "readers'"}
            n_flips = 4 if "flips4" in variants else 2 if "flips2" in variants else 1
            for s in range(0, len(idx), 32):
                rows = idx[s:s + 32]
                cubes = np.asarray(ds.cache.images[rows], np.float32)
                ref = np.asarray(ds.cache.masks[rows], np.float32)
                maps = maps_under_flips(segment, cubes, n_flips)
                for v in variants:
                    if v == "readers'":
                        seg, t = ref, 0.5
                    elif v.startswith("t"):
                        seg, t = maps[0], float(v[1:])
                    elif v.startswith("open"):
                        seg, t = opened(maps[0], int(v[4:])), 0.5
                    else:
                        seg, t = maps[: 2 if v == "flips2" else 4].mean(0), 0.5
                    stats[v].append(outline_statistics_batch(seg, cubes, at_threshold(t)))
                    if v != "readers'":
                        dices[v].append(dice(seg >= t, ref >= 0.5))
            for v in variants:
                out[f"{part}_stats_{v}"] = np.concatenate(stats[v])
            for v in dices:
                out[f"{part}_dice_{v}"] = np.concatenate(dices[v])
        OUT.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
        print(f"{box_dir.name} fold {fold}: outlines of {len(fit_idx)} training-fold and {len(test_idx)} test nodules", flush=True)
    return dict(np.load(path))


folds_done, cached = [], {}
for fold in range(5):
    # A variant's box nets are read under the shipped rule only: one pass, no flips.
    arrays = [measure_fold(d, fold, VARIANTS if k == 0 else ["t0.5"]) for k, d in enumerate(DIRS)]
    if all(a is not None for a in arrays):
        folds_done.append(fold)
        cached[fold] = arrays
rules = [(0, v) for v in VARIANTS] + [(k, "t0.5") for k in range(1, len(DIRS))]
names = [v if k == 0 else f"{DIRS[k].name} t0.5" for k, v in rules]

scores = {n: [] for n in names}
stats_test = {n: [] for n in names}
dice_test = {n: [] for n, (k, v) in zip(names, rules) if v != "readers'"}
labels, fold_of, has_mask = [], [], []
for fold in folds_done:
    first = cached[fold][0]
    fl = ds.labels[first["fit_index"]] >= 0
    tl = ds.labels[first["test_index"]] >= 0
    groups = np.array([ds.patients[i] for i in first["fit_index"][fl]])
    y_fit = ds.labels[first["fit_index"]][fl].astype(float)
    for n, (k, v) in zip(names, rules):
        d = cached[fold][k]
        scores[n].append(linear.nested_fit_score(d[f"fit_stats_{v}"][fl], y_fit, groups, d[f"test_stats_{v}"][tl], L2_GRID)[0])
        stats_test[n].append(d[f"test_stats_{v}"])
        if n in dice_test:
            dice_test[n].append(d[f"test_dice_{v}"])
    labels.append(ds.labels[first["test_index"]][tl])
    fold_of.append(np.full(int(tl.sum()), fold))
    has_mask.append(ds.cache.has_mask[first["test_index"]])
y, fold_of, has_mask = np.concatenate(labels).astype(float), np.concatenate(fold_of), np.concatenate(has_mask)
scores = {k: np.concatenate(v) for k, v in scores.items()}
stats_test = {k: np.concatenate(v) for k, v in stats_test.items()}
dice_test = {k: np.concatenate(v)[has_mask] for k, v in dice_test.items()}
reference = scores["t0.5"]
short = ["Feret", "logV", "HUmean", "HUsd", "HUp90", "solid", "compact"]
width = max(len(n) for n in names)
lines = [
    f"box nets: {', '.join(str(d.relative_to(ROOT) if d.is_absolute() and d.is_relative_to(ROOT) else d) for d in DIRS)}; "
    f"folds {folds_done}: {len(y)} labelled held-out nodules ({int(y.sum())} malignant), "
    f"{int(has_mask.sum())} held-out nodules with a readers' mask",
    f"{'outline':{width}s} {'Dice':>6s} {'7 alone':>8s}  {'paired vs t0.5 [95 % CI]':>26s}  r with the readers': "
    + " ".join(f"{n:>7s}" for n in short),
]
readers = stats_test["readers'"][has_mask]
for n in names:
    a = roc_auc(y, scores[n])
    lo, hi = linear.paired_interval(y, scores[n], reference, fold_of)
    mine = stats_test[n][has_mask]
    r = [np.corrcoef(mine[:, j], readers[:, j])[0, 1] for j in range(len(OUTLINE_FEATURE_NAMES))]
    dice_text = f"{dice_test[n].mean():6.3f}" if n in dice_test else f"{'':6s}"
    lines.append(f"{n:{width}s} {dice_text} {a:8.3f}  {a - roc_auc(y, reference):+8.3f} [{lo:+.3f}, {hi:+.3f}]  "
                 + " " * 21 + " ".join(f"{x:7.3f}" for x in r))
print("\n".join(lines))
OUTPUT = "outline_threshold.txt" if len(DIRS) == 1 else f"outline_threshold_{'_'.join(d.name for d in DIRS[1:])}.txt"
Path(__file__).with_name(OUTPUT).write_text("\n".join(lines) + "\n")

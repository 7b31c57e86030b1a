"""Does the outline term learn from outlines cleaner than the ones it meets at run time? The head step
fits the term on the training fold's box-net statistics, and the box net was trained on those very
nodules (in-sample), while the test fold's statistics come from nodules it never saw. If the box net
outlined its own training nodules much closer to the readers', the term would weigh the statistics
for a cleaner signal than it gets, and cross-fitting (inner box nets, so that every training nodule's
statistics are held out) would be a lever.

Two yardsticks, from the arrays probe_outline_threshold.py cached for DIR's box nets (rule t0.5):
  1. Dice and each statistic's Pearson r with the readers' outline, training fold (in-sample) against
     test fold (held out), per fold;
  2. for each test fold k, the seven statistics alone fitted (L2 logistic, L2 by 3-fold
     patient-grouped inner CV; probes/linear.py) on the same nodules twice: those of fold k's
     training set that another measured fold j holds out, once with fold k's in-sample statistics
     and once with fold j's held-out ones; both score fold k's held-out statistics. Pooled over the
     folds, paired (held-out-fitted minus in-sample-fitted).

Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_outline_crossfit.py [DIR]
(DIR defaults to docs/cv/probes/box_nets_epyc; needs runs/probes/outline_threshold_DIRNAME_foldK.npz
for at least two folds, which probe_outline_threshold.py DIR writes; output outline_crossfit.txt)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa
import linear  # noqa
from nodule_edge.metrics import roc_auc
from nodule_edge.outline import OUTLINE_FEATURE_NAMES

cfg, ds, spec = setup()
box_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/cv/probes/box_nets_epyc"
L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
cached = {k: dict(np.load(p)) for k in range(5) if (p := OUT / f"outline_threshold_{box_dir.name}_fold{k}.npz").exists()}
if len(cached) < 2:
    raise SystemExit(f"needs the cached arrays of two folds or more: run probe_outline_threshold.py {box_dir}")
short = ["Feret", "logV", "HUmean", "HUsd", "HUp90", "solid", "compact"][: len(OUTLINE_FEATURE_NAMES)]
lines = [f"box nets: {box_dir.name}; folds {sorted(cached)}; rule t0.5",
         "1. outline against the readers' (nodules with a readers' mask)",
         f"{'fold':>4s} {'part':>9s} {'Dice':>6s}  r with the readers': " + " ".join(f"{n:>7s}" for n in short)]
for k, d in cached.items():
    for part in ("fit", "test"):
        has = ds.cache.has_mask[d[f"{part}_index"]]
        mine, ref = d[f"{part}_stats_t0.5"][has], d[f"{part}_stats_readers'"][has]
        r = [np.corrcoef(mine[:, j], ref[:, j])[0, 1] for j in range(len(short))]
        name = "in-sample" if part == "fit" else "held out"
        lines.append(f"{k:4d} {name:>9s} {d[f'{part}_dice_t0.5'][has].mean():6.3f}  " + " " * 20 + " ".join(f"{x:7.3f}" for x in r))

lines.append("2. seven statistics alone, fitted on in-sample or on held-out statistics of the same nodules")
ys, s_in, s_out, fold_of = [], [], [], []
for k, dk in cached.items():
    row_of = {int(i): n for n, i in enumerate(dk["fit_index"])}
    x_in, x_out, y_fit, groups = [], [], [], []
    for j, dj in cached.items():
        if j == k:
            continue
        for n, i in enumerate(dj["test_index"]):
            i = int(i)
            if ds.labels[i] >= 0 and i in row_of:
                x_in.append(dk["fit_stats_t0.5"][row_of[i]])
                x_out.append(dj["test_stats_t0.5"][n])
                y_fit.append(float(ds.labels[i]))
                groups.append(ds.patients[i])
    x_in, x_out, y_fit, groups = (np.asarray(v) for v in (x_in, x_out, y_fit, groups))
    tl = ds.labels[dk["test_index"]] >= 0
    x_test, y = dk["test_stats_t0.5"][tl], ds.labels[dk["test_index"]][tl].astype(float)
    a = linear.nested_fit_score(x_in, y_fit, groups, x_test, L2_GRID)[0]
    b = linear.nested_fit_score(x_out, y_fit, groups, x_test, L2_GRID)[0]
    lines.append(f"fold {k}: fitted on {len(y_fit)} labelled nodules; test AUC in-sample-fitted {roc_auc(y, a):.3f}, "
                 f"held-out-fitted {roc_auc(y, b):.3f}")
    ys.append(y), s_in.append(a), s_out.append(b), fold_of.append(np.full(len(y), k))
y, s_in, s_out, fold_of = (np.concatenate(v) for v in (ys, s_in, s_out, fold_of))
lo, hi = linear.paired_interval(y, s_out, s_in, fold_of)
lines.append(f"pooled ({len(y)} labelled): in-sample-fitted {roc_auc(y, s_in):.3f}, held-out-fitted {roc_auc(y, s_out):.3f}, "
             f"paired {roc_auc(y, s_out) - roc_auc(y, s_in):+.3f} [{lo:+.3f}, {hi:+.3f}]")
print("\n".join(lines))
Path(__file__).with_name("outline_crossfit.txt").write_text("\n".join(lines) + "\n")

"""Probe A/C analysis: AUC per fold and pooled, folds above diameter, path parity, box geometry.

Usage: .venv/bin/python docs/cv/probes/analyse_paths.py   (reads runs/probes/paths_foldK.npz)
Writes runs/probes/paths_summary.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from nodule_edge.metrics import roc_auc

OUT = Path(__file__).resolve().parents[3] / "runs" / "probes"
ROOT = Path(__file__).resolve().parents[3]
sig = lambda z: 1 / (1 + np.exp(-z))

folds = [k for k in range(5) if (OUT / f"paths_fold{k}.npz").is_file()]
data = {k: dict(np.load(OUT / f"paths_fold{k}.npz")) for k in folds}
fj = {k: json.loads((ROOT / f"docs/cv/fold{k}.json").read_text()) for k in folds}
summary = {"folds": folds, "reproduction": {}, "variants": {}, "box": {}}

# reproduction
for k in folds:
    d = data[k]; sel = d["labels"] >= 0
    p_json = np.asarray(fj[k]["predictions"]["probability"])
    p_rt, p_ref = sig(d["runtime_default"]), sig(d["reference_box"])
    summary["reproduction"][k] = {
        "auc_runtime": roc_auc(d["labels"][sel], p_rt[sel]), "json_auc_runtime": fj[k]["malignancy"]["auc"],
        "auc_reference": roc_auc(d["labels"][sel], p_ref[sel]), "json_auc_reference": fj[k]["malignancy_reference_box"]["auc"],
        "max_abs_dp_vs_json": float(np.abs(p_rt - p_json).max()),
        "parity": float(np.abs(p_rt - p_ref).mean()), "json_parity": fj[k]["path_parity"]["mean_abs_delta_probability"],
        "diameter_auc_json": fj[k]["baseline_diameter"]["auc"],
    }

# variants
def derived(d):
    out = {}
    skip = {"index", "labels", "diameters", "found", "box_pass1", "box_pass2", "box_reader", "timings", "changed", "rules", "flip_logits_runtime", "flip_logits_reference"}
    for key in d:
        if key not in skip:
            out[key] = d[key]
    fr, ff = d["flip_logits_runtime"], d["flip_logits_reference"]
    inplane = [0, 2, 4, 6]  # no z flip
    out["flips8_runtime"] = fr.mean(1)
    out["flips4_inplane_runtime"] = fr[:, inplane].mean(1)
    out["flips8_reference"] = ff.mean(1)
    out["flips4_inplane_reference"] = ff[:, inplane].mean(1)
    out["ens_default+third_pass"] = (d["runtime_default"] + d["third_pass"]) / 2
    out["ens_thr0.3+0.4+0.5+0.6"] = (d["runtime_default"] + d["thr0.3"] + d["thr0.4"] + d["thr0.6"]) / 4
    out["ens_margins-2..+2"] = (d["runtime_default"] + d["margin-2vox"] + d["margin-1vox"] + d["margin+1vox"] + d["margin+2vox"]) / 5
    return out

der = {k: derived(data[k]) for k in folds}
names = list(der[folds[0]])
for name in names:
    per, par, allp, ally = {}, {}, [], []
    for k in folds:
        d = data[k]; sel = d["labels"] >= 0; z = der[k][name]
        if np.isnan(z).any():
            continue
        per[k] = roc_auc(d["labels"][sel], z[sel])
        par[k] = float(np.abs(sig(z) - sig(d["reference_box"])).mean())
        allp.append(z[sel]); ally.append(d["labels"][sel])
    pooled = roc_auc(np.concatenate(ally), np.concatenate(allp)) if len(folds) == 5 and len(per) == 5 else float("nan")
    above = sum(per[k] > summary["reproduction"][k]["diameter_auc_json"] for k in per)
    summary["variants"][name] = {"pooled_auc": pooled, "per_fold": per, "mean_fold": float(np.mean(list(per.values()))),
                                 "folds_above_diameter": above, "parity_per_fold": par, "parity_mean": float(np.mean(list(par.values())))}
# pooled diameter (raw diameters, as pooled_metrics does)
ally = np.concatenate([data[k]["labels"][data[k]["labels"] >= 0] for k in folds])
alld = np.concatenate([data[k]["diameters"][data[k]["labels"] >= 0] for k in folds])
summary["pooled_diameter_auc"] = roc_auc(ally, alld)

# box geometry: first-pass default box vs readers' box
rows = []
for k in folds:
    d = data[k]
    b1, br = d["box_pass1"], d["box_reader"]
    ok = (b1[:, 0, 0] >= 0) & (br[:, 0, 0] >= 0)
    ext1 = b1[:, 1] - b1[:, 0] + 1; extr = br[:, 1] - br[:, 0] + 1
    dp = np.abs(sig(d["runtime_default"]) - sig(d["reference_box"]))
    for i in np.flatnonzero(ok):
        rows.append(dict(fold=k, ratio=(ext1[i] / extr[i]).tolist(), lo=(b1[i, 0] - br[i, 0]).tolist(), hi=(b1[i, 1] - br[i, 1]).tolist(),
                         dp=float(dp[i]), label=int(d["labels"][i]), diam=float(d["diameters"][i])))
ratio = np.array([r["ratio"] for r in rows]); lo = np.array([r["lo"] for r in rows]); hi = np.array([r["hi"] for r in rows]); dp = np.array([r["dp"] for r in rows])
axes = ["z", "y", "x"]
geo = {"n_compared": len(rows), "n_first_pass_empty": int(sum((data[k]["box_pass1"][:, 0, 0] < 0).sum() for k in folds))}
for a, ax in enumerate(axes):
    geo[ax] = {
        "extent_ratio_median": float(np.median(ratio[:, a])), "extent_ratio_p10_p90": [float(np.percentile(ratio[:, a], 10)), float(np.percentile(ratio[:, a], 90))],
        "low_offset_vox_median": float(np.median(lo[:, a])), "high_offset_vox_median": float(np.median(hi[:, a])),
        "frac_pred_smaller_by_ge2vox": float(((lo[:, a] >= 2) | (hi[:, a] <= -2)).mean()),
        "frac_pred_larger_by_ge2vox": float(((lo[:, a] <= -2) | (hi[:, a] >= 2)).mean()),
        "frac_within_1vox_both_sides": float(((np.abs(lo[:, a]) <= 1) & (np.abs(hi[:, a]) <= 1)).mean()),
    }
maxdev = np.maximum(np.abs(lo), np.abs(hi)).max(1)
geo["max_side_deviation_vox_quantiles_50_75_90_95"] = [float(np.percentile(maxdev, q)) for q in (50, 75, 90, 95)]
for lo_b, hi_b in ((0, 1), (2, 3), (4, 7), (8, 1000)):
    m = (maxdev >= lo_b) & (maxdev <= hi_b)
    geo[f"dp_when_maxdev_{lo_b}-{hi_b}vox"] = {"n": int(m.sum()), "mean_abs_dp": float(dp[m].mean()) if m.any() else None, "share_of_total_abs_dp": float(dp[m].sum() / dp.sum())}
big = dp > 0.1
geo["n_abs_dp_gt_0.1"] = int(big.sum())
geo["share_of_total_abs_dp_from_dp_gt_0.1"] = float(dp[big].sum() / dp.sum())
# the z-side: pred box smaller in z (cuts the nodule when z margin is 1 mm)
undersized = (ratio < 0.8).any(1); oversized = (ratio > 1.25).any(1)
geo["undersized_any_axis_ratio_lt_0.8"] = {"n": int(undersized.sum()), "mean_abs_dp": float(dp[undersized].mean())}
geo["oversized_any_axis_ratio_gt_1.25"] = {"n": int(oversized.sum()), "mean_abs_dp": float(dp[oversized].mean())}
geo["rest"] = {"n": int((~undersized & ~oversized).sum()), "mean_abs_dp": float(dp[~undersized & ~oversized].mean())}
summary["box"] = geo
# AUC counterfactual: runtime path, but the reference logit swapped in where the box is off by >= 2 vox
cf_p, cf_y = [], []
for k in folds:
    d = data[k]; b1, br = d["box_pass1"], d["box_reader"]
    dev = np.maximum(np.abs(b1[:, 0] - br[:, 0]), np.abs(b1[:, 1] - br[:, 1])).max(1)
    sel = d["labels"] >= 0
    cf_y.append(d["labels"][sel])
    row = []
    for thr in (2, 4, 8):
        z = np.where(dev >= thr, d["reference_box"], d["runtime_default"])
        row.append(z[sel])
        summary["box"].setdefault(f"counterfactual_ref_where_dev_ge{thr}_per_fold", {})[k] = roc_auc(d["labels"][sel], z[sel])
    cf_p.append(row)
if len(folds) == 5:
    for j, thr in enumerate((2, 4, 8)):
        summary["box"][f"counterfactual_ref_where_dev_ge{thr}_pooled"] = roc_auc(np.concatenate(cf_y), np.concatenate([r[j] for r in cf_p]))
# which axis's deviation goes with |dp|; signed: does a larger in-plane box raise p?
devax = np.maximum(np.abs(lo), np.abs(hi))
summary["box"]["corr_absdp_with_axis_dev_zyx"] = [float(np.corrcoef(devax[:, a], dp)[0, 1]) for a in range(3)]
growth = (hi - lo).astype(float)  # pred extent minus reader extent (vox), per axis
dps = []
for k in folds:
    d = data[k]; ok = (d["box_pass1"][:, 0, 0] >= 0) & (d["box_reader"][:, 0, 0] >= 0)
    dps.append((sig(d["runtime_default"]) - sig(d["reference_box"]))[ok])
dps = np.concatenate(dps)
summary["box"]["corr_signed_dp_with_extent_growth_zyx"] = [float(np.corrcoef(growth[:, a], dps)[0, 1]) for a in range(3)]
summary["box"]["corr_signed_dp_with_inplane_growth_sum"] = float(np.corrcoef(growth[:, 1] + growth[:, 2], dps)[0, 1])
summary["timings"] = {k: json.loads(str(data[k]["timings"])) for k in folds}
summary["changed_fraction"] = {k: json.loads(str(data[k]["changed"])) for k in folds}
(OUT / "paths_summary.json").write_text(json.dumps(summary, indent=1, default=float))

print("reproduction:")
for k, r in summary["reproduction"].items():
    print(f"  fold {k}: runtime {r['auc_runtime']:.4f} (json {r['json_auc_runtime']:.4f})  ref {r['auc_reference']:.4f} (json {r['json_auc_reference']:.4f})  parity {r['parity']:.4f} (json {r['json_parity']:.4f})  max|dp| vs json {r['max_abs_dp_vs_json']:.2e}")
print(f"pooled diameter {summary['pooled_diameter_auc']:.3f}")
print(f"{'variant':32s} pooled  " + " ".join(f"f{k}   " for k in folds) + " mean  >diam parity")
for name, v in summary["variants"].items():
    print(f"{name:32s} {v['pooled_auc']:.3f}  " + " ".join(f"{v['per_fold'].get(k, float('nan')):.3f}" for k in folds) + f" {v['mean_fold']:.3f}  {v['folds_above_diameter']}/{len(v['per_fold'])}  {v['parity_mean']:.3f}")
print(json.dumps(summary["box"], indent=1))

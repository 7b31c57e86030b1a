"""Size read-outs of the SAME networks' second-pass segmentation (run lr_warmup, folds 0-4, runtime
path with the fold's box net) against the readers' mask size, and their held-out AUC.

Per test nodule, from segmentation64 (64^3 probabilities, 0.5 mm voxels, 0.125 mm^3 each):
  soft_vol     sum p                                   (mm^3)
  hard05/03/07 count of p >= 0.5 / 0.3 / 0.7            (mm^3; empty -> floored at one voxel for logs)
  cc05_vol     26-connected component of p >= 0.5 nearest the cube centre (SimpleITK, as
               radiomics_features.component_nearest_centre / nodule_extent)
  cc05_feret   in-plane max Feret diameter of that component (mm): max over z-slices of the max
               pairwise distance of its boundary pixels + 1 voxel (radiomics_features.feret_inplane,
               the same definition as the readers' column 0)
  pool32_vol   soft mass after 2x2x2 average pooling (32^3, 1 mm^3 voxels) = what the heads'
               log_volume statistic reads (segmentation_statistics); equal to soft_vol (printed check)
Readers' reference: runs/probes/reader_radiomics.npz "f" (col 0 Feret mm, col 1 log volume mm^3).
Labels: malignancy_mean > 3 -> 1, < 3 -> 0 (ds.labels). Non-calcified: calcification_maxvote == 6.
Each fold's probabilities are checked against docs/ablations/lr_warmup/foldK.json first.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_size_estimate.py
(output: size_estimate.txt, runs/probes/size_estimate_lr_warmup.npz)"""
import sys, json, csv, time
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "docs/cv/probes")); sys.path.insert(0, str(ROOT))
from common import setup, DEVICE  # noqa
from radiomics_features import component_nearest_centre, feret_inplane  # noqa
from nodule_edge.metrics import roc_auc
from nodule_edge.train.checkpoints import load_checkpoint
from nodule_edge.train.first_pass import load_box_net, box_net_segmenter
from nodule_edge.train.trainer import predict_runtime_path

RUN, FOLDS, VOXMM3 = "lr_warmup", [0, 1, 2, 3, 4], 0.125
SMOKE = "--smoke" in sys.argv  # 6 nodules of folds 0-1, nothing written
VOLS = ["soft_vol", "hard05", "hard03", "hard07", "cc05_vol", "pool32_vol"]
lines = []


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True); lines.append(s)


def readouts(seg):
    p = np.asarray(seg, np.float64).reshape(64, 64, 64)
    cc = component_nearest_centre(p >= 0.5)
    pool = p.reshape(32, 2, 32, 2, 32, 2).mean((1, 3, 5))  # 2x2x2 average pooling, 1 mm voxels
    return dict(soft_vol=p.sum() * VOXMM3, hard05=(p >= 0.5).sum() * VOXMM3, hard03=(p >= 0.3).sum() * VOXMM3,
                hard07=(p >= 0.7).sum() * VOXMM3, cc05_vol=cc.sum() * VOXMM3, cc05_feret=feret_inplane(cc),
                pool32_vol=pool.sum() * 1.0)


t0 = time.time()
cfg, ds, spec = setup()
rows = list(csv.DictReader(open("/work/shared/data/lidc_voi/manifest.csv")))
diam = np.array([float(r["diameter_mm"]) for r in rows])
noncalc = np.array([int(r["calcification_maxvote"]) == 6 for r in rows])
F = np.load(ROOT / "runs/probes/reader_radiomics.npz")["f"]
R = {k: [] for k in ["index", "fold", "p", "json_volume_mm3"] + VOLS + ["cc05_feret"]}
for k in FOLDS:
    d = ROOT / f"runs/ablations/{RUN}/fold{k}"
    rec = json.loads((ROOT / f"docs/ablations/{RUN}/fold{k}.json").read_text())["predictions"]
    idx = np.array(rec["index"])
    if SMOKE:
        if k > 1: break
        rec = {key: (v[:6] if isinstance(v, list) else v) for key, v in rec.items()}; idx = idx[:6]
    model, _ = load_checkpoint(d / "refit.safetensors"); model.eval()
    net, _ = load_box_net(d / "box_net.safetensors")
    out, _ = predict_runtime_path(model, ds, idx, DEVICE, spec, segment=box_net_segmenter(net))
    p = out["malignancy_probability"].ravel()
    dev = np.abs(p - np.array(rec["probability"])).max()
    ro = [readouts(s) for s in out["segmentation64"]]
    for name in VOLS + ["cc05_feret"]:
        R[name] += [r[name] for r in ro]
    R["index"] += list(idx); R["fold"] += [k] * len(idx); R["p"] += list(p)
    R["json_volume_mm3"] += list(rec.get("volume_mm3", [np.nan] * len(idx)))
    say(f"fold {k}: n={len(idx)} max|dp| vs json {dev:.2e}  ({time.time() - t0:.0f}s)")
    del out, model, net
R = {k: np.array(v, np.float64 if k not in ("index", "fold") else np.int64) for k, v in R.items()}
idx = R["index"]
if not SMOKE:
    np.savez(ROOT / f"runs/probes/size_estimate_{RUN}.npz", **R, reader_feret_mm=F[idx, 0], reader_log_volume=F[idx, 1],
             diameter_mm=diam[idx], noncalcified=noncalc[idx], label=ds.labels[idx])

say("soft_vol vs pool32_vol (heads' log_volume mass): max |rel diff|",
    f"{np.nanmax(np.abs(R['pool32_vol'] / np.maximum(R['soft_vol'], 1e-12) - 1)):.1e}",
    "; vs json volume_mm3 max |rel diff|", f"{np.nanmax(np.abs(R['json_volume_mm3'] / np.maximum(R['soft_vol'], 1e-12) - 1)):.1e}")
for name in ["hard05", "hard03", "hard07", "cc05_vol"]:
    say(f"  {name}: empty in {int((R[name] == 0).sum())} nodules (log floored at one voxel)")

y = ds.labels[idx]; lab = y >= 0
rf_log_vol, rf_log_feret = F[idx, 1], np.log(np.maximum(F[idx, 0], 0.5))
has_ref = np.isfinite(rf_log_vol) & np.isfinite(rf_log_feret)
D = diam[idx]
bins = [(0, 5), (5, 8), (8, 12), (12, 20), (20, 1e9)]
logs = {n: np.log(np.maximum(R[n], VOXMM3)) for n in VOLS}
logs["cc05_feret"] = np.log(np.maximum(R["cc05_feret"], 0.5))
ref = {n: rf_log_vol for n in VOLS}; ref["cc05_feret"] = rf_log_feret
extra = {"model_p": R["p"], "diameter_mm": D, "reader_logvol": rf_log_vol, "reader_feret": rf_log_feret}

for title, sel in [("ALL", np.ones(len(idx), bool)), ("NON-CALCIFIED", noncalc[idx])]:
    m = sel & lab; mr = m & has_ref
    say(f"\n== {title}: labelled n={m.sum()} (pos {int(y[m].sum())}), with readers' mask n={mr.sum()}")
    say(f"{'read-out':12s} {'AUC':>6s} {'AUC|ref':>7s} {'r(log)':>6s} {'sd(d)':>6s} {'mean(d)':>7s} | mean log err by diameter_mm " + " ".join(f"({a},{b if b < 1e9 else ''}]" for a, b in bins))
    for n, v in logs.items():
        e = v - ref[n]; er = sel & has_ref  # size agreement on all nodules of the subset with a reader mask
        binerr = [e[er & (D > a) & (D <= b)] for a, b in bins]
        say(f"{n:12s} {roc_auc(y[m], v[m]):6.4f} {roc_auc(y[mr], v[mr]):7.4f} {np.corrcoef(v[er], ref[n][er])[0, 1]:6.3f} "
            f"{e[er].std():6.3f} {e[er].mean():+7.3f} | " + " ".join(f"{b.mean():+.2f}({len(b)})" for b in binerr))
    for n, v in extra.items():
        mm = mr if n.startswith("reader") else m
        say(f"{n:12s} {roc_auc(y[mm], v[mm]):6.4f} {roc_auc(y[mr], v[mr]):7.4f}")
say("\nAUC: all labelled of the subset; AUC|ref: those with a readers' mask. r, sd(d), mean(d): log read-out minus",
    "readers' log volume (cc05_feret: log Feret vs readers' log Feret) on all nodules of the subset with a readers' mask",
    "(labelled or not); bins by manifest diameter_mm, (n) per bin.")
say(f"runtime {time.time() - t0:.0f}s")
if not SMOKE:
    (ROOT / "docs/cv/probes/size_estimate.txt").write_text("\n".join(lines) + "\n")

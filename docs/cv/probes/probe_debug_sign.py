"""Does a debug loss that can steer the class keep the outline term's Grad-CAM on the nodule?

The outline ablation (docs/ablations/README.md, outline_statistics) lost Grad-CAM on the nodule
(0.898 against 0.90): where the term changes a nodule's class the map of the final class is the
complement of the network's, and the refit's debug loss reads the class as sign(p - 0.5), which
passes no gradient to the term. [head] debug_sign_temperature reads it as tanh(z / T) instead
(nodule_edge.train.head._cam_margin).

Training folds only: per shipped fold, the head step's own inputs (runs/shipped/foldK/last, its
box net; the training fold's nodules, never the test fold) and refit_heads under each variant,
reporting its inner patient-grouped CV (pooled out-of-fold AUC and Grad-CAM-on-nodule fraction by
L2, as the head step scores them) and the L2 it chooses. Used to choose the variant that the
ablation then runs on the test folds, with its rule written before.

Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_debug_sign.py [FOLD ...]
(output: debug_sign.txt, one block per fold appended)"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa
import copy
import dataclasses
import time
from nodule_edge.train.first_pass import box_net_segmenter, load_box_net
from nodule_edge.train.head import refit_heads
from nodule_edge.train.run import head_inputs, head_objective

cfg, ds, spec = setup()
cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, outline_statistics=True))
VARIANTS = {
    "sign (outline_statistics)": dict(debug_sign_temperature=0.0),
    "tanh T=1": dict(debug_sign_temperature=1.0),
    "tanh T=1, not adaptive": dict(debug_sign_temperature=1.0, adaptive=False),
    "tanh T=0.5, not adaptive": dict(debug_sign_temperature=0.5, adaptive=False),
}
folds = [int(a) for a in sys.argv[1:]] or list(range(5))
out = Path(__file__).with_name("debug_sign.txt")
for fold in folds:
    train, val, _ = fold_split(ds, cfg, fold)
    fit_idx = np.concatenate([train, val])
    model, _ = load_checkpoint(ROOT / f"runs/shipped/fold{fold}/last.safetensors")
    model.eval()
    segment = box_net_segmenter(load_box_net(ROOT / f"runs/shipped/fold{fold}/box_net.safetensors")[0])
    t = time.perf_counter()
    inputs = head_inputs(model, ds, fit_idx, DEVICE, spec, segment, with_reference=True, with_outline=True)
    lines = [f"fold {fold}: {len(fit_idx)} training-fold nodules (head inputs {time.perf_counter() - t:.0f} s)"]
    for name, change in VARIANTS.items():
        adaptive = change.pop("adaptive", None) if "adaptive" in change else None
        vcfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, **change))
        if adaptive is not None:
            vcfg = dataclasses.replace(vcfg, loss=dataclasses.replace(vcfg.loss, adaptive=adaptive))
            change["adaptive"] = adaptive
        t = time.perf_counter()
        info = refit_heads(copy.deepcopy(model), inputs, [ds.patients[i] for i in fit_idx], head_objective(vcfg),
                           l2_grid=cfg.head.l2_grid, seed=cfg.train.seed)
        inner = "  ".join(f"L2 {k}: AUC {v['auc']:.3f} CAM {v['cam_on_nodule_fraction']:.3f}"
                          for k, v in info["inner_cv_by_l2"].items())
        after = info["training_after"]
        lines.append(f"  {name:28s} {inner}  -> L2 {info['l2']:g}; training AUC {after['auc']:.3f} "
                     f"CAM {after['cam_on_nodule_fraction']:.3f} ({time.perf_counter() - t:.0f} s)")
        print(lines[-1], flush=True)
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")

"""Probe A (+C flips): runtime-path box rules vs the reference box, per fold, no retraining.

Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/probe_paths.py [folds...]
Writes runs/probes/paths_foldK.npz (per-nodule logits of every rule) and seg_foldK.npz.
"""
from __future__ import annotations

import os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa

import SimpleITK as sitk
from nodule_edge.patch import bound_to_nodule, box_keep_mask, nodule_extent, window_channels
from nodule_edge.train.trainer import reference_bounded

BS = 8


@torch.no_grad()
def forward(model, images):
    logit, seg = [], []
    for s in range(0, len(images), BS):
        x = torch.from_numpy(np.asarray(images[s:s + BS], np.float32))
        o = model(x)
        logit.append(o.malignancy_logit.double().numpy())
        sg = o.segmentation.float()
        seg.append(sg[:, 0].numpy().astype(np.float16))
    return np.concatenate(logit), np.concatenate(seg)


def extent(seg, thr, mode="nearest"):
    if mode == "nearest":
        return nodule_extent(seg, thr)
    b = np.asarray(seg) >= thr
    if not b.any():
        return None
    pts = np.argwhere(b)
    return pts.min(0), pts.max(0)


def apply_box(patch, ext, margin_vox, outside):
    if ext is None:
        return patch
    keep = box_keep_mask(patch.shape[-3:], ext[0], ext[1], margin_vox)
    return np.where(keep[None], patch, outside[:, None, None, None]).astype(patch.dtype, copy=False)


def main(folds):
    cfg, ds, spec = setup()
    box = spec.nodule_box
    base_margin = np.asarray(box.runtime_margin_mm()) / spec.spacing_mm
    outside = window_channels(np.full((1, 1, 1), spec.outside_hu, np.float32), spec)[:, 0, 0, 0]
    for fold in folds:
        t0 = time.time()
        model, _ = fold_model(fold)
        _, _, te = fold_split(ds, cfg, fold)
        fj = fold_json(fold)
        assert list(te) == fj["predictions"]["index"], "split differs from the fold JSON"
        cubes = ds.cache.images[te].astype(np.float32)
        timings = {}
        t = time.time(); logit1, seg1 = forward(model, cubes); timings["first_pass"] = (time.time() - t) / len(te)
        res = {"first_pass_whole_cube": logit1}
        # default rule: the shipped function
        bounded_def = np.empty_like(cubes); found = np.zeros(len(te), bool)
        for i in range(len(te)):
            bounded_def[i], found[i] = bound_to_nodule(cubes[i], seg1[i].astype(np.float32), spec)
        t = time.time(); logit_def, seg2 = forward(model, bounded_def); timings["second_pass"] = (time.time() - t) / len(te)
        res["runtime_default"] = logit_def
        t = time.time(); ref_img = reference_bounded(ds, te, spec).astype(np.float32)
        logit_ref, seg_ref = forward(model, ref_img); timings["reference"] = (time.time() - t) / len(te)
        res["reference_box"] = logit_ref
        # boxes
        ext1 = [extent(seg1[i].astype(np.float32), 0.5) for i in range(len(te))]
        ext2 = [extent(seg2[i].astype(np.float32), 0.5) for i in range(len(te))]
        masks = ds.cache.masks[te]
        extr = [extent(masks[i].astype(np.float32), box.threshold, "all") if ds.cache.has_mask[te[i]] else None for i in range(len(te))]

        def boxes_arr(exts):
            a = np.full((len(te), 2, 3), -1, np.int64)
            for i, e in enumerate(exts):
                if e is not None:
                    a[i, 0], a[i, 1] = e
            return a

        rules = {}
        for thr in (0.3, 0.4, 0.6):
            rules[f"thr{thr}"] = ([extent(seg1[i].astype(np.float32), thr) for i in range(len(te))], base_margin)
        rules["all_components"] = ([extent(seg1[i].astype(np.float32), 0.5, "all") for i in range(len(te))], base_margin)
        for d in (-2, -1, 1, 2):
            rules[f"margin{d:+d}vox"] = (ext1, np.maximum(base_margin + d, 0))
        rules["z_margin+1vox"] = (ext1, base_margin + np.array([1, 0, 0]))
        rules["inplane_margin+2vox"] = (ext1, base_margin + np.array([0, 2, 2]))
        rules["third_pass"] = ([e2 if e2 is not None else e1 for e1, e2 in zip(ext1, ext2)], base_margin)
        union = []
        for e1, e2 in zip(ext1, ext2):
            if e1 is None or e2 is None:
                union.append(e1 if e2 is None else e2)
            else:
                union.append((np.minimum(e1[0], e2[0]), np.maximum(e1[1], e2[1])))
        rules["union_pass1_pass2"] = (union, base_margin)
        changed_frac = {}
        for name, (exts, margin) in rules.items():
            imgs = np.stack([apply_box(cubes[i], exts[i], margin, outside) if exts[i] is not None else cubes[i] for i in range(len(te))])
            same = np.array([np.array_equal(imgs[i], bounded_def[i]) for i in range(len(te))])
            lg = logit_def.copy()
            todo = np.flatnonzero(~same)
            t = time.time()
            if len(todo):
                lg[todo], _ = forward(model, imgs[todo])
            timings[name] = (time.time() - t) / max(len(todo), 1)
            res[name] = lg
            changed_frac[name] = float((~same).mean())
            print(f"fold {fold} {name}: {len(todo)} changed", flush=True)
        # flips (probe C) on the runtime default input, and on the reference input
        flips8 = [tuple(a for a in range(3) if (k >> a) & 1) for k in range(8)]
        t = time.time()
        fl_rt, fl_ref = [], []
        for axes in flips8:
            if not axes:
                fl_rt.append(logit_def); fl_ref.append(logit_ref); continue
            fa = [a + 2 for a in axes]
            fl_rt.append(forward(model, np.flip(bounded_def, fa).copy())[0])
            if os.environ.get("SKIP_REF_FLIPS") == "1":
                fl_ref.append(np.full(len(te), np.nan))
            else:
                fl_ref.append(forward(model, np.flip(ref_img, fa).copy())[0])
        timings["flip_pass_each"] = (time.time() - t) / len(te) / (7 if os.environ.get("SKIP_REF_FLIPS") == "1" else 14)
        res["flip_logits_runtime"] = np.stack(fl_rt, 1)  # [n, 8], column k = flips of axes bits k (z=1,y=2,x=4)
        res["flip_logits_reference"] = np.stack(fl_ref, 1)
        np.savez(OUT / f"paths_fold{fold}.npz", index=te, labels=ds.labels[te], diameters=ds.diameters[te], found=found,
                 box_pass1=boxes_arr(ext1), box_pass2=boxes_arr(ext2), box_reader=boxes_arr(extr),
                 timings=json.dumps(timings), changed=json.dumps(changed_frac), rules=json.dumps(list(res)), **res)
        np.savez(OUT / f"seg_fold{fold}.npz", index=te, seg_runtime=seg2, seg_reference=seg_ref, seg_first=seg1)
        print(f"fold {fold} done in {time.time() - t0:.0f}s timings {timings}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [0, 1, 2, 3, 4])

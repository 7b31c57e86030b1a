"""Probe B, part 1: 7 radiomics features per nodule from (a) the runtime path's predicted mask
(second pass, p >= 0.5, 26-connected component nearest the cube centre, as nodule_extent picks),
(b) the readers' mask (cached soft mask >= 0.5), on HU resampled from the VOI onto the cube grid.

Features: in-plane max Feret diameter (mm), log volume (mm^3), HU mean, HU sd, HU p90,
solid fraction (HU > -300), compactness (sphericity 36*pi*V^2/A^3, A = exposed voxel faces).
Needs runs/probes/seg_foldK.npz from probe_paths.py.
Usage: OMP_NUM_THREADS=1 .venv/bin/python docs/cv/probes/radiomics_features.py
Writes runs/probes/radiomics.npz
"""
from __future__ import annotations

import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import *  # noqa
import dataclasses
import SimpleITK as sitk
from nodule_edge.patch import resample_hu, window_channels

NAMES = ["feret_diameter_mm", "log_volume_mm3", "hu_mean", "hu_sd", "hu_p90", "solid_fraction", "compactness"]
VOX = 0.5


def component_nearest_centre(binary):
    if not binary.any():
        return binary
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)), True))
    pts = np.argwhere(lab > 0)
    c = (np.asarray(binary.shape) - 1) / 2.0
    near = pts[np.argmin(((pts - c) ** 2).sum(1))]
    return lab == lab[tuple(near)]


def feret_inplane(m):
    best = 0.0
    for z in np.flatnonzero(m.any((1, 2))):
        sl = m[z]
        # boundary pixels of the slice
        inner = sl.copy()
        inner[1:-1, 1:-1] = sl[1:-1, 1:-1] & sl[:-2, 1:-1] & sl[2:, 1:-1] & sl[1:-1, :-2] & sl[1:-1, 2:]
        pts = np.argwhere(sl & ~inner).astype(np.float64)
        if len(pts) == 0:
            continue
        d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max() + 1.0
        best = max(best, d)
    return best * VOX


def features(m, hu):
    n = int(m.sum())
    if n == 0:
        return np.full(7, np.nan)
    v = hu[m]
    vol = n * VOX**3
    p = np.pad(m, 1)
    faces = sum(int((p != np.roll(p, 1, ax)).sum()) for ax in range(3))
    area = faces * VOX**2
    return np.array([feret_inplane(m), np.log(vol), v.mean(), v.std(), np.percentile(v, 90), (v > -300).mean(), 36 * np.pi * vol**2 / area**3])


def voi_hu(rec, whole):
    """The nodule's VOI in HU, resampled onto the whole cube's grid (no window)."""
    return resample_hu(sitk.ReadImage(str(rec.image_path)), rec.center_lps_mm, whole)


def outline_features(ds, idx, maps, whole):
    """features() of the component at the centre of each map (p >= 0.5) of the nodules ``idx``,
    on their VOI's HU: ``[len(idx), 7]``."""
    return np.array([features(component_nearest_centre(m >= 0.5), voi_hu(ds.records[i], whole)) for i, m in zip(idx, maps)])


def main():
    cfg, ds, spec = setup()
    whole = dataclasses.replace(spec, nodule_box=None)
    idx_all, f_pred, f_reader, fold_of, dice, t_feat = [], [], [], [], [], []
    max_dev = 0.0
    for fold in range(5):
        s = np.load(OUT / f"seg_fold{fold}.npz")
        for j, i in enumerate(s["index"]):
            rec = ds.records[i]
            hu = voi_hu(rec, whole)
            if j < 3:  # the HU grid is the cached patch's grid
                max_dev = max(max_dev, float(np.abs(window_channels(hu, whole) - ds.cache.images[i].astype(np.float32)).max()))
            t = time.time()
            mp = component_nearest_centre(s["seg_runtime"][j].astype(np.float32) >= 0.5)
            fp = features(mp, hu)
            t_feat.append(time.time() - t)
            mr = ds.cache.masks[i].astype(np.float32) >= 0.5
            fr = features(mr, hu) if ds.cache.has_mask[i] else np.full(7, np.nan)
            d = 2 * (mp & mr).sum() / max(mp.sum() + mr.sum(), 1)
            idx_all.append(i); f_pred.append(fp); f_reader.append(fr); fold_of.append(fold); dice.append(d)
        print("fold", fold, "done", flush=True)
    f_pred = np.array(f_pred); f_reader = np.array(f_reader)
    print("max windowed deviation of HU grid vs cache:", max_dev)
    print("empty predicted masks:", int(np.isnan(f_pred[:, 0]).sum()), "missing reader masks:", int(np.isnan(f_reader[:, 0]).sum()))
    print("dice pred vs reader mean:", float(np.mean(dice)), "feature time per nodule s:", float(np.mean(t_feat)))
    np.savez(OUT / "radiomics.npz", index=np.array(idx_all), fold=np.array(fold_of), names=np.array(NAMES),
             pred=f_pred, reader=f_reader, dice=np.array(dice), labels=ds.labels[idx_all], diameters=ds.diameters[idx_all],
             seconds_per_nodule=float(np.mean(t_feat)))


if __name__ == "__main__":
    main()

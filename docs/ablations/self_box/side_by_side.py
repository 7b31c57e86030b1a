"""The self_box folds next to the shipped run's (Markdown). Run from the repository root: python docs/ablations/self_box/side_by_side.py"""
import json
from pathlib import Path

rows = []
for k in range(5):
    b = Path(f"docs/ablations/self_box/fold{k}.json")
    if not b.is_file():
        continue
    s, n = json.loads(Path(f"docs/cv/fold{k}.json").read_text()), json.loads(b.read_text())
    def f(d, *keys):
        for key in keys:
            d = d[key]
        return f"{d:.3f}"
    rows.append(
        f"| {k} | {f(n,'malignancy','auc')} ({f(s,'malignancy','auc')}) | {f(n,'malignancy_reference_box','auc')} ({f(s,'malignancy_reference_box','auc')}) | "
        f"{f(s,'baseline_diameter','auc')} | {f(n,'path_parity','mean_abs_delta_probability')} ({f(s,'path_parity','mean_abs_delta_probability')}) | "
        f"{f(n,'dice_mean')} ({f(s,'dice_mean')}) | {f(n,'cam_on_nodule_fraction_gt_mask')} ({f(s,'cam_on_nodule_fraction_gt_mask')}) | "
        f"{f(n,'attributes_mean_mae')} ({f(s,'attributes_mean_mae')}) | {n['seconds_per_epoch']} ({s['seconds_per_epoch']}) |"
    )
print("| fold | AUC runtime path | AUC readers' box | diameter AUC | path parity | Dice | CAM on nodule | attribute MAE | s / epoch |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
print("\n".join(rows))

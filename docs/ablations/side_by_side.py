"""An ablation's folds next to the shipped run's same folds (Markdown; shipped in brackets).

Run from the repository root: ``python docs/ablations/side_by_side.py ABLATION``, e.g. ``self_box``
or ``epochs20`` (reads ``docs/ablations/ABLATION/foldK.json`` and ``docs/cv/foldK.json``).
"""

import json
import sys
from pathlib import Path


def _value(result: dict, *keys: str) -> str:
    for key in keys:
        result = result[key]
    return f"{result:.3f}"


def main(name: str) -> None:
    columns = (
        ("malignancy", "auc"),
        ("malignancy_reference_box", "auc"),
        ("path_parity", "mean_abs_delta_probability"),
        ("dice_mean",),
        ("cam_on_nodule_fraction_gt_mask",),
        ("attributes_mean_mae",),
    )
    print(
        "| fold | AUC runtime path | AUC readers' box | path parity | Dice | CAM on nodule | attribute MAE "
        "| diameter AUC | epochs | s / epoch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in range(5):
        path = Path(f"docs/ablations/{name}/fold{k}.json")
        if not path.is_file():
            continue
        ablation, shipped = json.loads(path.read_text()), json.loads(Path(f"docs/cv/fold{k}.json").read_text())
        cells = [f"{_value(ablation, *keys)} ({_value(shipped, *keys)})" for keys in columns]
        cells += [
            _value(shipped, "baseline_diameter", "auc"),
            f"{ablation['epochs_run']} ({shipped['epochs_run']})",
            f"{ablation['seconds_per_epoch']} ({shipped['seconds_per_epoch']})",
        ]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])

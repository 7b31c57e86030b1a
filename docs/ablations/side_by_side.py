"""An ablation's folds next to a reference run's same folds (Markdown; reference in brackets).

Run from the repository root: ``python docs/ablations/side_by_side.py ABLATION [REFERENCE]``, e.g.
``self_box no_attribute_readout`` (reads ``docs/ablations/ABLATION/foldK.json`` and
``docs/ablations/REFERENCE/foldK.json``; without REFERENCE the shipped run's ``docs/cv/foldK.json``).
Runs recorded before the attribute readout step compare with ``no_attribute_readout``, the shipped
recipe of their time.
"""

import json
import sys
from pathlib import Path


def _value(result: dict, *keys: str) -> str:
    for key in keys:
        result = result[key]
    return f"{result:.3f}"


def main(name: str, reference: str | None = None) -> None:
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
        ablation, shipped = json.loads(path.read_text()), json.loads(Path(f"docs/ablations/{reference}/fold{k}.json" if reference else f"docs/cv/fold{k}.json").read_text())
        cells = [f"{_value(ablation, *keys)} ({_value(shipped, *keys)})" for keys in columns]
        cells += [
            _value(shipped, "baseline_diameter", "auc"),
            f"{ablation['epochs_run']} ({shipped['epochs_run']})",
            f"{ablation['seconds_per_epoch']} ({shipped['seconds_per_epoch']})",
        ]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)

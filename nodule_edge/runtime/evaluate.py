"""`nodule-edge evaluate`: the runtime over a VOI folder, one CSV row per nodule."""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import OutputError
from nodule_edge.manifest import read_unsure_manifest
from nodule_edge.metrics import binary_metrics, dice
from nodule_edge.patch import resample_mask

__all__ = ["CSV_COLUMNS", "evaluate_voi_dir"]

log = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = (
    "voi_id",
    "malignancy_probability",
    *ATTRIBUTE_NAMES,
    "dice",
    "nodule_attention",
    "background_attention",
    "retrieval_score",
)


def evaluate_voi_dir(
    inferer: Any,
    voi_dir: str | Path,
    out_csv: str | Path,
    limit: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``inferer`` on every nodule of a VOI folder; write the predictions CSV atomically.

    Each nodule is excluded from its own similar-nodule retrieval (by ``voi_id``).

    Returns:
        Summary metrics (AUC/accuracy against the LIDC proxy where ratings exist, mean Dice).
    """
    records = read_unsure_manifest(voi_dir)
    if limit:
        records = records[:limit]
    out_csv = Path(out_csv)
    if not out_csv.resolve().parent.is_dir():
        raise OutputError(f"cannot write {out_csv}: folder {out_csv.resolve().parent} does not exist")
    rows = []
    probs, labels, dices = [], [], []
    for i, rec in enumerate(records):
        result = inferer.infer(rec.image_path, worlds=[rec.center_lps_mm], exclude_ids={rec.id})
        n = result.nodules[0]
        p = n.prediction
        d = None
        if rec.mask_path is not None:
            d = dice(p.segmentation >= 0.5, resample_mask(sitk.ReadImage(str(rec.mask_path)), rec.center_lps_mm, inferer.spec) >= 0.5)
            dices.append(d)
        if rec.label is not None:
            probs.append(p.malignancy_probability)
            labels.append(rec.label)
        rows.append(
            [rec.id, f"{p.malignancy_probability:.6f}", *(f"{p.attributes[a]:.4f}" for a in ATTRIBUTE_NAMES), "" if d is None else f"{d:.4f}", f"{p.nodule_attention:.6f}", f"{p.background_attention:.6f}", "" if p.retrieval_score is None else f"{p.retrieval_score:.4f}"]
        )
        if progress:
            progress(i + 1, len(records))
    fd, tmp = tempfile.mkstemp(prefix=f".{out_csv.name}.", dir=out_csv.resolve().parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, out_csv)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"writing {out_csv} failed, nothing was written: {exc}") from exc
    summary: dict[str, Any] = {"nodules": len(records)}
    if labels and len(set(labels)) == 2:
        m = binary_metrics(np.asarray(labels), np.asarray(probs))
        summary["auc (LIDC proxy labels)"] = round(m["auc"], 4)
        summary["accuracy (LIDC proxy labels)"] = round(m["accuracy"], 4)
    if dices:
        summary["mean dice"] = round(float(np.mean(dices)), 4)
    return summary

"""Nodule manifests: the documented layouts of unsure (LIDC-style VOI folder) and sure data.

* the *unsure* manifest (the layout of ``../shared/data/lidc_voi``): ``manifest.csv`` with
  ``voi_id, patient_id, center_{x,y,z}_mm`` (LPS), optional ``diameter_mm`` and ``<attr>_mean``
  reader-mean ratings, volumes in ``image/<voi_id>.nii.gz`` and optional masks in
  ``mask/<voi_id>.nii.gz``;
* an optional *sure* manifest: a CSV with ``id, patient_id, volume, center_{x,y,z}_mm, label``
  (0 benign, 1 malignant, e.g. from pathology), volume paths relative to the CSV.

Shared by training, export (index building) and the runtime's ``evaluate``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import DataError

__all__ = ["NoduleRecord", "read_unsure_manifest", "read_sure_manifest", "lidc_proxy_label"]


@dataclass(frozen=True)
class NoduleRecord:
    """One nodule: where its volume is, its centre, and whatever labels it carries."""

    id: str
    patient_id: str
    image_path: Path
    center_lps_mm: tuple[float, float, float]
    mask_path: Path | None = None
    ratings: tuple[float, ...] | None = None  # six reader-mean ratings on the 1–5 scale
    label: int | None = None  # 0 benign / 1 malignant (sure data or proxy)
    diameter_mm: float | None = None
    # The readers' majority calcification rating says calcified (LIDC ``calcification_maxvote``
    # 1-5; 6 = absent); None where the manifest has no such column.
    calcified: bool | None = None


def lidc_proxy_label(malignancy_mean: float) -> int | None:
    """LIDC's binary proxy: > 3 malignant, < 3 benign, exactly 3 unknown."""
    if malignancy_mean > 3.0:
        return 1
    if malignancy_mean < 3.0:
        return 0
    return None


def _float(row: dict[str, str], key: str, where: str) -> float:
    try:
        return float(row[key])
    except KeyError as exc:
        raise DataError(f"{where}: missing column '{key}'") from exc
    except ValueError as exc:
        raise DataError(f"{where}: column '{key}' is not a number: {row[key]!r}") from exc


#: LIDC's calcification rating for "absent" (1-5 name calcification patterns).
CALCIFICATION_ABSENT = 6


def _calcified(row: dict[str, str], where: str) -> bool | None:
    value = (row.get("calcification_maxvote") or "").strip()
    if not value:
        return None
    rating = _float(row, "calcification_maxvote", where)
    if rating not in (1, 2, 3, 4, 5, CALCIFICATION_ABSENT):
        raise DataError(f"{where}: calcification_maxvote must be an LIDC rating 1-6, got {value!r}")
    return rating != CALCIFICATION_ABSENT


def read_unsure_manifest(root: str | Path) -> list[NoduleRecord]:
    """Read a VOI folder in the layout of ``../shared/data/lidc_voi``.

    Args:
        root: Folder with ``manifest.csv``, ``image/`` and optionally ``mask/``.

    Returns:
        One record per row, with the LIDC proxy label where ratings are present.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"no manifest.csv in {root}")
    records = []
    with manifest.open(newline="") as fh:
        for line_no, row in enumerate(csv.DictReader(fh), start=2):
            where = f"{manifest}:{line_no}"
            voi_id = (row.get("voi_id") or "").strip()
            if not voi_id:
                raise DataError(f"{where}: empty voi_id")
            image = root / "image" / f"{voi_id}.nii.gz"
            if not image.is_file():
                raise DataError(f"{where}: volume {image} does not exist")
            mask = root / "mask" / f"{voi_id}.nii.gz"
            center = tuple(_float(row, f"center_{a}_mm", where) for a in "xyz")
            ratings = None
            if all(f"{name}_mean" in row and row[f"{name}_mean"] != "" for name in ATTRIBUTE_NAMES):
                ratings = tuple(_float(row, f"{name}_mean", where) for name in ATTRIBUTE_NAMES)
            diameter = _float(row, "diameter_mm", where) if row.get("diameter_mm") else None
            calcified = _calcified(row, where)
            records.append(
                NoduleRecord(
                    id=voi_id,
                    patient_id=row.get("patient_id") or voi_id,
                    image_path=image,
                    center_lps_mm=center,  # type: ignore[arg-type]  # three floats: one per axis "xyz"
                    mask_path=mask if mask.is_file() else None,
                    ratings=ratings,
                    label=lidc_proxy_label(ratings[-1]) if ratings else None,
                    diameter_mm=diameter,
                    calcified=calcified,
                )
            )
    if not records:
        raise DataError(f"{manifest} has no rows")
    return records


def read_sure_manifest(path: str | Path) -> list[NoduleRecord]:
    """Read a sure-data CSV (``id, patient_id, volume, center_{x,y,z}_mm, label``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sure manifest {path} does not exist")
    records = []
    with path.open(newline="") as fh:
        for line_no, row in enumerate(csv.DictReader(fh), start=2):
            where = f"{path}:{line_no}"
            label = (row.get("label") or "").strip()
            if label not in ("0", "1"):
                raise DataError(f"{where}: label must be 0 or 1, got {label!r}")
            volume = path.parent / (row.get("volume") or "")
            if not volume.is_file():
                raise DataError(f"{where}: volume {volume} does not exist")
            records.append(
                NoduleRecord(
                    id=row.get("id") or volume.stem,
                    patient_id=row.get("patient_id") or row.get("id") or volume.stem,
                    image_path=volume,
                    center_lps_mm=tuple(_float(row, f"center_{a}_mm", where) for a in "xyz"),  # type: ignore[arg-type]  # three: one per axis
                    label=int(label),
                )
            )
    return records

"""Training data: manifests, the sure/unsure split, patient-disjoint folds and cached patches.

Two manifests feed training, as in "Faithful learning with sure data":

* the *unsure* manifest (the layout of ``../shared/data/lidc_voi``): ``manifest.csv`` with
  ``voi_id, patient_id, center_{x,y,z}_mm`` (LPS), optional ``diameter_mm``, ``<attr>_mean``
  reader-mean ratings and ``calcification_maxvote`` (LIDC 1-6, 6 = absent; the pooled CV is also
  reported by it), volumes in ``image/<voi_id>.nii.gz`` and optional masks in
  ``mask/<voi_id>.nii.gz``;
* an optional *sure* manifest: a CSV with ``id, patient_id, volume, center_{x,y,z}_mm, label``
  (0 benign, 1 malignant, e.g. from pathology), volume paths relative to the CSV.

Without a sure manifest, LIDC's proxy is used: mean malignancy > 3 malignant, < 3 benign, = 3 left
out of classification. All patches come from :func:`nodule_edge.patch.build_patch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nodule_edge._files import atomic_file, sha256_bytes
from nodule_edge._sitk import simpleitk
from nodule_edge.attributes import ATTRIBUTE_NAMES, ratings_to_unit
from nodule_edge.errors import DataError
from nodule_edge.manifest import NoduleRecord, lidc_proxy_label, read_sure_manifest, read_unsure_manifest
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, build_patch, resample_mask

__all__ = [
    "NoduleRecord",
    "read_unsure_manifest",
    "read_sure_manifest",
    "lidc_proxy_label",
    "patient_folds",
    "PatchCache",
    "build_patch_cache",
]

log = logging.getLogger(__name__)


def patient_folds(patient_ids: list[str], n_folds: int = 5, seed: int = 0) -> list[int]:
    """Assign every item a fold by its patient, so no patient spans two folds.

    Returns:
        Fold index per item (same order as ``patient_ids``).
    """
    unique = sorted(set(patient_ids))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    fold_of = {unique[i]: rank % n_folds for rank, i in enumerate(order)}
    return [fold_of[p] for p in patient_ids]


@dataclass
class PatchCache:
    """Patches of every record, built once (float16 to halve memory)."""

    ids: list[str]
    images: np.ndarray  # [N, C, S, S, S] float16 in [0, 1]
    masks: np.ndarray  # [N, S, S, S] float16 soft masks (NaN-free; zeros when absent)
    has_mask: np.ndarray  # [N] bool
    z_extent_mm: np.ndarray  # [N] physical z extent of the source volume around the centre (min of both sides ×2)


def _z_context_mm(image: sitk.Image, center: tuple[float, float, float]) -> float:
    """Twice the smaller distance from the centre to the volume's z ends (symmetric context)."""
    size = image.GetSize()
    corners = [image.TransformIndexToPhysicalPoint((0, 0, 0)), image.TransformIndexToPhysicalPoint((0, 0, size[2] - 1))]
    zs = sorted(c[2] for c in corners)
    half_spacing = image.GetSpacing()[2] / 2
    return 2 * min(center[2] - zs[0] + half_spacing, zs[1] - center[2] + half_spacing)


def build_patch_cache(
    records: list[NoduleRecord],
    spec: PatchSpec = DEFAULT_PATCH_SPEC,
    cache_dir: str | Path | None = None,
) -> PatchCache:
    """Build (or load from ``cache_dir``) the patches of all records with the shared patch builder."""
    key = sha256_bytes(
        (spec.to_json() + "|".join(f"{r.id}:{r.image_path}:{r.center_lps_mm}" for r in records)).encode()
    )[:16]
    cache_file = Path(cache_dir) / f"patches-{key}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as data:
            log.info("loaded %d cached patches from %s", len(records), cache_file)
            return PatchCache(
                [r.id for r in records], data["images"], data["masks"], data["has_mask"], data["z_extent_mm"]
            )
    n, s = len(records), spec.size
    images = np.zeros((n, spec.channels, s, s, s), np.float16)
    masks = np.zeros((n, s, s, s), np.float16)
    has_mask = np.zeros(n, bool)
    z_extent = np.zeros(n, np.float32)
    simpleitk()  # applies the command line's ITK warning setting (nodule_edge._sitk) to the reads below
    for i, rec in enumerate(records):
        try:
            image = sitk.ReadImage(str(rec.image_path))
        except RuntimeError as exc:
            raise DataError(f"cannot read volume {rec.image_path}: {exc}") from exc
        images[i] = build_patch(image, rec.center_lps_mm, spec)
        z_extent[i] = _z_context_mm(image, rec.center_lps_mm)
        if rec.mask_path is not None:
            masks[i] = resample_mask(sitk.ReadImage(str(rec.mask_path)), rec.center_lps_mm, spec)
            has_mask[i] = True
        if (i + 1) % 100 == 0:
            log.info("built %d/%d patches", i + 1, n)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # One temp file per writer: under torchrun every rank builds and writes the same cache.
        with atomic_file(cache_file) as tmp:
            np.savez(tmp, images=images, masks=masks, has_mask=has_mask, z_extent_mm=z_extent)
    return PatchCache([r.id for r in records], images, masks, has_mask, z_extent)


def calcification(records: list[NoduleRecord]) -> np.ndarray:
    """Per record 1.0 where the readers' majority rated it calcified, 0.0 where not, NaN unknown."""
    return np.array([np.nan if r.calcified is None else float(r.calcified) for r in records], np.float32)


def targets(records: list[NoduleRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Attribute targets in [0, 1], their presence, labels (-1 unknown) and diameters (NaN unknown)."""
    attrs = np.zeros((len(records), len(ATTRIBUTE_NAMES)), np.float32)
    has_attrs = np.zeros(len(records), bool)
    labels = np.full(len(records), -1, np.int64)
    diameters = np.full(len(records), np.nan, np.float32)
    for i, rec in enumerate(records):
        if rec.ratings is not None:
            attrs[i] = ratings_to_unit(np.asarray(rec.ratings))
            has_attrs[i] = True
        if rec.label is not None:
            labels[i] = rec.label
        if rec.diameter_mm is not None:
            diameters[i] = rec.diameter_mm
    return attrs, has_attrs, labels, diameters

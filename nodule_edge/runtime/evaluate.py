"""`nodule-edge evaluate`: the runtime over a VOI folder, one CSV row per nodule.

A nodule the runtime refuses (a recorded centre outside its VOI, an unreadable volume or mask) is
recorded with its ``voi_id`` and a one-line reason and the loop goes on
(:mod:`nodule_edge.row_errors`): the predictions CSV holds the other nodules, ``errors.csv`` beside
it lists the failures, and the summary metrics are over the nodules that ran.

Example:
    >>> from nodule_edge.runtime import NoduleInferer
    >>> from nodule_edge.runtime.evaluate import evaluate_voi_dir
    >>> ev = evaluate_voi_dir(NoduleInferer(), "../shared/data/lidc_voi", "out/predictions.csv")
    >>> ev.summary["auc (LIDC proxy labels)"], len(ev.errors)
    >>> ev.errors.raise_if_failed(ev.total, ev.errors_csv, noun="nodules")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nodule_edge._files import write_csv_atomic
from nodule_edge._sitk import simpleitk
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import DataError, OutputError
from nodule_edge.manifest import NoduleRecord, read_unsure_manifest
from nodule_edge.metrics import binary_metrics, dice
from nodule_edge.patch import resample_mask
from nodule_edge.row_errors import RowErrors

__all__ = ["CSV_COLUMNS", "ERRORS_CSV_NAME", "EvaluatedNodule", "Evaluation", "evaluate_voi_dir"]

log = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = (
    "voi_id",
    "malignancy_probability",
    *ATTRIBUTE_NAMES,
    "dice",
    "nodule_attention",
    "background_attention",
    "retrieval_score",
    "quality_flags",
    "outline_logit",
)
#: File name of the failed rows, written beside the predictions CSV on every run.
ERRORS_CSV_NAME = "errors.csv"


@dataclass(frozen=True)
class EvaluatedNodule:
    """One nodule the runtime ran on: its manifest record and the model's outputs.

    Attributes:
        record: The manifest row (id, paths, centre, reader-mean ratings, proxy label, diameter).
        malignancy_probability: The model's probability.
        attributes: The six predicted ratings (1-5 scale), keyed by attribute name.
        dice: Dice of the predicted segmentation against the manifest's mask, None without a mask.
        nodule_attention: Mean saliency inside the predicted nodule.
        background_attention: Mean saliency outside it.
        trustworthy: The runtime's saliency trust check.
        retrieval_score: Fraction of the retrieved similar nodules rated malignant (None: no index).
        quality_flags: Codes of the quality flags raised (README, Quality flags).
        outline_logit: What the model's outline term added to the malignancy logit (None: the
            model has no outline term).
    """

    record: NoduleRecord
    malignancy_probability: float
    attributes: dict[str, float]
    dice: float | None
    nodule_attention: float
    background_attention: float
    trustworthy: bool
    retrieval_score: float | None
    quality_flags: tuple[str, ...] = ()
    outline_logit: float | None = None

    @property
    def network_probability(self) -> float | None:
        """The probability without the outline term (the network's own), None without a term."""
        if self.outline_logit is None:
            return None
        p = min(max(self.malignancy_probability, 1e-12), 1 - 1e-12)
        return float(1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) - self.outline_logit))))

    def csv_row(self) -> list[str]:
        """The nodule's row of the predictions CSV (:data:`CSV_COLUMNS`)."""
        return [
            self.record.id,
            f"{self.malignancy_probability:.6f}",
            *(f"{self.attributes[a]:.4f}" for a in ATTRIBUTE_NAMES),
            "" if self.dice is None else f"{self.dice:.4f}",
            f"{self.nodule_attention:.6f}",
            f"{self.background_attention:.6f}",
            "" if self.retrieval_score is None else f"{self.retrieval_score:.4f}",
            ";".join(self.quality_flags),
            "" if self.outline_logit is None else f"{self.outline_logit:.6f}",
        ]


@dataclass(frozen=True)
class Evaluation:
    """What one ``evaluate`` run did; enough to build the HTML report.

    Attributes:
        summary: Metrics over the nodules that ran, plus ``nodules`` (attempted) and ``failed``.
        nodules: The nodules that ran, in manifest order.
        errors: The nodules that failed (also in ``errors_csv``).
        total: Nodules attempted (after ``limit``).
        predictions_csv: Path of the predictions CSV.
        errors_csv: Path of ``errors.csv``.
        voi_dir: The evaluated folder.
        model_version: The bundle's model version.
        backend: The inference engine used.
        trust_margin: The margin of the saliency trust check.
        started: When the run started (UTC).
        seconds: Wall time of the run.
    """

    summary: dict[str, Any]
    nodules: list[EvaluatedNodule]
    errors: RowErrors
    total: int
    predictions_csv: Path
    errors_csv: Path
    voi_dir: Path
    model_version: str = ""
    backend: str = ""
    trust_margin: float = 0.0
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0


def _evaluate_one(inferer: Any, rec: NoduleRecord) -> EvaluatedNodule:
    """Run the model on one nodule (itself left out of its retrieval) and score its mask."""
    result = inferer.infer(rec.image_path, worlds=[rec.center_lps_mm], exclude_ids={rec.id})
    p = result.nodules[0].prediction
    d = None
    if rec.mask_path is not None:
        try:
            mask = simpleitk().ReadImage(str(rec.mask_path))  # a NIfTI mask: SimpleITK reads it
        except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
            raise DataError(f"cannot read mask {rec.mask_path}: {exc}") from exc
        d = dice(p.segmentation >= 0.5, resample_mask(mask, rec.center_lps_mm, inferer.spec) >= 0.5)
    return EvaluatedNodule(
        record=rec,
        malignancy_probability=float(p.malignancy_probability),
        attributes={a: float(p.attributes[a]) for a in ATTRIBUTE_NAMES},
        dice=d,
        nodule_attention=float(p.nodule_attention),
        background_attention=float(p.background_attention),
        trustworthy=bool(p.trustworthy),
        retrieval_score=None if p.retrieval_score is None else float(p.retrieval_score),
        quality_flags=tuple(f.code for _, f in getattr(result, "all_quality_flags", [])),
        outline_logit=None if p.outline_logit is None else float(p.outline_logit),
    )


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    write_csv_atomic(path, CSV_COLUMNS, rows)


def _summary(nodules: list[EvaluatedNodule], total: int, failed: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"nodules": total, "failed": failed}
    labelled = [n for n in nodules if n.record.label is not None]
    labels = [n.record.label for n in labelled]
    if len(set(labels)) == 2:
        m = binary_metrics(np.asarray(labels), np.asarray([n.malignancy_probability for n in labelled]))
        summary["auc (LIDC proxy labels)"] = round(m["auc"], 4)
        summary["accuracy (LIDC proxy labels)"] = round(m["accuracy"], 4)
        network = [n.network_probability for n in labelled]
        if all(q is not None for q in network):
            # A model with an outline term: what the network alone reaches (README, Usage: evaluate).
            alone = binary_metrics(np.asarray(labels), np.asarray(network, dtype=np.float64))
            summary["auc without the outline term (LIDC proxy labels)"] = round(alone["auc"], 4)
    dices = [n.dice for n in nodules if n.dice is not None]
    if dices:
        summary["mean dice"] = round(float(np.mean(dices)), 4)
    return summary


def evaluate_voi_dir(
    inferer: Any,
    voi_dir: str | Path,
    out_csv: str | Path,
    limit: int = 0,
    progress: Callable[[int, int], None] | None = None,
    fail_fast: bool = False,
) -> Evaluation:
    """Run ``inferer`` on every nodule of a VOI folder; write the predictions CSV and ``errors.csv``.

    Each nodule is excluded from its own similar-nodule retrieval (by ``voi_id``). A nodule that
    raises one of the package's errors is recorded and left out; both CSVs are written atomically
    (``errors.csv`` beside ``out_csv``, a header only when nothing failed). Raising on failures
    is the caller's choice: ``result.errors.raise_if_failed(...)``.

    Args:
        inferer: A :class:`~nodule_edge.runtime.NoduleInferer` (or anything with its ``infer`` and ``spec``).
        voi_dir: Folder in the layout of ``../shared/data/lidc_voi``.
        out_csv: Predictions CSV to write; its folder must exist.
        limit: Evaluate only the first ``limit`` nodules (0: all).
        progress: Called with (done, total) after each nodule, failed or not.
        fail_fast: Re-raise the first nodule's error; nothing is written then.

    Returns:
        The per-nodule results, the failures and the summary (AUC/accuracy against the LIDC
        proxy where ratings exist, mean Dice; over the nodules that ran).
    """
    started, t0 = datetime.now(UTC), time.perf_counter()
    records = read_unsure_manifest(voi_dir)
    if limit:
        records = records[:limit]
    out_csv = Path(out_csv)
    if not out_csv.resolve().parent.is_dir():
        raise OutputError(f"cannot write {out_csv}: folder {out_csv.resolve().parent} does not exist")
    if out_csv.name == ERRORS_CSV_NAME:
        raise OutputError(
            f"cannot write the predictions to {out_csv}: {ERRORS_CSV_NAME} beside it is where the failed nodules go; choose another name"
        )
    errors = RowErrors(fail_fast=fail_fast)
    nodules: list[EvaluatedNodule] = []
    for i, rec in enumerate(records):
        evaluated = errors.attempt(rec.id, _evaluate_one, inferer, rec)
        if evaluated is not None:
            nodules.append(evaluated)
        if progress:
            progress(i + 1, len(records))
    _write_csv(out_csv, [n.csv_row() for n in nodules])
    errors_csv = errors.write_csv(out_csv.parent / ERRORS_CSV_NAME)
    if errors:
        log.info("%d of %d nodules failed; reasons in %s", len(errors), len(records), errors_csv)
    return Evaluation(
        summary=_summary(nodules, len(records), len(errors)),
        nodules=nodules,
        errors=errors,
        total=len(records),
        predictions_csv=out_csv,
        errors_csv=errors_csv,
        voi_dir=Path(voi_dir),
        model_version=str(getattr(inferer, "model_version", "")),
        backend=str(getattr(inferer, "backend", "")),
        trust_margin=float(getattr(inferer, "trust_margin", 0.0)),
        started=started,
        seconds=time.perf_counter() - t0,
    )

"""`nodule-edge train`: patient-disjoint cross-validation, then the final model on all data."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodule_edge.train.config import TrainConfig
from nodule_edge.train.evaluation import context_statistics, evaluate_model, pooled_metrics, retrieval_comparison
from nodule_edge.train.trainer import Dataset, load_checkpoint, load_dataset, split_fold, train_model

__all__ = ["run_training"]

log = logging.getLogger(__name__)


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def run_training(cfg: TrainConfig, progress: Callable[[str], None] | None = None, folds_only: bool = False) -> dict[str, Any]:
    """Run the configured CV folds and (optionally) the final model; writes ``summary.json``.

    Returns:
        The summary: per-fold metrics, pooled metrics, chosen epoch count and the final checkpoint.
    """
    say = progress or log.info
    out_dir = cfg.resolve(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ds: Dataset = load_dataset(cfg)
    say(f"dataset: {len(ds)} nodules, {len(set(ds.patients))} patients, {(ds.labels >= 0).sum()} labelled")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    summary: dict[str, Any] = {
        "config": cfg.to_dict(),
        "config_sha256": cfg.sha256(),
        "hardware": {"device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "folds": {},
        "data_context": context_statistics(ds),
    }
    fold_results = []
    best_epochs = []
    for i, fold in enumerate(cfg.cv.run_folds):
        train_idx, val_idx, test_idx = split_fold(ds, cfg, fold)
        max_epochs = cfg.cv.fold_epochs[i] if cfg.cv.fold_epochs else cfg.train.epochs
        say(f"fold {fold}: train {len(train_idx)} / val {len(val_idx)} / test {len(test_idx)} nodules, up to {max_epochs} epochs")
        fit = train_model(cfg, ds, train_idx, val_idx, out_dir / f"fold{fold}", max_epochs, progress=say)
        model, meta = load_checkpoint(out_dir / f"fold{fold}" / "best.safetensors")
        result = evaluate_model(model, ds, test_idx, train_idx, device)
        result["retrieval"] = retrieval_comparison(ds, result)
        result.update(best_epoch=fit["best_epoch"], epochs_run=len(fit["history"]), max_epochs=max_epochs, train_seconds=_epoch_seconds(fit), steps_per_epoch=fit["steps_per_epoch"])
        fold_results.append(result)
        best_epochs.append(fit["best_epoch"])
        summary["folds"][str(fold)] = _strip(result)
        summary["parameters"] = fit["parameters"]
        say(f"fold {fold}: AUC {result['malignancy']['auc']:.3f}, best epoch {fit['best_epoch']}")
        _write(out_dir / "summary.json", summary)
    if fold_results:
        summary["pooled"] = pooled_metrics(fold_results, ds)
    # The full-budget fold decides the final epoch count (the first run fold).
    chosen = best_epochs[0] if best_epochs else cfg.train.epochs
    summary["chosen_epochs"] = int(chosen)
    if cfg.cv.final and not folds_only:
        all_idx = np.arange(len(ds))
        say(f"final model: all {len(ds)} nodules for {chosen} epochs")
        fit = train_model(cfg, ds, all_idx, np.zeros(0, np.int64), out_dir / "final", chosen, progress=say, early_stopping=False)
        final = out_dir / "final" / "last.safetensors"
        summary["final"] = {"checkpoint": str(final), "epochs": chosen, "train_seconds": _epoch_seconds(fit)}
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write(out_dir / "summary.json", summary)
    return summary


def _epoch_seconds(fit: dict[str, Any]) -> float:
    # Summed from the per-epoch history, so a resumed or re-evaluated run keeps its training time.
    return round(sum(float(h.get("seconds", 0.0)) for h in fit["history"]), 1)


def _write(path: Path, data: dict[str, Any]) -> None:
    # Under torchrun every rank runs the folds; rank 0 alone writes (one temp file, no race).
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    os.replace(tmp, path)

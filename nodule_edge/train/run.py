"""`nodule-edge train`: patient-disjoint cross-validation, then the final model on all data."""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodule_edge._files import sha256_bytes, write_text_atomic
from nodule_edge.errors import ConfigError
from nodule_edge.outline import OutlineHead, outline_statistics_batch
from nodule_edge.train.config import TrainConfig
from nodule_edge.train.evaluation import context_statistics, evaluate_model, pooled_metrics, retrieval_comparison
from nodule_edge.train.head import HeadInputs, HeadObjective, refit_classifier, refit_heads
from nodule_edge.train.model import count_parameters
from nodule_edge.train.trainer import (
    Dataset,
    bf16_enabled,
    channels_last_enabled,
    evaluated_checkpoint,
    load_checkpoint,
    load_dataset,
    patch_spec_from,
    predict,
    predict_runtime_path,
    reference_bounded,
    save_checkpoint,
    split_fold,
    train_model,
)

__all__ = ["RunFiles", "run_training", "head_objective", "head_inputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFiles:
    """Where one config's run writes in its output folder, which several configs may share.

    Head-step ablations re-evaluate the shipped run's networks in its folder (``runs/shipped``):
    they must read its networks and box nets but not replace what it wrote, the final refit
    the bundle is exported from above all. The folder belongs to the config named in its
    ``summary.json`` (the first config that wrote one; a folder without a readable summary
    belongs to whoever runs). That config writes the plain names, every other config the same
    names with ``.NAME`` before the extension (``summary.NAME.json``, ``foldK/result.NAME.json``,
    ``foldK/refit.NAME.safetensors``, ``foldK/box_net.NAME.safetensors``). Network checkpoints
    keep their names: a folder holding a network of another training config is refused
    (:func:`nodule_edge.train.checkpoints.resume_state`), never overwritten.

    Example:
        >>> from pathlib import Path
        >>> RunFiles(Path("runs/shipped"), "head_refit_full", owner=False).refit(0)
        PosixPath('runs/shipped/fold0/refit.head_refit_full.safetensors')

    Attributes:
        out_dir: The config's output folder.
        name: The config's name.
        owner: Whether the folder belongs to this config (plain names).
    """

    out_dir: Path
    name: str
    owner: bool = True

    @classmethod
    def of(cls, out_dir: Path, name: str) -> RunFiles:
        """The files of config ``name`` in ``out_dir``, ownership read from its ``summary.json``."""
        try:
            recorded = json.loads((out_dir / "summary.json").read_text()).get("config", {}).get("name", name)
        except (OSError, ValueError, AttributeError):  # absent or unreadable: this run writes it
            return cls(out_dir, name, owner=True)
        return cls(out_dir, name, owner=recorded == name)

    def _named(self, folder: Path, stem: str, suffix: str) -> Path:
        return folder / (f"{stem}{suffix}" if self.owner else f"{stem}.{self.name}{suffix}")

    def folder(self, fold: int | None) -> Path:
        """A fold's folder, or the final model's for ``None``."""
        return self.out_dir / ("final" if fold is None else f"fold{fold}")

    @property
    def summary(self) -> Path:
        """The run's summary."""
        return self._named(self.out_dir, "summary", ".json")

    def result(self, fold: int) -> Path:
        """A fold's result (its copy in ``cv.export_dir`` is ``foldK.json``)."""
        return self._named(self.folder(fold), "result", ".json")

    def refit(self, fold: int | None) -> Path:
        """The network after the head step, of a fold or of the final model."""
        return self._named(self.folder(fold), "refit", ".safetensors")

    def box_nets(self, fold: int | None) -> tuple[Path, ...]:
        """Where the box net of a fold or of the final model is written, then where one of the same
        key may already be (the owner's, reused rather than trained again)."""
        own = self._named(self.folder(fold), "box_net", ".safetensors")
        return (own,) if self.owner else (own, self.folder(fold) / "box_net.safetensors")


def fold_config_sha256(cfg: TrainConfig) -> str:
    """Hash of everything that shapes one fold's result (not which folds run, nor the final model)."""
    data = cfg.to_dict()
    for key in ("run_folds", "final", "export_dir"):
        data["cv"].pop(key, None)
    return sha256_bytes(json.dumps(data, sort_keys=True).encode())


def _fold_result(files: RunFiles, export_dir: Path | None, fold: int, sha: str) -> dict[str, Any] | None:
    """A fold's result from this run's folder, or from its exported copy (a fold finished in an
    earlier sitting survives only there: runs/ is not kept), when the same fold config wrote it."""
    found = _finished_fold(files.result(fold), sha)
    if found is None and export_dir is not None:
        found = _finished_fold(export_dir / f"fold{fold}.json", sha)
    return found


def _finished_fold(path: Path, sha: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("fold_config_sha256") == sha else None


def run_training(
    cfg: TrainConfig, progress: Callable[[str], None] | None = None, folds_only: bool = False
) -> dict[str, Any]:
    """Run the configured CV folds and (optionally) the final model; writes ``summary.json``.

    Resumable fold by fold: a fold whose ``foldK/result.json`` was written by the same fold
    configuration is not run again, an unfinished fold continues from its last checkpoint, and the
    final model likewise. Each finished fold is also written to ``cv.export_dir/foldK.json`` (the
    repository keeps them in ``docs/cv``) the moment it exists.

    Returns:
        The summary: per-fold metrics, pooled metrics (once every fold of the CV has a result),
        the epoch count of the final model and its checkpoint.
    """
    say = progress or log.info
    out_dir = cfg.resolve(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_dir = cfg.resolve(cfg.cv.export_dir) if cfg.cv.export_dir else None
    t_start = time.perf_counter()
    ds: Dataset = load_dataset(cfg)
    say(f"dataset: {len(ds)} nodules, {len(set(ds.patients))} patients, {(ds.labels >= 0).sum()} labelled")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    spec = patch_spec_from(cfg)
    sha = fold_config_sha256(cfg)
    files = RunFiles.of(out_dir, cfg.name)
    if not files.owner:
        say(
            f"{out_dir} belongs to the config named in its summary.json: this run reads its networks and box "
            f"nets and writes its own files as {files.summary.name}, foldK/{files.result(0).name}, foldK/{files.refit(0).name}"
        )
    summary_file = files.summary
    summary: dict[str, Any] = {
        "config": cfg.to_dict(),
        "config_sha256": cfg.sha256(),
        "fold_config_sha256": sha,
        "patch_spec": json.loads(spec.to_json()),
        "hardware": _hardware(device),
        "folds": {},
        "data_context": context_statistics(ds),
    }
    results: dict[int, dict[str, Any]] = {}
    for i, fold in enumerate(cfg.cv.run_folds):
        result_path = files.result(fold)
        done = _fold_result(files, export_dir, fold, sha)
        if done is not None:
            say(f"fold {fold}: finished earlier (AUC {done['malignancy']['auc']:.3f}), not run again")
            results[fold] = done
            summary["folds"][str(fold)] = _without_predictions(done)
            continue
        train_idx, val_idx, test_idx = split_fold(ds, cfg, fold)
        max_epochs = cfg.cv.fold_epochs[i] if cfg.cv.fold_epochs else cfg.train.epochs
        say(
            f"fold {fold}: train {len(train_idx)} / val {len(val_idx)} / test {len(test_idx)} nodules, up to {max_epochs} epochs"
        )
        # The box net, the refit and the evaluation see the whole training fold (its validation
        # patients too), never the test fold. The box net does not read the network; with
        # [train] outline_offset it is trained first, to give the network's offset its statistics.
        fit_idx = np.concatenate([train_idx, val_idx])
        first = _first_pass(cfg, ds, fit_idx, files.box_nets(fold), device, say) if cfg.train.outline_offset else None
        fit = train_model(
            cfg,
            ds,
            train_idx,
            val_idx,
            files.folder(fold),
            max_epochs,
            progress=say,
            early_stopping=cfg.cv.evaluate == "best",
            outline=_outline_of_every_nodule(cfg, ds, first[0] if first else None, spec, say),
        )
        model, meta = load_checkpoint(files.folder(fold) / evaluated_checkpoint(cfg, cfg.cv.evaluate))
        segment, box_net = first or _first_pass(cfg, ds, fit_idx, files.box_nets(fold), device, say)
        t_eval = time.perf_counter()
        head = (
            _refit_head(cfg, model, ds, fit_idx, device, spec, files.refit(fold), meta, say, segment)
            if cfg.head.refit != "none"
            else None
        )
        outline_head = OutlineHead.from_dict(head["outline_head"]) if head and "outline_head" in head else None
        result = evaluate_model(
            model, ds, test_idx, train_idx, device, spec, segment=segment, outline_head=outline_head
        )
        if box_net is not None:
            # The file is the run folder's business, not the fold file's (docs/cv is committed).
            trained = {k: v for k, v in box_net.items() if k != "checkpoint"}
            result.setdefault("first_pass", {"network": "box_net"})["box_net"] = trained
        if head is not None:
            result["classifier_refit"] = head
        result["retrieval"] = retrieval_comparison(ds, result)
        predictions = result.pop("_predictions")
        result.update(
            fold=fold,
            fold_config_sha256=sha,
            evaluated_checkpoint=cfg.cv.evaluate,
            evaluated_epoch=int(meta.get("epoch", 0)),
            best_epoch=fit["best_epoch"],
            epochs_run=len(fit["history"]),
            max_epochs=max_epochs,
            train_seconds=_epoch_seconds(fit),
            seconds_per_epoch=round(_epoch_seconds(fit) / max(1, len(fit["history"])), 1),
            evaluation_seconds=round(time.perf_counter() - t_eval, 1),
            steps_per_epoch=fit["steps_per_epoch"],
            training_precision=_training_precision(fit),
            parameters=fit["parameters"],
            hardware=_hardware(device),
            history=[{k: h[k] for k in ("epoch", "seconds", "train", "val")} for h in fit["history"]],
            predictions={
                "note": "index = row of lidc_voi/manifest.csv (0-based); probability from the runtime path",
                "index": [int(v) for v in predictions["index"]],
                "probability": [round(float(v), 6) for v in predictions["probability"]],
                "volume_mm3": [round(float(v), 2) for v in predictions["volume_mm3"]],
            },
        )
        _write(result_path, result)
        if export_dir is not None:
            export_dir.mkdir(parents=True, exist_ok=True)
            _write(export_dir / f"fold{fold}.json", result)
        results[fold] = result
        summary["folds"][str(fold)] = _without_predictions(result)
        summary["parameters"] = fit["parameters"]
        say(
            f"fold {fold}: AUC {result['malignancy']['auc']:.3f} (diameter-only {result.get('baseline_diameter', {}).get('auc', float('nan')):.3f}), Dice {result.get('dice_mean', float('nan')):.3f}"
        )
        _write(summary_file, summary)
    # Pool over every fold of the CV that has a result, this session's or an earlier one's.
    for fold in range(cfg.cv.folds):
        done = results.get(fold) or _fold_result(files, export_dir, fold, sha)
        if done is not None:
            results[fold] = done
    if results:
        # Folds finished in an earlier sitting still say how large the network is.
        summary.setdefault("parameters", next((r["parameters"] for r in results.values() if r.get("parameters")), None))
        summary["pooled"] = pooled_metrics([results[f] for f in sorted(results)], ds)
        summary["pooled"]["folds"] = sorted(results)
    summary["chosen_epochs"] = int(cfg.train.epochs)
    if cfg.cv.final and not folds_only:
        all_idx = np.arange(len(ds))
        say(f"final model: all {len(ds)} nodules for {cfg.train.epochs} epochs")
        first = _first_pass(cfg, ds, all_idx, files.box_nets(None), device, say) if cfg.train.outline_offset else None
        fit = train_model(
            cfg,
            ds,
            all_idx,
            np.zeros(0, np.int64),
            files.folder(None),
            cfg.train.epochs,
            progress=say,
            early_stopping=False,
            outline=_outline_of_every_nodule(cfg, ds, first[0] if first else None, spec, say),
        )
        final = files.folder(None) / evaluated_checkpoint(cfg, "last")
        summary["final"] = {
            "checkpoint": str(final),
            "epochs": cfg.train.epochs,
            "train_seconds": _epoch_seconds(fit),
            "training_precision": _training_precision(fit),
        }
        segment, box_net = first or _first_pass(cfg, ds, all_idx, files.box_nets(None), device, say)
        if box_net is not None:
            summary["final"]["box_net"] = box_net
        if cfg.head.refit != "none":
            model, meta = load_checkpoint(final)
            summary["final"]["classifier_refit"] = _refit_head(
                cfg, model, ds, all_idx, device, spec, files.refit(None), meta, say, segment
            )
            summary["final"]["checkpoint"] = str(files.refit(None))
            # The head step may add a layer (the attribute skip): count what ships.
            summary["final"]["parameters"] = count_parameters(model)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write(summary_file, summary)
    return summary


def _refit_head(
    cfg: TrainConfig,
    model: Any,
    ds: Dataset,
    idx: np.ndarray,
    device: torch.device,
    spec: Any,
    out_path: Path,
    meta: dict[str, Any],
    say: Callable[[str], None],
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Refit the heads on the nodules ``idx`` (a whole training fold); saves the network to ``out_path``.

    The runtime path's features come from boxes drawn by ``segment`` (a box net) when given, else
    by the model's own first pass.

    ``"full"`` refits the classifier by logistic regression, ``"debugged"`` the attribute and
    malignancy heads under the training objective (:mod:`nodule_edge.train.head`); each chooses its
    L2 strength by inner patient-grouped CV over these nodules.
    """
    if cfg.head.refit == "full":
        labelled = idx[ds.labels[idx] >= 0]
        features = predict_runtime_path(model, ds, labelled, device, spec, segment=segment)[0]["classifier_input"]
        info = refit_classifier(
            model, features, ds.labels[labelled], [ds.patients[i] for i in labelled], seed=cfg.train.seed
        )
        chosen = info["inner_cv_auc_by_l2"][f"{info['l2']:g}"]
        say(f"classifier refitted on {info['n_labelled']} nodules: L2 {info['l2']:g}, inner-CV AUC {chosen:.3f}")
    else:
        inputs = head_inputs(
            model,
            ds,
            idx,
            device,
            spec,
            segment,
            with_reference=cfg.head.parity_weight > 0,
            with_outline=cfg.head.outline_statistics and cfg.train.nodule_box,
        )
        info = refit_heads(
            model,
            inputs,
            [ds.patients[i] for i in idx],
            head_objective(cfg),
            l2_grid=cfg.head.l2_grid,
            seed=cfg.train.seed,
            calibrate=cfg.head.calibrate,
            # The term the network was trained beside, where it was ([train] outline_offset).
            outline_init=OutlineHead.from_dict(meta["outline_offset"]) if "outline_offset" in meta else None,
        )
        say(
            f"heads refitted on {info['n_nodules']} nodules: L2 {info['l2']:g}, training AUC {info['training_before']['auc']:.3f} -> {info['training_after']['auc']:.3f}"
        )
    save_checkpoint(
        out_path,
        model,
        {**{k: v for k, v in meta.items() if k != "model_config"}, "classifier_refit": info},
    )
    return info


def head_inputs(
    model: Any,
    ds: Dataset,
    idx: np.ndarray,
    device: torch.device,
    spec: Any,
    segment: Callable[[np.ndarray], np.ndarray] | None,
    with_reference: bool,
    with_outline: bool = False,
) -> HeadInputs:
    """What the "debugged" head refit reads for the nodules ``idx``: the runtime path's head inputs,
    fusion features and coarse segmentation, with ``with_reference`` the training path's head
    inputs (box of the readers' mask) for the path-parity penalty, and with ``with_outline`` the
    first pass's outline statistics (:mod:`nodule_edge.outline`)."""
    pred = predict_runtime_path(
        model, ds, idx, device, spec, with_features=True, segment=segment, with_outline_statistics=with_outline
    )[0]
    width = model.feature_channels + model.n_seg_features
    reference = (
        predict(model, ds, idx, device, False, images=reference_bounded(ds, idx, spec))["classifier_input"][:, :width]
        if with_reference
        else None
    )
    return HeadInputs(
        head_in=pred["classifier_input"][:, :width],
        features=pred.pop("features"),
        segmentation=pred["seg16"].reshape(len(idx), -1),
        labels=ds.labels[idx],
        attributes=ds.attributes[idx],
        has_attributes=ds.has_attributes[idx],
        reference_head_in=reference,
        outline=pred["outline_statistics"] if with_outline else None,
    )


def _outline_of_every_nodule(
    cfg: TrainConfig,
    ds: Dataset,
    segment: Callable[[np.ndarray], np.ndarray] | None,
    spec: Any,
    say: Callable[[str], None],
) -> np.ndarray | None:
    """``[len(ds), 7]`` the box net's outline statistics of every nodule's whole cube, as the
    runtime's first pass draws them (:func:`nodule_edge.outline.outline_statistics_batch`), for
    ``[train] outline_offset``; None without it. The test fold's rows are computed too and never
    read: the network's loss sees only its training nodules."""
    if not cfg.train.outline_offset:
        return None
    if segment is None:
        raise ConfigError("train.outline_offset needs the box net as the first pass")
    rows = []
    for start in range(0, len(ds), 32):
        cubes = np.asarray(ds.cache.images[start : start + 32], np.float32)
        rows.append(outline_statistics_batch(segment(cubes), cubes, spec))
    say(f"outline statistics of {len(ds)} nodules from the box net, for the network's outline offset")
    return np.concatenate(rows)


def _first_pass(
    cfg: TrainConfig,
    ds: Dataset,
    idx: np.ndarray,
    paths: tuple[Path, ...],
    device: torch.device,
    say: Callable[[str], None],
) -> tuple[Callable[[np.ndarray], np.ndarray] | None, dict[str, Any] | None]:
    """The runtime's first pass for a network trained on ``idx``: None for the model's own, else a
    box net trained on the same nodules (written to ``paths[0]``, or loaded from any of ``paths``
    trained under the same key; :meth:`RunFiles.box_nets`) and what its sidecar says."""
    if cfg.first_pass.network != "box_net":
        return None, None
    from nodule_edge.train.first_pass import box_net_segmenter, train_box_net

    # On the run's device, as the network: the same command trains everything on a GPU where
    # there is one (README, Training); the box net then evaluates on the CPU like the runtime's.
    bf16 = bf16_enabled(cfg.train.bf16, device)
    net, info = train_box_net(
        cfg.first_pass,
        ds.cache.images,
        ds.cache.masks,
        ds.cache.has_mask,
        idx,
        paths[0],
        reuse=paths[1:],
        seed=cfg.train.seed,
        bf16=bf16,
        channels_last=channels_last_enabled(cfg.train.channels_last, device, bf16),
        device=device,
        progress=say,
    )
    keep = ("n_nodules", "train_seconds", "first_pass", "checkpoint")
    return box_net_segmenter(net), {k: info[k] for k in keep if k in info}


def head_objective(cfg: TrainConfig) -> HeadObjective:
    """The training objective restricted to the heads, as the "debugged" refit optimises it.

    The loss section's weights, with the debug loss weighted ``head.debug_weight`` times (adaptive
    only when ``head.debug_adaptive`` too, its class read at ``head.debug_sign_temperature``) and the
    attribute MSE ``head.attribute_weight`` times more,
    the attribute readout step (with the skip) when ``head.attribute_readout`` (``head.attribute_skip``),
    the path-parity penalty at ``head.parity_weight``, and the classifier fitted to the readers'
    mean malignancy ratings when ``head.classifier_target`` is ``"ratings"``.
    """
    return HeadObjective(
        alpha=cfg.loss.alpha * cfg.head.debug_weight if cfg.loss.debug else 0.0,
        gamma=cfg.loss.gamma * cfg.head.attribute_weight,
        delta=cfg.loss.delta,
        adaptive=cfg.loss.adaptive and cfg.head.debug_adaptive,
        attribute_readout=cfg.head.attribute_readout,
        attribute_skip=cfg.head.attribute_skip,
        parity_weight=cfg.head.parity_weight,
        rating_targets=cfg.head.classifier_target == "ratings",
        sign_temperature=cfg.head.debug_sign_temperature,
    )


def _without_predictions(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("predictions", "history")}


def _hardware(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": str(device), "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _training_precision(fit: dict[str, Any]) -> str:
    """ "bf16" (autocast), "fp32" or "bf16 and fp32": what the network's epochs ran in.

    Read from the epochs' history where each records it; a history from before that (a network
    restored from an older checkpoint) falls back to what this machine runs, which is where such
    a network was trained when it was not moved.
    """
    recorded = {bool(h["bf16"]) for h in fit["history"] if "bf16" in h}
    if not recorded or any("bf16" not in h for h in fit["history"]):
        recorded.add(bool(fit["bf16"]))
    return " and ".join(name for flag, name in ((True, "bf16"), (False, "fp32")) if flag in recorded)


def _epoch_seconds(fit: dict[str, Any]) -> float:
    # Summed from the per-epoch history, so a resumed or re-evaluated run keeps its training time.
    return round(sum(float(h.get("seconds", 0.0)) for h in fit["history"]), 1)


def _write(path: Path, data: dict[str, Any]) -> None:
    # Under torchrun every rank runs the folds; rank 0 alone writes (one temp file, no race).
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    write_text_atomic(path, json.dumps(data, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

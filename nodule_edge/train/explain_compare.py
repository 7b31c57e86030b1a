"""``nodule-edge explain-compare``: every explanation method on held-out nodules of one CV fold.

For each held-out nodule (the fold's test patients, never seen in training) and each method —
Grad-CAM and occlusion as the runtime computes them, and the Captum methods of
:mod:`nodule_edge.train.explain` — the map of the malignancy logit on the nodule-bounded input is
scored with :mod:`nodule_edge.runtime.explain_metrics` against the readers' consensus mask:
pointing game, saliency mass inside the nodule (positive part), deletion and insertion areas
(probability of the predicted class, baseline the windowed air value), and its run time on this
CPU. The model-randomisation sanity check (Quantus' cascading Model Parameter Randomisation)
re-initialises the network from the output side, stage by stage, on a few nodules and reports the
Spearman similarity of each method's map before and after. The Grad-CAM/occlusion agreement over
the held-out nodules gives the runtime's agreement threshold (its 5th percentile: the 5 % most
discordant held-out maps fall below it), which ``nodule-edge export --explain-summary`` stores in
the bundle.

Example:
    nodule-edge explain-compare configs/shipped.toml --fold 0 --limit 20 --out docs/explain/fold0.json
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nodule_edge._files import write_text_atomic
from nodule_edge.errors import ConfigError, OutputError
from nodule_edge.explanation_methods import RUNTIME_METHODS, TORCH_METHODS
from nodule_edge.outline import OutlineHead, outline_step
from nodule_edge.runtime.explain_metrics import (
    deletion_curve,
    insertion_curve,
    pointing_game,
    randomisation_similarity,
    rank_correlation,
    relevance_mass_accuracy,
)
from nodule_edge.runtime.occlusion import occlusion_map

__all__ = ["ALL_METHODS", "AGREEMENT_PERCENTILE", "compare_explanations", "render_table"]

log = logging.getLogger(__name__)

#: Methods compared, runtime ones first (the names are defined once, in the runtime).
ALL_METHODS: tuple[str, ...] = RUNTIME_METHODS + TORCH_METHODS
#: The agreement threshold is this percentile of the held-out Grad-CAM/occlusion Spearman.
AGREEMENT_PERCENTILE = 5.0
#: Stages re-initialised in turn by the randomisation check, output side first (attribute prefixes
#: of CollaborativeNet's parameters; whatever is left is the encoder).
_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("heads", ("cls", "attr_out", "attr_embed")),
    ("fusion and segmentation", ("fusion", "seg_head")),
    ("encoder", ("",)),
)


def _torch_run(model: torch.nn.Module) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The exported graph's outputs the runtime reads (probability, logit, segmentation and
    Grad-CAM on the patch grid), computed by the PyTorch model."""

    @torch.no_grad()
    def run(patches: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
        out = model(x)
        size = x.shape[-1]
        seg = out.segmentation.float()
        if seg.shape[-1] != size:
            seg = F.interpolate(seg, size=(size,) * 3, mode="trilinear", align_corners=False)
        cam = F.interpolate(out.cam.float(), size=(size,) * 3, mode="trilinear", align_corners=False).clamp(0.0, 1.0)
        return {
            "malignancy_probability": out.malignancy_probability.float().numpy(),
            "malignancy_logit": out.malignancy_logit.float().numpy(),
            "segmentation": seg[:, 0].numpy(),
            "saliency": cam[:, 0].numpy(),
        }

    return run


def _maps(
    model: torch.nn.Module,
    patch: np.ndarray,
    spec: Any,
    methods: Sequence[str],
    options: dict[str, dict[str, Any]],
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    outline_head: OutlineHead | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, float, float]], Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """method → (signed map, explained input, seconds, probability) for one nodule, and the second
    pass as the explanations perturb it (with the nodule's outline term, fixed, for a model that
    has one, as the runtime's ``NoduleInferer.model_run``); ``segment`` is the first pass when it
    is a box net."""
    from nodule_edge.patch import run_nodule_bounded_with_input
    from nodule_edge.train.explain import explain

    run = _torch_run(model)
    out: dict[str, tuple[np.ndarray, np.ndarray, float, float]] = {}
    t0 = time.perf_counter()
    finish = outline_step(spec, outline_head) if outline_head is not None else None
    outputs, _, answered = run_nodule_bounded_with_input(run, patch[None], spec, segment=segment, finish=finish)
    cam_seconds = time.perf_counter() - t0
    if outline_head is not None:
        run = _with_fixed_term(run, outline_head, outputs["outline_statistics"][0])
    bounded = np.asarray(answered[0], np.float32)
    p = float(outputs["malignancy_probability"][0])
    sign = 1.0 if p >= 0.5 else -1.0
    for method in methods:
        if method == "gradcam":
            out[method] = (outputs["saliency"][0], bounded, cam_seconds, p)
        elif method == "occlusion":
            occluded = occlusion_map(run, patch, spec, segment=segment, **options.get(method, {}))
            out[method] = (occluded.towards_prediction, occluded.bounded_patch, occluded.seconds, p)
        else:
            attributed = explain(model, patch, method, spec=spec, segment=segment, **options.get(method, {}))
            out[method] = (sign * attributed.map, attributed.input, attributed.seconds, p)
    return out, run


def _with_fixed_term(
    run: Callable[[np.ndarray], dict[str, np.ndarray]], head: OutlineHead, statistics: np.ndarray
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    def fixed(patches: np.ndarray) -> dict[str, np.ndarray]:
        return head.apply(run(patches), np.repeat(statistics[None], len(patches), axis=0))

    return fixed


def _randomised(model: torch.nn.Module, upto: int, seed: int) -> torch.nn.Module:
    """A copy whose parameters in stages ``0..upto`` of :data:`_STAGES` are re-initialised."""
    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    claimed: set[str] = set()
    names = [n for n, _ in clone.named_parameters()]
    for i, (_, prefixes) in enumerate(_STAGES):
        members = [n for n in names if n not in claimed and any(n.startswith(p) for p in prefixes)]
        claimed.update(members)
        if i > upto:
            continue
        params = dict(clone.named_parameters())
        with torch.no_grad():
            for name in members:
                param = params[name]
                std = float(param.std()) if param.numel() > 1 and float(param.std()) > 0 else 0.05
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return clone.eval()


def compare_explanations(
    cfg: Any,
    fold: int,
    checkpoint: str | Path | None = None,
    *,
    limit: int = 20,
    methods: Sequence[str] = ALL_METHODS,
    curve_steps: int = 10,
    randomisation_nodules: int = 3,
    options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every method on ``limit`` held-out nodules of ``fold``; metrics, times, sanity check.

    Args:
        cfg: The training config (its data and CV split).
        fold: CV fold whose test patients are explained.
        checkpoint: The fold's model (default: the config's refit of the fold,
            :meth:`nodule_edge.train.run.RunFiles.refit`, else the checkpoint the CV evaluates:
            ``last.safetensors``, ``ema.safetensors`` under weight EMA).
        limit: Held-out nodules (the fold's first ``limit`` test nodules in manifest order).
        methods: Subset of :data:`ALL_METHODS`.
        curve_steps: Steps of the deletion and insertion curves.
        randomisation_nodules: Nodules of the randomisation check.
        options: Per-method options (see :data:`nodule_edge.train.explain.DEFAULT_OPTIONS`).
        progress: Called with one line per nodule.

    Returns:
        A JSON-ready dict: per-nodule metrics, the per-method summary, the randomisation table
        and the agreement threshold.
    """
    from nodule_edge.train.run import RunFiles
    from nodule_edge.train.trainer import (
        evaluated_checkpoint,
        load_checkpoint,
        load_dataset,
        patch_spec_from,
        split_fold,
    )

    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ConfigError(f"unknown explanation method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    if limit < 1 or curve_steps < 1 or randomisation_nodules < 0:
        raise ConfigError(
            f"limit and curve_steps must be >= 1 and randomisation_nodules >= 0, got {limit}, {curve_steps}, {randomisation_nodules}"
        )
    say = progress or log.info
    options = options or {}
    ds = load_dataset(cfg)
    spec = patch_spec_from(cfg)
    _, _, test = split_fold(ds, cfg, fold)
    test = np.sort(test)[:limit]
    files = RunFiles.of(cfg.resolve(cfg.output_dir), cfg.name)
    if checkpoint is None:
        refit = files.refit(fold)
        checkpoint = refit if refit.is_file() else files.folder(fold) / evaluated_checkpoint(cfg, cfg.cv.evaluate)
    model, meta = load_checkpoint(checkpoint)
    model.eval()
    segment = None
    if cfg.first_pass.network == "box_net":
        # The runtime's first pass is the fold's box net, trained beside its network (this
        # config's own, else the one it reused from the folder's owner).
        from nodule_edge.train.first_pass import box_net_segmenter, load_box_net

        box_net = next((p for p in files.box_nets(fold) if p.is_file()), files.box_nets(fold)[0])
        segment = box_net_segmenter(load_box_net(box_net)[0])
    outline_head = (
        OutlineHead.from_dict(meta["classifier_refit"]["outline_head"])
        if "outline_head" in meta.get("classifier_refit", {})
        else None
    )
    rows: list[dict[str, Any]] = []
    for n, i in enumerate(test):
        patch = np.asarray(ds.cache.images[i], np.float32)
        mask = np.asarray(ds.cache.masks[i], np.float32) >= 0.5
        maps, run = _maps(model, patch, spec, methods, options, segment, outline_head)
        p = next(iter(maps.values()))[3]
        target = 1 if p >= 0.5 else 0
        row: dict[str, Any] = {
            "row": int(i),
            "id": ds.cache.ids[i],
            "probability": round(p, 6),
            "label": None if int(ds.labels[i]) < 0 else int(ds.labels[i]),
            "methods": {},
        }

        def score(x: np.ndarray, run: Callable[[np.ndarray], dict[str, np.ndarray]] = run) -> np.ndarray:
            return run(x)["malignancy_probability"].astype(np.float64)

        for method, (signed, explained_input, seconds, _) in maps.items():
            metrics: dict[str, Any] = {"seconds": round(seconds, 3)}
            if bool(ds.cache.has_mask[i]) and mask.any():
                metrics["pointing_game"] = _num(pointing_game(signed, mask))
                metrics["mass_inside"] = _num(relevance_mass_accuracy(np.clip(signed, 0, None), mask))
            metrics["deletion_auc"] = _num(
                deletion_curve(score, explained_input, signed, steps=curve_steps, target=target).auc
            )
            metrics["insertion_auc"] = _num(
                insertion_curve(score, explained_input, signed, steps=curve_steps, target=target).auc
            )
            row["methods"][method] = metrics
        if "gradcam" in maps and "occlusion" in maps:
            row["agreement_spearman"] = _num(rank_correlation(maps["gradcam"][0], maps["occlusion"][0]))
        rows.append(row)
        say(
            f"nodule {n + 1}/{len(test)} ({row['id']}): "
            + ", ".join(f"{m} {v['seconds']:.1f} s" for m, v in row["methods"].items())
        )

    randomisation = []
    for i in test[:randomisation_nodules]:
        patch = np.asarray(ds.cache.images[i], np.float32)
        before = {m: v[0] for m, v in _maps(model, patch, spec, methods, options, segment, outline_head)[0].items()}
        for stage in range(len(_STAGES)):
            after = {
                m: v[0]
                for m, v in _maps(
                    _randomised(model, stage, seed=stage), patch, spec, methods, options, segment, outline_head
                )[0].items()
            }
            randomisation.append(
                {
                    "id": ds.cache.ids[i],
                    "randomised_up_to": _STAGES[stage][0],
                    "spearman": {m: _num(randomisation_similarity(before[m], after[m])) for m in methods},
                }
            )
        say(f"randomisation check on {ds.cache.ids[i]} done")

    agreements = [r["agreement_spearman"] for r in rows if r.get("agreement_spearman") is not None]
    threshold = float(np.percentile(agreements, AGREEMENT_PERCENTILE)) if agreements else None
    return {
        "fold": fold,
        "checkpoint": str(checkpoint),
        "n_nodules": len(rows),
        "selection": f"the first {len(rows)} test nodules of fold {fold} in manifest order (patients unseen in training)",
        "curve_steps": curve_steps,
        "options": options,
        "method_defaults": _method_defaults(),
        "hardware": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        },
        "summary": _summary(rows, methods),
        "randomisation": randomisation,
        "randomisation_summary": _randomisation_summary(randomisation, methods),
        "agreement": {
            "spearman_mean": _num(float(np.mean(agreements))) if agreements else None,
            "percentile": AGREEMENT_PERCENTILE,
            "threshold": None if threshold is None else round(threshold, 4),
            "n": len(agreements),
        },
        "nodules": rows,
    }


def _method_defaults() -> dict[str, Any]:
    from nodule_edge.runtime.occlusion import AUTO_GRIDS, DEFAULT_MAX_PASSES
    from nodule_edge.train.explain import DEFAULT_OPTIONS

    return {
        "occlusion": {"grids": [list(g) for g in AUTO_GRIDS], "max_passes": DEFAULT_MAX_PASSES},
        **json.loads(json.dumps(DEFAULT_OPTIONS, default=str)),
    }


def _num(value: float) -> float | None:
    return round(float(value), 6) if value is not None and math.isfinite(float(value)) else None


def _summary(rows: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        stats: dict[str, Any] = {}
        for metric in ("pointing_game", "mass_inside", "deletion_auc", "insertion_auc", "seconds"):
            values = [r["methods"][method].get(metric) for r in rows if method in r["methods"]]
            values = [v for v in values if v is not None]
            stats[metric] = (
                {
                    "mean": _num(float(np.mean(values))),
                    "sd": _num(float(np.std(values, ddof=1))) if len(values) > 1 else None,
                    "n": len(values),
                }
                if values
                else None
            )
        out[method] = stats
    return out


def _randomisation_summary(entries: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for stage, _ in _STAGES:
        chosen = [e for e in entries if e["randomised_up_to"] == stage]
        out[stage] = {
            m: _num(float(np.mean(vals)))
            if (vals := [e["spearman"][m] for e in chosen if e["spearman"].get(m) is not None])
            else None
            for m in methods
        }
    return out


def render_table(result: dict[str, Any]) -> str:
    """The README's comparison table (Markdown) from a :func:`compare_explanations` result."""

    def cell(stats: dict[str, Any] | None, digits: int = 2) -> str:
        if not stats or stats.get("mean") is None:
            return "–"
        sd = stats.get("sd")
        return f"{stats['mean']:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")

    lines = [
        f"Fold {result['fold']}, {result['selection']}; {result['curve_steps']}-step curves; {result['hardware']['threads']} thread(s).",
        "",
        "| method | pointing game | mass inside | deletion AUC (lower better) | insertion AUC (higher better) | seconds / nodule | randomised heads: Spearman | randomised all: Spearman |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rand = result.get("randomisation_summary", {})
    for method, stats in result["summary"].items():
        heads = rand.get(_STAGES[0][0], {}).get(method)
        full = rand.get(_STAGES[-1][0], {}).get(method)
        lines.append(
            f"| {method} | {cell(stats['pointing_game'])} | {cell(stats['mass_inside'])} | {cell(stats['deletion_auc'])} | {cell(stats['insertion_auc'])} | {cell(stats['seconds'], 1)} | "
            + ("–" if heads is None else f"{heads:.2f}")
            + " | "
            + ("–" if full is None else f"{full:.2f}")
            + " |"
        )
    agreement = result.get("agreement", {})
    if agreement.get("threshold") is not None:
        lines += [
            "",
            f"Grad-CAM vs occlusion Spearman: mean {agreement['spearman_mean']:.2f} over {agreement['n']} nodules; {agreement['percentile']:g}th percentile {agreement['threshold']:.2f} (the runtime's agreement threshold).",
        ]
    return "\n".join(lines) + "\n"


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write the JSON atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    write_text_atomic(path, json.dumps(result, indent=2))
    return path

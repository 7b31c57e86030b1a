"""Write MODEL_CARD.md from a training run's summary.json (every figure comes from the run)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodule_edge._files import write_text_atomic
from nodule_edge.train.config import DEBUGGED_L2_GRID

__all__ = [
    "mean_of",
    "render_cv_report",
    "render_model_card",
    "render_run_comparison",
    "result_value",
    "write_model_card",
]


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if v != v else f"{v:.{digits}f}"


# The targets of the model (README, "The model"), judged on the pooled patient-disjoint CV.
TARGETS = {
    "pooled_auc": 0.92,
    "attribute_mae_reduction": 0.25,
    "dice": 0.75,
    "cam_on_nodule": 0.90,
    "context_delta_p": 0.03,
}

EXPORT_COMMAND = "nodule-edge export runs/shipped/final/refit.safetensors --index-from ../shared/data/lidc_voi --cache-dir cache --summary runs/shipped/summary.json"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "n/a"


def _reached(ok: bool) -> str:
    return "reached" if ok else "**not reached**"


def result_value(r: dict[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` (``"malignancy.auc"``) in a fold result, or None where it is missing."""
    node: Any = r
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def mean_of(values: list[Any]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    clean = [float(v) for v in values if v is not None]
    return sum(clean) / len(clean) if clean else None


def _mean_sd(values: list[Any]) -> str:
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return "n/a"
    mean = sum(clean) / len(clean)
    if len(clean) < 2:
        return _f(mean)
    sd = (sum((v - mean) ** 2 for v in clean) / (len(clean) - 1)) ** 0.5
    return f"{_f(mean)} ± {_f(sd)}"


_FOLD_COLUMNS = [
    ("AUC (runtime path)", "malignancy.auc"),
    ("AUC (reference box)", "malignancy_reference_box.auc"),
    ("diameter-only AUC", "baseline_diameter.auc"),
    ("attribute MAE", "attributes_mean_mae"),
    ("constant MAE", "attributes_baseline_constant_mean_mae"),
    ("Dice", "dice_mean"),
    ("CAM on nodule", "cam_on_nodule_fraction_gt_mask"),
    ("path parity, mean abs Δp", "path_parity.mean_abs_delta_probability"),
    ("context, mean abs Δp", "context_sensitivity_nodule_intact.mean_abs_delta_probability"),
]


def _fold_table(folds: dict[str, dict[str, Any]], pooled: dict[str, Any] | None) -> list[str]:
    lines = [
        "| fold | test nodules (labelled) | " + " | ".join(name for name, _ in _FOLD_COLUMNS) + " | epochs | minutes |",
        "|---|---:|" + "---:|" * len(_FOLD_COLUMNS) + "---:|---:|",
    ]
    for fold, r in sorted(folds.items()):
        cells = [_f(result_value(r, key)) for _, key in _FOLD_COLUMNS]
        lines.append(
            f"| {fold} | {r.get('n_nodules')} ({r.get('n_labelled')}) | "
            + " | ".join(cells)
            + f" | {r.get('epochs_run')} | {_f((r.get('train_seconds') or 0) / 60, 1)} |"
        )
    if len(folds) > 1:
        cells = [_mean_sd([result_value(r, key) for r in folds.values()]) for _, key in _FOLD_COLUMNS]
        lines.append("| mean ± sd | | " + " | ".join(cells) + " | | |")
    if pooled:
        lines.append(
            f"| pooled ({pooled.get('n_folds')} folds) | {_f(result_value(pooled, 'malignancy.n'), 0)} labelled | {_f(result_value(pooled, 'malignancy.auc'))} | | {_f(pooled.get('diameter_auc'))} | | | | | | | | |"
        )
    return lines


def _targets(summary: dict[str, Any]) -> list[str]:
    folds = summary.get("folds", {})
    pooled = summary.get("pooled") or {}
    complete = pooled.get("n_folds") == summary["config"]["cv"]["folds"]
    auc, diam = result_value(pooled, "malignancy.auc"), pooled.get("diameter_auc")
    above = [
        (result_value(r, "malignancy.auc") or 0) > (result_value(r, "baseline_diameter.auc") or 1)
        for r in folds.values()
    ]
    mae = mean_of([r.get("attributes_mean_mae") for r in folds.values()])
    const = mean_of([r.get("attributes_baseline_constant_mean_mae") for r in folds.values()])
    reduction = 1 - mae / const if mae is not None and const else None
    dice_v = mean_of([r.get("dice_mean") for r in folds.values()])
    cam = mean_of([r.get("cam_on_nodule_fraction_gt_mask") for r in folds.values()])
    parity = mean_of([result_value(r, "path_parity.mean_abs_delta_probability") for r in folds.values()])
    context = mean_of(
        [result_value(r, "context_sensitivity_nodule_intact.mean_abs_delta_probability") for r in folds.values()]
    )
    scope = "" if complete else f" (only {pooled.get('n_folds', 0)} of {summary['config']['cv']['folds']} folds so far)"
    return [
        f"## Targets vs reached{scope}",
        "",
        "| target | reached | |",
        "|---|---:|---|",
        f"| pooled CV AUC ≥ {TARGETS['pooled_auc']} and above the diameter-only baseline on every fold | {_f(auc)} (diameter-only {_f(diam)}); above on {sum(above)} of {len(above)} folds | {_reached(complete and auc is not None and auc >= TARGETS['pooled_auc'] and all(above))} |",
        f"| attribute MAE ≥ {TARGETS['attribute_mae_reduction'] * 100:.0f} % below the constant baseline | {'n/a' if reduction is None else f'{reduction * 100:.0f} % below'} | {_reached(reduction is not None and reduction >= TARGETS['attribute_mae_reduction'])} |",
        f"| Dice ≥ {TARGETS['dice']} at 64³ | {_f(dice_v)} | {_reached(dice_v is not None and dice_v >= TARGETS['dice'])} |",
        f"| Grad-CAM on the nodule for ≥ {TARGETS['cam_on_nodule'] * 100:.0f} % of nodules | {_f(cam)} | {_reached(cam is not None and cam >= TARGETS['cam_on_nodule'])} |",
        f"| runtime vs training path, mean \\|Δp\\| ≤ {TARGETS['context_delta_p']} | {_f(parity)} | {_reached(parity is not None and parity <= TARGETS['context_delta_p'])} |",
        f"| context cut to the nodule + 2 mm, mean \\|Δp\\| ≤ {TARGETS['context_delta_p']} | {_f(context)} | {_reached(context is not None and context <= TARGETS['context_delta_p'])} |",
        "",
    ]


def _other_runs(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "## Other runs (not the shipped model)",
        "",
        "| run | folds | pooled AUC (diameter-only) | mean fold AUC | attribute MAE (constant) | Dice | CAM on nodule | epochs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, summary in runs.items():
        folds = summary.get("folds", {})
        pooled = summary.get("pooled") or {}
        lines.append(
            f"| {name} | {', '.join(sorted(folds))} | {_f(result_value(pooled, 'malignancy.auc'))} ({_f(pooled.get('diameter_auc'))}) "
            f"| {_mean_sd([result_value(r, 'malignancy.auc') for r in folds.values()])} "
            f"| {_f(mean_of([r.get('attributes_mean_mae') for r in folds.values()]))} ({_f(mean_of([r.get('attributes_baseline_constant_mean_mae') for r in folds.values()]))}) "
            f"| {_f(mean_of([r.get('dice_mean') for r in folds.values()]))} | {_f(mean_of([r.get('cam_on_nodule_fraction_gt_mask') for r in folds.values()]))} "
            f"| {summary['config']['train'].get('epochs')} |"
        )
    return lines + [""]


def _precision_text(summary: dict[str, Any]) -> str:
    """What the networks were trained in, as the fold results and the final model record it."""
    by_run = {f"fold {k}": v.get("training_precision") for k, v in sorted(summary.get("folds", {}).items())}
    if "final" in summary:
        by_run["the final model"] = summary["final"].get("training_precision")
    known = {name: value for name, value in by_run.items() if value}
    if not known:
        return 'bf16 autocast where the CPU runs bf16 natively, else fp32 (`bf16 = "auto"`)'
    text = {"bf16": "bf16 autocast", "fp32": "fp32", "bf16 and fp32": "partly bf16 autocast, partly fp32"}
    values = set(known.values())
    if len(values) == 1 and len(known) == len(by_run):
        return f"{text.get(values.pop(), '?')} (every fold and the final model)"
    return "; ".join(f"{name}: {text.get(value, value)}" for name, value in known.items())


def _l2_words(cfg: dict[str, Any], refit_info: dict[str, Any]) -> str:
    # A summary's config omits the grid at the value it had before the key existed.
    grid = cfg.get("head", {}).get("l2_grid", DEBUGGED_L2_GRID)
    chosen = f"; the final model's: {refit_info['l2']:g}" if "l2" in refit_info else ""
    return "(" + ", ".join(f"{float(v):g}" for v in grid) + chosen + ")"


def _head_refit_lines(cfg: dict[str, Any], refit_info: dict[str, Any]) -> list[str]:
    refit = cfg.get("head", {}).get("refit", "none")
    if refit == "debugged":
        # A summary without the key was written before it existed, when the weight was 1.
        weight = float(cfg.get("head", {}).get("attribute_weight", 1.0))
        attribute = (
            "attribute MSE"
            if weight == 1
            else f"attribute MSE × {weight:g}" + (", i.e. in rating points" if weight == 16 else "")
        )
        # A summary without the key was written before it existed, when there was no penalty.
        parity = float(cfg.get("head", {}).get("parity_weight", 0.0))
        if parity:
            attribute += f" + {parity:g} × the mean |p(runtime path) − p(readers' box)| over the training fold (path-parity penalty)"
        return [
            '- Head refit (after training, `[head] refit = "debugged"`): the attribute embedding, attribute output and classifier are refitted on the training fold\'s runtime-path features '
            f"under the training objective (BCE + {_debug_loss_words(cfg)} + {attribute}, full batch, warm start, L2 on standardised inputs); the classifier's L2 is chosen by 3-fold patient-grouped inner CV "
            f"among the strengths {_l2_words(cfg, refit_info)} that keep Grad-CAM on the nodule for ≥ 90 % of nodules. Backbone and segmentation unchanged (`nodule_edge/train/head.py`, docs/cv/README.md)."
            + _outline_sentence(cfg, refit_info)
            + _readout_sentence(cfg.get("head", {}))
            + (
                " Then the classifier's logit is rescaled by Platt scaling fitted on the inner CV's out-of-fold logits (same ranking; probabilities calibrated on held-out nodules of the training fold)."
                if cfg.get("head", {}).get("calibrate")
                else ""
            )
        ]
    if refit == "full":
        return [
            '- Classifier refit (after training, `[head] refit = "full"`): L2 logistic regression on the training fold\'s classifier inputs, L2 by inner patient-grouped CV.'
        ]
    return []


def _debug_loss_words(cfg: dict[str, Any]) -> str:
    """The refit's debug loss (absent keys: before they existed, the adaptive loss on the sign)."""
    head, loss = cfg.get("head", {}), cfg.get("loss", {})
    adaptive = loss.get("adaptive", True) and head.get("debug_adaptive", True)
    temperature = float(head.get("debug_sign_temperature", 0.0))
    words = "adaptive debug loss" if adaptive else "debug loss, every labelled nodule weighted alike"
    if temperature > 0:
        words += f", the class read as tanh(logit / {temperature:g}) so that the loss also steers which class the logit takes"
    return words


def _outline_sentence(cfg: dict[str, Any], refit_info: dict[str, Any]) -> str:
    """The outline term of the head step, when the run had one (it needs the nodule-bounded input);
    ``refit_info`` is the final model's head-step record."""
    if not (cfg.get("head", {}).get("outline_statistics") and cfg.get("train", {}).get("nodule_box")):
        return ""
    # A record without the key was written before it existed, when the L2 was 1e-3.
    l2 = float(refit_info.get("outline_l2", 1e-3))
    trained_beside = (
        " The network was trained beside the term (`[train] outline_offset`: a linear term on the same statistics,"
        " trained with it, added to the classifier's logit in its loss and validation), and the head step starts the"
        " term from the trained one."
        if cfg.get("train", {}).get("outline_offset")
        else ""
    )
    return (
        " Beside the classifier, an outline term (`[head] outline_statistics = true`, `nodule_edge/outline.py`) is fitted with it:"
        " the logit is the network's plus a linear function of seven statistics of the first pass's outline of the whole cube"
        f" (in-plane Feret diameter, log volume, HU mean, sd and 90th percentile, solid fraction, compactness; L2 {l2:g} on their"
        " standardised weights), the same on the runtime and the training path. The term has no map of its own: Grad-CAM shows"
        " the network's evidence for the final class, the complement of the network's own map where the term changes the class;"
        " the statistics are in each prediction (`outline_statistics`) and the weights in the ONNX metadata (`outline_head`)."
        + trained_beside
    )


def _parameters(summary: dict[str, Any]) -> str:
    """The shipped model's parameter count, and the trained network's when the head step added some."""
    trained, shipped = summary.get("parameters"), summary.get("final", {}).get("parameters")
    if shipped is None or shipped == trained:
        return f"{_count(trained)} parameters"
    return (
        f"{_count(shipped)} parameters ({_count(trained)} trained, {_count(shipped - trained)} added by the head step)"
    )


def _readout_sentence(head: dict[str, Any]) -> str:
    """The attribute readout step of the head section (absent keys: before they existed, off)."""
    if not head.get("attribute_readout", False):
        return ""
    if head.get("attribute_skip", False):
        return (
            " Then the attribute output layer and a linear skip from the pooled features and statistics to the attribute logits"
            " (`[head] attribute_readout = true`, `attribute_skip = true`) are refitted to the L1 error in rating points;"
            " probability, logit and Grad-CAM do not read them."
        )
    return (
        " Then the attribute output layer alone is refitted to the L1 error in rating points"
        " (`[head] attribute_readout = true`); probability, logit and Grad-CAM do not read it."
    )


def render_model_card(
    summary: dict[str, Any],
    command: str,
    extra: dict[str, Any] | None = None,
    other_runs: dict[str, dict[str, Any]] | None = None,
    export_command: str = EXPORT_COMMAND,
) -> str:
    """Markdown model card: model, input, data, training, per-fold and pooled CV metrics, limits.

    Args:
        summary: The shipped run's ``summary.json`` (per-fold results and the pooled CV).
        command: The command that reproduces the run.
        extra: More "key: value" lines for the end of the metrics.
        other_runs: Summaries of runs that are not the shipped model (ablations), by name.
        export_command: The command that builds the bundle from the run.
    """
    cfg = summary["config"]
    hw = summary["hardware"]
    model = cfg.get("model", {})
    train = cfg["train"]
    box = (summary.get("patch_spec") or {}).get("nodule_box")
    folds = summary.get("folds", {})
    pooled = summary.get("pooled")
    decoder = (
        "a U-Net-style decoder that outlines the nodule at 0.5 mm (skips from the stem and the input, depth-to-space)"
        if model.get("decoder", "unet64") == "unet64"
        else "the papers' light 16³ segmentation head"
    )
    size_aware = (
        " Size-aware heads: six statistics of the nodule under the predicted (detached) segmentation — log volume, mean and spread of both windows, solid fraction — enter the attribute embedding and the classifier."
        if model.get("seg_features")
        else ""
    )
    lines = [
        "# nodule-edge model card",
        "",
        "## Model",
        f"Collaborative 3D CNN (Zhang et al.): dilated residual backbone (widths {model.get('widths')}) with GroupNorm, {decoder}, fusion module, attribute branch whose embedding feeds the benign/malignant branch (concatenation), trained with the adaptive contrastive-saliency (debug) loss.{size_aware} {_parameters(summary)}. Grad-CAM in closed form in the graph.",
        "",
        "## Model input",
        "A 32 mm cube at 0.5 mm (64³), two channels: lung window [-1000, 400] HU and mediastinal window [-160, 240] HU.",
    ]
    first = cfg.get("first_pass") or {}
    if first.get("network") == "box_net":
        # Under a box net the network never sees a whole cube at run time; the whole samples remain
        # in training (the recorded recipe), so the card says what they are rather than why.
        whole_why = "kept from the recipe of the network's own first pass; at run time the box net, not the network, sees the whole cube"
        first_pass = (
            f"the runtime's first pass is a box net (a segmentation-only network at widths {first.get('widths')}, trained {'before' if train.get('outline_offset') else 'after'} the network on the same nodules' whole cubes, {first.get('epochs')} epochs, Dice + BCE against the readers' mask; `first_pass.onnx` in the bundle): "
            "its segmentation (the component at the centre) gives the box, at the middle of the training margins, and the model's one pass on the bounded cube gives the answer. "
        )
    else:
        whole_why = "as the runtime's first pass sees them"
        first_pass = "the runtime runs the model twice: the first pass's segmentation (the component at the centre) gives the box, at the middle of the training margins, and the second pass gives the answer. "
    if box:
        lines += [
            f"Bounded to the nodule: everything outside the nodule's box plus {box['margin_mm'][0]:g} mm in z and {box['margin_mm'][1]:g} mm in-plane is air. "
            f"Training draws each side's margin from that value to {box['jitter_mm']:g} mm more (box of the reference mask; {train.get('unbounded_probability', 0) * 100:.0f} % of samples whole, {whole_why}); "
            + first_pass
            + "Why: the LIDC VOIs end at the nodule's last slice in z for 54 % of nodules, so where air begins tells a model the size; a full study has lung there. With the box, both paths see the same input and context beyond the box cannot move the prediction "
            "(path parity and context rows below).",
        ]
    lines += [
        "",
        "## Data",
        "679 LIDC-IDRI nodules from 385 patients (VOIs with consensus masks and reader ratings; CC BY 3.0, Armato et al. 2011).",
        "- Unsure data (segmentation + attributes): every training nodule; targets are reader-mean ratings scaled to [0, 1].",
        "- Sure data (classification): **LIDC proxy labels** — reader-mean malignancy > 3 malignant, < 3 benign, = 3 excluded (581 labelled nodules). No pathology is available: every malignancy metric below is against radiologists' ratings, not pathology.",
        f"- Split: patient-disjoint {cfg['cv']['folds']}-fold cross-validation (seed {train['seed']}); 20 % of each training fold's patients for validation (monitoring; the fold is evaluated at its {cfg['cv'].get('evaluate', 'best')} checkpoint).",
        "",
        "## Training",
        f"- Reproduce: `{command}` (config `configs/shipped.toml`, sha256 {summary['config_sha256'][:16]}…); resumable fold by fold, each finished fold in `docs/cv/foldK.json`.",
        f"- Hardware: {hw['device']} ({hw['cpu']}), {hw['threads']} threads, torch {hw['torch']}.",
        f"- Bundle: `{export_command}`.",
        *_head_refit_lines(cfg, summary.get("final", {}).get("classifier_refit") or {}),
        f"- Schedule: {train['epochs']} epochs, batch {train['batch_sure']} sure + {train['batch_unsure']} unsure, AdamW lr {train['lr']} with cosine decay, {_precision_text(summary)}; augmentation: flips of every axis, in-plane 90° rotations and transposes (z never swapped, nothing cut).",
        "- Training time (sum of epoch times): "
        + "; ".join(
            [
                f"fold {k} {_f((v.get('train_seconds') or 0) / 60, 1)} min ({v.get('epochs_run')} epochs of {v.get('steps_per_epoch')} steps)"
                for k, v in sorted(folds.items())
            ]
            + ([f"final model {_f(summary['final']['train_seconds'] / 60, 1)} min"] if summary.get("final") else [])
        )
        + ".",
        "",
        "## Patient-disjoint cross-validation",
        "",
        f"Runtime path = what `nodule-edge infer` does ({'the box net, then one pass of the network' if first.get('network') == 'box_net' else 'two passes of the network'}); reference box = the training path (box of the readers' mask). Pooled = every fold's held-out predictions in one ROC.",
        "",
        *_fold_table(folds, pooled),
        "",
    ]
    if pooled and pooled.get("segmentation_volume_auc") is not None:
        lines.append(
            f"- What the segmentation alone knows: the AUC of its predicted volume, pooled, is {_f(pooled['segmentation_volume_auc'])}."
        )
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", *_targets(summary)]
    if other_runs:
        lines += _other_runs(other_runs)
    lines += [
        "## Known limits",
        "- Labels are radiologists' ratings (LIDC proxy), not pathology; = 3 nodules are excluded from the malignancy metrics. The diameter baseline uses the readers' own diameter, which their ratings follow closely.",
        *_calcification_lines(pooled),
        "- The model has only met points at a nodule: at a point without one (lung, vessel, ground glass) it still outlines something and gives a probability, often near 1. The runtime's quality flags (`no_nodule_at_point`, `nodule_exceeds_cube`, `no_nodule_found`, `lung_hu_outside_training`; README, Quality flags) say when that is likely; they do not change the probability.",
        "- LIDC scanners and protocols (2000s-era CT, 0.5–2.5 mm slices); performance on other populations, low-dose screening or contrast phases is unmeasured.",
        "- Not a medical device; research use only.",
    ]
    return "\n".join(lines) + "\n"


def _calcification_lines(pooled: dict[str, Any] | None) -> list[str]:
    """The pooled AUC split by the readers' calcification rating, where it says the ruler wins a subgroup."""
    groups = (pooled or {}).get("by_calcification") or {}
    plain, calcified = groups.get("non_calcified") or {}, groups.get("calcified") or {}
    if plain.get("auc") is None or plain.get("diameter_auc") is None:
        return []
    if plain["auc"] >= plain["diameter_auc"]:
        return [
            f"- Among the {plain['n']} non-calcified nodules (readers' majority calcification rating: absent) the model ranks malignancy at least as well as the readers' diameter: AUC {_f(plain['auc'])} against {_f(plain['diameter_auc'])} (pooled CV)."
        ]
    auc, diameter = result_value(pooled or {}, "malignancy.auc"), (pooled or {}).get("diameter_auc")
    where_it_wins = (
        f" The model's pooled lead over diameter comes with the {calcified['n']} calcified nodules ({calcified['n_malignant']} malignant), which diameter alone ranks by size."
        if calcified and auc is not None and diameter is not None and auc > diameter
        else ""
    )
    return [
        f"- **Among the {plain['n']} non-calcified nodules (readers' majority calcification rating: absent) the readers' diameter ranks malignancy better than the model: AUC {_f(plain['diameter_auc'])} against {_f(plain['auc'])}** (pooled CV).{where_it_wins} Where a nodule is not calcified, the model's probability adds little to a careful measurement of its size; the readers rated what they measured (docs/cv/README.md, item 11)."
    ]


def render_cv_report(folds: dict[str, dict[str, Any]], pooled: dict[str, Any] | None, title: str) -> str:
    """The per-fold table with mean ± sd and the pooled CV, as Markdown (``nodule-edge cv-report``)."""
    lines = [f"# {title}", "", *_fold_table(folds, pooled), ""]
    if pooled:
        lines.append(
            f"Pooled out-of-fold AUC {_f(result_value(pooled, 'malignancy.auc'))} on {_f(result_value(pooled, 'malignancy.n'), 0)} labelled nodules; diameter alone {_f(pooled.get('diameter_auc'))}; volume of the predicted segmentation {_f(pooled.get('segmentation_volume_auc'))}."
        )
        for name, group in (pooled.get("by_calcification") or {}).items():
            lines.append(
                f"- {name.replace('_', '-')} (readers' majority rating): {group['n']} labelled, {group['n_malignant']} malignant; AUC {_f(group.get('auc'))}, diameter alone {_f(group.get('diameter_auc'))}."
            )
    return "\n".join(lines) + "\n"


def render_run_comparison(rows: list[dict[str, Any]], title: str) -> str:
    """One row per cross-validated run (``compare_runs``), the first run the reference, as Markdown."""
    lines = [
        f"# {title}",
        "",
        "| run | folds | pooled AUC, runtime path (labelled) | Δ AUC vs the reference on the same folds [95 % CI] "
        "| diameter AUC, pooled | folds above diameter | readers'-box AUC | path parity | Dice | CAM on nodule "
        "| attribute MAE (below constant) | Brier, pooled (Δ [95 % CI]) | epochs | s / epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        versus = row.get("versus_reference")
        if versus is None:
            delta = "reference"
        else:
            low, high = versus["delta_auc_ci95"]
            shared = "" if versus["folds"] == rows[0]["folds"] else f" (folds {', '.join(map(str, versus['folds']))})"
            delta = f"{versus['delta_auc']:+.3f} [{low:+.3f}, {high:+.3f}]{shared}"
        brier = _f(row.get("pooled_brier"))
        if versus is not None and "delta_brier" in versus:
            b_low, b_high = versus["delta_brier_ci95"]
            brier += f" ({versus['delta_brier']:+.3f} [{b_low:+.3f}, {b_high:+.3f}])"
        below = row.get("attribute_mae_below_constant")
        mae = _f(row.get("attribute_mae_mean")) + ("" if below is None else f" ({below * 100:.0f} %)")
        lines.append(
            f"| {row['run']} | {', '.join(map(str, row['folds']))} | {_f(row['pooled_auc'])} ({row['n_labelled']}) | {delta} "
            f"| {_f(row.get('pooled_diameter_auc'))} | {row['folds_above_diameter']} of {len(row['folds'])} "
            f"| {_f(row.get('reference_box_auc_mean'))} | {_f(row.get('path_parity_mean'))} | {_f(row.get('dice_mean'))} "
            f"| {_f(row.get('cam_on_nodule_mean'))} | {mae} | {brier} | {', '.join(map(str, row['epochs']))} "
            f"| {_f(row.get('seconds_per_epoch_mean'), 1)} |"
        )
    lines += [
        "",
        "Metrics other than the pooled AUC and Brier score are means over each run's folds. Each Δ pairs each "
        "nodule's two predictions; its interval resamples nodules within folds (paired bootstrap).",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(
    summary_path: str | Path,
    out_path: str | Path,
    command: str = "nodule-edge train configs/shipped.toml",
    extra: dict[str, Any] | None = None,
    other_runs: Sequence[str | Path] = (),
    explain_summary: str | Path | None = None,
) -> Path:
    """Render the model card of ``summary.json`` (plus other runs' summaries) to ``out_path``.

    ``other_runs`` and ``explain_summary`` are the export's options, named in the card's bundle
    command as they were given.
    """
    summary = json.loads(Path(summary_path).read_text())
    others = {Path(p).stem: json.loads(Path(p).read_text()) for p in other_runs}
    export_command = EXPORT_COMMAND + "".join(f" --other-run {p}" for p in other_runs)
    if explain_summary is not None:
        export_command += f" --explain-summary {explain_summary}"
    out = Path(out_path)
    write_text_atomic(out, render_model_card(summary, command, extra, others, export_command))
    return out

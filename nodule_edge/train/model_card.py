"""Write MODEL_CARD.md from a training run's summary.json (every figure comes from the run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["render_model_card", "write_model_card"]


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if v != v else f"{v:.{digits}f}"


def render_model_card(summary: dict[str, Any], command: str, extra: dict[str, Any] | None = None) -> str:
    """Markdown model card: data, split, config, time and hardware, metrics with baselines, limits."""
    cfg = summary["config"]
    hw = summary["hardware"]
    lines = [
        "# nodule-edge model card",
        "",
        "## Model",
        f"Collaborative 3D CNN (Zhang et al.): dilated residual backbone with GroupNorm, light segmentation head, fusion module, attribute branch whose embedding feeds the benign/malignant branch (concatenation), trained with the adaptive contrastive-saliency (debug) loss. {summary.get('parameters', 'n/a'):,} parameters. Input: 2×64³ patch (32 mm cube at 0.5 mm; lung window [-1000, 400] HU and mediastinal window [-160, 240] HU).",
        "",
        "## Data",
        "679 LIDC-IDRI nodules from 385 patients (VOIs with consensus masks and reader ratings; CC BY 3.0, Armato et al. 2011).",
        "- Unsure data (segmentation + attributes): every training nodule; targets are reader-mean ratings scaled to [0, 1].",
        "- Sure data (classification): **LIDC proxy labels** — reader-mean malignancy > 3 malignant, < 3 benign, = 3 excluded (581 labelled nodules). No pathology is available: every malignancy metric below is against radiologists' ratings, not pathology.",
        f"- Split: patient-disjoint {cfg['cv']['folds']}-fold cross-validation (seed {cfg['train']['seed']}); 20 % of each training fold's patients for validation and early stopping.",
        "",
        "## Training",
        f"- Reproduce: `{command}` (config `configs/shipped.toml`, sha256 {summary['config_sha256'][:16]}…).",
        f"- Hardware: {hw['device']} ({hw['cpu']}), {hw['threads']} threads, torch {hw['torch']}; total wall time {_f(summary.get('total_seconds', 0) / 60, 1)} min.",
        f"- Folds run: {', '.join(summary['folds'])} (of {cfg['cv']['folds']}). Without a GPU a full 5-fold CV does not fit one session; the other folds were **not run**, so the figures below are one held-out fold, not a 5-fold mean.",
        f"- Final model: all 679 nodules for {summary.get('chosen_epochs')} epochs (the validation-chosen epoch of fold 0), batch {cfg['train']['batch_sure']} sure + {cfg['train']['batch_unsure']} unsure, AdamW lr {cfg['train']['lr']} with cosine decay, bf16 autocast on CPU, augmentation: flips, 90° rotations, axis transposes, and z-context truncation (image and mask) to a random extent between {_f(cfg['train']['context_min_mm'], 0)} mm and the full 32 mm for {_f(cfg['train']['context_probability'] * 100, 0)} % of samples.",
        "",
        "## Held-out metrics (patient-disjoint test fold)",
    ]
    for fold, r in summary["folds"].items():
        m = r["malignancy"]
        b = r.get("baseline_diameter", {})
        lines += [
            f"### Fold {fold} — {r['n_nodules']} test nodules, {r['n_labelled']} with a proxy label; best epoch {r['best_epoch']} of {r['epochs_run']} run",
            "",
            "| malignancy (proxy labels) | model | diameter-only baseline |",
            "|---|---:|---:|",
        ]
        for key in ("auc", "accuracy", "f1", "sensitivity", "specificity", "precision", "precision_benign"):
            lines.append(f"| {key} | {_f(m.get(key))} | {_f(b.get(key))} |")
        lines += ["", "| attribute | MAE (1–5) | within ±1 | constant-baseline MAE |", "|---|---:|---:|---:|"]
        for name, a in r.get("attributes", {}).items():
            lines.append(f"| {name} | {_f(a['mae'])} | {_f(a['within_1'])} | {_f(a['baseline_constant_mae'])} |")
        mean, const = r.get("attributes_mean_mae"), r.get("attributes_baseline_constant_mean_mae")
        if mean is not None and const:
            lines.append(f"| **mean** | {_f(mean)} | | {_f(const)} ({(1 - mean / const) * 100:.0f} % lower) |")
        cs = r.get("context_sensitivity", {})
        retrieval = r.get("retrieval") or {}
        if retrieval.get("attributes"):
            lines += [
                "",
                f"Similar-nodule retrieval on the same held-out fold (index of the fold's own nodules with the model's outputs, K = {retrieval.get('k')}, leave-one-patient-out; score = mean label of the neighbours):",
                "",
                "| vector | AUC | accuracy |",
                "|---|---:|---:|",
                f"| six attribute scores (MICCAI) | {_f(retrieval['attributes']['auc'])} | {_f(retrieval['attributes']['accuracy'])} |",
                f"| probability + malignancy rating (MedIA machine + expert) | {_f(retrieval['machine_expert']['auc'])} | {_f(retrieval['machine_expert']['accuracy'])} |",
            ]
        lines += [
            "",
            f"- Dice at 64³ (segmentation upsampled from 16³, threshold 0.5): {_f(r.get('dice_mean'))}",
            f"- Grad-CAM higher on the nodule than on the background: {_f(r.get('cam_on_nodule_fraction_gt_mask'))} of nodules (reference mask), {_f(r.get('cam_on_nodule_fraction_predicted_mask'))} (predicted mask, the runtime's trust check)",
            f"- Context sensitivity ({cs.get('n', 0)} test nodules with ≥ 24 mm z context, full vs truncated to 10 mm): mean |Δp| {_f(cs.get('mean_abs_delta_probability'))} (signed mean {_f(cs.get('mean_delta_probability'))}), max |Δp| {_f(cs.get('max_abs_delta_probability'))}, mean |Δ attribute| {_f(cs.get('mean_abs_delta_attribute_rating'))} rating points. Only large nodules have that much z context in the VOIs, and truncating to 10 mm cuts the nodule itself, so this mixes context with content.",
            "",
        ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    ctx = summary.get("data_context") or {}
    shortcut = (
        f" The VOIs' symmetric z context exceeds the nodule diameter by a median {_f(ctx.get('median_z_context_minus_diameter_mm'), 1)} mm (r = {_f(ctx.get('z_context_vs_diameter_r'), 2)} with the diameter over {ctx.get('n')} nodules; {ctx.get('n_z_context_ge_24mm')} have ≥ 24 mm), so where the air begins tells a model the nodule's size; the z-context truncation above is there to take that cue away, and only longer-context training data can remove it."
        if ctx
        else ""
    )
    lines += [
        "",
        "## Known limits",
        "- Labels are radiologists' ratings (LIDC proxy), not pathology; = 3 nodules are excluded from the malignancy metrics.",
        "- Short z context: the training VOIs have a median z extent of about 10 mm, padded with air to 32 mm; at run time full studies give real context (see context sensitivity above)." + shortcut,
        "- LIDC scanners and protocols (2000s-era CT, 0.5–2.5 mm slices); performance on other populations, low-dose screening or contrast phases is unmeasured.",
        "- One CV fold at full budget; the 5-fold figures the papers report were not reproduced here.",
        "- Not a medical device; research use only.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(summary_path: str | Path, out_path: str | Path, command: str = "nodule-edge train configs/shipped.toml", extra: dict[str, Any] | None = None) -> Path:
    """Render the model card of ``summary.json`` to ``out_path``."""
    summary = json.loads(Path(summary_path).read_text())
    out = Path(out_path)
    out.write_text(render_model_card(summary, command, extra))
    return out

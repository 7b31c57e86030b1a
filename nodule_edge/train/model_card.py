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


# The targets on patient-disjoint CV (LIDC proxy labels).
TARGETS = {"auc": 0.94, "attribute_mae_reduction": 0.25, "dice": 0.75, "cam_on_nodule": 0.90}

EXPORT_COMMAND = "nodule-edge export runs/shipped/final/last.safetensors --index-from ../shared/data/lidc_voi --cache-dir cache --summary runs/shipped/summary.json"


def _reached(ok: bool) -> str:
    return "reached" if ok else "**not reached**"


def _targets(fold: str, r: dict[str, Any]) -> list[str]:
    auc, diam = r["malignancy"].get("auc"), r.get("baseline_diameter", {}).get("auc")
    mae, const = r.get("attributes_mean_mae"), r.get("attributes_baseline_constant_mean_mae")
    reduction = 1 - mae / const if mae is not None and const else None
    dice_v, cam = r.get("dice_mean"), r.get("cam_on_nodule_fraction_gt_mask")
    auc_ok = auc is not None and diam is not None and auc >= TARGETS["auc"] and auc > diam
    return [
        f"## Targets vs reached (fold {fold})",
        "",
        "| target | reached | |",
        "|---|---:|---|",
        f"| malignancy AUC ≥ {TARGETS['auc']} and above the diameter-only baseline | {_f(auc)} (diameter-only {_f(diam)}) | {_reached(auc_ok)} |",
        f"| attribute MAE ≥ {TARGETS['attribute_mae_reduction'] * 100:.0f} % below the constant baseline | {'n/a' if reduction is None else f'{reduction * 100:.0f} % below'} | {_reached(reduction is not None and reduction >= TARGETS['attribute_mae_reduction'])} |",
        f"| Dice ≥ {TARGETS['dice']} | {_f(dice_v)} | {_reached(dice_v is not None and dice_v >= TARGETS['dice'])} |",
        f"| Grad-CAM on the nodule for ≥ {TARGETS['cam_on_nodule'] * 100:.0f} % of nodules | {_f(cam)} | {_reached(cam is not None and cam >= TARGETS['cam_on_nodule'])} |",
        "",
    ]


def _other_runs(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "## Other runs (not the shipped model)",
        "",
        "| run | fold | epochs (best / max) | z-context truncation | AUC (diameter-only) | attribute MAE (constant) | Dice | CAM on nodule | context Δp, 10 mm / nodule intact |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, summary in runs.items():
        t = summary["config"]["train"]
        for fold, r in summary.get("folds", {}).items():
            intact = r.get("context_sensitivity_nodule_intact", {})
            lines.append(
                f"| {name} | {fold} | {r.get('best_epoch')} / {r.get('max_epochs')} | ≥ {_f(t.get('context_min_mm'), 0)} mm, p {_f(t.get('context_probability'), 1)} "
                f"| {_f(r['malignancy'].get('auc'))} ({_f(r.get('baseline_diameter', {}).get('auc'))}) | {_f(r.get('attributes_mean_mae'))} ({_f(r.get('attributes_baseline_constant_mean_mae'))}) "
                f"| {_f(r.get('dice_mean'))} | {_f(r.get('cam_on_nodule_fraction_gt_mask'))} | {_f(r.get('context_sensitivity', {}).get('mean_abs_delta_probability'))} / {_f(intact.get('mean_abs_delta_probability'))} |"
            )
    return lines + [""]


def render_model_card(
    summary: dict[str, Any],
    command: str,
    extra: dict[str, Any] | None = None,
    other_runs: dict[str, dict[str, Any]] | None = None,
    export_command: str = EXPORT_COMMAND,
) -> str:
    """Markdown model card: data, split, config, time and hardware, metrics with baselines, limits.

    Args:
        summary: The shipped run's ``summary.json``.
        command: The command that reproduces the run.
        extra: More "key: value" lines for the end of the metrics.
        other_runs: Summaries of runs that are not the shipped model (ablations, short folds), by name.
        export_command: The command that builds the bundle from the run.
    """
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
        f"- Hardware: {hw['device']} ({hw['cpu']}), {hw['threads']} threads, torch {hw['torch']}.",
        f"- Bundle: `{export_command}`.",
        "- Training time (sum of epoch times): " + "; ".join([f"fold {k} {_f(v.get('train_seconds', 0) / 60, 1)} min ({v.get('epochs_run')} epochs of {v.get('steps_per_epoch')} steps)" for k, v in summary["folds"].items()] + ([f"final model {_f(summary['final']['train_seconds'] / 60, 1)} min"] if summary.get("final") else [])) + ".",
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
            f"- Context sensitivity ({cs.get('n', 0)} test nodules with ≥ 24 mm z context, full vs truncated to 10 mm): mean |Δp| {_f(cs.get('mean_abs_delta_probability'))} (signed mean {_f(cs.get('mean_delta_probability'))}), max |Δp| {_f(cs.get('max_abs_delta_probability'))}, mean |Δ attribute| {_f(cs.get('mean_abs_delta_attribute_rating'))} rating points. Only large nodules have that much z context in the VOIs, and truncating to 10 mm cuts the nodule itself, so this mixes context with content."
            + (
                f" With the nodule left whole ({r['context_sensitivity_nodule_intact']['n']} test nodules whose context reaches diameter + 4 mm, full context, median {_f(r['context_sensitivity_nodule_intact']['median_full_context_mm'], 1)} mm, vs truncated to diameter + 2 mm, median {_f(r['context_sensitivity_nodule_intact']['median_truncated_context_mm'], 1)} mm): mean |Δp| {_f(r['context_sensitivity_nodule_intact']['mean_abs_delta_probability'])} (signed {_f(r['context_sensitivity_nodule_intact']['mean_delta_probability'])}), max {_f(r['context_sensitivity_nodule_intact']['max_abs_delta_probability'])}."
                if r.get("context_sensitivity_nodule_intact")
                else ""
            ),
            "",
        ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    if summary["folds"]:
        first = next(iter(summary["folds"]))
        lines += ["", *_targets(first, summary["folds"][first])]
    if other_runs:
        lines += _other_runs(other_runs)
    ctx = summary.get("data_context") or {}
    shortcut = (
        f" The VOIs' symmetric z context exceeds the nodule diameter by a median {_f(ctx.get('median_z_context_minus_diameter_mm'), 1)} mm (r = {_f(ctx.get('z_context_vs_diameter_r'), 2)} with the diameter over {ctx.get('n')} nodules; {ctx.get('n_z_context_ge_24mm')} have ≥ 24 mm), so where the air begins tells a model the nodule's size."
        if ctx
        else ""
    )
    intact = next((r["context_sensitivity_nodule_intact"] for r in summary["folds"].values() if r.get("context_sensitivity_nodule_intact")), None)
    if intact:
        shift = -intact["mean_delta_probability"]
        shortcut += (
            f" The z-context truncation above is meant to weaken that cue; what remains, measured on {intact['n']} held-out nodules with room (full context vs cut to diameter + 2 mm, nodule intact): "
            f"p is {abs(shift):.2f} {'higher' if shift > 0 else 'lower'} on average with the full context, so on full-context studies at run time the probabilities lean {'malignant' if shift > 0 else 'benign'} by about that much relative to the held-out metrics above. Only longer-context training data can remove the cue."
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


def write_model_card(
    summary_path: str | Path,
    out_path: str | Path,
    command: str = "nodule-edge train configs/shipped.toml",
    extra: dict[str, Any] | None = None,
    other_runs: list[str | Path] = (),
) -> Path:
    """Render the model card of ``summary.json`` (plus other runs' summaries) to ``out_path``."""
    summary = json.loads(Path(summary_path).read_text())
    others = {Path(p).stem: json.loads(Path(p).read_text()) for p in other_runs}
    export_command = EXPORT_COMMAND + "".join(f" --other-run {p}" for p in other_runs)
    out = Path(out_path)
    out.write_text(render_model_card(summary, command, extra, others, export_command))
    return out

"""The model card is rendered from a run's summary.json: every figure comes from the summary."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from nodule_edge.train.model_card import render_model_card, write_model_card


def _summary(auc: float = 0.95, dice: float = 0.8, mae: float = 0.4) -> dict:
    fold = {
        "n_nodules": 10,
        "n_labelled": 8,
        "malignancy": {"auc": auc, "accuracy": 0.9},
        "baseline_diameter": {"auc": 0.85},
        "attributes": {"malignancy": {"mae": mae, "within_1": 0.9, "baseline_constant_mae": 0.6}},
        "attributes_mean_mae": mae,
        "attributes_baseline_constant_mean_mae": 0.6,
        "dice_mean": dice,
        "cam_on_nodule_fraction_gt_mask": 0.95,
        "context_sensitivity": {"n": 3, "mean_abs_delta_probability": 0.2, "mean_delta_probability": -0.2, "max_abs_delta_probability": 0.3},
        "context_sensitivity_nodule_intact": {"n": 5, "median_full_context_mm": 20.0, "median_truncated_context_mm": 12.0, "mean_abs_delta_probability": 0.1, "mean_delta_probability": -0.08, "max_abs_delta_probability": 0.2},
        "best_epoch": 7,
        "epochs_run": 9,
        "max_epochs": 24,
        "train_seconds": 600.0,
        "steps_per_epoch": 47,
    }
    return {
        "config": {"cv": {"folds": 5}, "train": {"seed": 0, "batch_sure": 8, "batch_unsure": 4, "lr": 1e-3, "context_min_mm": 4.0, "context_probability": 0.5}},
        "config_sha256": "ab" * 32,
        "hardware": {"device": "cpu", "cpu": "x86_64", "threads": 2, "torch": "2.13.0"},
        "parameters": 3810808,
        "folds": {"0": fold},
        "data_context": {"n": 679, "median_z_context_mm": 7.0, "median_z_context_minus_diameter_mm": 0.8, "z_context_vs_diameter_r": 0.93, "n_z_context_ge_24mm": 38},
        "chosen_epochs": 7,
        "final": {"train_seconds": 1200.0},
        "total_seconds": 1800.0,
    }


def test_targets_are_judged_from_the_figures() -> None:
    good = render_model_card(_summary(), "nodule-edge train x.toml")
    assert "**not reached**" not in good
    bad = render_model_card(_summary(auc=0.90, dice=0.5, mae=0.55), "nodule-edge train x.toml")
    assert bad.count("**not reached**") == 3  # AUC, Dice and MAE (8 % below the constant); CAM stays reached
    assert "0.900 (diameter-only 0.850)" in bad


def test_context_shift_and_other_runs_are_reported(tmp_path: Path) -> None:
    card = render_model_card(_summary(), "cmd")
    assert "p is 0.08 higher on average with the full context" in card
    assert "lean malignant" in card
    other = copy.deepcopy(_summary(auc=0.7))
    other_path = tmp_path / "short_run.json"
    other_path.write_text(json.dumps(other))
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps(_summary()))
    written = write_model_card(summary_path, tmp_path / "MODEL_CARD.md", other_runs=[other_path]).read_text()
    assert "| short_run | 0 | 7 / 24 | ≥ 4 mm, p 0.5 | 0.700 (0.850) |" in written
    assert "None" not in written
    # The bundle line is the command that rebuilds this very card, other runs included.
    assert f"--summary runs/shipped/summary.json --other-run {other_path}`" in written

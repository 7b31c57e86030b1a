"""The model card is rendered from a run's summary.json: every figure comes from the summary."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nodule_edge.train.model_card import render_model_card, write_model_card


def _fold(auc: float, diameter: float = 0.85, dice: float = 0.8, mae: float = 0.4) -> dict:
    return {
        "n_nodules": 10,
        "n_labelled": 8,
        "malignancy": {"auc": auc, "accuracy": 0.9},
        "malignancy_reference_box": {"auc": auc + 0.01},
        "baseline_diameter": {"auc": diameter},
        "attributes_mean_mae": mae,
        "attributes_baseline_constant_mean_mae": 0.6,
        "dice_mean": dice,
        "cam_on_nodule_fraction_gt_mask": 0.95,
        "path_parity": {"mean_abs_delta_probability": 0.02},
        "context_sensitivity_nodule_intact": {"n": 5, "mean_abs_delta_probability": 0.004},
        "epochs_run": 12,
        "train_seconds": 600.0,
        "steps_per_epoch": 47,
    }


def _summary(
    aucs: tuple[float, ...] = (0.95, 0.93, 0.94, 0.96, 0.92),
    pooled_auc: float = 0.94,
    dice: float = 0.8,
    mae: float = 0.4,
) -> dict:
    return {
        "config": {
            "model": {"decoder": "unet64", "seg_features": True, "widths": [24, 48, 96, 128]},
            "cv": {"folds": 5, "evaluate": "last"},
            "train": {
                "epochs": 12,
                "seed": 0,
                "batch_sure": 8,
                "batch_unsure": 4,
                "lr": 1e-3,
                "unbounded_probability": 0.2,
            },
        },
        "config_sha256": "ab" * 32,
        "patch_spec": {"nodule_box": {"margin_mm": [0.0, 4.0, 4.0], "jitter_mm": 2.0, "threshold": 0.5}},
        "hardware": {"device": "cpu", "cpu": "x86_64", "threads": 2, "torch": "2.13.0"},
        "parameters": 1350125,
        "folds": {str(i): _fold(a, dice=dice, mae=mae) for i, a in enumerate(aucs)},
        "pooled": {
            "n_folds": len(aucs),
            "malignancy": {"auc": pooled_auc, "n": 40},
            "diameter_auc": 0.88,
            "segmentation_volume_auc": 0.86,
        },
        "final": {"train_seconds": 1200.0},
    }


def test_targets_are_judged_from_the_figures() -> None:
    good = render_model_card(_summary(), "nodule-edge train x.toml")
    assert "**not reached**" not in good
    assert "| mean ± sd | |" in good and "| pooled (5 folds) | 40 labelled | 0.940 |" in good
    bad = render_model_card(
        _summary(aucs=(0.95, 0.80, 0.94, 0.96, 0.92), pooled_auc=0.90, dice=0.5, mae=0.55), "nodule-edge train x.toml"
    )
    assert bad.count("**not reached**") == 3  # AUC (and one fold below diameter), Dice, MAE (8 % below)
    assert "0.900 (diameter-only 0.880); above on 4 of 5 folds" in bad


def test_an_unfinished_cv_is_never_called_reached() -> None:
    partial = _summary(aucs=(0.95, 0.96), pooled_auc=0.95)
    card = render_model_card(partial, "cmd")
    assert "only 2 of 5 folds so far" in card
    assert "above on 2 of 2 folds | **not reached**" in card


def test_other_runs_and_the_bundle_command(tmp_path: Path) -> None:
    other = copy.deepcopy(_summary(aucs=(0.70,), pooled_auc=0.70))
    other_path = tmp_path / "papers_model.json"
    other_path.write_text(json.dumps(other))
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps(_summary()))
    written = write_model_card(summary_path, tmp_path / "MODEL_CARD.md", other_runs=[other_path]).read_text()
    assert "| papers_model | 0 | 0.700 (0.880) | 0.700 |" in written
    assert "None" not in written
    # The bundle line is the command that rebuilds this very card, other runs included.
    assert f"--summary runs/shipped/summary.json --other-run {other_path}`" in written
    assert "0 mm in z and 4 mm in-plane" in written


def _fold_file(tmp_path: Path, fold: int, rows: list[int], sha: str = "s") -> Path:
    result = {
        **_fold(0.9),
        "fold": fold,
        "fold_config_sha256": sha,
        "predictions": {
            "index": rows,
            "probability": [0.1 * (i % 10) for i in rows],
            "volume_mm3": [float(i) for i in rows],
        },
    }
    path = tmp_path / f"fold{fold}.json"
    path.write_text(json.dumps(result))
    return path


def test_cv_report_pools_fold_files(tmp_path: Path, synthetic_voi_dir: Path) -> None:
    from click.testing import CliRunner

    from nodule_edge.cli import main

    a = _fold_file(tmp_path, 0, [0, 1, 2, 3, 4, 5])
    b = _fold_file(tmp_path, 1, [6, 7, 8, 9, 10, 11])
    result = CliRunner().invoke(
        main, ["cv-report", str(a), str(b), "--voi-dir", str(synthetic_voi_dir), "--title", "T"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# T\n")
    assert "| pooled (2 folds) |" in result.stdout and "| mean ± sd |" in result.stdout
    # Two configurations in one pool, or a file that is not a fold result: one line, exit 2.
    c = _fold_file(tmp_path / "..", 2, [0, 1], sha="other")
    mixed = CliRunner().invoke(main, ["cv-report", str(a), str(c), "--voi-dir", str(synthetic_voi_dir)])
    assert mixed.exit_code != 0 and "different configurations" in mixed.stderr and "Traceback" not in mixed.output
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    bad = CliRunner().invoke(main, ["cv-report", str(junk), "--voi-dir", str(synthetic_voi_dir)])
    assert bad.exit_code != 0 and "not a fold result" in bad.stderr


def test_cv_compare_pairs_runs_on_the_same_nodules(tmp_path: Path, synthetic_voi_dir: Path) -> None:
    from click.testing import CliRunner

    from nodule_edge.cli import main
    from nodule_edge.train.data import read_unsure_manifest, targets
    from nodule_edge.train.evaluation import compare_runs

    _, _, labels, _ = targets(read_unsure_manifest(synthetic_voi_dir))
    split = {0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 8, 9, 10, 11]}
    rng = np.random.default_rng(0)

    def run(
        name: str, probability: Callable[[int], float], folds: tuple[int, ...] = (0, 1), rows: dict | None = None
    ) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for k in folds:
            path = _fold_file(folder, k, (rows or split)[k], sha=name)
            result = json.loads(path.read_text())
            result["predictions"]["probability"] = [float(probability(i)) for i in (rows or split)[k]]
            path.write_text(json.dumps(result))
        return folder

    noisy = rng.random(12)
    reference = run("reference", lambda i: noisy[i])
    perfect = run("perfect", lambda i: float(labels[i] > 0))
    half = run("half", lambda i: float(labels[i] > 0), folds=(1,))
    rows = compare_runs([reference, perfect, half], synthetic_voi_dir, draws=200)
    assert "versus_reference" not in rows[0]
    versus = rows[1]["versus_reference"]
    assert rows[1]["pooled_auc"] == 1.0 and versus["auc"] == 1.0
    assert versus["delta_auc"] == 1.0 - rows[0]["pooled_auc"] > 0
    low, high = versus["delta_auc_ci95"]
    assert low <= versus["delta_auc"] <= high
    # Certain, right probabilities have Brier score 0: the paired difference is the reference's score, negated.
    assert rows[1]["pooled_brier"] == 0.0 and abs(versus["delta_brier"] + rows[0]["pooled_brier"]) < 1e-12
    b_low, b_high = versus["delta_brier_ci95"]
    assert b_low <= versus["delta_brier"] <= b_high < 0
    # A run with fewer folds is compared on the folds both runs have.
    assert rows[2]["folds"] == [1] and rows[2]["versus_reference"]["folds"] == [1]
    assert rows[2]["versus_reference"]["n_labelled"] == int((labels[split[1]] >= 0).sum())

    printed = CliRunner().invoke(
        main,
        ["cv-compare", str(reference), str(perfect), str(half), "--voi-dir", str(synthetic_voi_dir), "--draws", "100"],
    )
    assert printed.exit_code == 0, printed.output
    table = printed.stdout.splitlines()
    assert table[4].startswith(f"| {reference} | 0, 1 |") and "| reference |" in table[4]
    assert f"| {half} | 1 |" in table[6] and "(folds 1)" in table[6]
    assert f"| 0.000 ({versus['delta_brier']:+.3f} [" in table[5]

    # Another split cannot be paired; a folder without fold files is no run: one line, exit 3 (bad data).
    other = run("other", lambda i: 0.5, rows={0: [0, 1, 2, 3, 4, 6], 1: [5, 7, 8, 9, 10, 11]})
    mixed = CliRunner().invoke(main, ["cv-compare", str(reference), str(other), "--voi-dir", str(synthetic_voi_dir)])
    assert mixed.exit_code == 3 and "another split" in mixed.stderr and "Traceback" not in mixed.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none = CliRunner().invoke(main, ["cv-compare", str(empty), "--voi-dir", str(synthetic_voi_dir)])
    assert none.exit_code == 3 and "holds no foldK.json files" in none.stderr


def test_the_head_refit_line_names_the_attribute_weight() -> None:
    summary = _summary()
    summary["config"]["head"] = {"refit": "debugged", "attribute_weight": 16.0}
    card = render_model_card(summary, "c")
    assert "BCE + adaptive debug loss + attribute MSE × 16, i.e. in rating points," in card
    assert "attribute_readout" not in card
    summary["config"]["head"] = {"refit": "debugged", "attribute_readout": True}
    assert "the attribute output layer alone is refitted to the L1 error" in render_model_card(summary, "c")
    summary["config"]["head"] = {"refit": "debugged", "attribute_readout": True, "attribute_skip": True}
    assert "and a linear skip from the pooled features and statistics" in render_model_card(summary, "c")
    assert "path-parity penalty" not in render_model_card(summary, "c")
    assert "outline term" not in render_model_card(summary, "c")
    summary["config"]["head"] = {"refit": "debugged", "outline_statistics": True, "debug_sign_temperature": 1.0}
    summary["config"]["train"]["nodule_box"] = True
    summary["config"].setdefault("loss", {})["adaptive"] = True
    card = render_model_card(summary, "c")
    assert "an outline term (`[head] outline_statistics = true`" in card
    # The final model's head-step record says which L2 the term had; one written before the record
    # had the key was fitted at 1e-3.
    assert "compactness; L2 0.001 on their standardised weights" in card
    summary.setdefault("final", {})["classifier_refit"] = {"outline_l2": 0.004}
    assert "compactness; L2 0.004 on their standardised weights" in render_model_card(summary, "c")
    assert "outline_offset" not in card
    summary["config"]["train"]["outline_offset"] = True
    assert "The network was trained beside the term (`[train] outline_offset`" in render_model_card(summary, "c")
    assert "BCE + adaptive debug loss, the class read as tanh(logit / 1)" in card
    summary["config"]["head"]["debug_adaptive"] = False
    assert "BCE + debug loss, every labelled nodule weighted alike, the class read as" in render_model_card(
        summary, "c"
    )
    summary["config"]["head"] = {"refit": "debugged", "parity_weight": 1.0}
    assert "+ 1 × the mean |p(runtime path) − p(readers' box)| over the training fold" in render_model_card(
        summary, "c"
    )
    # A summary written before the key existed had the weight 1.
    summary["config"]["head"] = {"refit": "debugged"}
    assert "BCE + adaptive debug loss + attribute MSE," in render_model_card(summary, "c")


def test_the_card_counts_the_parameters_that_ship() -> None:
    summary = _summary()
    assert "1,350,125 parameters." in render_model_card(summary, "c")
    # The head step added the attribute skip to the final model: the card says what ships.
    summary["final"] = {**summary.get("final", {}), "parameters": 1350929}
    assert "1,350,929 parameters (1,350,125 trained, 804 added by the head step)." in render_model_card(summary, "c")


def test_the_card_names_the_first_pass_the_config_ran() -> None:
    own = render_model_card(_summary(), "c")
    assert "the runtime runs the model twice" in own and "box net" not in own
    summary = _summary()
    summary["config"]["first_pass"] = {"network": "box_net", "widths": [8, 16, 32, 32], "epochs": 20}
    boxed = render_model_card(summary, "c")
    assert "first pass is a box net" in boxed and "widths [8, 16, 32, 32]" in boxed and "20 epochs" in boxed
    assert "the runtime runs the model twice" not in boxed
    # Whole training samples are what the network's own first pass sees; under a box net they are not.
    assert "as the runtime's first pass sees them" in own
    assert "as the runtime's first pass sees them" not in boxed and "the box net, not the network" in boxed
    assert "(two passes of the network)" in own and "(the box net, then one pass of the network)" in boxed


def test_the_card_says_when_the_classifier_is_platt_scaled() -> None:
    summary = _summary()
    assert "Platt scaling" not in render_model_card(summary, "c")
    summary["config"]["head"] = {**summary["config"].get("head", {}), "refit": "debugged", "calibrate": True}
    assert "rescaled by Platt scaling fitted on the inner CV's out-of-fold logits" in render_model_card(summary, "c")


def test_known_limits_say_where_the_ruler_wins_a_subgroup() -> None:
    summary = _summary()
    assert "non-calcified" not in render_model_card(summary, "c")  # no subgroup figures: no claim
    summary["pooled"]["by_calcification"] = {
        "calcified": {"n": 84, "n_malignant": 2, "auc": 0.99, "diameter_auc": 1.0},
        "non_calcified": {"n": 497, "n_malignant": 263, "auc": 0.885, "diameter_auc": 0.910},
    }
    card = render_model_card(summary, "c")
    known_limits = card[card.index("## Known limits") :]
    assert "the readers' diameter ranks malignancy better than the model: AUC 0.910 against 0.885" in known_limits
    assert (
        "Among the 497 non-calcified nodules" in known_limits
        and "with the 84 calcified nodules (2 malignant), which diameter alone ranks by size" in known_limits
    )
    summary["pooled"]["malignancy"]["auc"] = 0.87  # below the pooled diameter (0.88): no lead to explain
    assert "calcified nodules (2 malignant)" not in render_model_card(summary, "c")
    summary["pooled"]["by_calcification"]["non_calcified"]["auc"] = 0.93
    card = render_model_card(summary, "c")
    assert "the model ranks malignancy at least as well as the readers' diameter: AUC 0.930 against 0.910" in card


def test_cv_report_lists_the_calcification_split() -> None:
    from nodule_edge.train.model_card import render_cv_report

    pooled = {
        "n_folds": 2,
        "malignancy": {"auc": 0.9, "n": 40},
        "by_calcification": {
            "calcified": {"n": 8, "n_malignant": 0},
            "non_calcified": {"n": 32, "n_malignant": 12, "auc": 0.81, "diameter_auc": 0.84},
        },
    }
    report = render_cv_report({"0": _fold(0.9), "1": _fold(0.9)}, pooled, "T")
    assert "- calcified (readers' majority rating): 8 labelled, 0 malignant; AUC n/a, diameter alone n/a." in report
    assert (
        "- non-calcified (readers' majority rating): 32 labelled, 12 malignant; AUC 0.810, diameter alone 0.840."
        in report
    )


def test_the_card_says_what_precision_the_networks_trained_in() -> None:
    summary = _summary()
    # Summaries from before the precision was recorded claim neither.
    assert 'bf16 autocast where the CPU runs bf16 natively, else fp32 (`bf16 = "auto"`)' in render_model_card(
        summary, "c"
    )
    for result in summary["folds"].values():
        result["training_precision"] = "fp32"
    summary["final"]["training_precision"] = "fp32"
    card = render_model_card(summary, "c")
    assert "cosine decay, fp32 (every fold and the final model);" in card and "bf16 autocast" not in card
    summary["folds"]["2"]["training_precision"] = "bf16"
    summary["final"]["training_precision"] = "bf16 and fp32"
    mixed = render_model_card(summary, "c")
    assert "fold 1: fp32; fold 2: bf16 autocast; fold 3: fp32" in mixed
    assert "the final model: partly bf16 autocast, partly fp32" in mixed


def test_the_card_names_the_l2_grid_and_the_final_models_choice() -> None:
    summary = _summary()
    summary["config"]["head"] = {"refit": "debugged"}
    # Before the key existed the grid was 0.01, 0.03, 0.1, and the config omits it at that value.
    assert "among the strengths (0.01, 0.03, 0.1) that keep Grad-CAM" in render_model_card(summary, "c")
    summary["config"]["head"]["l2_grid"] = [0.001, 0.003, 0.01, 0.03, 0.1]
    summary["final"]["classifier_refit"] = {"l2": 0.003}
    card = render_model_card(summary, "c")
    assert "among the strengths (0.001, 0.003, 0.01, 0.03, 0.1; the final model's: 0.003) that keep" in card


def test_the_cards_bundle_command_names_the_explain_summary_it_was_given(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps(_summary()))
    written = write_model_card(
        summary_path, tmp_path / "card.md", explain_summary="docs/explain/fold0_agreement.json"
    ).read_text()
    assert "--summary runs/shipped/summary.json --explain-summary docs/explain/fold0_agreement.json`" in written
    assert "--explain-summary" not in write_model_card(summary_path, tmp_path / "plain.md").read_text()

"""explain-compare on synthetic data: every runtime and Captum method scored, randomisation, threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("captum")

from nodule_edge.errors import ConfigError, DataError
from nodule_edge.train.config import load_config
from nodule_edge.train.explain_compare import compare_explanations, render_table, write_result


@pytest.fixture
def seeded_checkpoint(tmp_path):
    from nodule_edge.patch import DEFAULT_PATCH_SPEC
    from nodule_edge.train.model import CollaborativeNet
    from nodule_edge.train.trainer import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "seeded.safetensors"
    save_checkpoint(path, CollaborativeNet(), {"epoch": 0, "patch_spec": DEFAULT_PATCH_SPEC.to_json()})
    return path


def test_compare_scores_each_method_and_sets_the_threshold(tiny_config, seeded_checkpoint, tmp_path):
    # The seeded checkpoint has no box net beside it: the network's own segmentation draws the box.
    cfg = load_config(tiny_config(first_pass='network = "model"'))
    methods = ("gradcam", "occlusion", "saliency")
    result = compare_explanations(
        cfg,
        0,
        seeded_checkpoint,
        limit=2,
        methods=methods,
        curve_steps=2,
        randomisation_nodules=1,
        options={"occlusion": {"block": 32}},
    )
    assert result["n_nodules"] == 2 and [r["row"] for r in result["nodules"]] == sorted(
        r["row"] for r in result["nodules"]
    )
    for row in result["nodules"]:
        assert list(row["methods"]) == list(methods)
        for metrics in row["methods"].values():
            assert metrics["seconds"] >= 0
            for key in ("pointing_game", "mass_inside", "deletion_auc", "insertion_auc"):
                assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
        assert -1.0 <= row["agreement_spearman"] <= 1.0
    agreements = [r["agreement_spearman"] for r in result["nodules"]]
    assert result["agreement"]["threshold"] == pytest.approx(np.percentile(agreements, 5), abs=1e-4)
    assert [e["randomised_up_to"] for e in result["randomisation"]] == ["heads", "fusion and segmentation", "encoder"]
    # Re-initialising the whole network changes the model's own Grad-CAM (the sanity check can fail).
    assert result["randomisation"][-1]["spearman"]["gradcam"] < 0.99
    assert result["summary"]["occlusion"]["seconds"]["n"] == 2
    table = render_table(result)
    assert table.count("\n| ") == 1 + len(methods) and "agreement threshold" in table
    path = write_result(result, tmp_path / "sub" / "fold0.json")
    assert json.loads(path.read_text())["fold"] == 0


def test_unknown_method_and_bad_limits(tiny_config, seeded_checkpoint):
    cfg = load_config(tiny_config())
    with pytest.raises(ConfigError, match="unknown explanation method"):
        compare_explanations(cfg, 0, seeded_checkpoint, methods=("gradcam", "magic"))
    with pytest.raises(ConfigError, match="limit"):
        compare_explanations(cfg, 0, seeded_checkpoint, limit=0)


def test_export_reads_the_threshold_or_names_the_bad_file(tmp_path):
    from nodule_edge.cli.train import _explanation_threshold

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"fold": 0, "agreement": {"threshold": 0.12, "percentile": 5.0, "n": 20}}))
    section = _explanation_threshold(str(good))
    assert section["agreement_threshold"] == 0.12 and "20 held-out nodules of CV fold 0" in section["source"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="bad.json"):
        _explanation_threshold(str(bad))

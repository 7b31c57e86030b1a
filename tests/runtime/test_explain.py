"""`infer --explain`: runtime methods, their outputs and metrics, and the agreement trust check."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from nodule_edge.cli import main
from nodule_edge.errors import OptionError
from nodule_edge.runtime.explain import RUNTIME_METHODS, TORCH_METHODS, parse_methods


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus", "unknown explanation method 'bogus'"),
        ("gradcam,,occlusion", "comma-separated"),
        ("gradcam,gradcam", "twice"),
        ("integrated_gradients", "explain-compare"),
        ("lrp", "nodule-edge[explain]"),
    ],
)
def test_parse_methods_names_the_problem(text, fragment):
    with pytest.raises(OptionError) as info:
        parse_methods(text)
    assert fragment in str(info.value) and info.value.exit_code == 2


def test_parse_methods_keeps_the_order():
    assert parse_methods(" Occlusion,gradcam ") == ("occlusion", "gradcam")
    assert set(RUNTIME_METHODS).isdisjoint(TORCH_METHODS)


@pytest.fixture(scope="module")
def inferer(tiny_bundle):
    from nodule_edge.runtime import NoduleInferer

    return NoduleInferer(tiny_bundle, backend="cpu", threads=1, top_k=0)


@pytest.fixture(scope="module")
def diagnosed(inferer, demo_study):
    folder, voxel = demo_study
    return inferer.infer(folder, voxels=[voxel])


def test_explain_adds_maps_metrics_and_agreement(inferer, diagnosed):
    result = dataclasses.replace(
        diagnosed, nodules=[dataclasses.replace(n, quality_flags=list(n.quality_flags)) for n in diagnosed.nodules]
    )
    inferer.explain(result, "gradcam,occlusion", occlusion_options={"block": 32}, faithfulness=True)
    explained = result.nodules[0].explanations
    assert list(explained.maps) == ["gradcam", "occlusion"]
    for exp in explained.maps.values():
        assert exp.map.shape == (64, 64, 64) and np.isfinite(exp.map).all()
        assert 0.0 <= exp.display.min() and exp.display.max() <= 1.0
        assert set(exp.metrics) >= {"pointing_game", "mass_inside", "deletion_auc", "insertion_auc"}
    assert explained.maps["occlusion"].options["block"] == 32 and explained.maps["occlusion"].seconds > 0
    # Grad-CAM is the runtime's own map, untouched.
    np.testing.assert_array_equal(explained.maps["gradcam"].map, result.nodules[0].prediction.saliency)
    assert -1.0 <= explained.agreement.spearman <= 1.0
    assert explained.agreement.threshold is None and explained.agreement.agrees is None  # the tiny bundle has none
    assert "explain" in result.timing_ms


def test_disagreement_beyond_the_bundles_threshold_makes_the_nodule_untrustworthy(inferer, diagnosed):
    manifest = {**inferer.bundle.manifest, "explanations": {"agreement_threshold": 1.01, "source": "a test"}}
    strict = (
        dataclasses.replace(inferer, bundle=dataclasses.replace(inferer.bundle, manifest=manifest))
        if dataclasses.is_dataclass(inferer)
        else None
    )
    if strict is None:  # NoduleInferer is a plain class: swap the bundle on a shallow copy
        import copy

        strict = copy.copy(inferer)
        strict.bundle = dataclasses.replace(inferer.bundle, manifest=manifest)
    result = dataclasses.replace(
        diagnosed, nodules=[dataclasses.replace(n, quality_flags=list(n.quality_flags)) for n in diagnosed.nodules]
    )
    before = result.nodules[0].malignancy_probability
    strict.explain(result, ("gradcam", "occlusion"), occlusion_options={"block": 32})
    nodule = result.nodules[0]
    assert nodule.explanations.agreement.agrees is False
    assert not nodule.trustworthy and any("disagree" in r and "a test" in r for r in nodule.trust_reasons)
    assert "explanations_disagree" in [f.code for f in nodule.quality_flags]
    assert nodule.malignancy_probability == before  # flags and checks never change the prediction


def test_bad_occlusion_options_are_option_errors(inferer, diagnosed):
    with pytest.raises(OptionError, match="block"):
        inferer.explain(diagnosed, "occlusion", occlusion_options={"block": 100})
    with pytest.raises(OptionError, match="unknown occlusion option"):
        inferer.explain(diagnosed, "occlusion", occlusion_options={"blok": 8})


def test_cli_infer_explain_writes_a_map_per_method(use_explain_bundle, demo_study, tmp_path):
    folder, (x, y, z) = demo_study
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "infer",
            str(folder),
            "--xyz",
            f"{x},{y},{z}",
            "--out",
            str(out),
            "--explain",
            "gradcam,occlusion",
            "--occlusion-block",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "explanations: gradcam (" in result.stdout and "Grad-CAM vs occlusion: Spearman" in result.stdout
    report = json.loads((out / "report.json").read_text())
    methods = report["nodules"][0]["explanations"]["methods"]
    assert [methods[m]["file"] for m in ("gradcam", "occlusion")] == [
        "nodule0_saliency.nii.gz",
        "nodule0_occlusion.nii.gz",
    ]
    assert (out / "nodule0_occlusion.nii.gz").is_file()
    from PIL import Image

    with Image.open(out / "nodule0_overlay.png") as overlay:
        single = CliRunner().invoke(
            main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(tmp_path / "plain")]
        )
        assert single.exit_code == 0
        with Image.open(tmp_path / "plain" / "nodule0_overlay.png") as plain:
            assert overlay.height == 2 * plain.height  # one panel per method


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--explain", "bogus"], "unknown explanation method"),
        (["--explain", "smoothgrad"], "explain-compare"),
        (["--explain", "occlusion", "--occlusion-block", "100"], "block"),
        (["--explain", "occlusion", "--occlusion-stride", "0"], "stride"),
        (["--occlusion-block", "8"], "need --explain"),
    ],
)
def test_cli_bad_explain_options_write_nothing(use_explain_bundle, demo_study, tmp_path, args, fragment):
    folder, (x, y, z) = demo_study
    result = CliRunner().invoke(
        main, ["infer", str(folder), "--xyz", f"{x},{y},{z}", "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.fixture
def use_explain_bundle(tiny_bundle, monkeypatch):
    monkeypatch.setenv("NODULE_EDGE_BUNDLE", str(tiny_bundle))
    monkeypatch.setenv("NODULE_EDGE_THREADS", "1")
    return tiny_bundle

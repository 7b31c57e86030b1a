"""A bundle whose model has an outline term: the runtime adds it after the second pass, from the
first pass's outline, and explanations perturb the second pass with the term held fixed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nodule_edge.errors import BundleError
from nodule_edge.outline import OUTLINE_FEATURE_NAMES, outline_statistics
from nodule_edge.patch import bound_to_nodule
from nodule_edge.runtime.engines.base import metadata_from_props
from nodule_edge.runtime.outputs import build_report


@pytest.fixture(scope="module")
def inferer(tiny_bundle_with_outline_term):
    from nodule_edge.runtime import NoduleInferer

    return NoduleInferer(tiny_bundle_with_outline_term, backend="cpu", threads=1, top_k=3)


def test_the_term_is_read_from_the_artifact_and_added_to_the_second_pass(inferer, demo_study) -> None:
    head = inferer.outline_head
    assert head is not None and head.weights[1] == 1.5 and head.bias == -6.0
    folder, voxel = demo_study
    result = inferer.infer(folder, voxels=[voxel])
    pred, patch = result.nodules[0].prediction, result.nodules[0].patch
    assert pred.outline_statistics is not None and pred.outline_statistics.shape == (len(OUTLINE_FEATURE_NAMES),)
    first = inferer.engine.segment(patch[None])
    np.testing.assert_allclose(pred.outline_statistics, outline_statistics(first[0], patch, inferer.spec))
    bounded, _ = bound_to_nodule(patch, first[0], inferer.spec)
    network = inferer.engine.run(bounded[None])
    z = float(network["malignancy_logit"][0]) + float(head.logit(pred.outline_statistics[None])[0])
    assert pred.malignancy_probability == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-5)
    assert pred.malignancy_probability != pytest.approx(float(network["malignancy_probability"][0]), abs=1e-4)
    # The report says what the term added and whether it changed the class.
    term = float(head.logit(pred.outline_statistics[None])[0])
    assert pred.outline_logit == pytest.approx(term)
    assert pred.outline_changes_class == ((z > 0) != (float(network["malignancy_logit"][0]) > 0))
    report = build_report(result)["nodules"][0]["outline_term"]
    assert list(report["statistics"]) == list(OUTLINE_FEATURE_NAMES)
    assert report["statistics"]["log_volume_mm3"] == pytest.approx(float(pred.outline_statistics[1]), abs=1e-4)
    assert report["logit"] == pytest.approx(term, abs=1e-4) and report["changes_class"] == pred.outline_changes_class


def test_explanations_see_the_final_probability(inferer, demo_study) -> None:
    folder, voxel = demo_study
    result = inferer.infer(folder, voxels=[voxel])
    inferer.explain(result, "gradcam,occlusion", occlusion_options={"block": 32}, faithfulness=True)
    nodule = result.nodules[0]
    run = inferer.model_run(nodule.prediction)
    first = inferer.engine.segment(nodule.patch[None])
    bounded, _ = bound_to_nodule(nodule.patch, first[0], inferer.spec)
    assert float(run(bounded[None])["malignancy_probability"][0]) == pytest.approx(
        nodule.prediction.malignancy_probability, abs=1e-5
    )
    assert np.isfinite(nodule.explanations.maps["occlusion"].map).all()
    assert inferer.model_run(None) == inferer.engine.run  # no nodule: the engine as it is


def test_a_malformed_outline_term_is_a_bundle_error(inferer) -> None:
    props = dict(inferer.engine.metadata.raw)
    props["outline_head"] = '{"names": ["log_volume_mm3"], "weights": [1.0], "bias": 0.0}'
    with pytest.raises(BundleError, match="malformed"):
        metadata_from_props(props)
    props["outline_head"] = inferer.engine.metadata.raw["outline_head"]
    props["patch_spec"] = dataclasses.replace(inferer.spec, nodule_box=None).to_json()
    with pytest.raises(BundleError, match="no nodule box"):
        metadata_from_props(props)
    del props["outline_head"]
    assert metadata_from_props(props).outline_head is None

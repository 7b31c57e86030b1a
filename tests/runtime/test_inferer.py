"""NoduleInferer on a real (synthetic) DICOM study: coordinates, batching, arrays, retrieval, types."""

from __future__ import annotations

import numpy as np
import pytest

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import CoordinateError, NoduleEdgeError, StudyError
from nodule_edge.index import Neighbour
from nodule_edge.runtime import NoduleInferer, NodulePrediction, NoduleResult, Study, StudyResult
from nodule_edge.runtime.demo import demo_volume
from nodule_edge.runtime.outputs import build_report

# Geometry write_demo_study uses (identity orientation, first slice at the origin).
DEMO_SPACING = (0.7, 0.7, 1.25)


@pytest.fixture(scope="module")
def inferer(tiny_bundle) -> NoduleInferer:
    return NoduleInferer(tiny_bundle, backend="cpu", top_k=20)


@pytest.fixture(scope="module")
def voxel_result(inferer, demo_study) -> StudyResult:
    folder, voxel = demo_study
    return inferer.infer(folder, voxels=[voxel])


def _assert_same_prediction(a: NodulePrediction, b: NodulePrediction, atol: float = 1e-5) -> None:
    assert a.malignancy_probability == pytest.approx(b.malignancy_probability, abs=atol)
    for name in ATTRIBUTE_NAMES:
        assert a.attributes[name] == pytest.approx(b.attributes[name], abs=atol)
    assert a.nodule_attention == pytest.approx(b.nodule_attention, abs=atol)
    assert a.background_attention == pytest.approx(b.background_attention, abs=atol)
    np.testing.assert_allclose(a.segmentation, b.segmentation, atol=atol, rtol=0)
    np.testing.assert_allclose(a.saliency, b.saliency, atol=atol, rtol=0)
    np.testing.assert_allclose(a.embedding, b.embedding, atol=atol, rtol=0)
    assert [n.id for n in a.similar] == [n.id for n in b.similar]


def test_voxel_and_world_points_give_the_same_outputs(inferer, demo_study, voxel_result):
    folder, voxel = demo_study
    expected_world = np.array(voxel, float) * np.array(DEMO_SPACING)  # identity direction, origin 0
    by_voxel = voxel_result.nodules[0]
    np.testing.assert_allclose(by_voxel.world_lps_mm, expected_world, atol=1e-6)

    by_world = inferer.infer(folder, worlds=[tuple(expected_world)]).nodules[0]
    np.testing.assert_allclose(by_world.xyz_voxel, voxel, atol=1e-6)
    np.testing.assert_allclose(by_world.world_lps_mm, by_voxel.world_lps_mm, atol=1e-9)
    np.testing.assert_array_equal(by_world.patch, by_voxel.patch)
    _assert_same_prediction(by_world.prediction, by_voxel.prediction, atol=1e-6)
    assert by_world.center_slice == by_voxel.center_slice


def test_several_points_run_as_one_engine_batch(inferer, demo_study, voxel_result, monkeypatch):
    folder, voxel = demo_study
    calls: list[tuple[int, ...]] = []
    real_run = inferer.engine.run

    def counting_run(patches):
        calls.append(tuple(patches.shape))
        return real_run(patches)

    monkeypatch.setattr(inferer.engine, "run", counting_run)
    other = (100, 80, 20)
    world_of_voxel = tuple(np.array(voxel, float) * np.array(DEMO_SPACING))
    result = inferer.infer(folder, voxels=[voxel, other], worlds=[world_of_voxel])

    # One batch per pass: the whole cubes, then (nodule-bounded model) the bounded cubes.
    passes = 2 if inferer.spec.nodule_box is not None else 1
    assert len(calls) == passes, f"engine called {len(calls)} times for one infer() call"
    assert all(c[0] == 3 for c in calls)
    assert [n.xyz_voxel for n in result.nodules][:2] == [tuple(map(float, voxel)), tuple(map(float, other))]
    # Order is voxels first, then worlds; the batched result equals the single-point one.
    _assert_same_prediction(result.nodules[0].prediction, voxel_result.nodules[0].prediction, atol=1e-4)
    _assert_same_prediction(result.nodules[2].prediction, voxel_result.nodules[0].prediction, atol=1e-4)
    assert result.nodules[1].malignancy_probability != pytest.approx(result.nodules[0].malignancy_probability, abs=1e-6)


def test_study_result_and_report_fields(inferer, voxel_result, demo_study):
    folder, voxel = demo_study
    r = voxel_result
    assert r.backend == "cpu" == inferer.backend
    assert r.model_version == inferer.model_version == inferer.bundle.model_version
    assert set(r.timing_ms) == {"open_study", "coordinates", "read_and_patch", "engine", "retrieval_and_measure"}
    assert all(v >= 0 for v in r.timing_ms.values())
    assert r.study.kind == "dicom" and r.study.size == (192, 192, 48)

    n = r.nodules[0]
    assert n.xyz_voxel == tuple(float(v) for v in voxel)
    assert n.center_slice is not None
    assert n.center_slice["instance_number"] == voxel[2] + 1  # the demo numbers slices from 1
    assert n.center_slice["sop_instance_uid"].startswith("1.2.")
    assert n.volume_mm3 >= 0 and n.longest_axial_diameter_mm >= 0

    report = build_report(r, inferer.index_kind)
    assert report["model"] == {
        "version": r.model_version,
        "backend": "cpu",
        "executor": "CPUExecutionProvider",
        "index_kind": "attributes",
    }
    assert report["study"]["slice_count"] == 48
    node = report["nodules"][0]
    assert node["malignancy_probability"] == pytest.approx(n.malignancy_probability, abs=1e-6)
    assert list(node["attributes"]) == list(ATTRIBUTE_NAMES)
    assert node["saliency"]["trustworthy"] == n.trustworthy
    assert node["saliency"]["sign_uncertain"] == (abs(n.malignancy_probability - 0.5) < 0.05)
    assert [s["id"] for s in node["similar"]] == [s.id for s in n.prediction.similar]


def test_results_are_typed(voxel_result, inferer):
    r = voxel_result
    assert isinstance(r, StudyResult) and isinstance(r.study, Study)
    n = r.nodules[0]
    assert isinstance(n, NoduleResult) and isinstance(n.prediction, NodulePrediction)
    p = n.prediction
    assert type(p.malignancy_probability) is float and 0.0 <= p.malignancy_probability <= 1.0
    assert list(p.attributes) == list(ATTRIBUTE_NAMES)
    assert all(type(v) is float and 1.0 <= v <= 5.0 for v in p.attributes.values())
    assert type(p.nodule_attention) is float and type(p.background_attention) is float
    assert type(p.trustworthy) is bool
    assert p.trustworthy == (p.nodule_attention - p.background_attention > inferer.trust_margin)
    size = inferer.spec.size
    assert p.segmentation.shape == p.saliency.shape == (size, size, size)
    assert p.segmentation.dtype == p.saliency.dtype == np.float32
    assert p.embedding.ndim == 1 and p.embedding.dtype == np.float32
    assert n.patch.shape == (inferer.spec.channels, size, size, size)
    assert all(isinstance(s, Neighbour) for s in p.similar)
    assert len(p.similar) == len(inferer.index) == 6  # top_k=20 > 6 entries
    assert p.retrieval_score is not None and 0.0 <= p.retrieval_score <= 1.0
    # Convenience properties read through to the prediction.
    assert n.malignancy_probability == p.malignancy_probability
    assert n.attributes is p.attributes and n.trustworthy is p.trustworthy
    assert all(type(v) is float for v in n.xyz_voxel + n.world_lps_mm)


def test_infer_array_equals_the_dicom_result(inferer, voxel_result, demo_study):
    _, voxel = demo_study
    hu = demo_volume()  # what write_demo_study stores (slope 1, intercept 0)
    result = inferer.infer_array(hu, spacing_mm=DEMO_SPACING, voxels=[voxel])
    a, b = result.nodules[0], voxel_result.nodules[0]
    np.testing.assert_allclose(a.world_lps_mm, b.world_lps_mm, atol=1e-9)
    np.testing.assert_allclose(a.patch, b.patch, atol=1e-4, rtol=0)
    _assert_same_prediction(a.prediction, b.prediction, atol=1e-4)
    assert a.center_slice is None  # no DICOM instance behind an array
    assert result.study.kind == "volume"


def test_infer_array_rejects_a_2d_array(inferer):
    with pytest.raises(CoordinateError, match=r"\(192, 192\)"):
        inferer.infer_array(np.zeros((192, 192), np.int16), spacing_mm=(1, 1, 1), voxels=[(1, 1, 1)])


def test_non_finite_voxels_near_the_nodule_are_refused(inferer, monkeypatch):
    hu = np.full((40, 40, 40), -800.0, np.float32)
    hu[20, 18:22, 18:22] = np.nan
    monkeypatch.setattr(inferer.engine, "run", lambda patches: pytest.fail("NaN patch reached the engine"))
    with pytest.raises(StudyError, match="not finite"):
        inferer.infer_array(hu, spacing_mm=(1, 1, 1), voxels=[(20, 20, 20)])


def test_exclude_ids_removes_the_id_from_similar(inferer, demo_study, voxel_result):
    folder, voxel = demo_study
    before = [s.id for s in voxel_result.nodules[0].prediction.similar]
    assert len(before) == 6
    dropped = {before[0], before[3]}
    after = inferer.infer(folder, voxels=[voxel], exclude_ids=dropped).nodules[0].prediction
    ids = [s.id for s in after.similar]
    assert not dropped & set(ids)
    assert ids == [i for i in before if i not in dropped]
    labels = [s.label for s in after.similar if s.label is not None]
    assert after.retrieval_score == pytest.approx(sum(labels) / len(labels))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"voxels": [(500, 10, 10)]}, "500"),
        ({"voxels": [(10, 10, 48)]}, "48"),  # one past the last slice
        ({"voxels": [(-3, 10, 10)]}, "-3"),
        ({"voxels": [(float("nan"), 10, 10)]}, "nan"),
        ({"voxels": [(1, 2)]}, "(1, 2)"),
        ({"voxels": [("a", 1, 2)]}, "('a', 1, 2)"),
        ({"voxels": [None]}, "None"),
        ({"worlds": [((1, 2, 3), (4, 5, 6))]}, "((1, 2, 3), (4, 5, 6))"),
        ({"worlds": [(43.4, 63.0, 9000.0)]}, "9000"),
        ({"worlds": [(43.4, -250.0, 30.0)]}, "-250"),
        ({}, "--xyz"),
    ],
)
def test_bad_coordinates_raise_coordinate_error_naming_the_value(inferer, demo_study, kwargs, named, monkeypatch):
    folder, _ = demo_study

    def no_engine(patches):  # pragma: no cover - reaching the engine is the failure
        raise AssertionError("a bad coordinate reached the engine")

    monkeypatch.setattr(inferer.engine, "run", no_engine)
    with pytest.raises(CoordinateError) as info:
        inferer.infer(folder, **kwargs)
    assert named in str(info.value)
    assert isinstance(info.value, NoduleEdgeError) and info.value.exit_code == 2


def test_a_bad_point_among_good_ones_fails_the_whole_call(inferer, demo_study, monkeypatch):
    folder, voxel = demo_study
    monkeypatch.setattr(inferer.engine, "run", lambda patches: pytest.fail("engine ran"))
    with pytest.raises(CoordinateError, match="700"):
        inferer.infer(folder, voxels=[voxel, (700, 0, 0)])


def test_constructor_rejects_negative_top_k(tiny_bundle):
    with pytest.raises(ValueError, match="-1"):
        NoduleInferer(tiny_bundle, top_k=-1)


def test_top_k_zero_skips_retrieval(tiny_bundle, demo_study):
    inferer = NoduleInferer(tiny_bundle, backend="cpu", top_k=0)
    assert inferer.index is None and inferer.index_kind is None
    folder, voxel = demo_study
    result = inferer.infer(folder, voxels=[voxel])
    assert result.nodules[0].prediction.similar == []
    assert result.nodules[0].prediction.retrieval_score is None

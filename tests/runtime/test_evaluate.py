"""`nodule-edge evaluate` internals: leave-self-out retrieval, Dice only where a mask exists, per-row errors."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from nodule_edge.errors import CoordinateError, DataError, OutputError
from nodule_edge.runtime import NoduleInferer
from nodule_edge.runtime.evaluate import CSV_COLUMNS, evaluate_voi_dir

EXPECTED_COLUMNS = (
    "voi_id, malignancy_probability, subtlety, sphericity, margin, lobulation, spiculation, "
    "malignancy, dice, nodule_attention, background_attention, retrieval_score, quality_flags, outline_logit"
).split(", ")


class SpyInferer:
    """Delegates to a real inferer and keeps every call's arguments and result."""

    def __init__(self, inner: NoduleInferer) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.calls: list[tuple[str, set[str] | None, list[str]]] = []

    def infer(self, source, voxels=(), worlds=(), series_uid=None, exclude_ids=None):
        result = self.inner.infer(source, voxels=voxels, worlds=worlds, series_uid=series_uid, exclude_ids=exclude_ids)
        self.calls.append((str(source), exclude_ids, [s.id for s in result.nodules[0].prediction.similar]))
        return result


@pytest.fixture(scope="module")
def inferer(tiny_bundle) -> NoduleInferer:
    return NoduleInferer(tiny_bundle, backend="cpu", top_k=20)


@pytest.fixture(scope="module")
def evaluated(inferer, synthetic_voi_dir, tmp_path_factory):
    """Evaluate a copy of the synthetic VOI folder in which nodule SYN-0001 has no mask."""
    root = tmp_path_factory.mktemp("eval")
    voi = root / "voi"
    shutil.copytree(synthetic_voi_dir, voi)
    (voi / "mask" / "SYN-0001_R_1.nii.gz").unlink()
    spy = SpyInferer(inferer)
    progress: list[tuple[int, int]] = []
    summary = evaluate_voi_dir(
        spy, voi, root / "predictions.csv", progress=lambda d, t: progress.append((d, t))
    ).summary
    with (root / "predictions.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    return spy, summary, rows, progress


def test_csv_has_exactly_the_documented_columns(evaluated):
    _, _, rows, _ = evaluated
    assert list(CSV_COLUMNS) == EXPECTED_COLUMNS
    assert rows[0] == EXPECTED_COLUMNS
    assert [r[0] for r in rows[1:]] == [f"SYN-{i:04d}_R_1" for i in range(6)]
    assert all(len(r) == len(EXPECTED_COLUMNS) for r in rows)


def test_each_nodule_is_excluded_from_its_own_retrieval(evaluated, inferer):
    spy, _, rows, _ = evaluated
    assert len(spy.calls) == 6
    for (source, excluded, similar), row in zip(spy.calls, rows[1:]):
        voi_id = row[0]
        assert source.endswith(f"{voi_id}.nii.gz")
        assert excluded == {voi_id}
        assert voi_id not in similar
        # Every other nodule is still there (the index holds these six, k = 20).
        assert len(similar) == 5
    # Labels alternate malignant/benign; leaving self out makes the score 2/5 or 3/5, never 3/6.
    scores = {r[0]: float(r[EXPECTED_COLUMNS.index("retrieval_score")]) for r in rows[1:]}
    for i in range(6):
        assert scores[f"SYN-{i:04d}_R_1"] == pytest.approx(0.4 if i % 2 == 0 else 0.6, abs=1e-4)


def test_the_index_would_return_the_nodule_itself_without_exclusion(inferer, synthetic_voi_dir, evaluated):
    """Makes the exclusion check above meaningful: the nodule is in the bundle's index."""
    spy, _, _, _ = evaluated
    source = spy.calls[0][0]
    from nodule_edge.manifest import read_unsure_manifest

    rec = read_unsure_manifest(synthetic_voi_dir)[0]
    similar = [s.id for s in inferer.infer(source, worlds=[rec.center_lps_mm]).nodules[0].prediction.similar]
    assert rec.id in similar


def test_dice_is_empty_without_a_mask(evaluated):
    _, summary, rows, _ = evaluated
    dice = {r[0]: r[EXPECTED_COLUMNS.index("dice")] for r in rows[1:]}
    assert dice["SYN-0001_R_1"] == ""
    for voi_id, value in dice.items():
        if voi_id != "SYN-0001_R_1":
            assert 0.0 <= float(value) <= 1.0
    assert summary["nodules"] == 6
    mean = sum(float(v) for v in dice.values() if v) / 5
    assert summary["mean dice"] == pytest.approx(mean, abs=1e-3)
    assert "auc (LIDC proxy labels)" in summary


def test_progress_is_reported_per_nodule(evaluated):
    *_, progress = evaluated
    assert progress == [(i, 6) for i in range(1, 7)]


def test_limit_and_missing_output_folder(inferer, synthetic_voi_dir, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        evaluate_voi_dir(inferer, synthetic_voi_dir, tmp_path / "missing" / "p.csv")
    assert not (tmp_path / "missing").exists()
    summary = evaluate_voi_dir(inferer, synthetic_voi_dir, tmp_path / "p.csv", limit=1).summary
    assert summary["nodules"] == 1 and summary["failed"] == 0
    assert len((tmp_path / "p.csv").read_text().strip().splitlines()) == 2
    assert (tmp_path / "errors.csv").read_text().splitlines() == ["id,error,reason"]  # written every run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.csv", "p.csv"]  # no temp file left beside them


def test_folder_without_manifest_is_a_data_error(inferer, tmp_path):
    with pytest.raises(DataError, match="manifest.csv"):
        evaluate_voi_dir(inferer, tmp_path, tmp_path / "p.csv")


# ------------------------------------------------------------------------------ per-row errors


@pytest.fixture(scope="module")
def with_failures(inferer, synthetic_voi_dir, break_voi_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_fail")
    voi = break_voi_dir(synthetic_voi_dir, root / "voi", outside="SYN-0002_R_1", bad_mask="SYN-0004_R_1")
    progress: list[tuple[int, int]] = []
    evaluation = evaluate_voi_dir(inferer, voi, root / "predictions.csv", progress=lambda d, t: progress.append((d, t)))
    return root, evaluation, progress


def test_bad_rows_are_recorded_and_the_others_predicted(with_failures):
    root, ev, progress = with_failures
    with (root / "predictions.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    good = ["SYN-0000_R_1", "SYN-0001_R_1", "SYN-0003_R_1", "SYN-0005_R_1"]
    assert [r[0] for r in rows[1:]] == good
    assert [n.record.id for n in ev.nodules] == good
    assert progress == [(i, 6) for i in range(1, 7)]  # failed rows count as done
    with (root / "errors.csv").open(newline="") as fh:
        errors = list(csv.DictReader(fh))
    assert [(e["id"], e["error"]) for e in errors] == [
        ("SYN-0002_R_1", "CoordinateError"),
        ("SYN-0004_R_1", "DataError"),
    ]
    assert "outside the volume" in errors[0]["reason"]
    assert "SYN-0004_R_1.nii.gz" in errors[1]["reason"] and "\n" not in errors[1]["reason"]
    assert ev.errors_csv == root / "errors.csv" and ev.total == 6


def test_summary_is_over_the_good_rows_and_counts_the_failures(with_failures):
    root, ev, _ = with_failures
    assert ev.summary["nodules"] == 6 and ev.summary["failed"] == 2
    dices = [n.dice for n in ev.nodules]
    assert len(dices) == 4 and all(d is not None for d in dices)
    assert ev.summary["mean dice"] == pytest.approx(sum(dices) / 4, abs=1e-3)
    # The good rows are 0 (malignant) and 1, 3, 5 (benign): both classes, so the AUC is there.
    assert {n.record.label for n in ev.nodules} == {0, 1} and "auc (LIDC proxy labels)" in ev.summary


def test_raise_if_failed_names_the_count(with_failures):
    from nodule_edge.errors import RowsFailedError

    _, ev, _ = with_failures
    with pytest.raises(RowsFailedError, match="2 of 6 nodules failed") as info:
        ev.errors.raise_if_failed(ev.total, ev.errors_csv, noun="nodules")
    assert info.value.exit_code == 9


def test_fail_fast_stops_at_the_first_bad_row_and_writes_nothing(inferer, synthetic_voi_dir, break_voi_dir, tmp_path):
    voi = break_voi_dir(synthetic_voi_dir, tmp_path / "voi", outside="SYN-0002_R_1")
    out = tmp_path / "out"
    out.mkdir()
    progress: list[tuple[int, int]] = []
    with pytest.raises(CoordinateError, match="SYN-0002_R_1: .*outside the volume"):
        evaluate_voi_dir(
            inferer, voi, out / "predictions.csv", fail_fast=True, progress=lambda d, t: progress.append((d, t))
        )
    assert progress == [(1, 6), (2, 6)]  # stopped at the third row
    assert list(out.iterdir()) == []


def test_predictions_may_not_be_named_errors_csv(inferer, synthetic_voi_dir, tmp_path):
    with pytest.raises(OutputError, match="errors.csv"):
        evaluate_voi_dir(inferer, synthetic_voi_dir, tmp_path / "errors.csv")
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_an_outline_term_records_it_and_what_the_network_alone_reaches(
    tiny_bundle_with_outline_term, synthetic_voi_dir, tmp_path
):
    inferer = NoduleInferer(tiny_bundle_with_outline_term, backend="cpu", top_k=3)
    evaluation = evaluate_voi_dir(inferer, synthetic_voi_dir, tmp_path / "predictions.csv", limit=4)
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    column = EXPECTED_COLUMNS.index("outline_logit")
    for nodule, row in zip(evaluation.nodules, rows[1:]):
        rec = nodule.record
        p = inferer.infer(rec.image_path, worlds=[rec.center_lps_mm], exclude_ids={rec.id}).nodules[0].prediction
        assert p.outline_logit is not None
        assert nodule.outline_logit == pytest.approx(p.outline_logit) and float(row[column]) == pytest.approx(
            p.outline_logit, abs=1e-5
        )
        # Taking the term back out of the final logit gives the network's own probability.
        network = 1 / (
            1 + np.exp(-(np.log(p.malignancy_probability / (1 - p.malignancy_probability)) - p.outline_logit))
        )
        assert nodule.network_probability == pytest.approx(network, abs=1e-6)
        assert nodule.network_probability != pytest.approx(nodule.malignancy_probability, abs=1e-4)
    assert "auc without the outline term (LIDC proxy labels)" in evaluation.summary


def test_without_an_outline_term_the_column_is_empty_and_the_network_is_the_model(evaluated):
    _, summary, rows, _ = evaluated
    assert all(r[EXPECTED_COLUMNS.index("outline_logit")] == "" for r in rows[1:])
    assert not any("outline" in key for key in summary)

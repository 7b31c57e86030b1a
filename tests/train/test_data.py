"""Training data: manifests, proxy labels, patient-disjoint folds and the patch cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import DataError
from nodule_edge.patch import DEFAULT_PATCH_SPEC
from nodule_edge.train.config import load_config
from nodule_edge.train.data import (
    PatchCache,
    build_patch_cache,
    calcification,
    lidc_proxy_label,
    patient_folds,
    read_sure_manifest,
    read_unsure_manifest,
    targets,
)
from nodule_edge.train.trainer import Dataset, split_fold

from .synthetic import MALIGNANCY_MEANS


def test_read_unsure_manifest_on_synthetic_vois(small_voi_dir: Path) -> None:
    records = read_unsure_manifest(small_voi_dir)
    assert [r.id for r in records] == [f"SYN-{i:03d}" for i in range(6)]
    assert len({r.patient_id for r in records}) == 3
    assert all(r.image_path.is_file() for r in records)
    assert [r.mask_path is not None for r in records] == [True, True, True, True, False, True]
    assert records[5].ratings is None and records[5].label is None
    for i, rec in enumerate(records[:5]):
        assert rec.ratings is not None and len(rec.ratings) == len(ATTRIBUTE_NAMES)
        assert rec.ratings[ATTRIBUTE_NAMES.index("malignancy")] == MALIGNANCY_MEANS[i]
        assert rec.label == lidc_proxy_label(MALIGNANCY_MEANS[i])
        assert rec.diameter_mm is not None and rec.diameter_mm > 0
    # The manifest centre is the sphere centre: the volume is bright there.
    image = sitk.ReadImage(str(records[0].image_path))
    index = image.TransformPhysicalPointToIndex(records[0].center_lps_mm)
    assert image[index] > -200


def test_unsure_manifest_errors(tmp_path: Path, small_voi_dir: Path) -> None:
    with pytest.raises(DataError, match="no manifest.csv"):
        read_unsure_manifest(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(small_voi_dir, broken)
    (broken / "image" / "SYN-002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"manifest.csv:4: volume .*SYN-002.nii.gz does not exist"):
        read_unsure_manifest(broken)
    text = (small_voi_dir / "manifest.csv").read_text().splitlines()
    header = text[0].split(",")
    row = text[1].split(",")
    row[header.index("center_y_mm")] = "north"
    (broken / "manifest.csv").write_text("\n".join([text[0], ",".join(row)]) + "\n")
    with pytest.raises(DataError, match="center_y_mm"):
        read_unsure_manifest(broken)
    (broken / "manifest.csv").write_text(text[0] + "\n")
    with pytest.raises(DataError, match="no rows"):
        read_unsure_manifest(broken)


def test_calcification_comes_from_the_readers_majority_rating(tmp_path: Path, small_voi_dir: Path) -> None:
    assert all(r.calcified is None for r in read_unsure_manifest(small_voi_dir))  # no such column
    folder = tmp_path / "vois"
    shutil.copytree(small_voi_dir, folder)
    text = (small_voi_dir / "manifest.csv").read_text().splitlines()
    votes = ["6", "3", "", "1", "6.0", "6"]
    rows = [f"{line},{vote}" for line, vote in zip(text[1:], votes, strict=True)]
    (folder / "manifest.csv").write_text("\n".join([text[0] + ",calcification_maxvote", *rows]) + "\n")
    records = read_unsure_manifest(folder)
    assert [r.calcified for r in records] == [False, True, None, True, False, False]
    assert np.array_equal(calcification(records), [0, 1, np.nan, 1, 0, 0], equal_nan=True)
    rows[1] = f"{text[2]},7"
    (folder / "manifest.csv").write_text("\n".join([text[0] + ",calcification_maxvote", *rows]) + "\n")
    with pytest.raises(DataError, match=r"manifest.csv:3: calcification_maxvote must be an LIDC rating 1-6, got '7'"):
        read_unsure_manifest(folder)


def test_read_unsure_manifest_on_the_real_vois(lidc_voi_dir: Path) -> None:
    records = read_unsure_manifest(lidc_voi_dir)
    assert len(records) == 679
    assert len({r.patient_id for r in records}) == 385
    assert all(r.ratings is not None for r in records)
    labels = [r.label for r in records]
    assert labels.count(None) == sum(1 for r in records if r.ratings[-1] == 3.0)  # type: ignore[index]  # all rated: asserted above
    assert {0, 1} <= set(labels)
    # LIDC rates calcification on every nodule; most are not calcified (rating 6, absent).
    calcified = [r.calcified for r in records]
    assert None not in calcified and 0 < sum(calcified) < len(records) / 2  # type: ignore[arg-type]  # no None: asserted


@pytest.mark.parametrize(
    ("mean", "label"),
    [(1.0, 0), (2.75, 0), (2.999, 0), (3.0, None), (3.25, 1), (5.0, 1)],
)
def test_lidc_proxy_label(mean: float, label: int | None) -> None:
    assert lidc_proxy_label(mean) == label


def _sure_csv(folder: Path, rows: list[str]) -> Path:
    path = folder / "sure.csv"
    path.write_text("id,patient_id,volume,center_x_mm,center_y_mm,center_z_mm,label\n" + "\n".join(rows) + "\n")
    return path


def test_read_sure_manifest(tmp_path: Path, small_voi_dir: Path) -> None:
    (tmp_path / "vols").mkdir()
    for i in range(2):
        shutil.copy(small_voi_dir / "image" / f"SYN-00{i}.nii.gz", tmp_path / "vols" / f"s{i}.nii.gz")
    path = _sure_csv(tmp_path, ["a,P1,vols/s0.nii.gz,1.5,2,-3,1", "b,P2,vols/s1.nii.gz,0,0,0,0"])
    records = read_sure_manifest(path)
    assert [(r.id, r.patient_id, r.label) for r in records] == [("a", "P1", 1), ("b", "P2", 0)]
    assert records[0].image_path == tmp_path / "vols" / "s0.nii.gz"
    assert records[0].center_lps_mm == (1.5, 2.0, -3.0)
    assert records[0].ratings is None and records[0].mask_path is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a,P1,vols/s0.nii.gz,0,0,0,2", "label must be 0 or 1, got '2'"),
        ("a,P1,vols/s0.nii.gz,0,0,0,", "label must be 0 or 1"),
        ("a,P1,vols/missing.nii.gz,0,0,0,1", r"volume .*missing.nii.gz does not exist"),
        ("a,P1,vols/s0.nii.gz,0,x,0,1", "column 'center_y_mm' is not a number"),
    ],
)
def test_read_sure_manifest_rejects_bad_rows(tmp_path: Path, small_voi_dir: Path, row: str, message: str) -> None:
    (tmp_path / "vols").mkdir()
    shutil.copy(small_voi_dir / "image" / "SYN-000.nii.gz", tmp_path / "vols" / "s0.nii.gz")
    path = _sure_csv(tmp_path, ["ok,P0,vols/s0.nii.gz,0,0,0,0", row])
    with pytest.raises(DataError, match=r"sure.csv:3: " + message):
        read_sure_manifest(path)


def test_read_sure_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_sure_manifest(tmp_path / "absent.csv")


def _patients(seed: int, n_items: int = 200, n_patients: int = 37) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"P{int(i):03d}" for i in rng.integers(0, n_patients, n_items)]


@pytest.mark.parametrize("n_folds", [2, 3, 5])
def test_patient_folds_never_split_a_patient(n_folds: int) -> None:
    patients = _patients(n_folds)
    folds = patient_folds(patients, n_folds, seed=0)
    assert len(folds) == len(patients)
    fold_of: dict[str, int] = {}
    for p, f in zip(patients, folds):
        assert fold_of.setdefault(p, f) == f
        assert 0 <= f < n_folds
    # Patients (not nodules) are spread evenly over the folds.
    counts = np.bincount(list(fold_of.values()), minlength=n_folds)
    assert counts.max() - counts.min() <= 1


def test_patient_folds_are_seeded_and_order_independent() -> None:
    patients = _patients(0)
    assert patient_folds(patients, 5, seed=3) == patient_folds(list(patients), 5, seed=3)
    assert patient_folds(patients, 5, seed=3) != patient_folds(patients, 5, seed=4)
    # The same patient gets the same fold whatever order the records come in.
    shuffled = list(reversed(patients))
    a = dict(zip(patients, patient_folds(patients, 5, seed=3)))
    b = dict(zip(shuffled, patient_folds(shuffled, 5, seed=3)))
    assert a == b


def _index_only_dataset(patients: list[str]) -> Dataset:
    n = len(patients)
    cache = PatchCache([str(i) for i in range(n)], np.zeros((n, 1)), np.zeros((n, 1)), np.zeros(n, bool), np.zeros(n))
    return Dataset([None] * n, cache, np.zeros((n, 6)), np.zeros(n, bool), np.zeros(n), np.zeros(n), patients)  # type: ignore[list-item]


@pytest.mark.parametrize("val_fraction", [0.2, 0.5])
def test_split_fold_is_patient_disjoint(tmp_path: Path, val_fraction: float) -> None:
    patients = _patients(1)
    ds = _index_only_dataset(patients)
    cfg = load_config(_empty_config(tmp_path), {"cv.val_fraction": val_fraction})
    tests = []
    for fold in range(cfg.cv.folds):
        train, val, test = split_fold(ds, cfg, fold)
        sets = [{patients[i] for i in part} for part in (train, val, test)]
        assert all(sets), "every part has patients"
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(patients)))
        tests.append(test)
        again = split_fold(ds, cfg, fold)
        assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    # The test parts of all folds partition the data set.
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(patients)))


def _empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def test_build_patch_cache_round_trips_through_npz(
    tmp_path: Path, small_voi_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = read_unsure_manifest(small_voi_dir)
    cache = build_patch_cache(records, DEFAULT_PATCH_SPEC, tmp_path / "cache")
    n, s = len(records), DEFAULT_PATCH_SPEC.size
    assert cache.ids == [r.id for r in records]
    assert cache.images.shape == (n, 2, s, s, s) and cache.images.dtype == np.float16
    assert cache.masks.shape == (n, s, s, s)
    assert cache.has_mask.tolist() == [r.mask_path is not None for r in records]
    assert float(cache.images.min()) >= 0 and float(cache.images.max()) <= 1
    assert float(cache.masks.min()) >= 0 and float(cache.masks.max()) <= 1
    c = s // 2
    # Sphere at the centre (lung window well above air), air in the corner; mask agrees.
    assert np.all(cache.images[:, 0, c, c, c] > 0.6)
    assert np.all(cache.images[:, 0, 0, 0, 0] < 0.1)
    assert np.all(cache.masks[cache.has_mask, c, c, c] > 0.99)
    assert np.all(cache.masks[~cache.has_mask] == 0)
    # 20 slices of 2 mm around the middle: 40 mm of symmetric z context.
    np.testing.assert_allclose(cache.z_extent_mm, 40.0, atol=1e-4)
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp*"))

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache must not re-read volumes")

    monkeypatch.setattr(sitk, "ReadImage", no_read)
    again = build_patch_cache(records, DEFAULT_PATCH_SPEC, tmp_path / "cache")
    for name in ("images", "masks", "has_mask", "z_extent_mm"):
        np.testing.assert_array_equal(getattr(again, name), getattr(cache, name))
    with np.load(files[0], allow_pickle=False) as data:
        assert set(data.files) == {"images", "masks", "has_mask", "z_extent_mm"}


def test_patch_cache_key_depends_on_the_records(tmp_path: Path, small_voi_dir: Path) -> None:
    records = read_unsure_manifest(small_voi_dir)
    build_patch_cache(records[:2], DEFAULT_PATCH_SPEC, tmp_path)
    sub = build_patch_cache(records[:1], DEFAULT_PATCH_SPEC, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert sub.images.shape[0] == 1


def test_targets(small_voi_dir: Path) -> None:
    records = read_unsure_manifest(small_voi_dir)
    attrs, has_attrs, labels, diameters = targets(records)
    assert has_attrs.tolist() == [True] * 5 + [False]
    assert labels.tolist() == [0, 1, 0, 1, -1, -1]  # 1.5, 4.5, 2.0, 4.0, 3.0, unrated
    np.testing.assert_allclose(attrs[:5, ATTRIBUTE_NAMES.index("malignancy")], (np.array(MALIGNANCY_MEANS[:5]) - 1) / 4)
    assert np.all((attrs >= 0) & (attrs <= 1))
    assert np.isfinite(diameters).all()

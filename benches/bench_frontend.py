"""Study front end: DICOM study → 2×64³ model patch, against the naive whole-series path.

For each study (a generated 300-slice 512² uncompressed CT, and the real 255-slice JPEG Lossless
chest series when ../shared/data is present) one run measures:

* ``header_scan``      - :func:`open_study` alone (header-only scan, series choice, geometry);
* ``roi_patch``        - ``build_patches`` on an already opened study (ROI read + resample);
* ``open_and_patch``   - both, from the folder path;
* ``naive``            - what the issue calls naive: read the whole series (SimpleITK/GDCM),
  resample the whole volume to 0.5 mm isotropic, crop the 64³ cube, window;
* ``whole_read_patch`` - read the whole series, then resample only the cube with SimpleITK
  (separates the cost of reading everything from the cost of resampling everything).

``decode_roi_slices[imagecodecs|gdcm|pydicom]`` decodes the chest cube's slices (whole 512²
slices, two threads where the decoder releases the GIL) with each decoder: libjpeg-turbo through
imagecodecs, which ``"auto"`` uses for JPEG Lossless; GDCM through SimpleITK, which it uses for the
other lossless compressed syntaxes; pydicom + pylibjpeg, the fallback.

``header_reader[dicomsdl|pydicom]`` scans the chest study's 255 headers with each reader.

``interpolation[linear|bspline]`` times ``build_patch`` on the ROI of a real LIDC VOI; its
``extra_info`` carries the linear-vs-B-spline patch differences over a sample of VOIs.

Targets (issue): ``roi_patch`` ≤ 150 ms on the uncompressed study and ≥ 20× faster than ``naive``.
Speedups are left to the report (``--benchmark-json``); nothing is asserted here.

Run: ``python -m pytest benches/bench_frontend.py --benchmark-columns=min,median,mean,rounds``
(about 3 minutes on 2 cores, most of it writing the synthetic study and the naive rounds;
the naive path needs about 2 GB of memory).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk

from nodule_edge.data_paths import data_dir
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, build_patch, patch_grid, resample_hu, window_channels
from nodule_edge.runtime.dicom import decode_slices
from nodule_edge.runtime.study import open_study
from nodule_edge.volume import Volume

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = data_dir(REPO_ROOT)
CHEST = SHARED_DATA / "dicom" / "chest_ricord_jpeg_lossless"
LIDC = SHARED_DATA / "lidc_voi"
SPEC = DEFAULT_PATCH_SPEC


def _factory() -> ModuleType:
    # benches/ is not a package next to tests/; load the test helper by path so this works
    # whether pytest runs from the repo root or elsewhere.
    path = REPO_ROOT / "tests" / "runtime" / "dicom_factory.py"
    name = "nodule_edge_bench_dicom_factory"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


@dataclass(frozen=True)
class Case:
    """One study to benchmark and the nodule centre to read."""

    name: str
    folder: Path
    center: np.ndarray


@pytest.fixture(scope="session")
def synthetic_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A 300-slice 512² Explicit VR CT (0.7 mm pixels, 1 mm slices), written once per session."""
    folder = tmp_path_factory.mktemp("frontend") / "ct_512x512x300"
    series = _factory().write_series(
        folder,
        n_slices=300,
        rows=512,
        cols=512,
        pixel_spacing=(0.7, 0.7),
        slice_spacing=1.0,
        origin=(-179.2, -179.2, -300.0),
    )
    center = series.voxel_to_world((300.4, 200.7, 150.3))
    return Case("synthetic_512x512x300_uncompressed", folder, center)


@pytest.fixture(scope="session")
def chest_case() -> Case:
    """The real JPEG Lossless chest series (skipped when ../shared/data is absent)."""
    if not CHEST.is_dir():
        pytest.skip(f"real data not found at {CHEST} (set NODULE_EDGE_DATA)")
    study = open_study(CHEST)
    return Case("chest_ricord_jpeg_lossless", CHEST, study.voxel_to_world((200.0, 260.0, 120.0)))


@pytest.fixture(params=["synthetic", "chest"])
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(f"{request.param}_case")


def read_whole_series(folder: Path) -> sitk.Image:
    """The whole series in HU, as a viewer or a quick script would read it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.Cast(reader.Execute(), sitk.sitkFloat32)


def naive_patch(folder: Path, center: np.ndarray, spec: PatchSpec = SPEC) -> np.ndarray:
    """Read everything, resample everything to the patch spacing, then crop the cube."""
    image = read_whole_series(folder)
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    size = [int(math.ceil(e / spec.spacing_mm)) for e in extent]
    iso = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        [spec.spacing_mm] * 3,
        image.GetDirection(),
        spec.outside_hu,
        sitk.sitkFloat32,
    )
    del image
    first = np.asarray(
        iso.TransformPhysicalPointToIndex(tuple(float(v) for v in center - (spec.size / 2 - 0.5) * spec.spacing_mm))
    )
    hu = sitk.GetArrayViewFromImage(iso)
    out = np.full((spec.size,) * 3, spec.outside_hu, dtype=np.float32)
    lo = np.maximum(first, 0)
    hi = np.minimum(first + spec.size, np.asarray(iso.GetSize()))
    out[
        lo[2] - first[2] : hi[2] - first[2], lo[1] - first[1] : hi[1] - first[1], lo[0] - first[0] : hi[0] - first[0]
    ] = hu[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    return window_channels(out, spec)


def sitk_cube_patch(image: sitk.Image, center: np.ndarray, spec: PatchSpec = SPEC) -> np.ndarray:
    """SimpleITK's Resample of just the cube from a whole image, then the windows (no copy of the image)."""
    cube = sitk.Resample(
        image,
        patch_grid(center, spec).to_image(sitk.sitkFloat32),
        sitk.Transform(),
        sitk.sitkLinear,
        spec.outside_hu,
        sitk.sitkFloat32,
    )
    return window_channels(sitk.GetArrayFromImage(cube), spec)


def test_header_scan(benchmark, case: Case) -> None:
    study = benchmark.pedantic(open_study, args=(case.folder,), warmup_rounds=1, rounds=5)
    benchmark.extra_info.update(study=case.name, slices=study.n_slices)


def test_roi_patch(benchmark, case: Case) -> None:
    study = open_study(case.folder)
    patches = benchmark.pedantic(study.build_patches, args=(case.center, SPEC), warmup_rounds=1, rounds=10)
    roi = study.reference_geometry(case.center, SPEC)
    benchmark.extra_info.update(study=case.name, roi_size=list(roi.size), slices_read=roi.size[2])
    assert patches.shape == (1, SPEC.channels, SPEC.size, SPEC.size, SPEC.size)


def test_open_and_patch(benchmark, case: Case) -> None:
    def run() -> np.ndarray:
        return open_study(case.folder).build_patches(case.center, SPEC)

    benchmark.pedantic(run, warmup_rounds=1, rounds=5)
    benchmark.extra_info["study"] = case.name


def test_naive(benchmark, case: Case) -> None:
    patch = benchmark.pedantic(naive_patch, args=(case.folder, case.center), warmup_rounds=1, rounds=2)
    ours = open_study(case.folder).build_patches(case.center, SPEC)[0]
    # The naive crop sits on the whole-volume 0.5 mm lattice, up to a quarter voxel off centre.
    benchmark.extra_info.update(study=case.name, max_abs_diff_vs_roi_patch=float(np.abs(patch - ours).max()))


def test_whole_read_patch(benchmark, case: Case) -> None:
    def run() -> np.ndarray:
        return sitk_cube_patch(read_whole_series(case.folder), case.center, SPEC)

    patch = benchmark.pedantic(run, warmup_rounds=1, rounds=3)
    ours = open_study(case.folder).build_patches(case.center, SPEC)[0]
    benchmark.extra_info.update(study=case.name, max_abs_diff_vs_roi_patch=float(np.abs(patch - ours).max()))


@pytest.mark.parametrize("backend", ["imagecodecs", "gdcm", "pydicom"])
def test_decode_roi_slices(benchmark, chest_case: Case, backend: str) -> None:
    if backend == "imagecodecs":
        pytest.importorskip("imagecodecs", reason="imagecodecs is not installed (the imagecodecs extra)")
    study = open_study(chest_case.folder)
    roi = study.reference_geometry(chest_case.center, SPEC)
    k0 = roi.index_offset[2]
    headers = study.slices[k0 : k0 + roi.size[2]]
    benchmark.pedantic(
        decode_slices, args=(headers,), kwargs={"backend": backend, "threads": 2}, warmup_rounds=1, rounds=5
    )
    benchmark.extra_info.update(study=chest_case.name, slices=len(headers))


@pytest.mark.parametrize("reader", ["dicomsdl", "pydicom"])
def test_header_reader(benchmark, chest_case: Case, reader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodule_edge.runtime.dicom import headers

    if reader == "dicomsdl" and headers._dicomsdl_module() is None:
        pytest.skip("dicomsdl is not installed (the dicomsdl extra)")
    if reader == "pydicom":
        monkeypatch.setattr(headers, "_dicomsdl_module", lambda: None)
    scan = benchmark.pedantic(headers.scan_folder, args=(chest_case.folder,), warmup_rounds=1, rounds=5)
    benchmark.extra_info.update(study=chest_case.name, files=len(scan.files))


# ------------------------------------------------------------------------- interpolation

TIMED_VOI = "LIDC-IDRI-0001_R_1"  # 0.70 × 0.70 × 2.5 mm, 53 × 64 × 11 voxels
SAMPLE_EVERY = 7  # ~97 of the 679 VOIs for the difference statistics


def _voi_center(row: dict[str, str]) -> np.ndarray:
    return np.array([float(row[f"center_{a}_mm"]) for a in "xyz"])


def _interior(roi: Volume, center: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Patch voxels at least one ROI voxel inside the ROI border (``[z, y, x]`` mask)."""
    grid = patch_grid(center, spec)
    zyx = np.stack(np.meshgrid(*[np.arange(spec.size)] * 3, indexing="ij"), axis=-1)
    world = np.asarray(grid.origin) + zyx[..., ::-1] * spec.spacing_mm
    direction = np.asarray(roi.direction).reshape(3, 3)
    index = (world - np.asarray(roi.origin)) @ direction / np.asarray(roi.spacing_mm)
    return np.all((index >= 1) & (index <= np.asarray(roi.size) - 2), axis=-1)


@pytest.fixture(scope="session")
def interpolation_stats() -> dict[str, float | int]:
    """Linear vs B-spline patch differences over a deterministic sample of LIDC VOIs.

    Compared on the patch voxels that lie inside the VOI, at least one voxel from its border
    (the two interpolators treat borders differently, and the VOIs are small). VOIs with fewer
    than 4 voxels along an axis are counted and left out: cubic B-spline is undefined there
    (SimpleITK returns garbage or NaN).
    """
    if not (LIDC / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {LIDC} (set NODULE_EDGE_DATA)")
    with open(LIDC / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[::SAMPLE_EVERY]
    linear, bspline = PatchSpec(interpolation="linear"), PatchSpec(interpolation="bspline")
    patch_max, patch_mean, hu_max, hu_mean, too_thin = [], [], [], [], 0
    for row in rows:
        center = _voi_center(row)
        roi = open_study(LIDC / "image" / f"{row['voi_id']}.nii.gz").read_roi(center, bspline)
        if min(roi.size) < 4:
            too_thin += 1
            continue
        a, b = resample_hu(roi, center, linear), resample_hu(roi, center, bspline)
        inside = _interior(roi, center, linear)
        d_patch = np.abs(window_channels(a, linear) - window_channels(b, bspline))[:, inside]
        d_hu = np.abs(a - b)[inside]
        patch_max.append(float(d_patch.max()))
        patch_mean.append(float(d_patch.mean()))
        hu_max.append(float(d_hu.max()))
        hu_mean.append(float(d_hu.mean()))
    return {
        "vois_sampled": len(rows),
        "vois_too_thin_for_bspline": too_thin,
        "patch_max_abs_diff_max": max(patch_max),
        "patch_max_abs_diff_median": float(np.median(patch_max)),
        "patch_mean_abs_diff_mean": float(np.mean(patch_mean)),
        "hu_max_abs_diff_max": max(hu_max),
        "hu_max_abs_diff_median": float(np.median(hu_max)),
        "hu_mean_abs_diff_mean": float(np.mean(hu_mean)),
    }


@pytest.mark.parametrize("interpolation", ["linear", "bspline"])
def test_interpolation(benchmark, interpolation: str, interpolation_stats: dict[str, float | int]) -> None:
    with open(LIDC / "manifest.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["voi_id"] == TIMED_VOI)
    spec = PatchSpec(interpolation=interpolation)  # type: ignore[arg-type]
    center = _voi_center(row)
    # Both time the same ROI (the B-spline one, with its wider margin).
    roi = open_study(LIDC / "image" / f"{TIMED_VOI}.nii.gz").read_roi(center, PatchSpec(interpolation="bspline"))
    benchmark.pedantic(build_patch, args=(roi, center, spec), warmup_rounds=1, rounds=20)
    benchmark.extra_info.update(voi=TIMED_VOI, roi_size=list(roi.size), **interpolation_stats)

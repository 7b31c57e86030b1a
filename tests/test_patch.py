"""The shared model input: the patch spec, its JSON form, and the nodule-bounded input rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nodule_edge.patch import (
    DEFAULT_PATCH_SPEC,
    NoduleBox,
    PatchSpec,
    bound_to_nodule,
    box_keep_mask,
    nodule_extent,
    run_nodule_bounded,
    window_channels,
)

SIZE = DEFAULT_PATCH_SPEC.size


def _ball(center: tuple[float, float, float], radius: float, size: int = SIZE) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(size, dtype=np.float32),) * 3, indexing="ij")
    return (((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2) <= radius**2).astype(np.float32)


def test_spec_json_round_trip_keeps_the_nodule_box() -> None:
    text = DEFAULT_PATCH_SPEC.to_json()
    assert json.loads(text)["nodule_box"] == {"margin_mm": [0.0, 4.0, 4.0], "jitter_mm": 2.0, "threshold": 0.5}
    assert PatchSpec.from_json(text) == DEFAULT_PATCH_SPEC


def test_spec_json_of_an_older_model_reads_the_whole_cube() -> None:
    legacy = json.loads(DEFAULT_PATCH_SPEC.to_json())
    del legacy["nodule_box"]
    assert PatchSpec.from_json(json.dumps(legacy)).nodule_box is None


@pytest.mark.parametrize(
    ("box", "needle"),
    [
        ({"margin_mm": [0, 4, 4], "wobble": 1}, "wobble"),
        ({"margin_mm": [0, -1, 4]}, "margins"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_bad_nodule_box_json_is_refused(box: dict, needle: str) -> None:
    data = json.loads(DEFAULT_PATCH_SPEC.to_json())
    data["nodule_box"] = box
    with pytest.raises(ValueError, match=needle):
        PatchSpec.from_json(json.dumps(data))


def test_runtime_margin_is_the_middle_of_the_training_range() -> None:
    assert NoduleBox(margin_mm=(0.0, 4.0, 4.0), jitter_mm=2.0).runtime_margin_mm() == (1.0, 5.0, 5.0)


def test_nodule_extent_takes_the_component_at_the_centre() -> None:
    seg = _ball((31.5, 31.5, 31.5), 5) + _ball((8, 8, 8), 3)  # the nodule and a vessel-like blob
    low, high = nodule_extent(seg)
    assert low.tolist() == [27, 27, 27] and high.tolist() == [36, 36, 36]
    # Off-centre nodule: the nearest component wins, the other is ignored.
    low, high = nodule_extent(_ball((40, 30, 30), 4) + _ball((5, 5, 60), 2))
    assert low.tolist() == [36, 26, 26] and high.tolist() == [44, 34, 34]
    assert nodule_extent(np.zeros((SIZE,) * 3)) is None


def test_bound_to_nodule_keeps_the_box_plus_runtime_margins_and_sets_air_elsewhere() -> None:
    rng = np.random.default_rng(0)
    patch = rng.uniform(0.1, 1.0, (2, SIZE, SIZE, SIZE)).astype(np.float32)
    seg = _ball((31.5, 31.5, 31.5), 5)
    bounded, found = bound_to_nodule(patch, seg)
    assert found
    air = window_channels(np.full((1, 1, 1), -1000.0, np.float32))[:, 0, 0, 0]
    kept = np.argwhere((bounded != air[:, None, None, None]).all(axis=0))
    # Nodule 27..36 in each axis; runtime margins 1 mm (2 voxels) in z and 5 mm (10 voxels) in-plane.
    assert kept.min(axis=0).tolist() == [25, 17, 17]
    assert kept.max(axis=0).tolist() == [38, 46, 46]
    inside = (slice(None), slice(25, 39), slice(17, 47), slice(17, 47))
    np.testing.assert_array_equal(bounded[inside], patch[inside])


def test_box_keeps_voxels_within_the_margin_and_clips_at_the_cube_edge() -> None:
    rng = np.random.default_rng(1)
    index = np.arange(SIZE)
    for _ in range(200):
        low = rng.integers(0, SIZE, 3)
        high = np.minimum(SIZE - 1, low + rng.integers(0, SIZE, 3))
        margin = rng.uniform(0, 12, 3) * rng.integers(0, 2, 3)  # fractional voxels, or none
        keep = box_keep_mask((SIZE,) * 3, low, high, margin)
        for axis in range(3):
            expected = (index >= low[axis] - margin[axis] - 1e-6) & (index <= high[axis] + margin[axis] + 1e-6)
            other = tuple(a for a in range(3) if a != axis)
            np.testing.assert_array_equal(keep.any(axis=other), expected)
        assert keep.sum() == np.prod([keep.any(axis=tuple(a for a in range(3) if a != ax)).sum() for ax in range(3)])


def test_off_centre_foreground_far_from_the_nodule_does_not_widen_the_box() -> None:
    # Foreground in a far corner makes the region above the threshold span the whole cube.
    seg = _ball((31.5, 31.5, 31.5), 5) + _ball((1, 1, 1), 1) + _ball((62, 62, 62), 1)
    low, high = nodule_extent(seg)
    assert low.tolist() == [27, 27, 27] and high.tolist() == [36, 36, 36]
    low, high = nodule_extent(_ball((62, 62, 62), 1) + _ball((50, 10, 12), 3))
    assert low.tolist() == [47, 7, 9] and high.tolist() == [53, 13, 15]


def test_empty_segmentation_leaves_the_cube_whole_and_says_so() -> None:
    patch = np.full((2, SIZE, SIZE, SIZE), 0.5, np.float32)
    bounded, found = bound_to_nodule(patch, np.zeros((SIZE,) * 3, np.float32))
    assert not found
    np.testing.assert_array_equal(bounded, patch)


def test_run_nodule_bounded_feeds_the_second_pass_the_bounded_cube() -> None:
    patches = np.full((2, 2, SIZE, SIZE, SIZE), 0.6, np.float32)
    seen: list[np.ndarray] = []

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(x.copy())
        seg = np.stack([_ball((31.5, 31.5, 31.5), 4), np.zeros((SIZE,) * 3, np.float32)])
        return {"segmentation": seg, "malignancy_probability": np.full(len(x), float(len(seen)))}

    out, found = run_nodule_bounded(run, patches, DEFAULT_PATCH_SPEC)
    assert len(seen) == 2 and out["malignancy_probability"].tolist() == [2.0, 2.0]
    assert found.tolist() == [True, False]
    assert (seen[1][0] == 0).mean() > 0.8  # the first cube was bounded to its nodule
    np.testing.assert_array_equal(seen[1][1], patches[1])  # nothing found: read whole
    # A whole-cube model runs once.
    seen.clear()
    out, found = run_nodule_bounded(run, patches, PatchSpec())
    assert len(seen) == 1 and found.all()


def test_training_path_and_runtime_path_bound_identically() -> None:
    """The torch training path (reference mask, runtime margins) equals the runtime's numpy path."""
    torch = pytest.importorskip("torch")
    from nodule_edge.train.trainer import bound_batch

    rng = np.random.default_rng(1)
    patches = rng.uniform(0.05, 1.0, (3, 2, SIZE, SIZE, SIZE)).astype(np.float32)
    masks = np.stack([_ball((30, 33, 29), 6), _ball((20, 40, 35), 2.5), _ball((31.5, 31.5, 31.5), 12)])
    trained = bound_batch(
        torch.from_numpy(patches),
        torch.from_numpy(masks),
        torch.ones(3, dtype=torch.bool),
        DEFAULT_PATCH_SPEC.nodule_box,
        DEFAULT_PATCH_SPEC.spacing_mm,
        None,
    ).numpy()
    for i in range(3):
        runtime, found = bound_to_nodule(patches[i], masks[i])
        assert found
        np.testing.assert_array_equal(trained[i], runtime)


def test_training_jitter_never_cuts_into_the_nodule() -> None:
    torch = pytest.importorskip("torch")
    from nodule_edge.train.trainer import bound_batch

    gen = torch.Generator().manual_seed(3)
    mask = torch.from_numpy(np.stack([_ball((31.5, 31.5, 31.5), r) for r in (2, 6, 14, 20)]))
    images = torch.ones(4, 2, SIZE, SIZE, SIZE)
    for _ in range(5):
        out = bound_batch(images, mask, torch.ones(4, dtype=torch.bool), NoduleBox(), 0.5, gen)
        assert torch.all(out[:, 0][mask > 0.5] == 1)
        assert float(out.mean()) < 1.0  # something outside was blanked
    # The unbounded share keeps whole cubes.
    out = bound_batch(images, mask, torch.ones(4, dtype=torch.bool), NoduleBox(), 0.5, gen, unbounded_probability=1.0)
    assert torch.equal(out, images)

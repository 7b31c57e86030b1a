"""Occlusion sensitivity: known answers from toy models, the nodule-bounded path, option checks."""

from __future__ import annotations

import numpy as np
import pytest

from nodule_edge.patch import DEFAULT_PATCH_SPEC, NoduleBox, PatchSpec, bound_to_nodule, window_channels
from nodule_edge.runtime.occlusion import (
    AUTO_GRIDS,
    DEFAULT_BLOCK,
    DEFAULT_MAX_PASSES,
    DEFAULT_STRIDE,
    air_fill,
    block_starts,
    occlusion_map,
    probability_logit,
)

S = 64
#: The toy model's evidence: a 16³ cube at the centre, aligned with an 8-voxel block grid.
REGION = (slice(24, 40), slice(24, 40), slice(24, 40))
WHOLE_CUBE = PatchSpec()  # no nodule box: one pass on the whole cube


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _toy_run(
    region=REGION,
    gain: float = 4.0,
    offset: float = -2.0,
    segmentation: np.ndarray | None = None,
    calls: list | None = None,
):
    """A model whose malignancy logit is ``gain · mean(channel 0 over region) + offset``."""

    def run(patches: np.ndarray) -> dict[str, np.ndarray]:
        if calls is not None:
            calls.append(patches.copy())
        logit = gain * patches[(slice(None), 0, *region)].mean(axis=(1, 2, 3)) + offset
        seg = (
            np.zeros((len(patches), S, S, S), np.float32)
            if segmentation is None
            else np.repeat(segmentation[None], len(patches), 0)
        )
        return {"malignancy_probability": _sigmoid(logit).astype(np.float32), "segmentation": seg}

    return run


def _patch(value: float = 1.0) -> np.ndarray:
    patch = np.zeros((2, S, S, S), np.float32)
    patch[(slice(None), *REGION)] = value
    return patch


def test_map_is_the_logit_drop_exactly_over_the_evidence_region():
    result = occlusion_map(_toy_run(), _patch(), WHOLE_CUBE, block=8, stride=8, fill=0.0)
    inside = np.zeros((S, S, S), bool)
    inside[REGION] = True
    # Each of the 8 blocks tiling the region hides 1/8 of it: the logit falls by 4/8 = 0.5.
    np.testing.assert_allclose(result.map[inside], 0.5, atol=1e-4)
    assert np.all(result.map[~inside] == 0.0)
    # The logit, not the probability: the probability would fall by sigmoid(2) − sigmoid(1.5) ≈ 0.063.
    assert result.logit == pytest.approx(2.0, abs=1e-5)
    assert result.probability == pytest.approx(float(_sigmoid(np.float64(2.0))), abs=1e-6)
    # Only the 8 blocks that hold non-fill voxels ran; the other 504 hid nothing.
    assert (result.blocks, result.occluded_passes, result.forward_passes) == (512, 8, 9)
    assert not result.saturated


def test_overlapping_blocks_average_onto_the_grid():
    result = occlusion_map(_toy_run(), _patch(), WHOLE_CUBE, block=8, stride=4, fill=0.0)
    # Support: voxels covered by some block that meets the region, i.e. the region widened by
    # block − stride = 4 voxels on every side.
    support = np.zeros((S, S, S), bool)
    support[20:44, 20:44, 20:44] = True
    assert np.all(result.map[support] > 0)
    assert np.all(result.map[~support] == 0)
    # Deep inside the region every covering block hides 512 of its 4096 voxels: drop 0.5 each.
    np.testing.assert_allclose(result.map[28:36, 28:36, 28:36], 0.5, atol=1e-4)
    assert result.map[REGION].min() > result.map[20:24, 20:44, 20:44].max()
    assert len(block_starts(S, 8, 4)) == 15


def test_negative_evidence_gives_a_negative_map_and_sign_follows_the_prediction():
    # Gain −4: the region argues for benign; hiding it raises the malignancy (negative drop).
    result = occlusion_map(_toy_run(gain=-4.0, offset=2.0), _patch(), WHOLE_CUBE, block=8, stride=8, fill=0.0)
    assert result.probability < 0.5
    assert result.map[REGION].max() < 0
    # Signed by the predicted (benign) class, the region supports the prediction.
    assert result.towards_prediction[REGION].min() > 0


def test_last_block_is_cut_off_at_the_edge_as_captum_places_it():
    assert block_starts(64, 16, 16) == [0, 16, 32, 48]
    assert block_starts(64, 16, 8) == [0, 8, 16, 24, 32, 40, 48]
    assert block_starts(64, 20, 20) == [0, 20, 40, 60]  # the last block covers 60..63 only
    assert block_starts(64, 64, 1) == [0]
    # Evidence in the last 4 voxels, reached only by the cut-off block.
    edge = (slice(60, 64), slice(0, 20), slice(0, 20))
    patch = np.zeros((2, S, S, S), np.float32)
    patch[(slice(None), *edge)] = 1.0
    result = occlusion_map(_toy_run(region=edge), patch, WHOLE_CUBE, block=20, stride=20, fill=0.0)
    assert result.map[edge].min() > 0
    assert np.count_nonzero(result.map) == 4 * 20 * 20


def test_default_fill_is_the_windowed_air_of_the_spec():
    spec = PatchSpec(windows=((-1200.0, 200.0), (-1100.0, 100.0)), outside_hu=-1000.0)
    expected = window_channels(np.full((1, 1, 1), -1000.0, np.float32), spec)[:, 0, 0, 0]
    np.testing.assert_allclose(air_fill(spec), expected)
    assert air_fill(spec)[0] == pytest.approx(200 / 1400) and air_fill(spec)[1] == pytest.approx(100 / 1200)
    calls: list[np.ndarray] = []
    result = occlusion_map(_toy_run(calls=calls), _patch(), spec, block=32, stride=32)
    assert result.fill == pytest.approx(tuple(expected))
    # An occluded block holds exactly the fill, channel by channel.
    occluded = calls[1][0]
    np.testing.assert_array_equal(
        occluded[:, :32, :32, :32], np.broadcast_to(expected[:, None, None, None], (2, 32, 32, 32))
    )
    # The default spec's air is 0 in both windows (−1000 HU is the bottom of the lung window).
    np.testing.assert_array_equal(air_fill(DEFAULT_PATCH_SPEC), [0.0, 0.0])


def test_occludes_the_nodule_bounded_input_with_the_box_fixed():
    spec = PatchSpec(nodule_box=NoduleBox())
    segmentation = np.zeros((S, S, S), np.float32)
    segmentation[28:36, 28:36, 28:36] = 1.0  # the first pass's nodule
    patch = np.random.default_rng(0).uniform(0.1, 1.0, (2, S, S, S)).astype(np.float32)
    wide = (slice(16, 48), slice(16, 48), slice(16, 48))  # evidence reaching beyond the box
    calls: list[np.ndarray] = []
    result = occlusion_map(
        _toy_run(region=wide, segmentation=segmentation, calls=calls), patch, spec, block=8, stride=8
    )

    bounded, found = bound_to_nodule(patch, segmentation, spec)
    assert found and result.first_pass_found_nodule
    np.testing.assert_array_equal(calls[0][0], patch)  # first pass: the whole cube, once
    np.testing.assert_array_equal(calls[1][0], bounded)  # second pass: the bounded cube
    np.testing.assert_array_equal(result.bounded_patch, bounded)
    for cubes in calls[2:]:  # every occluded cube is the bounded cube with one block filled
        for cube in cubes:
            changed = np.argwhere((cube != bounded).any(axis=0))
            assert len(changed) and (changed.max(0) - changed.min(0) < 8).all()
    # Box: z 26..37 (margin 1 mm = 2 voxels), y and x 18..45 (5 mm = 10 voxels): 2 × 4 × 4 blocks.
    assert result.occluded_passes == 32 and result.forward_passes == 34
    # Blocks beyond the box hide air only and are 0, although the whole cube has evidence there
    # (z 16..23, say); every block meeting the box hides part of the evidence and is positive.
    touched = np.zeros((S, S, S), bool)
    touched[24:40, 16:48, 16:48] = True
    assert np.all(result.map[~touched] == 0)
    assert result.map[touched].min() > 0


def test_saturated_probability_is_flagged(caplog):
    result = occlusion_map(_toy_run(gain=4.0, offset=40.0), _patch(), WHOLE_CUBE, block=32, stride=32, fill=0.0)
    assert result.probability == 1.0 and result.saturated
    assert result.logit == pytest.approx(float(probability_logit(1.0)))
    assert 16 < result.logit < 17
    assert "saturated" in caplog.text
    # Towards 0 a float32 probability keeps its resolution: no cap at −16.6 there.
    assert float(probability_logit(np.float32(1e-20))) == pytest.approx(-46.0517, abs=1e-3)
    benign = occlusion_map(_toy_run(gain=4.0, offset=-40.0), _patch(), WHOLE_CUBE, block=32, stride=32, fill=0.0)
    assert not benign.saturated and benign.logit == pytest.approx(-36.0, abs=1e-4)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"block": 0}, "block must lie in [1, 64] voxels (the cube's edge), got 0"),
        ({"block": -3}, "got -3"),
        ({"block": 65}, "block must lie in [1, 64]"),
        ({"block": 8.5}, "block must be a whole number of voxels, got 8.5"),
        ({"stride": 0}, "stride must be >= 1 voxel, got 0"),
        ({"stride": -8}, "stride must be >= 1 voxel, got -8"),
        ({"block": 8, "stride": 16}, "stride 16 exceeds block 8"),
        ({"fill": float("nan")}, "fill must be finite, got nan"),
        ({"fill": (0.0, float("inf"))}, "fill must be finite, got (0.0, inf)"),
        ({"fill": (0.0, 0.0, 0.0)}, "one number or 2 (one per channel), got (0.0, 0.0, 0.0)"),
        ({"fill": "air"}, "fill must be a number or one number per channel, got 'air'"),
        ({"batch": 0}, "batch must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_raise_naming_the_option_and_value(options, named):
    with pytest.raises(ValueError) as info:
        occlusion_map(_toy_run(), _patch(), WHOLE_CUBE, **options)
    assert named in str(info.value)


def test_bad_patch_raises():
    with pytest.raises(ValueError, match=r"shape \[2, 64, 64, 64\].*got \[1, 2, 64, 64, 64\]"):
        occlusion_map(_toy_run(), _patch()[None], WHOLE_CUBE)
    bad = _patch()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        occlusion_map(_toy_run(), bad, WHOLE_CUBE)


def test_defaults_are_recorded():
    result = occlusion_map(_toy_run(), _patch(), WHOLE_CUBE, fill=0.0, max_passes=64)
    assert (result.block, result.stride, result.batch) == (DEFAULT_BLOCK, DEFAULT_STRIDE, 8)
    assert result.blocks == len(block_starts(S, DEFAULT_BLOCK, DEFAULT_STRIDE)) ** 3


def test_the_default_grid_coarsens_to_fit_the_pass_budget():
    """A whole-cube input needs 64 blocks of 16: over a budget of 32 the 22/21 grid (27) is used,
    under a budget of 8 the 32/32 grid; an explicit block is kept whatever it costs."""
    assert AUTO_GRIDS[0] == (DEFAULT_BLOCK, DEFAULT_STRIDE)
    full = np.full((2, S, S, S), 0.5, np.float32)  # every block hides something
    result = occlusion_map(_toy_run(), full, WHOLE_CUBE, fill=0.0)
    assert (result.block, result.stride, result.occluded_passes) == (22, 21, 27)
    assert result.occluded_passes <= DEFAULT_MAX_PASSES
    coarse = occlusion_map(_toy_run(), full, WHOLE_CUBE, fill=0.0, max_passes=8)
    assert (coarse.block, coarse.stride, coarse.occluded_passes) == (32, 32, 8)
    fixed = occlusion_map(_toy_run(), full, WHOLE_CUBE, fill=0.0, block=16, max_passes=8)
    assert (fixed.block, fixed.stride, fixed.occluded_passes) == (16, 16, 64)
    with pytest.raises(ValueError, match="max_passes must be an integer >= 1, got 0"):
        occlusion_map(_toy_run(), _patch(), WHOLE_CUBE, max_passes=0)


def test_end_to_end_through_an_onnx_runtime_engine(tiny_bundle):
    pytest.importorskip("onnxruntime")
    from nodule_edge.runtime import NoduleInferer

    inferer = NoduleInferer(tiny_bundle, backend="cpu", threads=1, top_k=0)
    z, y, x = np.mgrid[:S, :S, :S]
    hu = np.where((z - 31.5) ** 2 + (y - 31.5) ** 2 + (x - 31.5) ** 2 <= 10**2, 40.0, -850.0).astype(np.float32)
    patch = window_channels(hu, inferer.spec)

    result = occlusion_map(inferer.engine.run, patch, inferer.spec, block=32, stride=32)

    # The reference is the runtime's own answer for this cube (same two-pass path).
    expected = inferer.predict_patches(patch[None])[0]
    assert result.probability == pytest.approx(expected.malignancy_probability, abs=1e-6)
    assert result.map.shape == (S, S, S) and result.map.dtype == np.float32 and np.isfinite(result.map).all()
    assert result.blocks == 8 and result.forward_passes == result.occluded_passes + (
        2 if inferer.spec.nodule_box else 1
    )
    assert result.fill == pytest.approx(tuple(air_fill(inferer.spec)))
    # One block by hand (it holds part of the sphere, which no box leaves out): fill it in the
    # bounded cube, run the engine, compare the logit drop.
    cube = result.bounded_patch.copy()
    cube[:, :32, :32, :32] = air_fill(inferer.spec)[:, None, None, None]
    assert not np.array_equal(cube, result.bounded_patch)
    p = inferer.engine.run(cube[None])["malignancy_probability"][0]
    drop = result.logit - float(probability_logit(p))
    np.testing.assert_allclose(result.map[:32, :32, :32], drop, atol=1e-4)

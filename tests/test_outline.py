"""Outline statistics of the first pass's outline, and the outline term of the malignancy logit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nodule_edge.outline import (
    OUTLINE_FEATURE_NAMES,
    OUTLINE_MEASUREMENTS,
    OutlineHead,
    outline_measurements,
    outline_statistics,
    outline_step,
)
from nodule_edge.patch import DEFAULT_PATCH_SPEC, NoduleBox, run_nodule_bounded

SPEC = dataclasses.replace(DEFAULT_PATCH_SPEC, nodule_box=NoduleBox())
NAMES = {name: i for i, name in enumerate(OUTLINE_FEATURE_NAMES)}


def _lung(hu: np.ndarray) -> np.ndarray:
    low, high = SPEC.windows[0]
    return np.clip((hu - low) / (high - low), 0, 1)


def _cube(mask: np.ndarray, inside_hu: float = -160.0) -> np.ndarray:
    hu = np.where(mask, inside_hu, -850.0)
    return np.stack([_lung(hu), np.zeros_like(hu)]).astype(np.float32)


def _ball(radius: float, centre: tuple[float, float, float] = (32, 32, 32), size: int = 64) -> np.ndarray:
    z, y, x = np.mgrid[:size, :size, :size]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


def test_a_ball_measures_its_diameter_volume_and_density() -> None:
    ball = _ball(8)
    stats = outline_statistics(ball.astype(np.float32), _cube(ball), SPEC)
    assert np.exp(stats[NAMES["log_feret_mm"]]) == pytest.approx(17 * 0.5)  # 17 voxels across
    assert np.exp(stats[NAMES["log_volume_mm3"]]) == pytest.approx(ball.sum() * 0.125)
    assert stats[NAMES["hu_mean"]] == pytest.approx(-160, abs=1) and stats[NAMES["hu_sd"]] == pytest.approx(0, abs=1)
    assert stats[NAMES["hu_p90"]] == pytest.approx(-160, abs=1) and stats[NAMES["solid_fraction"]] == 1.0
    ground_glass = outline_statistics(ball.astype(np.float32), _cube(ball, -600.0), SPEC)
    assert ground_glass[NAMES["solid_fraction"]] == 0.0


def test_the_measurements_read_a_ball_in_millimetres_and_hounsfield_units() -> None:
    ball = _ball(8)
    measured = outline_measurements(outline_statistics(ball.astype(np.float32), _cube(ball), SPEC))
    assert list(measured) == [name for name, *_ in OUTLINE_MEASUREMENTS]
    assert measured["feret_mm"] == pytest.approx(17 * 0.5)
    assert measured["volume_mm3"] == pytest.approx(ball.sum() * 0.125)
    assert measured["hu_mean"] == pytest.approx(-160, abs=1) and measured["solid_fraction"] == 1.0
    with pytest.raises(ValueError, match="7 values, got shape \\(6,\\)"):
        outline_measurements(np.zeros(6))


def test_a_ball_is_more_compact_than_a_rod_of_the_same_volume() -> None:
    ball = _ball(8)
    rod = np.zeros_like(ball)
    rod[28:36, 28:36, 4 : 4 + int(round(ball.sum() / 64))] = True
    compact = {
        name: outline_statistics(m.astype(np.float32), _cube(m), SPEC)[NAMES["compactness"]]
        for name, m in (("ball", ball), ("rod", rod))
    }
    assert 0 < compact["rod"] < compact["ball"] <= 1


def test_only_the_nodule_at_the_centre_is_measured_and_an_empty_map_gives_finite_floors() -> None:
    nodule, vessel = _ball(5), _ball(4, centre=(10, 10, 54))
    both = outline_statistics((nodule | vessel).astype(np.float32), _cube(nodule | vessel), SPEC)
    alone = outline_statistics(nodule.astype(np.float32), _cube(nodule), SPEC)
    np.testing.assert_allclose(both, alone)
    empty = outline_statistics(np.zeros((64, 64, 64), np.float32), _cube(nodule), SPEC)
    assert np.isfinite(empty).all() and empty[NAMES["log_volume_mm3"]] < alone[NAMES["log_volume_mm3"]]


def _outputs(logits: list[float]) -> dict[str, np.ndarray]:
    z = np.asarray(logits, np.float32)
    rng = np.random.default_rng(0)
    return {
        "malignancy_logit": z,
        "malignancy_probability": (1 / (1 + np.exp(-z))).astype(np.float32),
        "saliency": rng.random((len(z), 4, 4, 4)).astype(np.float32),
        "nodule_attention": np.full(len(z), 0.8, np.float32),
        "background_attention": np.full(len(z), 0.3, np.float32),
    }


def test_the_outline_term_moves_the_probability_and_turns_the_map_where_the_class_changes() -> None:
    head = OutlineHead(weights=(1.0, 0, 0, 0, 0, 0, 0), bias=-0.5)
    stats = np.zeros((3, 7))
    stats[:, 0] = [0.0, 1.0, 3.0]  # terms -0.5, +0.5, +2.5
    out = _outputs([0.2, -1.0, -1.0])
    moved = head.apply(out, stats)
    np.testing.assert_allclose(moved["malignancy_logit"], [-0.3, -0.5, 1.5], atol=1e-6)
    np.testing.assert_allclose(moved["malignancy_probability"], 1 / (1 + np.exp(-moved["malignancy_logit"])), atol=1e-6)
    # Nodules 0 and 2 change class: their normalised maps are those of the negated evidence.
    np.testing.assert_allclose(moved["saliency"][[0, 2]], 1 - out["saliency"][[0, 2]])
    np.testing.assert_array_equal(moved["saliency"][1], out["saliency"][1])
    np.testing.assert_allclose(moved["nodule_attention"], [0.2, 0.8, 0.2], atol=1e-6)
    np.testing.assert_allclose(out["malignancy_logit"], [0.2, -1.0, -1.0])  # the input is left alone


def test_an_outline_head_round_trips_and_refuses_other_statistics() -> None:
    import json

    head = OutlineHead(weights=tuple(float(i) for i in range(7)), bias=0.25)
    assert OutlineHead.from_dict(json.loads(head.to_json())) == head
    with pytest.raises(ValueError, match="statistics"):
        OutlineHead.from_dict({"names": ["log_volume_mm3"], "weights": [1.0], "bias": 0.0})
    with pytest.raises(ValueError, match="7 finite weights"):
        OutlineHead(weights=(1.0, 2.0), bias=0.0)


def test_the_runtime_path_hands_the_first_pass_and_the_whole_cube_to_the_outline_step() -> None:
    ball = _ball(6)
    patch = _cube(ball)[None]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return _outputs([0.0] * len(x))

    head = OutlineHead(weights=(0, 1.0, 0, 0, 0, 0, 0), bias=0.0)
    out, found = run_nodule_bounded(
        run, patch, SPEC, segment=lambda x: ball[None].astype(np.float32), finish=outline_step(SPEC, head)
    )
    assert found.all()
    np.testing.assert_allclose(
        out["outline_statistics"][0], outline_statistics(ball.astype(np.float32), patch[0], SPEC)
    )
    assert out["malignancy_logit"][0] == pytest.approx(np.log(ball.sum() * 0.125), rel=1e-6)

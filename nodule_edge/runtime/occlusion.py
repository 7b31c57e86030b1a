"""Occlusion sensitivity with the engine alone: a second explanation beside the in-graph Grad-CAM.

Zeiler & Fergus (2014, arXiv:1311.2901) slide an occluding block over the input and record how
much the prediction falls when each region is hidden. This module does that on the model's 64³
patch with batched engine passes, no gradients and no torch, following the grid and averaging
rules of Captum's ``captum.attr.Occlusion``: the first block sits at index 0 on every axis, the
block moves by ``stride`` until the axis is covered (the last block may be cut off at the edge),
and a voxel covered by several blocks gets the mean of their output differences.

What is occluded: the nodule-bounded model input. The runtime reads a nodule in two passes
(:func:`nodule_edge.patch.run_nodule_bounded`): the first pass on the whole cube segments the
nodule, everything outside the nodule's box plus margins becomes air, and the second pass on
that bounded cube gives the answer (README, "The model and its patch"). Occlusion runs the first
pass once, bounds the cube exactly as the runtime does, and then occludes copies of the bounded
cube; the box stays fixed. Occluding the whole cube instead would move the box whenever a block
hid part of the nodule, mixing two effects (a different box and hidden voxels) in one number.

Blocks that hide nothing (every voxel already equals the fill value, as all voxels outside the
box do with the default air fill) are not run: the occluded input equals the bounded one, so its
output difference is exactly 0, and they still count in the average. With the default options
this leaves only the blocks that touch the nodule's box.

The map is the drop in the malignancy *logit*, ``logit(p) − logit(p_occluded)``, not in the
probability: the probability saturates (a nodule at p = 0.98 loses little probability whatever is
hidden, one at p = 0.5 loses much for the same evidence), while the logit is the classifier's
additive evidence before the sigmoid, comparable across nodules and across blocks. Positive
values mark regions that support malignancy; :attr:`OcclusionResult.towards_prediction` signs
the map by the predicted class, as the Grad-CAM map is signed by p − 0.5.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nodule_edge.errors import OptionError
from nodule_edge.patch import PatchSpec, run_nodule_bounded_with_input, window_channels

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BLOCK",
    "DEFAULT_STRIDE",
    "OcclusionResult",
    "air_fill",
    "block_starts",
    "occlusion_map",
    "probability_logit",
]

log = logging.getLogger(__name__)

#: Edge of the occluding cube in voxels: 16 voxels = 8 mm at 0.5 mm, a 4 × 4 × 4 grid on the cube.
DEFAULT_BLOCK = 16
#: Step between blocks in voxels. Equal to the block (no overlap): on 57 LIDC nodules (every 12th
#: VOI of ../shared/data/lidc_voi) the nodule box needed a median 24 occluded passes (90th
#: percentile 54, at most 64; at most 32 for every nodule under 10 mm), against 147 (313, 343) with
#: stride 8. At the README's 35–44 ms per pass on the 2-core CPU that is about 1 s for the median
#: nodule, about 2.5 s for the largest. So by default the grid coarsens for large nodule boxes:
#: see :data:`AUTO_GRIDS` and :data:`DEFAULT_MAX_PASSES`.
DEFAULT_STRIDE = 16
#: (block, stride) grids tried in order when no block is given: the first whose occluded passes
#: fit :data:`DEFAULT_MAX_PASSES` is used (22/21 needs at most 27 blocks, 32/32 at most 8).
AUTO_GRIDS: tuple[tuple[int, int], ...] = ((DEFAULT_BLOCK, DEFAULT_STRIDE), (22, 21), (32, 32))
#: Occluded passes the default grid may cost: 32 passes of batch 8 keep occlusion within the
#: 1.5 s per nodule the README promises on the 2-core CPU (benches/bench_explain.py).
DEFAULT_MAX_PASSES = 32
#: Occluded cubes per engine call (batches of 8 cost less per cube than single passes on CPU).
DEFAULT_BATCH = 8

#: The engine's probabilities are float32: the largest below 1 is ``1 − 2⁻²⁴`` (logit ≈ 16.6), so a
#: malignant prediction saturates there, while towards 0 float32 keeps resolution down to its
#: smallest normal number (logit ≈ −87). Probabilities are clipped to this range before the logit.
_P_LOW = float(np.finfo(np.float32).tiny)
_P_HIGH = 1.0 - float(np.finfo(np.float32).epsneg)


@dataclass(frozen=True)
class OcclusionResult:
    """An occlusion-sensitivity map of one nodule and how it was computed.

    Attributes:
        map: float32 ``[S, S, S]`` on the patch grid: mean drop of the malignancy logit over the
            blocks that cover each voxel (positive: hiding the voxel lowers the malignancy).
        probability: Malignancy probability of the unoccluded (bounded) input.
        logit: Its logit, the reference of every drop.
        block: Edge of the occluding cube in voxels.
        stride: Step between block positions in voxels.
        fill: Value written into occluded voxels, one per channel.
        batch: Occluded cubes per engine call.
        blocks: Block positions in the grid (``len(block_starts(...)) ** 3``).
        occluded_passes: Block positions actually run (the others hid nothing: drop exactly 0).
        forward_passes: Every cube the engine read: the first and second pass of the
            nodule-bounded path plus the occluded ones.
        first_pass_found_nodule: Whether the first pass found a nodule to bound the cube to; if
            not, the whole cube was occluded (as the runtime then reads the whole cube).
        bounded_patch: ``[C, S, S, S]`` model input that was occluded (the bounded cube), for
            the faithfulness metrics of :mod:`nodule_edge.runtime.explain_metrics`.
        seconds: Wall time of the whole computation.
        logit_from_model: The logits are the model's own output (``malignancy_logit``), not
            recovered from float32 probabilities (older bundles).
    """

    map: np.ndarray
    probability: float
    logit: float
    block: int
    stride: int
    fill: tuple[float, ...]
    batch: int
    blocks: int
    occluded_passes: int
    forward_passes: int
    first_pass_found_nodule: bool
    bounded_patch: np.ndarray
    seconds: float
    logit_from_model: bool = False

    @property
    def towards_prediction(self) -> np.ndarray:
        """The map signed by the predicted class: positive where hiding weakens the prediction.

        For a nodule predicted malignant (p ≥ 0.5) this is :attr:`map`; for one predicted benign
        it is ``−map``, the same convention as the runtime's (p − 0.5)-signed Grad-CAM (README,
        outputs: ``sign_uncertain``), so the two maps can be compared directly.
        """
        return self.map if self.probability >= 0.5 else -self.map

    @property
    def saturated(self) -> bool:
        """The unoccluded probability is at float32's limit, so the map is (near) zero regardless.

        The engine returns a float32 probability; beyond a logit of about 16.6 it reads exactly 1.0
        and a block that lowers the logit from, say, 25 to 18 changes nothing measurable (towards
        0, float32 saturates only at a logit of about −87). Such a
        map says "no single block matters", not "nothing matters". Bundles whose graph outputs
        ``malignancy_logit`` (the shipped one) never saturate.
        """
        return not self.logit_from_model and not _P_LOW < self.probability < _P_HIGH


def _logits(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The malignancy logits of an engine call: the model's own output where the graph has it
    (bundles exported since the logit output was added), else recovered from the probability."""
    if "malignancy_logit" in outputs:
        return np.asarray(outputs["malignancy_logit"], dtype=np.float64).reshape(-1)
    return probability_logit(outputs["malignancy_probability"]).reshape(-1)


def probability_logit(probability: np.ndarray | float) -> np.ndarray:
    """``log(p / (1 − p))`` in float64, with p kept within float32's range of 0 and 1.

    The engine returns float32 probabilities; at saturation (p = 1.0 exactly) the logit is
    capped at ``logit(1 − 2⁻²⁴) ≈ 16.6``, at p = 0 at about −87, instead of becoming infinite.
    """
    p = np.clip(np.asarray(probability, dtype=np.float64), _P_LOW, _P_HIGH)
    return np.log(p) - np.log1p(-p)


def air_fill(spec: PatchSpec) -> np.ndarray:
    """The windowed value of ``spec.outside_hu`` per channel: what the cube holds outside the scan.

    The same value fills the cube outside the nodule box (:func:`nodule_edge.patch.bound_to_nodule`),
    so occluding with it makes a block look like the air the model already sees around the box.
    """
    return window_channels(np.full((1, 1, 1), spec.outside_hu, np.float32), spec)[:, 0, 0, 0]


def block_starts(size: int, block: int, stride: int) -> list[int]:
    """First index of each block along one axis, as Captum's Occlusion places them.

    The first block starts at 0 and blocks step by ``stride`` until the axis is covered; the last
    may run past the edge and is then cut off (``ceil((size − block) / stride) + 1`` blocks).
    """
    _check_options(size, block, stride)
    count = math.ceil((size - block) / stride) + 1
    return [i * stride for i in range(count)]


def occlusion_map(
    run: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    patch: np.ndarray,
    spec: PatchSpec,
    *,
    block: int | None = None,
    stride: int | None = None,
    fill: float | Sequence[float] | None = None,
    batch: int = DEFAULT_BATCH,
    max_passes: int = DEFAULT_MAX_PASSES,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> OcclusionResult:
    """Occlusion sensitivity of the malignancy logit on the nodule-bounded input of one nodule.

    Args:
        run: The engine, ``patches [N, C, S, S, S] float32 -> outputs`` with
            ``malignancy_probability [N]`` and ``segmentation [N, S, S, S]`` (e.g.
            ``NoduleInferer().engine.run``).
        patch: Whole-cube model input ``[C, S, S, S]`` of one nodule (``NoduleResult.patch``).
        spec: The model's patch spec (``NoduleInferer().spec``); its nodule box decides the
            bounding, its windows and ``outside_hu`` the default fill.
        block: Edge of the occluding cube in voxels, 1 ≤ block ≤ S. None: the first grid of
            :data:`AUTO_GRIDS` whose occluded passes fit ``max_passes`` (the grid used is
            recorded in the result).
        stride: Step between blocks in voxels, 1 ≤ stride ≤ block (a larger step would leave
            voxels that no block covers, with no value in the map); None: the block. A stride
            without a block uses :data:`DEFAULT_BLOCK`.
        max_passes: Budget of occluded passes for the automatic grid (ignored when ``block``
            is given).
        fill: Value of occluded voxels: one number for every channel or one per channel.
            Default: :func:`air_fill`, the windowed air of ``spec.outside_hu``.
        batch: Occluded cubes per engine call, ≥ 1.
        segment: The engine's first pass (``NoduleInferer().engine.segment``), so that the box is
            the one the runtime draws; None: the segmentation of ``run``.

    Returns:
        The map on the patch grid and what it cost (:class:`OcclusionResult`).

    Raises:
        OptionError: An option is out of range (the message names it and its value), or the
            patch does not have the spec's shape or holds non-finite values.
    """
    t0 = time.perf_counter()
    size, channels = spec.size, spec.channels
    if block is None and stride is None:
        grids = AUTO_GRIDS
    else:
        chosen = DEFAULT_BLOCK if block is None else block
        grids = ((chosen, chosen if stride is None else stride),)
    for grid_block, grid_stride in grids:
        _check_options(size, grid_block, grid_stride)
    if len(grids) > 1 and (
        isinstance(max_passes, bool) or not isinstance(max_passes, numbers.Integral) or max_passes < 1
    ):
        raise OptionError(f"occlusion max_passes must be an integer >= 1, got {max_passes!r}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise OptionError(f"occlusion batch must be an integer >= 1, got {batch!r}")
    fill_values = _fill_values(fill, spec)
    patch = np.asarray(patch, dtype=np.float32)
    expected = (channels, size, size, size)
    if patch.shape != expected:
        raise OptionError(
            f"occlusion patch must have shape {list(expected)} (one nodule's cube), got {list(patch.shape)}"
        )
    if not np.isfinite(patch).all():
        raise OptionError("occlusion patch holds NaN or infinite values")

    # The runtime's own two-pass path, keeping the cube its second pass reads.
    outputs, found, answered = run_nodule_bounded_with_input(run, patch[None], spec, segment=segment)
    bounded = np.array(answered[0], dtype=np.float32)
    model_passes = 1 if spec.nodule_box is None else 2
    probability = float(np.asarray(outputs["malignancy_probability"]).reshape(-1)[0])
    has_logit = "malignancy_logit" in outputs
    reference = float(_logits(outputs)[0])
    if not has_logit and not _P_LOW < probability < _P_HIGH:  # OcclusionResult.saturated
        log.warning(
            "occlusion: the malignancy probability %.8g is saturated in float32 (logit capped at %.1f): the map cannot show drops",
            probability,
            reference,
        )

    fill_cube = fill_values[:, None, None, None]
    for used_block, used_stride in grids:
        starts, regions, count = _grid(bounded, fill_cube, size, used_block, used_stride)
        if len(regions) <= max_passes:
            break
    total = np.zeros((size, size, size), np.float64)

    for first in range(0, len(regions), batch):
        chunk = regions[first : first + batch]
        cubes = np.repeat(bounded[None], len(chunk), axis=0)
        for i, region in enumerate(chunk):
            cubes[(i, slice(None), *region)] = fill_cube
        drops = reference - _logits(run(cubes))
        for region, drop in zip(chunk, drops):
            total[region] += drop

    result_map = (total / count).astype(np.float32)
    seconds = time.perf_counter() - t0
    log.info(
        "occlusion: %d of %d blocks run (block %d, stride %d), %d forward passes, %.2f s",
        len(regions),
        len(starts) ** 3,
        used_block,
        used_stride,
        len(regions) + model_passes,
        seconds,
    )
    return OcclusionResult(
        map=result_map,
        probability=probability,
        logit=reference,
        block=int(used_block),
        stride=int(used_stride),
        fill=tuple(float(v) for v in fill_values),
        batch=int(batch),
        blocks=len(starts) ** 3,
        occluded_passes=len(regions),
        forward_passes=len(regions) + model_passes,
        first_pass_found_nodule=bool(found[0]),
        logit_from_model=has_logit,
        bounded_patch=bounded,
        seconds=seconds,
    )


def _grid(
    bounded: np.ndarray, fill_cube: np.ndarray, size: int, block: int, stride: int
) -> tuple[list[int], list[tuple[slice, slice, slice]], np.ndarray]:
    """Block starts, the blocks that hide something, and how many blocks cover each voxel."""
    starts = block_starts(size, block, stride)
    regions: list[tuple[slice, slice, slice]] = []
    count = np.zeros((size, size, size), np.int32)
    for z in starts:
        for y in starts:
            for x in starts:
                region = (slice(z, z + block), slice(y, y + block), slice(x, x + block))
                count[region] += 1
                # A block that hides nothing leaves the input, and so the output, unchanged.
                view = bounded[(slice(None), *region)]
                if not np.array_equal(view, np.broadcast_to(fill_cube, view.shape)):
                    regions.append(region)
    return starts, regions, count


def _check_options(size: int, block: int, stride: int) -> None:
    """Range checks of the grid options; the messages name the option and the value given."""
    if isinstance(block, bool) or not isinstance(block, numbers.Integral):
        raise OptionError(f"occlusion block must be a whole number of voxels, got {block!r}")
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral):
        raise OptionError(f"occlusion stride must be a whole number of voxels, got {stride!r}")
    if not 1 <= block <= size:
        raise OptionError(f"occlusion block must lie in [1, {size}] voxels (the cube's edge), got {block}")
    if stride < 1:
        raise OptionError(f"occlusion stride must be >= 1 voxel, got {stride}")
    if stride > block:
        raise OptionError(
            f"occlusion stride {stride} exceeds block {block}: voxels between blocks would never be occluded"
        )


def _fill_values(fill: float | Sequence[float] | None, spec: PatchSpec) -> np.ndarray:
    """Per-channel fill values (float32), the spec's air by default; rejects non-finite values."""
    if fill is None:
        return air_fill(spec).astype(np.float32)
    try:
        values = np.asarray(fill, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"occlusion fill must be a number or one number per channel, got {fill!r}") from exc
    if values.size == 1:
        values = np.repeat(values, spec.channels)
    if values.size != spec.channels:
        raise OptionError(f"occlusion fill must be one number or {spec.channels} (one per channel), got {fill!r}")
    if not np.isfinite(values).all():
        raise OptionError(f"occlusion fill must be finite, got {fill!r}")
    return values.astype(np.float32)

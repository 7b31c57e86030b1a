"""Explanations the torch-free runtime computes, and how far each can be trusted.

``infer --explain gradcam,occlusion`` asks for one saliency map per method on the patch grid:

* ``gradcam``: the model's in-graph Grad-CAM (every inference has it; README, Outputs);
* ``occlusion``: occlusion sensitivity computed with the engine alone
  (:func:`nodule_edge.runtime.occlusion.occlusion_map`), signed towards the prediction.

The PyTorch methods (integrated gradients, gradient × input, SmoothGrad, SHAP, LIME, LRP) need the
model's weights and the ``explain`` extra; they run in ``nodule-edge explain-compare``
(:mod:`nodule_edge.train.explain`), not in the runtime. Asking ``infer`` for one says so.

For each map the localisation metrics against the predicted nodule (pointing game, saliency mass
inside; :mod:`nodule_edge.runtime.explain_metrics`, Quantus definitions) are reported, and, when
``faithfulness`` is asked for, the deletion and insertion areas. With both methods, their rank
agreement (Spearman inside the cube) is a second, independent trust signal: below the bundle's
threshold (chosen on held-out nodules by ``explain-compare`` and stored in the bundle manifest
under ``explanations``) the nodule is not trustworthy, with the reason given.

Example:
    >>> result = inferer.infer("study/", voxels=[(120, 88, 54)])
    >>> explained = explain_nodule(inferer, result.nodules[0], ("gradcam", "occlusion"))
    >>> explained.maps["occlusion"].metrics["pointing_game"], explained.agreement
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nodule_edge.errors import BundleError, OptionError
from nodule_edge.explanation_methods import RUNTIME_METHODS, TORCH_METHODS
from nodule_edge.runtime.explain_metrics import (
    deletion_curve,
    insertion_curve,
    pointing_game,
    rank_correlation,
    relevance_mass_accuracy,
)
from nodule_edge.runtime.occlusion import occlusion_map

__all__ = [
    "RUNTIME_METHODS",
    "TORCH_METHODS",
    "AgreementCheck",
    "ExplainedNodule",
    "Explanation",
    "agreement_threshold",
    "explain_nodule",
    "parse_methods",
]

log = logging.getLogger(__name__)


def parse_methods(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"gradcam,occlusion"`` → ``("gradcam", "occlusion")``, checked.

    Raises:
        OptionError: Empty, repeated or unknown method, or a PyTorch method (named, with
            where it runs instead).
    """
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not t for t in items):
        raise OptionError(f"--explain expects comma-separated methods ({', '.join(RUNTIME_METHODS)}), got {text!r}")
    for item in items:
        if item in TORCH_METHODS:
            raise OptionError(
                f"explanation method {item!r} needs the PyTorch model and runs in 'nodule-edge explain-compare' "
                f"(pip install 'nodule-edge[explain]'); infer computes {', '.join(RUNTIME_METHODS)}"
            )
        if item not in RUNTIME_METHODS:
            raise OptionError(
                f"unknown explanation method {item!r}; infer computes {', '.join(RUNTIME_METHODS)} (and explain-compare also {', '.join(TORCH_METHODS)})"
            )
    if len(set(items)) != len(items):
        raise OptionError(f"--explain lists a method twice: {text!r}")
    return tuple(items)


@dataclass
class Explanation:
    """One method's map of one nodule.

    Attributes:
        method: ``gradcam`` or ``occlusion``.
        map: ``[S, S, S]`` on the patch grid, signed towards the prediction (positive: evidence
            for the predicted class).
        display: The map scaled to [0, 1] for overlays and NIfTI files (negative evidence at 0).
        options: What the method was run with (block, stride, fill for occlusion).
        seconds: Wall time of the method (0 for Grad-CAM, which every inference computes).
        metrics: pointing_game, mass_inside and, with faithfulness, deletion_auc/insertion_auc.
    """

    method: str
    map: np.ndarray
    display: np.ndarray
    options: dict[str, Any]
    seconds: float
    metrics: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class AgreementCheck:
    """Grad-CAM against occlusion: Spearman inside the cube, and the bundle's threshold."""

    spearman: float
    threshold: float | None
    source: str | None

    @property
    def agrees(self) -> bool | None:
        """False when the methods disagree beyond the threshold; None without one."""
        if self.threshold is None or not np.isfinite(self.spearman):
            return None
        return bool(self.spearman >= self.threshold)


@dataclass
class ExplainedNodule:
    """Every requested method's map, and the agreement check when both ran."""

    maps: dict[str, Explanation]
    agreement: AgreementCheck | None = None

    @property
    def trust_reasons(self) -> list[str]:
        """Why the explanations say 'do not trust' (empty when they do not)."""
        if self.agreement is not None and self.agreement.agrees is False:
            return [
                f"Grad-CAM and occlusion disagree (Spearman {self.agreement.spearman:.2f} < {self.agreement.threshold:.2f}, the threshold chosen on {self.agreement.source})"
            ]
        return []


def agreement_threshold(manifest: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """The bundle's Grad-CAM/occlusion agreement threshold and what it was chosen on."""
    section = manifest.get("explanations")
    if section is None:
        return None, None
    try:
        return float(section["agreement_threshold"]), str(section.get("source", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle manifest 'explanations' is malformed ({exc}): {section!r}") from exc


def _display(signed: np.ndarray) -> np.ndarray:
    top = float(np.max(signed)) if signed.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros_like(signed, dtype=np.float32)
    return np.clip(signed / top, 0.0, 1.0).astype(np.float32)


def explain_nodule(
    inferer: Any,
    nodule: Any,
    methods: Sequence[str],
    *,
    occlusion_options: Mapping[str, Any] | None = None,
    faithfulness: bool = False,
    curve_steps: int = 16,
) -> ExplainedNodule:
    """Compute ``methods`` for one diagnosed nodule, with their metrics.

    Args:
        inferer: The :class:`~nodule_edge.runtime.NoduleInferer` that diagnosed it.
        nodule: A :class:`~nodule_edge.runtime.NoduleResult` (its whole-cube ``patch`` is used).
        methods: From :func:`parse_methods`.
        occlusion_options: ``block``, ``stride``, ``fill``, ``batch``, ``max_passes`` for
            :func:`~nodule_edge.runtime.occlusion.occlusion_map`.
        faithfulness: Also compute the deletion and insertion areas (``curve_steps`` engine
            passes each, per method).
        curve_steps: Steps of the deletion and insertion curves.

    Raises:
        OptionError: A bad method or option (named).
    """
    methods = parse_methods(methods)
    spec = inferer.spec
    pred = nodule.prediction
    mask = pred.segmentation >= (spec.nodule_box.threshold if spec.nodule_box is not None else 0.5)
    sign = 1.0 if pred.malignancy_probability >= 0.5 else -1.0
    maps: dict[str, Explanation] = {}
    occluded = None
    if "occlusion" in methods:
        try:
            occluded = occlusion_map(
                inferer.model_run(pred),
                nodule.patch,
                spec,
                segment=inferer.engine.segment,
                **dict(occlusion_options or {}),
            )
        except OptionError:
            raise
        except ValueError as exc:
            raise OptionError(str(exc)) from exc
        except TypeError as exc:  # an unknown option name
            raise OptionError(f"unknown occlusion option: {exc}") from exc
    if "gradcam" in methods:
        # The runtime's Grad-CAM is normalised to [0, 1] towards the prediction (README, Outputs).
        cam = np.asarray(pred.saliency, dtype=np.float32)
        maps["gradcam"] = Explanation(
            "gradcam", cam, _display(cam), {"target": "malignancy logit, signed by p - 0.5"}, 0.0
        )
    if occluded is not None:
        signed = np.asarray(occluded.towards_prediction, dtype=np.float32)
        options = {
            "block": occluded.block,
            "stride": occluded.stride,
            "fill": list(occluded.fill),
            "batch": occluded.batch,
            "forward_passes": occluded.forward_passes,
            "target": "malignancy logit drop, signed towards the prediction",
        }
        maps["occlusion"] = Explanation("occlusion", signed, _display(signed), options, round(occluded.seconds, 4))
    maps = {m: maps[m] for m in methods}  # in the order asked
    for exp in maps.values():
        exp.metrics["pointing_game"] = _finite(pointing_game(exp.map, mask)) if mask.any() else None
        exp.metrics["mass_inside"] = (
            _finite(relevance_mass_accuracy(np.clip(exp.map, 0, None), mask)) if mask.any() else None
        )
    if faithfulness:
        bounded = occluded.bounded_patch if occluded is not None else _bounded(inferer, nodule.patch)
        target = 1 if sign > 0 else 0
        run = inferer.model_run(pred)

        def score(x: np.ndarray) -> np.ndarray:
            return np.asarray(run(np.asarray(x, np.float32))["malignancy_probability"], dtype=np.float64)

        for exp in maps.values():
            t0 = time.perf_counter()
            exp.metrics["deletion_auc"] = round(
                deletion_curve(score, bounded, exp.map, steps=curve_steps, target=target).auc, 6
            )
            exp.metrics["insertion_auc"] = round(
                insertion_curve(score, bounded, exp.map, steps=curve_steps, target=target).auc, 6
            )
            exp.metrics["curve_steps"] = curve_steps
            exp.seconds = round(exp.seconds + time.perf_counter() - t0, 4)
    agreement = None
    if "gradcam" in maps and "occlusion" in maps:
        threshold, source = agreement_threshold(inferer.bundle.manifest)
        agreement = AgreementCheck(
            _finite(rank_correlation(maps["gradcam"].map, maps["occlusion"].map)) or float("nan"), threshold, source
        )
    return ExplainedNodule(maps, agreement)


def _bounded(inferer: Any, patch: np.ndarray) -> np.ndarray:
    """The cube the second pass reads (the first pass's box), as occlusion records it."""
    from nodule_edge.patch import run_nodule_bounded_with_input

    _, _, answered = run_nodule_bounded_with_input(
        inferer.engine.run, patch[None], inferer.spec, segment=inferer.engine.segment
    )
    return np.asarray(answered[0], np.float32)


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None

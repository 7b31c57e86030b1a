"""Post-hoc attribution maps of the malignancy logit with Captum, beside the in-graph Grad-CAM.

One entry point, :func:`explain`, runs one of :data:`METHODS` on one nodule's patch and returns an
:class:`ExplanationMap` on the patch grid. Every method explains the same scalar, the malignancy
*logit* (the classifier's additive evidence before the sigmoid; the probability saturates, see
:mod:`nodule_edge.runtime.occlusion`), and the same input: the runtime reads a nodule in two
passes (:func:`nodule_edge.patch.run_nodule_bounded`; README, "The model and its patch"), the
first on the whole cube draws the nodule's box from its segmentation, everything outside the box
becomes air, and the second pass on that bounded cube gives the answer. :func:`explain` runs the
first pass once, bounds the cube with :func:`nodule_edge.patch.bound_to_nodule` as the runtime
does, and explains the second pass; the box stays fixed while a method perturbs the input.

The map is the per-voxel attribution **summed over the two input channels** (lung and
mediastinal window), signed: positive values push towards malignant. A sum keeps the additive
reading of the methods that have one (integrated gradients: the map sums to
``logit(input) − logit(baseline)``); the per-channel attributions are kept beside it.

Methods and their Captum classes (Kokhlikyan et al. 2020, arXiv:2009.07896):

* ``integrated_gradients``: ``IntegratedGradients`` (Sundararajan et al. 2017,
  arXiv:1703.01365) from the air cube, the value every voxel outside the nodule's box gets
  (``spec.outside_hu`` after windowing), so the attribution is the evidence of the nodule and
  its margin against the model's own "nothing here" input. The path is the straight line, but
  its quadrature nodes are crowded towards the baseline (``warp``, see
  :class:`~nodule_edge.train.explain_methods._Warped`): the stem is a convolution without bias followed by GroupNorm, which cancels the input's scale, and
  air windows to 0, so along ``α·x`` the backbone's output changes almost entirely at α < 10⁻⁴
  (a fold-0 test nodule: logit −1.3 at α = 10⁻⁶, +3.2 at 10⁻⁴, 8.9 at 1). With Captum's
  evenly spread Gauss–Legendre nodes the attributions of three fold-0 test nodules summed to 34,
  −154 and 157 % of ``logit(input) − logit(air)`` at 32 steps (58 % for the first at 128 steps);
  with ``warp=5`` Captum's convergence delta is 0.5, 26 and 14 % of the logit difference at 32
  steps (the remaining error did not fall steadily with more steps: the path is not smooth).
* ``gradient_x_input``: ``InputXGradient`` (Shrikumar et al. 2016, arXiv:1605.01713).
* ``saliency``: ``Saliency`` with ``abs=False``: the plain, signed gradient (Simonyan et al.
  2013, arXiv:1312.6034, take its absolute value; ``absolute=True`` does that).
* ``smoothgrad``: ``NoiseTunnel(Saliency)`` with ``nt_type="smoothgrad"``, the mean signed
  gradient over Gaussian-noised copies (Smilkov et al. 2017, arXiv:1706.03825, who recommend a
  noise of 10–20 % of the input range; the input range is [0, 1]).
* ``gradient_shap``: ``GradientShap`` (Lundberg & Lee 2017, arXiv:1705.07874, the expected
  gradients variant) against the air cube and a few air cubes with CT noise (Gaussian noise in
  HU, then windowed as a scan would be). Its points on the path are drawn uniformly, so the
  scale invariance above biases it as it biases plain integrated gradients: the convergence
  delta (mean over samples) was −3.0, −1.7 and −1.9 logits on the three fold-0 test nodules.
* ``lime``: ``Lime`` (Ribeiro et al. 2016, arXiv:1602.04938) over cubic super-voxels (``block``
  voxels on an edge, both channels together), an absent super-voxel being air. Captum's default
  surrogate, scikit-learn's Lasso, needs a package the ``explain`` extra does not carry; the
  surrogate here is a closed-form weighted ridge regression in torch
  (:class:`~nodule_edge.train.explain_methods._WeightedRidge`).
  Super-voxels in which every voxel already is air (all of those outside the nodule's box) are
  one inert feature: switching it off changes nothing, so its attribution is set to exactly 0.
  The box of a fold-0 test nodule held 32 to 448 of the 512 super-voxels of 8³ voxels: beyond
  ``samples`` of them the surrogate is under-determined and the ridge penalty decides the split.
  Each super-voxel's coefficient is spread evenly over its voxels and channels, so the map
  summed over a super-voxel is the surrogate's logit change when the super-voxel turns to air.
* ``lrp``: ``LRP`` (Bach et al. 2015, doi:10.1371/journal.pone.0130140). Captum has default
  rules for 2-D layers only; :data:`LRP_RULES` adds LRP-ε for ``Conv3d`` and ``Linear`` and the
  identity rule for ``GroupNorm``, and a model with a leaf layer no rule covers is refused with
  a :class:`~nodule_edge.errors.ConfigError` naming the layer types. It runs, but relevance is
  not conserved on this model; :func:`~nodule_edge.train.explain_methods._lrp` says why and by
  how much.

For a :class:`~nodule_edge.train.model.CollaborativeNet` every method differentiates the logit
itself, not the forward's graph, which detaches the segmentation on its way to the size
statistics (:func:`_collaborative_logit`).

Every call records the options it ran with (defaults filled in) and its wall time. The methods'
runners (Captum calls, the warped path, LIME's features and surrogate, the LRP rules) live in
:mod:`nodule_edge.train.explain_methods`; this module checks the options and builds what they run on.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nodule_edge.errors import ConfigError, require
from nodule_edge.patch import PatchSpec, bound_to_nodule, window_channels
from nodule_edge.train.explain_methods import LRP_RULES, RUNNERS
from nodule_edge.train.model import CollaborativeNet, segmentation_statistics

__all__ = [
    "METHODS",
    "DEFAULT_OPTIONS",
    "LRP_RULES",
    "ExplanationMap",
    "explain",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Option:
    """One option of a method: its default and the values it accepts."""

    default: Any
    kind: str  # "int>=0", "int>=1", "float>0", "float>=0", "float>=1", "bool", "choice"
    choices: tuple[str, ...] = ()


_IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")

# Defaults keep each method to 15 s or less per nodule with the shipped model on the 2-core CPU at
# one thread, where a forward and backward pass over a 64³ cube takes about 0.5 s and a forward pass
# about 0.15 s. Measured on three fold-0 test nodules (runs/shipped/fold0/refit.safetensors, load
# average 3–6 from other work on the machine): integrated gradients 12.9–14.3 s, gradient SHAP
# 14.1–14.6 s, LIME 10.4–11.5 s, SmoothGrad 8.3–9.1 s, LRP 0.7–1.0 s, gradient × input and the
# gradient 0.5–1.0 s. ``batch`` is the number of cubes per model call (8 cubes cost about as much per
# cube as one, and bound the memory of a backward pass).
_OPTIONS: dict[str, dict[str, _Option]] = {
    "integrated_gradients": {
        "steps": _Option(32, "int>=1"),
        "warp": _Option(5.0, "float>=1"),
        "integration": _Option("gausslegendre", "choice", _IG_METHODS),
        "batch": _Option(8, "int>=1"),
    },
    "gradient_x_input": {},
    "saliency": {
        "absolute": _Option(False, "bool"),
    },
    "smoothgrad": {
        "samples": _Option(24, "int>=1"),
        "noise_sd": _Option(0.15, "float>=0"),
        "batch": _Option(8, "int>=1"),
        "seed": _Option(0, "int>=0"),
    },
    "gradient_shap": {
        "samples": _Option(24, "int>=1"),
        "noisy_baselines": _Option(3, "int>=0"),
        "baseline_noise_hu": _Option(30.0, "float>=0"),
        "noise_sd": _Option(0.0, "float>=0"),
        "batch": _Option(8, "int>=1"),
        "seed": _Option(0, "int>=0"),
    },
    "lime": {
        "samples": _Option(96, "int>=1"),
        "block": _Option(8, "int>=1"),
        "alpha": _Option(1e-3, "float>0"),
        "batch": _Option(8, "int>=1"),
        "seed": _Option(0, "int>=0"),
    },
    "lrp": {
        "epsilon": _Option(1.0, "float>0"),
        "groupnorm_rule": _Option("identity", "choice", ("identity", "epsilon")),
    },
}

#: The methods :func:`explain` runs.
METHODS: tuple[str, ...] = tuple(_OPTIONS)
#: Each method's options and their defaults.
DEFAULT_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    m: {k: o.default for k, o in opts.items()} for m, opts in _OPTIONS.items()
}

_CAPTUM_CLASSES = {
    "integrated_gradients": "IntegratedGradients",
    "gradient_x_input": "InputXGradient",
    "saliency": "Saliency",
    "smoothgrad": "NoiseTunnel(Saliency)",
    "gradient_shap": "GradientShap",
    "lime": "Lime",
    "lrp": "LRP",
}


@dataclass(frozen=True)
class ExplanationMap:
    """An attribution map of one nodule's malignancy logit and how it was computed.

    Attributes:
        method: One of :data:`METHODS`.
        captum_class: The Captum attribution class that computed it.
        map: float32 ``[S, S, S]`` on the patch grid: ``attributions`` summed over the channels.
        attributions: float32 ``[C, S, S, S]``, one map per input channel.
        input: float32 ``[C, S, S, S]``, the input explained: the nodule-bounded patch of the
            second pass (the whole patch where the spec has no nodule box or the first pass found
            no nodule).
        nodule_found: Whether the first pass found a nodule (always True without a nodule box).
        logit: The malignancy logit of ``input``.
        baseline_logit: The logit of the baseline (integrated gradients), else None.
        convergence_delta: Captum's convergence delta where the method has one (integrated
            gradients, gradient SHAP: mean over samples, LRP): the sum of the attributions minus
            the output difference they should add up to; else None.
        options: The options the call ran with, defaults filled in.
        seconds: Wall time of the call, first pass and bounding included.
    """

    method: str
    captum_class: str
    map: np.ndarray
    attributions: np.ndarray
    input: np.ndarray
    nodule_found: bool
    logit: float
    baseline_logit: float | None
    convergence_delta: float | None
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class _Logit(nn.Module):
    """The malignancy logit ``[N]`` of a model that returns a ``ModelOutput`` or the logit itself.

    A module (not a function) so that LRP finds the model's layers among its children. For a
    :class:`CollaborativeNet` the logit comes from :func:`_collaborative_logit`: the same value as
    its forward, with a gradient that is the derivative of that value.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.model) is CollaborativeNet:  # a subclass may have changed the forward
            return _collaborative_logit(self.model, x)
        return _logit_of(self.model(x))


def _collaborative_logit(model: CollaborativeNet, x: torch.Tensor) -> torch.Tensor:
    """:meth:`CollaborativeNet.forward` up to the malignancy logit, without the segmentation's detach.

    The forward detaches the segmentation where it computes the size statistics, so that in
    training the classifier cannot resize the outline (model.py, "Size-aware heads"). The logit
    still depends on the input through that path: autograd's gradient of the forward is then not
    the derivative of the logit (on a fold-0 test nodule, d logit(αx)/dα at α = 0.001 is −258 by
    finite differences and −134 by autograd), and integrated gradients cannot add up to the
    logit difference. Here the same layers run in the same order with the detach left out: the
    value is the forward's (tests/train/test_explain.py checks it for every decoder and head
    variant), the gradient is the logit's.
    """
    stem = F.relu(model.stem(x))
    feats = model.block3(model.block2(model.block1(stem)))
    if model.config.decoder == "unet64":
        seg = torch.sigmoid(model.seg_head(feats, stem, x))
        coarse = F.avg_pool3d(seg, seg.shape[-1] // feats.shape[-1])
    else:
        seg = coarse = torch.sigmoid(model.seg_head(feats))
    fused = F.relu(feats + model.fusion(coarse))
    pooled = fused.mean(dim=(2, 3, 4))
    stats = segmentation_statistics(seg, x, model.config.voxel_mm) if model.config.seg_features else None
    logit, _, _, _ = model._heads(pooled, stats)
    return logit


def _logit_of(output: Any) -> torch.Tensor:
    logit = getattr(output, "malignancy_logit", output)
    if not isinstance(logit, torch.Tensor):
        raise ConfigError(
            f"explain needs a model that returns a ModelOutput or a logit tensor [N], got {type(output).__name__}"
        )
    if logit.dim() == 2 and logit.shape[1] == 1:
        logit = logit[:, 0]
    if logit.dim() != 1:
        raise ConfigError(f"explain needs one malignancy logit per cube (shape [N]), got shape {list(logit.shape)}")
    return logit


def explain(
    model: nn.Module,
    patch: np.ndarray | torch.Tensor,
    method: str,
    *,
    spec: PatchSpec,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    **options: Any,
) -> ExplanationMap:
    """Attribution map of the malignancy logit of one nodule, by one of :data:`METHODS`.

    Args:
        model: A :class:`~nodule_edge.train.model.CollaborativeNet` or any module mapping cubes
            ``[N, C, S, S, S]`` to an object with ``malignancy_logit`` ``[N]`` (and
            ``segmentation`` ``[N, 1, D, D, D]`` where ``spec`` has a nodule box) or to the logit
            tensor itself. It runs in eval mode; its training flag is restored afterwards.
        patch: The whole cube of one nodule, ``[C, S, S, S]`` windowed to [0, 1] (what
            :func:`nodule_edge.patch.build_patch` returns).
        method: One of :data:`METHODS`.
        spec: The patch definition the model reads; with a nodule box the map explains the
            second, nodule-bounded pass.
        segment: The first pass when it is not the model's own segmentation (a box net,
            :func:`nodule_edge.train.first_pass.box_net_segmenter`): ``patches -> [N, S, S, S]``.
        **options: Method options; :data:`DEFAULT_OPTIONS` lists them with their defaults.

            * ``integrated_gradients``: ``steps`` (quadrature nodes), ``warp`` (power ≥ 1 that
              crowds the nodes towards the baseline; 1 is Captum's plain integral),
              ``integration`` (Captum's ``method``), ``batch``.
            * ``saliency``: ``absolute`` (the gradient's absolute value, as Simonyan et al.).
            * ``smoothgrad``: ``samples``, ``noise_sd`` (standard deviation of the Gaussian noise
              on the [0, 1] input), ``batch``, ``seed``.
            * ``gradient_shap``: ``samples``, ``noisy_baselines`` (air cubes with CT noise beside
              the plain air cube), ``baseline_noise_hu`` (their noise in HU), ``noise_sd``
              (Captum's ``stdevs``, noise on the input), ``batch``, ``seed``.
            * ``lime``: ``samples``, ``block`` (super-voxel edge in voxels), ``alpha`` (ridge
              penalty of the surrogate), ``batch``, ``seed``.
            * ``lrp``: ``epsilon`` (of every ε-rule), ``groupnorm_rule`` (``"identity"`` or
              ``"epsilon"``).

    Returns:
        The map, the input it explains, the logit and the options and time of the call.

    Raises:
        ConfigError: Unknown method or option, an option value out of range, a model whose
            output is not a logit, a nodule box with a model without segmentation, or ``lrp`` on a
            model with a layer no LRP rule covers.
        ValueError: A patch that is not one finite cube of the spec's shape.
        MissingDependencyError: Captum is not installed (the ``explain`` extra).
    """
    start = time.perf_counter()
    if method not in _OPTIONS:
        raise ConfigError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    resolved = _resolve_options(method, options)
    if method == "lime" and resolved["block"] > spec.size:
        raise ConfigError(
            f"lime option block must lie in [1, {spec.size}] voxels (the cube's edge), got {resolved['block']}"
        )
    cube = _check_patch(patch, spec)
    require("captum", "explain")

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        bounded, found = _second_pass_input(model, cube, spec, dtype, device, segment)
        x = torch.from_numpy(bounded).to(device=device, dtype=dtype)[None]
        forward = _Logit(model)
        with torch.no_grad():
            logit = float(forward(x)[0])
        air = torch.from_numpy(_air(spec)).to(device=device, dtype=dtype).view(1, -1, 1, 1, 1).expand_as(x).contiguous()
        attributions, baseline_logit, delta = RUNNERS[method](forward, x, air, spec, resolved)
    finally:
        model.train(was_training)

    values = attributions.detach()[0].to(torch.float32).cpu().numpy()
    result = ExplanationMap(
        method=method,
        captum_class=_CAPTUM_CLASSES[method],
        map=values.sum(axis=0),
        attributions=values,
        input=bounded,
        nodule_found=found,
        logit=logit,
        baseline_logit=baseline_logit,
        convergence_delta=delta,
        options=resolved,
        seconds=time.perf_counter() - start,
    )
    log.debug("explain %s: %.2f s, options %s, logit %.3f, delta %s", method, result.seconds, resolved, logit, delta)
    return result


def _resolve_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    spec = _OPTIONS[method]
    unknown = sorted(set(options) - set(spec))
    if unknown:
        known = ", ".join(spec) if spec else "none"
        raise ConfigError(
            f"explanation method {method!r} has no option {', '.join(map(repr, unknown))}; its options: {known}"
        )
    resolved = {}
    for name, opt in spec.items():
        value = options.get(name, opt.default)
        resolved[name] = _check_option(method, name, value, opt)
    return resolved


def _check_option(method: str, name: str, value: Any, opt: _Option) -> Any:
    where = f"{method} option {name}"
    if opt.kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{where} must be True or False, got {value!r}")
        return bool(value)
    if opt.kind == "choice":
        if value not in opt.choices:
            raise ConfigError(f"{where} must be one of {', '.join(opt.choices)}, got {value!r}")
        return value
    if opt.kind.startswith("int"):
        low = int(opt.kind[-1])
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(f"{where} must be an integer >= {low}, got {value!r}")
        return int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    value = float(value)
    if opt.kind == "float>0" and not value > 0:
        raise ConfigError(f"{where} must be > 0, got {value!r}")
    if opt.kind == "float>=0" and not value >= 0:
        raise ConfigError(f"{where} must be >= 0, got {value!r}")
    if opt.kind == "float>=1" and not value >= 1:
        raise ConfigError(f"{where} must be >= 1, got {value!r}")
    return float(value)


def _check_patch(patch: np.ndarray | torch.Tensor, spec: PatchSpec) -> np.ndarray:
    if isinstance(patch, torch.Tensor):
        patch = patch.detach().cpu().numpy()
    cube = np.asarray(patch, dtype=np.float32)
    expected = (spec.channels, spec.size, spec.size, spec.size)
    if cube.shape != expected:
        raise ValueError(
            f"explain needs one patch of shape {list(expected)} (one nodule's cube), got {list(cube.shape)}"
        )
    if not np.isfinite(cube).all():
        raise ValueError("explain patch holds NaN or infinite values")
    return cube


def _air(spec: PatchSpec) -> np.ndarray:
    """Per-channel windowed value of ``spec.outside_hu``: what voxels outside the box get."""
    return window_channels(np.full((1, 1, 1), spec.outside_hu, np.float32), spec)[:, 0, 0, 0]


def _second_pass_input(
    model: nn.Module,
    cube: np.ndarray,
    spec: PatchSpec,
    dtype: torch.dtype,
    device: torch.device,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, bool]:
    """The cube the runtime's second pass reads (the first pass's box applied) and whether it found a nodule."""
    if spec.nodule_box is None:
        return cube, True
    if segment is not None:
        return bound_to_nodule(cube, np.asarray(segment(cube[None]))[0], spec)
    with torch.no_grad():
        output = model(torch.from_numpy(cube).to(device=device, dtype=dtype)[None])
    seg = getattr(output, "segmentation", None)
    if not isinstance(seg, torch.Tensor):
        raise ConfigError(
            "the patch spec has a nodule box, but the model returns no segmentation to draw it from; "
            "pass a spec with nodule_box=None to explain the whole cube"
        )
    seg = seg.float()
    if seg.shape[-1] != spec.size:
        # The light16 decoder segments at 16³: up-sample as the evaluation does (trainer.predict).
        seg = F.interpolate(seg, size=(spec.size,) * 3, mode="trilinear", align_corners=False)
    return bound_to_nodule(cube, seg[0, 0].cpu().numpy(), spec)

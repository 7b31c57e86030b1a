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
  its quadrature nodes are crowded towards the baseline (``warp``, see :class:`_Warped`): the
  stem is a convolution without bias followed by GroupNorm, which cancels the input's scale, and
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
  surrogate here is a closed-form weighted ridge regression in torch (:class:`_WeightedRidge`).
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
  not conserved on this model; :func:`_lrp` says why and by how much.

For a :class:`~nodule_edge.train.model.CollaborativeNet` every method differentiates the logit
itself, not the forward's graph, which detaches the segmentation on its way to the size
statistics (:func:`_collaborative_logit`).

Every call records the options it ran with (defaults filled in) and its wall time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nodule_edge.errors import ConfigError, require
from nodule_edge.patch import PatchSpec, bound_to_nodule, window_channels
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
DEFAULT_OPTIONS: Mapping[str, Mapping[str, Any]] = {m: {k: o.default for k, o in opts.items()} for m, opts in _OPTIONS.items()}
#: LRP rules this module assigns (with the defaults) to leaf layers: Captum has none for ``Conv3d``
#: and ``GroupNorm`` and uses ε = 10⁻⁹ for ``Linear``.
LRP_RULES: Mapping[str, str] = {"Conv3d": "EpsilonRule", "Linear": "EpsilonRule", "GroupNorm": "IdentityRule"}

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
        raise ConfigError(f"explain needs a model that returns a ModelOutput or a logit tensor [N], got {type(output).__name__}")
    if logit.dim() == 2 and logit.shape[1] == 1:
        logit = logit[:, 0]
    if logit.dim() != 1:
        raise ConfigError(f"explain needs one malignancy logit per cube (shape [N]), got shape {list(logit.shape)}")
    return logit


def explain(model: nn.Module, patch: np.ndarray | torch.Tensor, method: str, *, spec: PatchSpec, **options: Any) -> ExplanationMap:
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
        raise ConfigError(f"lime option block must lie in [1, {spec.size}] voxels (the cube's edge), got {resolved['block']}")
    cube = _check_patch(patch, spec)
    require("captum", "explain")

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        bounded, found = _second_pass_input(model, cube, spec, dtype, device)
        x = torch.from_numpy(bounded).to(device=device, dtype=dtype)[None]
        forward = _Logit(model)
        with torch.no_grad():
            logit = float(forward(x)[0])
        air = torch.from_numpy(_air(spec)).to(device=device, dtype=dtype).view(1, -1, 1, 1, 1).expand_as(x).contiguous()
        attributions, baseline_logit, delta = _RUNNERS[method](forward, x, air, spec, resolved)
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
        raise ConfigError(f"explanation method {method!r} has no option {', '.join(map(repr, unknown))}; its options: {known}")
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
        raise ValueError(f"explain needs one patch of shape {list(expected)} (one nodule's cube), got {list(cube.shape)}")
    if not np.isfinite(cube).all():
        raise ValueError("explain patch holds NaN or infinite values")
    return cube


def _air(spec: PatchSpec) -> np.ndarray:
    """Per-channel windowed value of ``spec.outside_hu``: what voxels outside the box get."""
    return window_channels(np.full((1, 1, 1), spec.outside_hu, np.float32), spec)[:, 0, 0, 0]


def _second_pass_input(model: nn.Module, cube: np.ndarray, spec: PatchSpec, dtype: torch.dtype, device: torch.device) -> tuple[np.ndarray, bool]:
    """The cube the runtime's second pass reads (the first pass's box applied) and whether it found a nodule."""
    if spec.nodule_box is None:
        return cube, True
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


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's and NumPy's global generators for one call, restoring the caller's states.

    Captum draws its noise and samples from torch, and GradientShap its interpolation points from
    NumPy's global generator.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)


_Result = tuple[torch.Tensor, float | None, float | None]


class _Warped(nn.Module):
    """``f(b + sign(d)·u^k)``: integrated gradients over ``u`` from 0 to ``|d|^(1/k)``, ``d = x − b``.

    The straight line from 0 to ``|d|^(1/k)`` in ``u`` is the straight line from the baseline
    ``b`` to the input ``x`` in the model's input, travelled as ``b + α^k·d``: the same path, so
    the same attributions in the limit (a line integral does not depend on how its path is
    parametrised), with the quadrature nodes crowded near the baseline by the power ``k``.
    """

    def __init__(self, forward: nn.Module, baseline: torch.Tensor, sign: torch.Tensor, power: float) -> None:
        super().__init__()
        self.forward_logit = forward
        self.power = power
        self.register_buffer("baseline", baseline)
        self.register_buffer("sign", sign)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        baseline, sign = cast(torch.Tensor, self.baseline), cast(torch.Tensor, self.sign)
        return self.forward_logit(baseline + sign * u.pow(self.power))


def _integrated_gradients(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> _Result:
    from captum.attr import IntegratedGradients

    power = opts["warp"]
    difference = x - air
    warped = _Warped(forward, air, torch.sign(difference), power)
    end = difference.abs().pow(1.0 / power)
    attributions, delta = IntegratedGradients(warped).attribute(
        _grad_leaf(end),
        baselines=torch.zeros_like(end),
        n_steps=opts["steps"],
        method=opts["integration"],
        internal_batch_size=opts["batch"],
        return_convergence_delta=True,
    )
    with torch.no_grad():
        baseline_logit = float(forward(air)[0])
    return attributions, baseline_logit, float(delta.detach().flatten()[0])


def _grad_leaf(x: torch.Tensor) -> torch.Tensor:
    """A leaf that requires grad (Captum warns when it has to switch that on itself)."""
    return x.detach().clone().requires_grad_(True)


def _gradient_x_input(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> _Result:
    from captum.attr import InputXGradient

    return InputXGradient(forward).attribute(_grad_leaf(x)), None, None


def _saliency(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> _Result:
    from captum.attr import Saliency

    return Saliency(forward).attribute(_grad_leaf(x), abs=opts["absolute"]), None, None


def _smoothgrad(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> _Result:
    from captum.attr import NoiseTunnel, Saliency

    with _seeded(opts["seed"], x.device):
        attributions = NoiseTunnel(Saliency(forward)).attribute(
            _grad_leaf(x),
            nt_type="smoothgrad",
            nt_samples=opts["samples"],
            nt_samples_batch_size=opts["batch"],
            stdevs=opts["noise_sd"],
            abs=False,
        )
    return attributions, None, None


def _noisy_air(spec: PatchSpec, count: int, noise_hu: float, seed: int) -> np.ndarray:
    """``count`` cubes of air with Gaussian CT noise of ``noise_hu`` HU, windowed: ``[count, C, S, S, S]``."""
    rng = np.random.default_rng(seed)
    hu = spec.outside_hu + rng.normal(0.0, noise_hu, (count, spec.size, spec.size, spec.size)).astype(np.float32)
    return window_channels(hu, spec)


def _gradient_shap(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> _Result:
    from captum.attr import GradientShap

    noisy = torch.from_numpy(_noisy_air(spec, opts["noisy_baselines"], opts["baseline_noise_hu"], opts["seed"])).to(x)
    baselines = torch.cat([air, noisy])
    explainer = GradientShap(forward)
    total = torch.zeros_like(x)
    deltas = []
    # GradientShap evaluates all its samples in one batch; chunks of ``batch`` bound the memory
    # and, weighted by their size, average to the same expectation.
    with _seeded(opts["seed"], x.device):
        for done in range(0, opts["samples"], opts["batch"]):
            n = min(opts["batch"], opts["samples"] - done)
            attributions, delta = explainer.attribute(
                _grad_leaf(x), baselines=baselines, n_samples=n, stdevs=opts["noise_sd"], return_convergence_delta=True
            )
            total += attributions.detach() * n
            deltas.append(delta.detach().flatten())
    return total / opts["samples"], None, float(torch.cat(deltas).mean())


def _block_features(bounded: torch.Tensor, air: torch.Tensor, block: int) -> tuple[torch.Tensor, int, bool]:
    """Super-voxel ids ``[1, 1, S, S, S]`` of ``block``³ cubes; all-air cubes share the inert id 0.

    Returns:
        The mask, the number of features, and whether id 0 is the inert (all-air) feature.
    """
    size = bounded.shape[-1]
    per_axis = math.ceil(size / block)
    index = torch.arange(size, device=bounded.device) // block
    ids = (index.view(-1, 1, 1) * per_axis**2 + index.view(1, -1, 1) * per_axis + index.view(1, 1, -1)).flatten()
    differs = (bounded[0] != air[0]).any(dim=0).flatten()  # [S³]
    active = torch.zeros(per_axis**3, dtype=torch.bool, device=bounded.device)
    active[ids[differs]] = True
    inert = not bool(active.all())
    # Active super-voxels keep their order, numbered after the inert one.
    new_id = torch.cumsum(active.long(), 0) - (0 if inert else 1)
    new_id[~active] = 0
    mask = new_id[ids].view(1, 1, size, size, size)
    return mask, int(active.sum()) + (1 if inert else 0), inert


class _WeightedRidge:
    """Closed-form weighted ridge regression, the LIME surrogate (captum ``Model`` protocol).

    Minimises ``Σ wᵢ (yᵢ − b − xᵢ·β)² / Σ wᵢ + alpha·‖β‖²`` with an unpenalised intercept ``b``:
    samples weighted by Captum's similarity kernel, as LIME's surrogate (Ribeiro et al. 2016).
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.coefficients: torch.Tensor | None = None

    def fit(self, train_data: Any, **kwargs: Any) -> dict[str, float]:
        xs, ys, ws = [], [], []
        for batch in train_data:
            xs.append(batch[0])
            ys.append(batch[1])
            ws.append(batch[2] if len(batch) > 2 else torch.ones(len(batch[0])))
        features = torch.cat(xs).double()
        target = torch.cat(ys).double().flatten()
        weight = torch.cat(ws).double().flatten()
        weight = weight / weight.sum()
        x_mean = weight @ features
        y_mean = weight @ target
        centred = features - x_mean
        gram = centred.T @ (weight[:, None] * centred) + self.alpha * torch.eye(features.shape[1], dtype=torch.float64)
        self.coefficients = torch.linalg.solve(gram, centred.T @ (weight * (target - y_mean)))
        return {}

    def representation(self) -> torch.Tensor:
        if self.coefficients is None:
            raise ConfigError("the LIME surrogate was read before it was fitted")
        return self.coefficients[None].float()


def _lime(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> _Result:
    from captum.attr import Lime

    mask, n_features, inert = _block_features(x, air, opts["block"])
    with _seeded(opts["seed"], x.device):
        coefficients = Lime(forward, interpretable_model=_WeightedRidge(opts["alpha"])).attribute(
            x,
            baselines=air,
            feature_mask=mask,
            n_samples=opts["samples"],
            perturbations_per_eval=opts["batch"],
            return_input_shape=False,
        )
    coefficients = coefficients.flatten().to(x.dtype)
    if inert:
        coefficients[0] = 0.0
    voxels = torch.bincount(mask.flatten(), minlength=n_features).to(x.dtype) * x.shape[1]
    per_voxel = (coefficients / voxels)[mask]  # [1, 1, S, S, S]
    return per_voxel.expand_as(x).contiguous(), None, None


def _lrp(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> _Result:
    """Captum's LRP with rules for the 3-D layers it has no default for.

    Rules: LRP-ε (Captum's ``EpsilonRule``, ``epsilon`` option) for ``Conv3d`` and ``Linear``;
    for ``GroupNorm`` the identity rule (``IdentityRule``, Captum's rule for BatchNorm) or, with
    ``groupnorm_rule="epsilon"``, LRP-ε; Captum's defaults for the rest (``nn.ReLU`` passes
    relevance on). LRP-ε conserves relevance through a layer without bias up to what ε absorbs
    (Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview", LNCS 11700); the
    model's convolutions before a GroupNorm have no bias.

    What GroupNorm does to conservation: the identity rule hands a GroupNorm's output relevance
    unchanged to its input, so the sum is kept across the layer, but the layer is treated as the
    identity: its centring (each output depends on the mean and spread of the whole channel group,
    and can have the opposite sign of its input) and its affine shift, a bias that should absorb
    relevance, are ignored, and the convolution below divides the relevance by its own output,
    whose scale the GroupNorm removed. With Captum's default ε = 10⁻⁹ that division made the
    relevance explode on a fold-0 test nodule (a sum of −2.3·10⁴ for a logit of 8.9, 2·10⁶ in one
    voxel); ε = 1 keeps it on the logit's scale. LRP-ε on the GroupNorm itself is worse in
    principle: the layer's output does not change when its input is scaled (mean and spread scale
    along), so gradient × input through it sums to zero over each group. Beyond the layers,
    Captum propagates relevance with hooks on the leaf modules only; the functional operations
    between them (residual sums, concatenations, trilinear up-sampling, pooling, the sigmoid of
    the segmentation, the segmentation statistics that also read the input) pass plain
    gradients, so a residual sum hands its whole relevance to both branches. The relevance
    therefore does not sum to the logit: with the defaults, sums of −10.4, −0.08 and −7.3 for
    logits of 8.9, 0.27 and −4.4 (Captum's convergence delta 19.2, 0.34 and 2.9) on three fold-0
    test nodules. :attr:`ExplanationMap.convergence_delta` reports it for every call.
    """
    from captum.attr import LRP
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
    from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule

    rules: dict[type, Callable[[], Any]] = {
        nn.Conv3d: lambda: EpsilonRule(epsilon=opts["epsilon"]),
        nn.Linear: lambda: EpsilonRule(epsilon=opts["epsilon"]),
        nn.GroupNorm: IdentityRule if opts["groupnorm_rule"] == "identity" else (lambda: EpsilonRule(epsilon=opts["epsilon"])),
    }
    leaves = [m for m in forward.modules() if next(m.children(), None) is None and m is not forward]
    missing = sorted({type(m).__name__ for m in leaves if type(m) not in rules and type(m) not in SUPPORTED_LAYERS_WITH_RULES and type(m) not in SUPPORTED_NON_LINEAR_LAYERS})
    if missing:
        covered = sorted({t.__name__ for t in SUPPORTED_LAYERS_WITH_RULES} | {t.__name__ for t in SUPPORTED_NON_LINEAR_LAYERS})
        raise ConfigError(
            f"LRP: no propagation rule for {', '.join(missing)} (Captum supports {', '.join(covered)}; "
            f"this module adds {', '.join(f'{k} ({v})' for k, v in LRP_RULES.items())})"
        )
    try:
        for module in leaves:
            if type(module) in rules:
                module.rule = rules[type(module)]()
        attributions, delta = LRP(forward).attribute(_grad_leaf(x), return_convergence_delta=True)
    finally:
        # Captum removes the rules it attached; these cover a failure before it got there.
        for module in leaves:
            for name in ("rule", "activations"):
                if hasattr(module, name):
                    delattr(module, name)
    return attributions, None, float(delta.detach().flatten()[0])


_RUNNERS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor, PatchSpec, dict[str, Any]], _Result]] = {
    "integrated_gradients": _integrated_gradients,
    "gradient_x_input": _gradient_x_input,
    "saliency": _saliency,
    "smoothgrad": _smoothgrad,
    "gradient_shap": _gradient_shap,
    "lime": _lime,
    "lrp": _lrp,
}

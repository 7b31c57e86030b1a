"""The attribution methods behind :func:`nodule_edge.train.explain.explain`, one runner each.

:mod:`nodule_edge.train.explain` checks the options, builds the input (the nodule-bounded cube of
the runtime's second pass), the logit to explain and the air baseline, and documents each method
and its measured behaviour; this module holds what runs a method on them: the warped
integrated-gradients path (:class:`_Warped`), the seeded noise of SmoothGrad and gradient SHAP,
LIME's super-voxel features and weighted ridge surrogate (:func:`_block_features`,
:class:`_WeightedRidge`) and the LRP rules for the 3-D layers (:func:`_lrp`, :data:`LRP_RULES`).
Captum is imported inside each runner, so importing this module does not need it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from nodule_edge.errors import ConfigError
from nodule_edge.patch import PatchSpec, window_channels

__all__ = ["LRP_RULES", "RUNNERS", "Result", "Runner"]

#: LRP rules this module assigns (with the defaults) to leaf layers: Captum has none for ``Conv3d``
#: and ``GroupNorm`` and uses ε = 10⁻⁹ for ``Linear``.
LRP_RULES: Mapping[str, str] = {"Conv3d": "EpsilonRule", "Linear": "EpsilonRule", "GroupNorm": "IdentityRule"}


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


#: What a method returns: the attributions ``[1, C, S, S, S]``, the baseline's logit (or None) and
#: Captum's convergence delta (or None).
Result = tuple[torch.Tensor, float | None, float | None]
#: A method: ``(forward, x, air, spec, options) -> Result``, ``forward`` mapping cubes to the logit
#: ``[N]``, ``x`` the bounded input ``[1, C, S, S, S]``, ``air`` the air cube of the same shape.
Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor, PatchSpec, dict[str, Any]], Result]


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


def _integrated_gradients(
    forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]
) -> Result:
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


def _gradient_x_input(
    forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]
) -> Result:
    from captum.attr import InputXGradient

    return InputXGradient(forward).attribute(_grad_leaf(x)), None, None


def _saliency(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> Result:
    from captum.attr import Saliency

    return Saliency(forward).attribute(_grad_leaf(x), abs=opts["absolute"]), None, None


def _smoothgrad(
    forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]
) -> Result:
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


def _gradient_shap(
    forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]
) -> Result:
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


def _lime(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> Result:
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


def _lrp(forward: nn.Module, x: torch.Tensor, air: torch.Tensor, spec: PatchSpec, opts: dict[str, Any]) -> Result:
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
        nn.GroupNorm: IdentityRule
        if opts["groupnorm_rule"] == "identity"
        else (lambda: EpsilonRule(epsilon=opts["epsilon"])),
    }
    leaves = [m for m in forward.modules() if next(m.children(), None) is None and m is not forward]
    missing = sorted(
        {
            type(m).__name__
            for m in leaves
            if type(m) not in rules
            and type(m) not in SUPPORTED_LAYERS_WITH_RULES
            and type(m) not in SUPPORTED_NON_LINEAR_LAYERS
        }
    )
    if missing:
        covered = sorted(
            {t.__name__ for t in SUPPORTED_LAYERS_WITH_RULES} | {t.__name__ for t in SUPPORTED_NON_LINEAR_LAYERS}
        )
        raise ConfigError(
            f"LRP: no propagation rule for {', '.join(missing)} (Captum supports {', '.join(covered)}; "
            f"nodule-edge adds {', '.join(f'{k} ({v})' for k, v in LRP_RULES.items())})"
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


#: The runner of each method of :data:`nodule_edge.train.explain.METHODS`.
RUNNERS: dict[str, Runner] = {
    "integrated_gradients": _integrated_gradients,
    "gradient_x_input": _gradient_x_input,
    "saliency": _saliency,
    "smoothgrad": _smoothgrad,
    "gradient_shap": _gradient_shap,
    "lime": _lime,
    "lrp": _lrp,
}

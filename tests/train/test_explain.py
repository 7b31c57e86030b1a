"""Captum attribution maps (nodule_edge.train.explain): shapes, completeness, locality, the
nodule-bounded second pass, and the errors for bad methods, options, models and a missing Captum.

The models are tiny and seeded and the cubes 32³ (the model is fully convolutional), with reduced
steps and samples, so the whole file runs in seconds on the 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from nodule_edge.errors import ConfigError, MissingDependencyError
from nodule_edge.patch import NoduleBox, PatchSpec, bound_to_nodule, window_channels
from nodule_edge.train.explain import DEFAULT_OPTIONS, METHODS, ExplanationMap, _Logit, explain
from nodule_edge.train.model import CollaborativeNet, ModelConfig

# The argument checks and the missing-Captum error run without Captum; everything else needs it.
requires_captum = pytest.mark.skipif(
    importlib.util.find_spec("captum") is None,
    reason="the explain extra (captum) is not installed: pip install 'nodule-edge[explain]'",
)

SIZE = 32
SPEC = PatchSpec(size=SIZE, nodule_box=NoduleBox())
WHOLE = dataclasses.replace(SPEC, nodule_box=None)
TINY = ModelConfig(widths=(8, 8, 8, 8), seg_widths=(8, 8), groups=4, embedding_dim=8)
# Options that keep every method to a handful of passes on the tiny model.
FAST = {
    "integrated_gradients": {"steps": 8},
    "gradient_x_input": {},
    "saliency": {},
    "smoothgrad": {"samples": 4},
    "gradient_shap": {"samples": 4, "noisy_baselines": 1},
    "lime": {"samples": 24},
    "lrp": {},
}
# A region of the cube away from the nodule, aligned to LIME's 8-voxel super-voxels.
REGION = (slice(8, 16), slice(0, 8), slice(16, 24))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these small models run faster alone than split over a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _patch(seed: int = 0) -> np.ndarray:
    """A 32³ cube: lung-like background (−850 HU with noise) and a soft-tissue sphere at the centre."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(SIZE),) * 3, indexing="ij")
    sphere = (z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2 <= 5**2
    hu = np.where(sphere, 40.0, -850.0) + rng.normal(0, 30, sphere.shape)
    return window_channels(hu.astype(np.float32), SPEC)


def _tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> CollaborativeNet:
    torch.manual_seed(seed)
    model = CollaborativeNet(TINY).to(dtype).eval()
    with torch.no_grad():
        model.cls.weight.mul_(5.0)  # move the logit away from 0, as after training
    return model


class RegionModel(nn.Module):
    """Logit = a linear head on the mean over ``REGION`` of ReLU(1×1×1 convolution of the input).

    Nothing outside the region reaches the logit, so a faithful map has all its mass there.
    """

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv3d(2, 4, 1, bias=False)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(4, 2, 1, 1, 1, generator=gen) + 0.5)
            self.head.weight.copy_(torch.rand(1, 4, generator=gen) + 0.5)
            self.head.bias.fill_(-1.0)
        mask = torch.zeros(1, 1, SIZE, SIZE, SIZE)
        mask[(0, 0, *REGION)] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = (self.relu(self.conv(x)) * self.mask).sum(dim=(2, 3, 4)) / self.mask.sum()
        return self.head(pooled)[:, 0]


class SmoothModel(nn.Module):
    """A small smooth convolutional network in float64 (softplus and tanh, biases): IG converges fast."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 4, 1)
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.conv1.weight.mul_(10.0)  # well into the nonlinear range of softplus and tanh
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(nn.functional.softplus(self.conv1(x))))
        return 300 * self.head(h.mean(dim=(2, 3, 4)))[:, 0]


class BoxedModel(nn.Module):
    """A linear logit over the whole cube and a fixed sphere as its segmentation (centred)."""

    def __init__(self, radius: float = 4.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(1, 2, SIZE, SIZE, SIZE, generator=gen) * 0.01)
        z, y, x = torch.meshgrid(*(torch.arange(SIZE),) * 3, indexing="ij")
        sphere = ((z - 16) ** 2 + (y - 16) ** 2 + (x - 16) ** 2 <= radius**2).float()
        self.register_buffer("sphere", sphere[None, None])

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        logit = (x * self.weight).sum(dim=(1, 2, 3, 4))
        return SimpleNamespace(malignancy_logit=logit, segmentation=self.sphere.expand(len(x), -1, -1, -1, -1))


@requires_captum
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_finite_map_on_the_patch_grid(method: str) -> None:
    model = _tiny_model()
    result = explain(model, _patch(), method, spec=SPEC, **FAST[method])
    assert isinstance(result, ExplanationMap)
    assert result.method == method
    assert result.map.shape == (SIZE,) * 3 and result.map.dtype == np.float32
    assert result.attributions.shape == (2, SIZE, SIZE, SIZE)
    assert np.isfinite(result.map).all() and np.abs(result.map).max() > 0
    np.testing.assert_allclose(result.map, result.attributions.sum(axis=0), rtol=1e-6, atol=1e-9)  # channels summed
    assert result.options == {**DEFAULT_OPTIONS[method], **FAST[method]}  # defaults filled in, as run
    assert result.seconds > 0
    with torch.no_grad():
        expected_logit = float(model(torch.from_numpy(result.input)[None]).malignancy_logit[0])
    assert result.logit == pytest.approx(expected_logit, rel=1e-5, abs=1e-6)
    assert not model.training


def test_the_logit_it_explains_is_the_model_logit_with_its_true_gradient() -> None:
    """Same value as the forward for every head variant; the gradient matches finite differences."""
    x = torch.from_numpy(_patch())[None].double()
    for config in (
        TINY,
        dataclasses.replace(TINY, decoder="light16"),
        dataclasses.replace(TINY, seg_features=False),
        dataclasses.replace(TINY, concat_embedding=False),
        dataclasses.replace(TINY, use_attributes=False),
    ):
        torch.manual_seed(0)
        model = CollaborativeNet(config).double().eval()
        with torch.no_grad():
            torch.testing.assert_close(_Logit(model)(x), model(x).malignancy_logit, rtol=1e-12, atol=1e-12)
    model = _tiny_model(dtype=torch.float64)
    direction = torch.from_numpy(_patch(seed=1))[None].double()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_Logit(model)(xg).sum(), xg)
    (forward_grad,) = torch.autograd.grad(model(xg).malignancy_logit.sum(), xg)
    # The segmentation statistics run in float32, so the step cannot be much smaller.
    h = 1e-3
    with torch.no_grad():
        numeric = float((_Logit(model)(x + h * direction) - _Logit(model)(x - h * direction)) / (2 * h))
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=2e-3)
    # The forward's own gradient misses the path through the detached segmentation.
    assert abs(float((forward_grad * direction).sum()) - numeric) > 10 * abs(float((grad * direction).sum()) - numeric)


@requires_captum
@pytest.mark.parametrize("outside_hu", [-1000.0, 0.0])
def test_integrated_gradients_add_up_to_the_logit_difference(outside_hu: float) -> None:
    """Completeness (Sundararajan et al. 2017): Σ attributions = logit(input) − logit(air).

    At −1000 HU air windows to 0 in both channels; at 0 HU it lies inside both windows, above the
    lung background, so the path also runs downwards. The warped path (``warp``) and the
    straight one (``warp=1``) must give the same attributions voxel by voxel.
    """
    spec = dataclasses.replace(WHOLE, outside_hu=outside_hu)
    model = SmoothModel()
    result = explain(model, _patch(), "integrated_gradients", spec=spec, steps=32)
    air = torch.from_numpy(window_channels(np.full((SIZE,) * 3, outside_hu, np.float32), spec))[None].double()
    with torch.no_grad():
        baseline_logit = float(model(air)[0])
    difference = result.logit - baseline_logit
    assert result.baseline_logit == pytest.approx(baseline_logit, abs=1e-12)
    assert abs(difference) > 0.1  # a test of something
    assert float(result.map.sum()) == pytest.approx(difference, rel=1e-4)
    assert abs(result.convergence_delta) < 1e-4 * abs(difference)
    straight = explain(model, _patch(), "integrated_gradients", spec=spec, steps=32, warp=1.0)
    np.testing.assert_allclose(
        result.attributions, straight.attributions, rtol=1e-3, atol=1e-6 * np.abs(straight.attributions).max()
    )


@requires_captum
@pytest.mark.parametrize("method", METHODS)
def test_a_model_that_reads_one_region_gets_a_map_on_that_region(method: str) -> None:
    # LIME fits one coefficient per super-voxel: more samples (cheap here) than the 64 of them.
    options = {**FAST[method], "samples": 128} if method == "lime" else FAST[method]
    result = explain(RegionModel(), _patch(), method, spec=WHOLE, **options)
    magnitude = np.abs(result.map)
    inside = magnitude[REGION].sum() / magnitude.sum()
    # Gradients vanish outside the region exactly; LIME's surrogate leaves a little elsewhere.
    assert inside > (0.9 if method == "lime" else 0.999), f"{method}: {inside:.3f} of the map in the region"


@requires_captum
@pytest.mark.parametrize("method", ["integrated_gradients", "gradient_x_input", "lime", "saliency"])
def test_the_map_explains_the_nodule_bounded_second_pass(method: str) -> None:
    model = BoxedModel()
    patch = _patch()
    bounded, found = bound_to_nodule(patch, model.sphere[0, 0].numpy(), SPEC)
    assert found and not np.array_equal(bounded, patch)
    result = explain(model, patch, method, spec=SPEC, **FAST[method])
    assert result.nodule_found
    np.testing.assert_array_equal(result.input, bounded)
    assert result.logit == pytest.approx(float((torch.from_numpy(bounded) * model.weight[0].detach()).sum()), rel=1e-5)
    outside = ~(bounded != 0).any(axis=0)  # air outside the box
    if method == "saliency":
        # The gradient of a linear logit is its weight, inside the box or not.
        np.testing.assert_allclose(result.map, model.weight[0].detach().sum(0).numpy(), rtol=1e-5, atol=1e-7)
    else:
        if method == "lime":
            # A super-voxel that reaches into the box spreads its coefficient over all its voxels:
            # only the 8³ blocks that lie wholly outside it are air throughout.
            blocks = outside.reshape(4, 8, 4, 8, 4, 8).all(axis=(1, 3, 5))
            outside = np.repeat(np.repeat(np.repeat(blocks, 8, 0), 8, 1), 8, 2)
            assert outside.any()
        # Attribution against air: voxels the box turned to air carry none.
        assert np.abs(result.map[outside]).max() == 0.0
        assert np.abs(result.map[~outside]).sum() > 0


@requires_captum
def test_a_box_net_first_pass_draws_the_box_instead_of_the_models_segmentation() -> None:
    model = BoxedModel()
    patch = _patch()
    other = np.zeros((SIZE,) * 3, np.float32)
    other[4:12, 4:12, 4:12] = 1.0  # a box net that finds the nodule elsewhere
    seen: list[tuple[int, ...]] = []

    def segment(patches: np.ndarray) -> np.ndarray:
        seen.append(patches.shape)
        return other[None]

    result = explain(model, patch, "gradient_x_input", spec=SPEC, segment=segment)
    assert seen == [(1, *patch.shape)]
    np.testing.assert_array_equal(result.input, bound_to_nodule(patch, other, SPEC)[0])
    assert not np.array_equal(result.input, bound_to_nodule(patch, model.sphere[0, 0].numpy(), SPEC)[0])


@requires_captum
def test_no_nodule_in_the_first_pass_explains_the_whole_cube() -> None:
    model = BoxedModel()
    model.sphere.zero_()  # an empty segmentation
    result = explain(model, _patch(), "gradient_x_input", spec=SPEC)
    assert not result.nodule_found
    np.testing.assert_array_equal(result.input, _patch())


@requires_captum
def test_a_light16_model_draws_its_box_from_the_upsampled_segmentation() -> None:
    torch.manual_seed(0)
    model = CollaborativeNet(dataclasses.replace(TINY, decoder="light16")).eval()
    with torch.no_grad():
        model.seg_head[-1].bias.fill_(10.0)  # a 16³ segmentation of ones: the box is the whole cube
    result = explain(model, _patch(), "gradient_x_input", spec=SPEC)
    assert result.nodule_found
    np.testing.assert_array_equal(result.input, _patch())
    assert result.map.shape == (SIZE,) * 3 and np.isfinite(result.map).all()


@requires_captum
@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap", "lime"])
def test_random_methods_repeat_with_their_seed_and_leave_the_global_generator(method: str) -> None:
    model = _tiny_model()
    state = torch.get_rng_state()
    first = explain(model, _patch(), method, spec=WHOLE, **FAST[method])
    assert torch.equal(torch.get_rng_state(), state)
    again = explain(model, _patch(), method, spec=WHOLE, **FAST[method])
    other = explain(model, _patch(), method, spec=WHOLE, **{**FAST[method], "seed": 1})
    np.testing.assert_array_equal(first.map, again.map)
    assert not np.array_equal(first.map, other.map)


@requires_captum
def test_training_flag_is_restored() -> None:
    model = _tiny_model().train()
    explain(model, _patch(), "saliency", spec=WHOLE)
    assert model.training


def test_unknown_method_lists_the_methods() -> None:
    with pytest.raises(ConfigError, match="unknown explanation method 'deeplift'") as info:
        explain(_tiny_model(), _patch(), "deeplift", spec=SPEC)
    for method in METHODS:
        assert method in str(info.value)


@pytest.mark.parametrize(
    ("method", "options", "fragment"),
    [
        ("integrated_gradients", {"steps": 0}, "integrated_gradients option steps must be an integer >= 1, got 0"),
        ("integrated_gradients", {"warp": 0.5}, "option warp must be >= 1, got 0.5"),
        ("integrated_gradients", {"integration": "simpson"}, "option integration must be one of gausslegendre"),
        ("smoothgrad", {"noise_sd": -0.1}, "smoothgrad option noise_sd must be >= 0, got -0.1"),
        ("smoothgrad", {"samples": 2.5}, "option samples must be an integer >= 1, got 2.5"),
        ("gradient_shap", {"noisy_baselines": -1}, "option noisy_baselines must be an integer >= 0, got -1"),
        (
            "gradient_shap",
            {"baseline_noise_hu": float("nan")},
            "option baseline_noise_hu must be a finite number, got nan",
        ),
        ("lime", {"samples": 0}, "lime option samples must be an integer >= 1, got 0"),
        ("lime", {"block": 33}, "lime option block must lie in [1, 32]"),
        ("lime", {"alpha": 0}, "lime option alpha must be > 0, got 0"),
        ("saliency", {"absolute": "yes"}, "saliency option absolute must be True or False, got 'yes'"),
        ("lrp", {"epsilon": -1e-9}, "lrp option epsilon must be > 0"),
        ("lrp", {"groupnorm_rule": "gamma"}, "option groupnorm_rule must be one of identity, epsilon, got 'gamma'"),
        ("gradient_x_input", {"steps": 8}, "'gradient_x_input' has no option 'steps'; its options: none"),
        ("smoothgrad", {"stdevs": 0.1}, "'smoothgrad' has no option 'stdevs'; its options: samples, noise_sd"),
    ],
)
def test_bad_options_name_the_option_and_the_value(method: str, options: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        explain(_tiny_model(), _patch(), method, spec=SPEC, **options)
    assert fragment in str(info.value)


@requires_captum
def test_lrp_names_the_layers_it_has_no_rule_for() -> None:
    model = nn.Sequential(
        nn.Conv3d(2, 4, 1), nn.InstanceNorm3d(4), nn.Softplus(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 1)
    )
    with pytest.raises(
        ConfigError,
        match=r"LRP: no propagation rule for AdaptiveAvgPool3d, Flatten, InstanceNorm3d, Softplus \(Captum supports .*GroupNorm \(IdentityRule\)",
    ):
        explain(model, _patch(), "lrp", spec=WHOLE)
    assert not any(hasattr(m, "rule") for m in model.modules())


@requires_captum
def test_lrp_leaves_no_rules_on_the_model() -> None:
    model = _tiny_model()
    explain(model, _patch(), "lrp", spec=WHOLE)
    assert not any(hasattr(m, "rule") or hasattr(m, "activations") for m in model.modules())


@requires_captum
def test_a_nodule_box_needs_a_model_with_segmentation() -> None:
    with pytest.raises(ConfigError, match="returns no segmentation"):
        explain(RegionModel(), _patch(), "saliency", spec=SPEC)


@requires_captum
def test_a_model_without_a_logit_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"one malignancy logit per cube \(shape \[N\]\), got shape \[1, 3\]"):
        explain(nn.Sequential(nn.Flatten(), nn.Linear(2 * SIZE**3, 3)), _patch(), "saliency", spec=WHOLE)


def test_a_patch_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"shape \[2, 32, 32, 32\].*got \[2, 16, 16, 16\]"):
        explain(_tiny_model(), np.zeros((2, 16, 16, 16), np.float32), "saliency", spec=SPEC)
    bad = _patch()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        explain(_tiny_model(), bad, "saliency", spec=SPEC)


def test_missing_captum_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "captum", None)  # import captum now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"nodule-edge\[explain\]"):
        explain(_tiny_model(), _patch(), "saliency", spec=SPEC)

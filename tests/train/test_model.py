"""CollaborativeNet: size, output shapes, and the closed-form Grad-CAM against autograd."""

from __future__ import annotations

import math

import pytest
import torch

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.train.losses import LossWeights, csl_loss, total_loss
from nodule_edge.train.model import (
    LEGACY_MODEL_CONFIG,
    SEG_FEATURE_NAMES,
    CollaborativeNet,
    ModelConfig,
    ModelOutput,
    _ConvNorm,
    count_parameters,
    depth_to_space,
    segmentation_statistics,
    space_to_depth,
    use_contiguous_groupnorm,
)

# The model is fully convolutional: 32³ inputs (8³ maps) keep the float64 checks fast.
SMALL = 32

LEGACY = ModelConfig(**LEGACY_MODEL_CONFIG)  # type: ignore[arg-type]
CAM_CONFIGS = {
    "concat": ModelConfig(),
    "no_concat": ModelConfig(concat_embedding=False),
    "no_attributes": ModelConfig(use_attributes=False),
    "no_seg_features": ModelConfig(seg_features=False),
    "legacy_light16": LEGACY,
}


def _model(config: ModelConfig, seed: int, cls_scale: float = 5.0) -> CollaborativeNet:
    torch.manual_seed(seed)
    model = CollaborativeNet(config).double().eval()
    with torch.no_grad():
        # A larger classifier weight moves p away from 0.5, as after training.
        model.cls.weight.mul_(cls_scale)
    return model


def _autograd_gradcam(out: ModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook Grad-CAM: ω = spatial mean of ∂p/∂F, CAM = (p − 0.5)·Σ_k ω_k F_k, min-max normalised."""
    p = out.malignancy_probability
    # Samples are independent (GroupNorm, eval mode), so ∂Σp/∂F[n] = ∂p_n/∂F[n].
    (grad,) = torch.autograd.grad(p.sum(), out.features, retain_graph=True)
    omega = grad.mean(dim=(2, 3, 4))  # [N, C]
    raw = (p - 0.5).view(-1, 1, 1, 1, 1) * (omega[:, :, None, None, None] * out.features).sum(1, keepdim=True)
    flat = raw.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1, 1)
    high = flat.max(1).values.view(-1, 1, 1, 1, 1)
    return omega, (raw - low) / (high - low)


def test_parameter_counts_of_the_shipped_and_the_legacy_model() -> None:
    assert count_parameters(CollaborativeNet()) == 707_245
    # The wider network shipped until narrow_widths (docs/ablations/wide_widths) and the 0.1 model.
    assert count_parameters(CollaborativeNet(ModelConfig(widths=(24, 48, 96, 128)))) == 1_350_125
    assert count_parameters(CollaborativeNet(LEGACY)) == 3_810_808


def test_output_shapes_at_the_patch_size() -> None:
    torch.manual_seed(0)
    model = CollaborativeNet().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 2, 64, 64, 64))
    assert out.malignancy_logit.shape == (2,)
    assert out.malignancy_probability.shape == (2,)
    assert out.attributes.shape == (2, len(ATTRIBUTE_NAMES))
    assert out.embedding.shape == (2, 64)
    assert out.segmentation.shape == (2, 1, 64, 64, 64)  # 0.5 mm, the patch's own grid
    assert out.segmentation_coarse.shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(out.segmentation_coarse, torch.nn.functional.avg_pool3d(out.segmentation, 4))
    assert out.features.shape == (2, 96, 16, 16, 16)
    assert out.cam.shape == (2, 1, 16, 16, 16)
    assert out.nodule_attention.shape == (2,) and out.background_attention.shape == (2,)
    assert torch.allclose(out.malignancy_probability, torch.sigmoid(out.malignancy_logit))
    for t in (out.malignancy_probability, out.attributes, out.segmentation, out.cam):
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def test_malignancy_only_model_regresses_one_attribute() -> None:
    model = CollaborativeNet(ModelConfig(num_attributes=1)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 2, SMALL, SMALL, SMALL))
    assert out.attributes.shape == (1, 1)


@pytest.mark.parametrize("name", sorted(CAM_CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_gradcam_equals_autograd_gradcam(name: str, seed: int) -> None:
    model = _model(CAM_CONFIGS[name], seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(3, 2, SMALL, SMALL, SMALL, generator=gen, dtype=torch.float64)
    out = model(x)
    omega, cam = _autograd_gradcam(out)

    pooled = out.features.mean(dim=(2, 3, 4))
    head_in = pooled
    if model.config.seg_features:
        head_in = torch.cat([pooled, segmentation_statistics(out.segmentation, x, model.config.voxel_mm)], dim=1)
    pre_embedding = model.attr_embed(head_in)
    n_voxels = out.features[0, 0].numel()
    closed = model.probability_gradient(pooled, out.malignancy_logit, pre_embedding) / n_voxels
    assert float(omega.abs().max()) > 0
    torch.testing.assert_close(closed, omega, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(out.cam, cam, rtol=0, atol=1e-5)
    # Guard against a trivially equal pair: the CAM spans [0, 1] and is not constant.
    assert float(out.cam.detach().amin()) == pytest.approx(0.0, abs=1e-12)
    assert float(out.cam.detach().amax()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("bias", [-40.0, 12.0, 40.0])
def test_gradcam_survives_confident_predictions(bias: float) -> None:
    """|z| ≥ 10: the textbook factor p(1 − p) underflows, the normalised CAM must not."""
    model = _model(ModelConfig(), 0).float()
    with torch.no_grad():
        model.cls.bias.fill_(bias)
        out = model(torch.rand(2, 2, SMALL, SMALL, SMALL, generator=torch.Generator().manual_seed(5)))
    assert torch.all(out.malignancy_logit.abs() > 9)
    cam = out.cam.flatten(1)
    torch.testing.assert_close(cam.max(1).values, torch.ones(2))
    torch.testing.assert_close(cam.min(1).values, torch.zeros(2))
    # Same map as at a moderate logit of the same sign: only the sign of p − 0.5 enters the CAM.
    with torch.no_grad():
        model.cls.bias.fill_(0.0)
        moderate = model(torch.rand(2, 2, SMALL, SMALL, SMALL, generator=torch.Generator().manual_seed(5)))
    if torch.equal(torch.sign(moderate.malignancy_logit), torch.sign(out.malignancy_logit)):
        torch.testing.assert_close(out.cam, moderate.cam, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(out.cam, 1 - moderate.cam, rtol=0, atol=1e-5)


def test_gradcam_under_bf16_autocast_is_normalised() -> None:
    model = _model(ModelConfig(), 1).float()
    with torch.no_grad():
        model.cls.bias.fill_(7.0)  # p > 0.998: p(1 − p) is 0 in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.rand(2, 2, SMALL, SMALL, SMALL, generator=torch.Generator().manual_seed(6)))
    cam = out.cam.float().flatten(1)
    assert torch.all(cam.max(1).values > 0.99)
    assert torch.all(cam.min(1).values < 0.01)


def test_gradcam_differs_without_the_embedding_path() -> None:
    """The concat term of ∂p/∂g matters: dropping it gives a different ω."""
    model = _model(ModelConfig(), 0)
    out = model(torch.rand(2, 2, SMALL, SMALL, SMALL, dtype=torch.float64))
    omega, _ = _autograd_gradcam(out)
    c = model.feature_channels
    p = out.malignancy_probability
    pooled_only = (p * (1 - p)).unsqueeze(1) * model.cls.weight[0, :c] / out.features[0, 0].numel()
    assert not torch.allclose(pooled_only, omega, rtol=1e-3, atol=0)


def test_debug_loss_alone_reaches_the_stem() -> None:
    torch.manual_seed(0)
    model = CollaborativeNet().train()
    out = model(torch.rand(2, 2, SMALL, SMALL, SMALL))
    # δ = 1 keeps the hinge active whatever the CAM (both means lie in [0, 1]).
    loss = csl_loss(out, delta=1.0, adaptive=False).mean()
    loss.backward()
    for param in (
        model.stem[0].weight,
        model.block3.conv2[0].weight,
        model.seg_head.refine[0][0].weight,
        model.fusion.weight,
    ):
        assert param.grad is not None
        assert torch.isfinite(param.grad).all()
        assert float(param.grad.abs().sum()) > 0


def test_minmax_normalised_cam_lies_in_unit_interval() -> None:
    torch.manual_seed(3)
    model = CollaborativeNet().eval()
    with torch.no_grad():
        out = model(torch.rand(4, 2, SMALL, SMALL, SMALL) * 3 - 1)
    cam = out.cam.flatten(1)
    assert torch.all(cam >= 0) and torch.all(cam <= 1)
    torch.testing.assert_close(cam.min(1).values, torch.zeros(4))
    torch.testing.assert_close(cam.max(1).values, torch.ones(4))
    assert torch.all((out.nodule_attention >= 0) & (out.nodule_attention <= 1))
    assert torch.all((out.background_attention >= 0) & (out.background_attention <= 1))


def test_space_to_depth_and_back_is_the_identity() -> None:
    x = torch.arange(2 * 3 * 4 * 6 * 8, dtype=torch.float32).view(2, 3, 4, 6, 8)
    packed = space_to_depth(x)
    assert packed.shape == (2, 24, 2, 3, 4)
    # Channel 0 of the packed tensor is the (0, 0, 0) corner of each 2³ block.
    torch.testing.assert_close(packed[:, 0], x[:, 0, ::2, ::2, ::2])
    torch.testing.assert_close(depth_to_space(packed), x)


def test_segmentation_statistics_of_a_known_ball() -> None:
    size = 64
    z, y, x = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) - 31.5,) * 3, indexing="ij")
    ball = ((z**2 + y**2 + x**2) <= 10.0**2).float()[None, None]  # radius 5 mm at 0.5 mm
    # The image's dense region is larger than the segmented ball, so 2³ pooling mixes nothing into it.
    dense = ((z**2 + y**2 + x**2) <= 13.0**2).float()
    image = torch.stack([torch.full_like(dense, 0.4), dense * 0.7])[None]
    stats = dict(zip(SEG_FEATURE_NAMES, segmentation_statistics(ball, image, voxel_mm=0.5)[0].tolist()))
    volume = float(ball.sum()) * 0.5**3
    assert volume == pytest.approx(4 / 3 * math.pi * 5.0**3, rel=0.03)
    assert stats["log_volume_mm3"] == pytest.approx((math.log1p(volume) - 5) / 2, abs=1e-4)
    assert stats["lung_window_mean"] == pytest.approx(0.4, abs=1e-5)
    assert stats["lung_window_sd"] == pytest.approx(0.0, abs=1e-2)
    assert stats["mediastinal_window_mean"] == pytest.approx(0.7, abs=1e-5)
    assert stats["mediastinal_window_sd"] == pytest.approx(0.0, abs=1e-2)
    assert stats["solid_fraction"] == pytest.approx(1.0, abs=1e-6)
    # A ball twice the radius has eight times the volume: log volume rises by log(8) / 2.
    big = ((z**2 + y**2 + x**2) <= 20.0**2).float()[None, None]
    grown = segmentation_statistics(big, image, voxel_mm=0.5)[0, 0]
    assert float(grown) - stats["log_volume_mm3"] == pytest.approx(math.log(8) / 2, abs=0.02)
    empty = segmentation_statistics(torch.zeros_like(ball), image, voxel_mm=0.5)
    assert torch.isfinite(empty).all()


def test_the_classifier_does_not_train_the_segmentation() -> None:
    """The statistics read a detached segmentation: with the fusion path closed, the
    classification loss leaves the decoder alone (it still trains the heads' statistic weights)."""
    torch.manual_seed(0)
    model = CollaborativeNet().train()
    with torch.no_grad():
        model.fusion.weight.zero_()
        model.fusion.bias.zero_()
    out = model(torch.rand(2, 2, SMALL, SMALL, SMALL))
    loss, _ = total_loss(
        out,
        labels=torch.tensor([1, 0]),
        label_mask=torch.tensor([True, True]),
        masks=torch.zeros(2, 1, SMALL, SMALL, SMALL),
        mask_present=torch.tensor([False, False]),
        attributes=torch.zeros(2, 6),
        attr_present=torch.tensor([False, False]),
        weights=LossWeights(),
        use_debug=False,
        use_attributes=False,
    )
    loss.backward()
    assert float(model.seg_head.out.weight.grad.abs().sum()) == 0.0
    assert float(model.stem[0].weight.grad.abs().sum()) > 0
    assert (
        float(
            model.cls.weight.grad[0, model.feature_channels : model.feature_channels + len(SEG_FEATURE_NAMES)]
            .abs()
            .sum()
        )
        > 0
    )


def test_channels_last_groupnorm_on_a_contiguous_copy_is_the_same_function() -> None:
    """Training's channels-last path (small groups normalised on a contiguous copy) computes
    what the contiguous path computes, forward and backward, and stays channels-last."""
    torch.manual_seed(0)
    model = CollaborativeNet(ModelConfig()).eval()
    x = torch.randn(2, 2, SMALL, SMALL, SMALL)
    small_groups = [
        m for m in model.modules() if isinstance(m, _ConvNorm) and m[1].num_channels // m[1].num_groups <= 6
    ]
    assert small_groups, "the shipped model has GroupNorms of at most 6 channels per group"
    plain = model(x.clone().requires_grad_())
    plain.malignancy_logit.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    cl_model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    default_input: list[bool] = []
    probe = small_groups[0][1].register_forward_pre_hook(lambda _m, args: default_input.append(args[0].is_contiguous()))
    with torch.no_grad():
        cl_model(x.contiguous(memory_format=torch.channels_last_3d))
    probe.remove()
    assert default_input == [False]  # off by default: the recorded runs' kernels
    assert use_contiguous_groupnorm(cl_model) == len(small_groups)
    seen: list[bool] = []
    hook = small_groups[0].register_forward_hook(
        lambda _m, _i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last_3d))
    )
    norm_input: list[bool] = []
    pre_hook = small_groups[0][1].register_forward_pre_hook(lambda _m, args: norm_input.append(args[0].is_contiguous()))
    out = cl_model(x.contiguous(memory_format=torch.channels_last_3d))
    hook.remove()
    pre_hook.remove()
    out.malignancy_logit.sum().backward()
    assert seen == [True]  # the block's output is channels-last again
    assert norm_input == [True]  # the norm itself ran on a contiguous copy
    torch.testing.assert_close(out.malignancy_logit, plain.malignancy_logit, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.segmentation, plain.segmentation, rtol=1e-4, atol=1e-4)
    for name, p in cl_model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-4, msg=name)

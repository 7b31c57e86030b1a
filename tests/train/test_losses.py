"""Losses: Dice, the (adaptive) contrastive saliency loss and their combination."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nodule_edge.train.losses import LossWeights, csl_loss, dice_loss, total_loss, tversky_loss
from nodule_edge.train.model import ModelOutput


def _output(
    cam: torch.Tensor,
    seg: torch.Tensor,
    logit: torch.Tensor,
    attributes: torch.Tensor | None = None,
) -> ModelOutput:
    n = cam.shape[0]
    logit = logit.clone().requires_grad_(True)
    attrs = attributes if attributes is not None else torch.full((n, 6), 0.5, requires_grad=True)
    return ModelOutput(
        malignancy_logit=logit,
        malignancy_probability=torch.sigmoid(logit),
        attributes=attrs,
        embedding=torch.zeros(n, 4),
        segmentation=seg,
        segmentation_coarse=seg,
        features=torch.zeros(n, 1, *cam.shape[2:]),
        classifier_input=torch.zeros(n, 1),
        cam=cam,
        nodule_attention=torch.zeros(n),
        background_attention=torch.zeros(n),
    )


def _ball(n: int = 2, size: int = 8) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    inside = ((grid - (size - 1) / 2) ** 2).sum(0) <= (size / 4) ** 2
    return inside.float().expand(n, 1, size, size, size).clone()


def test_dice_loss_is_zero_for_a_perfect_prediction() -> None:
    target = _ball()
    loss = dice_loss(target, target)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.zeros(2))


def test_dice_loss_is_about_one_for_disjoint_masks() -> None:
    target = _ball()
    loss = dice_loss(1 - target, target)
    assert torch.all(loss > 0.99) and torch.all(loss <= 1.0)


def test_dice_loss_half_overlap() -> None:
    pred = torch.zeros(1, 10)
    target = torch.zeros(1, 10)
    pred[0, :4] = 1
    target[0, 2:6] = 1
    # 2·2 / (4 + 4) = 0.5, shifted slightly by the smoothing term.
    assert float(dice_loss(pred, target, eps=0.0)) == pytest.approx(0.5)
    assert float(dice_loss(pred, target)) == pytest.approx(1 - 5 / 9)


def test_tversky_loss_is_dice_at_one_half_and_charges_misses_above_it() -> None:
    torch.manual_seed(0)
    pred, target = torch.rand(3, 8, 8, 8), (torch.rand(3, 8, 8, 8) > 0.6).float()
    torch.testing.assert_close(tversky_loss(pred, target, 0.5), dice_loss(pred, target))
    target = torch.zeros(1, 4, 4, 4)
    target[0, :2] = 1  # 32 voxels
    missed = target.clone()
    missed[0, 0] = 0  # predicts half of them, no false voxel
    extra = target.clone()
    extra[0, 2] = 1  # predicts all of them and 16 false ones
    assert tversky_loss(missed, target, 0.5) > tversky_loss(extra, target, 0.5)  # Dice: 0.667 vs 0.8
    assert tversky_loss(missed, target, 0.9) > tversky_loss(missed, target, 0.5)
    assert tversky_loss(extra, target, 0.9) < tversky_loss(extra, target, 0.5)


def test_csl_loss_is_zero_when_nodule_attention_exceeds_background_by_delta() -> None:
    seg = _ball()
    out = _output(cam=seg.clone(), seg=seg, logit=torch.tensor([3.0, -3.0]))
    # inside mean 1, outside mean 0: the margin 0.5 is met.
    torch.testing.assert_close(csl_loss(out, delta=0.5, adaptive=False), torch.zeros(2))
    torch.testing.assert_close(csl_loss(out, delta=0.5, adaptive=True), torch.zeros(2))
    # A margin above the gap makes it positive: 1.5 − 1 = 0.5.
    torch.testing.assert_close(csl_loss(out, delta=1.5, adaptive=False), torch.full((2,), 0.5))


def test_csl_loss_penalises_background_attention() -> None:
    seg = _ball()
    out = _output(cam=1 - seg, seg=seg, logit=torch.tensor([0.0, 2.0]))
    loss = csl_loss(out, delta=0.5, adaptive=False)
    torch.testing.assert_close(loss, torch.full((2,), 1.5))
    adaptive = csl_loss(out, delta=0.5, adaptive=True)
    p = torch.sigmoid(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(adaptive, 2 * (p - 0.5).abs() * 1.5)


def test_adaptive_weight_is_zero_at_p_one_half() -> None:
    seg = _ball()
    out = _output(cam=1 - seg, seg=seg, logit=torch.zeros(2))
    assert torch.all(csl_loss(out, adaptive=False) > 0)
    torch.testing.assert_close(csl_loss(out, adaptive=True), torch.zeros(2))


def test_adaptive_weight_is_not_optimised() -> None:
    """2|p − 0.5| is detached: the logit receives no gradient from the debug loss here."""
    seg = _ball()
    out = _output(cam=(1 - seg).requires_grad_(True), seg=seg, logit=torch.tensor([1.0, -1.0]))
    csl_loss(out, adaptive=True).sum().backward()
    assert out.cam.grad is not None and float(out.cam.grad.abs().sum()) > 0
    logit = out.malignancy_logit
    assert logit.grad is None or float(logit.grad.abs().sum()) == 0.0


def _targets(n: int, labelled: list[bool], masks: bool = True, attrs: bool = True) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.tensor([1, 0] * (n // 2) + [1] * (n % 2)),
        "label_mask": torch.tensor(labelled),
        "masks": _ball(n)[:, :, :, :, :],
        "mask_present": torch.full((n,), masks),
        "attributes": torch.linspace(0, 1, n * 6).view(n, 6),
        "attr_present": torch.full((n,), attrs),
    }


def test_total_loss_with_no_labelled_samples() -> None:
    seg = _ball(3) * 0.8
    out = _output(cam=1 - _ball(3), seg=seg.requires_grad_(True), logit=torch.tensor([0.3, -0.2, 1.0]))
    loss, parts = total_loss(
        out, **_targets(3, [False] * 3), weights=LossWeights(), use_debug=True, use_attributes=True
    )
    assert math.isfinite(loss.item())
    assert parts["cls"] == 0.0 and parts["debug"] == 0.0
    assert parts["seg"] > 0 and parts["reg"] > 0
    loss.backward()
    assert torch.isfinite(out.malignancy_logit.grad).all()


def test_total_loss_with_no_targets_at_all_is_zero_and_differentiable() -> None:
    out = _output(cam=_ball(2), seg=_ball(2), logit=torch.tensor([0.3, -0.2]))
    loss, parts = total_loss(
        out,
        **_targets(2, [False, False], masks=False, attrs=False),
        weights=LossWeights(),
        use_debug=True,
        use_attributes=True,
    )
    assert loss.item() == 0.0
    assert set(parts) == {"cls", "seg", "reg", "debug"}
    assert all(v == 0.0 for v in parts.values())
    loss.backward()  # no NaN from an empty mean, and a graph to backpropagate through
    assert torch.isfinite(out.malignancy_logit.grad).all()


def test_total_loss_reaches_every_head_even_when_a_part_is_missing() -> None:
    """Without attribute targets the attribute head still gets a (zero) gradient, as DDP needs."""
    attrs = torch.full((2, 6), 0.5, requires_grad=True)
    seg = (_ball(2) * 0.5).requires_grad_(True)
    out = _output(cam=_ball(2), seg=seg, logit=torch.tensor([0.3, -0.2]), attributes=attrs)
    loss, parts = total_loss(
        out, **_targets(2, [True, True], masks=False), weights=LossWeights(), use_debug=False, use_attributes=False
    )
    assert parts["reg"] == 0.0 and parts["seg"] == 0.0
    loss.backward()
    assert attrs.grad is not None and float(attrs.grad.abs().sum()) == 0.0
    assert seg.grad is not None and float(seg.grad.abs().sum()) == 0.0


def test_total_loss_uses_only_labelled_samples_for_classification() -> None:
    logits = torch.tensor([2.0, -1.0, 5.0])
    out = _output(cam=_ball(3), seg=_ball(3), logit=logits)
    t = _targets(3, [True, True, False])
    _, parts = total_loss(out, **t, weights=LossWeights(), use_debug=False, use_attributes=False)
    expected = F.binary_cross_entropy_with_logits(logits[:2], t["labels"][:2].float())
    assert parts["cls"] == pytest.approx(float(expected), rel=1e-6)
    assert parts["reg"] == 0.0 and parts["debug"] == 0.0


def test_total_loss_weights_and_attribute_columns() -> None:
    out = _output(cam=1 - _ball(2), seg=_ball(2), logit=torch.tensor([1.0, -1.0]), attributes=torch.full((2, 1), 0.5))
    t = _targets(2, [True, True])
    weights = LossWeights(alpha=2.0, beta=3.0, gamma=4.0, adaptive=False)
    loss, parts = total_loss(out, **t, weights=weights, use_debug=True, use_attributes=True, attribute_columns=[5])
    expected_reg = float(((0.5 - t["attributes"][:, 5]) ** 2).mean())
    assert parts["reg"] == pytest.approx(expected_reg, rel=1e-6)
    assert parts["debug"] == pytest.approx(1.5, rel=1e-6)
    total = parts["cls"] + 2 * parts["debug"] + 3 * parts["seg"] + 4 * parts["reg"]
    assert loss.item() == pytest.approx(total, rel=1e-6)

"""Losses of the collaborative model: BCE, Dice, MSE and the (adaptive) debug loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nodule_edge.train.model import ModelOutput, soft_region_means

__all__ = ["LossWeights", "dice_loss", "csl_loss", "total_loss", "tversky_loss"]


@dataclass(frozen=True)
class LossWeights:
    """Total = L_cls + α·L_debug + β·L_seg + γ·L_reg (all 1 by default, as in the papers).

    L_seg is the soft Dice loss plus the voxel-wise binary cross-entropy (the papers use Dice alone,
    on a 16³ map; at 64³ Dice alone learns too slowly, docs/cv/README.md).
    """

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    delta: float = 0.5  # margin of the contrastive saliency loss
    adaptive: bool = True  # L_ad-CSL = 2|p − 0.5|·L_CSL


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample, ``[N, ...]`` → ``[N]``."""
    dims = tuple(range(1, pred.dim()))
    inter = (pred * target).sum(dims)
    return 1 - (2 * inter + eps) / (pred.sum(dims) + target.sum(dims) + eps)


def tversky_loss(pred: torch.Tensor, target: torch.Tensor, fn_weight: float, eps: float = 1.0) -> torch.Tensor:
    """Soft Tversky loss per sample, ``[N, ...]`` → ``[N]``: 1 − (I + ε/2) / (I + (1 − w)·FP + w·FN + ε/2).

    ``fn_weight`` w weighs the missed voxels against the false ones; at 0.5 it is the soft Dice
    loss (:func:`dice_loss`, the same value up to rounding), above 0.5 a miss costs more.
    """
    dims = tuple(range(1, pred.dim()))
    inter = (pred * target).sum(dims)
    false_pos = pred.sum(dims) - inter
    false_neg = target.sum(dims) - inter
    return 1 - (inter + eps / 2) / (inter + (1 - fn_weight) * false_pos + fn_weight * false_neg + eps / 2)


def csl_loss(out: ModelOutput, delta: float = 0.5, adaptive: bool = True) -> torch.Tensor:
    """Contrastive saliency (debug) loss per sample: max(0, bkg − ndl + δ), optionally adaptive.

    The CAM means are taken inside and outside the *predicted* soft segmentation, as in the paper.
    The adaptive weight 2|p − 0.5| is detached: it scales how much a confident prediction is
    debugged, and is not itself a quantity to optimise.
    """
    inside, outside = soft_region_means(out.cam, out.segmentation_coarse)
    loss = F.relu(outside - inside + delta)
    if adaptive:
        loss = 2 * (out.malignancy_probability.detach() - 0.5).abs() * loss
    return loss


def total_loss(
    out: ModelOutput,
    *,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    masks: torch.Tensor,
    mask_present: torch.Tensor,
    attributes: torch.Tensor,
    attr_present: torch.Tensor,
    weights: LossWeights,
    use_debug: bool,
    use_attributes: bool,
    attribute_columns: slice | list[int] = slice(None),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Combine the task losses over the samples that carry each label.

    ``masks`` are the reference soft masks ``[N, 1, D, D, D]`` at the patch resolution; they are
    average-pooled to the segmentation head's own resolution when it is coarser.

    Returns:
        The scalar loss and its parts (floats, for logging).
    """
    if masks.shape[-1] != out.segmentation.shape[-1]:
        depth, height, width = out.segmentation.shape[2:]
        masks = F.adaptive_avg_pool3d(masks, (depth, height, width))
    # A missing part is a zero that still reaches every head: under DDP each parameter must get a
    # gradient every step (the attribute head is otherwise unused without attributes or targets).
    zero = (out.malignancy_logit.sum() + out.attributes.sum() + out.segmentation.sum()) * 0
    parts: dict[str, torch.Tensor] = {}
    sel = label_mask.bool()
    parts["cls"] = (
        F.binary_cross_entropy_with_logits(out.malignancy_logit.float()[sel], labels.float()[sel])
        if sel.any()
        else zero
    )
    msel = mask_present.bool()
    if msel.any():
        seg, target = out.segmentation.float()[msel], masks[msel].float()
        # Dice alone barely moves a 64³ map whose nodule fills < 1 % of it (the background gets
        # almost no gradient), so the voxel-wise BCE is added (docs/cv/README.md, point 2).
        parts["seg"] = dice_loss(seg, target).mean() + F.binary_cross_entropy(seg.clamp(1e-6, 1 - 1e-6), target)
    else:
        parts["seg"] = zero
    asel = attr_present.bool()
    if use_attributes and asel.any():
        parts["reg"] = F.mse_loss(out.attributes.float()[asel], attributes[asel][:, attribute_columns])
    else:
        parts["reg"] = zero
    parts["debug"] = csl_loss(out, weights.delta, weights.adaptive)[sel].mean() if use_debug and sel.any() else zero
    total = parts["cls"] + weights.alpha * parts["debug"] + weights.beta * parts["seg"] + weights.gamma * parts["reg"]
    return total, {k: float(v.detach()) for k, v in parts.items()}

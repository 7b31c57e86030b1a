"""The collaborative 3D CNN of Zhang et al., with a closed-form, differentiable Grad-CAM.

Backbone: 7³ stride-2 convolution (no max-pool) and three residual blocks (two 3³ convolutions
each, 1³ projection shortcuts); block 1 downsamples to 16³, blocks 2 and 3 keep 16³ with dilation
2 and 4; GroupNorm after every backbone convolution. A light segmentation decoder predicts the
nodule at 16³; a fusion convolution maps that map to 256 channels, adds it to the backbone features
and applies ReLU. After global average pooling, the attribute branch regresses six ratings through
an embedding that the benign/malignant branch also reads (concatenation).

Grad-CAM: the fusion features F reach the heads only through global average pooling g = mean(F), so
∂p/∂F_k(v) = (1/N)·∂p/∂g_k for every voxel v, and ω_k (the spatial mean of ∂p/∂F_k) is the same
expression. ∂p/∂g follows in closed form from the two small fully connected heads, so the CAM is an
ordinary forward computation: differentiable for the debug loss in training, and exportable to ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nodule_edge.attributes import ATTRIBUTE_NAMES

__all__ = ["ModelConfig", "CollaborativeNet", "ModelOutput", "count_parameters"]

_EPS = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    """Architecture switches; the defaults are the shipped model (attributes + concat + debug).

    Attributes:
        in_channels: Patch channels (one per HU window).
        widths: Output channels of the stem and of residual blocks 1–3.
        groups: GroupNorm groups.
        seg_widths: Channels of the two 3³ convolutions of the segmentation decoder.
        embedding_dim: Width of the attribute embedding.
        use_attributes: Train and use the attribute branch.
        concat_embedding: Feed the attribute embedding to the classifier (the papers' concat).
        num_attributes: Regressed attributes (6, or 1 for the malignancy-only ablation).
    """

    in_channels: int = 2
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    groups: int = 8
    seg_widths: tuple[int, int] = (32, 16)
    embedding_dim: int = 64
    use_attributes: bool = True
    concat_embedding: bool = True
    num_attributes: int = len(ATTRIBUTE_NAMES)


@dataclass
class ModelOutput:
    """All heads of one forward pass (16³ maps at the backbone resolution)."""

    malignancy_logit: torch.Tensor  # [N]
    malignancy_probability: torch.Tensor  # [N]
    attributes: torch.Tensor  # [N, A] in [0, 1]
    embedding: torch.Tensor  # [N, E]
    segmentation: torch.Tensor  # [N, 1, 16, 16, 16] probabilities
    features: torch.Tensor  # [N, 256, 16, 16, 16] fusion output
    cam: torch.Tensor  # [N, 1, 16, 16, 16] min-max normalised Grad-CAM
    nodule_attention: torch.Tensor  # [N]
    background_attention: torch.Tensor  # [N]


def _conv_gn(c_in: int, c_out: int, kernel: int, groups: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.GroupNorm(groups, c_out),
    )


class _ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = _conv_gn(c_in, c_out, 3, groups, stride=stride, dilation=dilation)
        self.conv2 = _conv_gn(c_out, c_out, 3, groups, dilation=dilation)
        self.shortcut = _conv_gn(c_in, c_out, 1, groups, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        return F.relu(self.conv2(out) + self.shortcut(x))


def soft_region_means(cam: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CAM inside and outside the predicted nodule, weighted by the soft segmentation."""
    dims = tuple(range(1, cam.dim()))
    inside = (cam * seg).sum(dims) / seg.sum(dims).clamp_min(_EPS)
    outside = (cam * (1 - seg)).sum(dims) / (1 - seg).sum(dims).clamp_min(_EPS)
    return inside, outside


def minmax_normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1].

    The denominator is clamped rather than offset by an epsilon: ONNX optimisers have been seen
    to fold away an ``x + 1e-8``, a clamp survives export.
    """
    flat = cam.flatten(1)
    low = flat.min(dim=1).values
    high = flat.max(dim=1).values
    shape = (-1,) + (1,) * (cam.dim() - 1)
    return (cam - low.view(shape)) / (high - low).clamp_min(1e-8).view(shape)


class CollaborativeNet(nn.Module):
    """Segmentation + attribute + malignancy network with an in-graph Grad-CAM."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        w0, w1, w2, w3 = config.widths
        g = config.groups
        self.stem = _conv_gn(config.in_channels, w0, 7, g, stride=2)
        self.block1 = _ResidualBlock(w0, w1, g, stride=2, dilation=1)
        self.block2 = _ResidualBlock(w1, w2, g, stride=1, dilation=2)
        self.block3 = _ResidualBlock(w2, w3, g, stride=1, dilation=4)
        s0, s1 = config.seg_widths
        self.seg_head = nn.Sequential(
            _conv_gn(w3, s0, 3, g),
            nn.ReLU(inplace=True),
            _conv_gn(s0, s1, 3, g),
            nn.ReLU(inplace=True),
            nn.Conv3d(s1, 1, 1),
        )
        self.fusion = nn.Conv3d(1, w3, 3, padding=1)
        self.attr_embed = nn.Linear(w3, config.embedding_dim)
        self.attr_out = nn.Linear(config.embedding_dim, config.num_attributes)
        cls_in = w3 + (config.embedding_dim if config.use_attributes and config.concat_embedding else 0)
        self.cls = nn.Linear(cls_in, 1)

    @property
    def feature_channels(self) -> int:
        return self.config.widths[3]

    def _heads(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre_embedding = self.attr_embed(pooled)
        embedding = F.relu(pre_embedding)
        attributes = torch.sigmoid(self.attr_out(embedding))
        if self.config.use_attributes and self.config.concat_embedding:
            logit = self.cls(torch.cat([pooled, embedding], dim=1)).squeeze(1)
        else:
            logit = self.cls(pooled).squeeze(1)
        return logit, attributes, pre_embedding

    def logit_gradient(self, pooled: torch.Tensor, pre_embedding: torch.Tensor) -> torch.Tensor:
        """Closed-form ∂z/∂g of the malignancy logit z for the pooled features g (shape [N, C])."""
        c = self.feature_channels
        weight = self.cls.weight[0]  # [C (+E)]
        dz_dg = weight[:c].unsqueeze(0).expand_as(pooled)
        if self.config.use_attributes and self.config.concat_embedding:
            w_e = weight[c:]  # [E]
            relu_mask = (pre_embedding > 0).to(pooled.dtype)  # [N, E]
            dz_dg = dz_dg + (relu_mask * w_e) @ self.attr_embed.weight  # [N, C]
        return dz_dg

    def probability_gradient(self, pooled: torch.Tensor, logit: torch.Tensor, pre_embedding: torch.Tensor) -> torch.Tensor:
        """Closed-form ∂p/∂g = p(1 − p)·∂z/∂g for the pooled features g (shape [N, C])."""
        p = torch.sigmoid(logit)
        return (p * (1 - p)).unsqueeze(1) * self.logit_gradient(pooled, pre_embedding)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        feats = self.block3(self.block2(self.block1(F.relu(self.stem(x)))))
        seg = torch.sigmoid(self.seg_head(feats))
        fused = F.relu(feats + self.fusion(seg))
        pooled = fused.mean(dim=(2, 3, 4))
        logit, attributes, pre_embedding = self._heads(pooled)
        p = torch.sigmoid(logit)
        # ω_k = p(1 − p)/N · ∂z/∂g_k. The positive per-sample factor p(1 − p)/N cancels in the
        # min-max normalisation, so it is left out: in float32 it underflows for confident
        # predictions (p → 1) and would turn the map into rounding noise.
        weights = self.logit_gradient(pooled, pre_embedding)
        raw_cam = (p - 0.5).view(-1, 1, 1, 1, 1) * (weights.view(*weights.shape, 1, 1, 1) * fused).sum(1, keepdim=True)
        cam = minmax_normalise(raw_cam)
        inside, outside = soft_region_means(cam, seg)
        return ModelOutput(
            malignancy_logit=logit,
            malignancy_probability=p,
            attributes=attributes,
            embedding=F.relu(pre_embedding),
            segmentation=seg,
            features=fused,
            cam=cam,
            nodule_attention=inside,
            background_attention=outside,
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

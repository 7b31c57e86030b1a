"""The collaborative 3D CNN of Zhang et al., with a closed-form, differentiable Grad-CAM.

Backbone: 7³ stride-2 convolution (no max-pool) and three residual blocks (two 3³ convolutions
each, 1³ projection shortcuts); block 1 downsamples to 16³, blocks 2 and 3 keep 16³ with dilation
2 and 4; GroupNorm after every backbone convolution.

Segmentation decoder, two designs (``ModelConfig.decoder``):

* ``"unet64"`` (the shipped model): a U-Net-style decoder upsamples the 16³ features to 32³ with a
  skip from the stem and to the patch's 64³ with a skip from the input, so the nodule is outlined
  at 0.5 mm. The papers' 16³ head (2 mm voxels) cannot recover a small nodule's size, and the
  classifier could not use what it did not see (docs/cv/README.md, "What capped the model").
* ``"light16"``: the papers' light decoder at 16³ (the model shipped before, kept for ablations).

Either way the segmentation, pooled to 16³, passes a fusion convolution that adds it to the
backbone features (then ReLU). After global average pooling the attribute branch regresses six
ratings through an embedding that the benign/malignant branch also reads (concatenation).

Size-aware heads (``ModelConfig.seg_features``): six statistics of the nodule under the predicted
soft segmentation (log volume in mm³, mean and spread of both HU windows, solid fraction) are
appended to the inputs of the attribute embedding and the classifier. The segmentation is detached
there: the classifier cannot make the outline bigger or smaller to suit its statistics (the
papers' fusion path still passes the classification gradient into the decoder).

Attribute skip (``ModelConfig.attribute_skip``, added after training by the head step's attribute
readout): a linear path from the head input straight to the six attribute logits, beside the
embedding. The embedding is shaped by the malignancy as much as by the ratings (the classifier
reads it), so the ratings gain from reading the pooled features and statistics directly; neither
the classifier nor Grad-CAM reads the skip (docs/cv/README.md, item 6).

Grad-CAM: the fusion features F reach the heads only through global average pooling g = mean(F), so
∂p/∂F_k(v) = (1/N)·∂p/∂g_k for every voxel v, and ω_k (the spatial mean of ∂p/∂F_k) is the same
expression. ∂p/∂g follows in closed form from the two small fully connected heads, so the CAM is an
ordinary forward computation: differentiable for the debug loss in training, and exportable to ONNX.
The segmentation statistics do not depend on F (they are computed upstream of the fusion), so they
leave the closed form unchanged: they add to the logit, not to ∂z/∂F.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nodule_edge.attributes import ATTRIBUTE_NAMES

__all__ = [
    "use_contiguous_groupnorm",
    "BoxNet",
    "BoxNetConfig",
    "ModelConfig",
    "CollaborativeNet",
    "ModelOutput",
    "count_parameters",
    "LEGACY_MODEL_CONFIG",
    "SEG_FEATURE_NAMES",
]

_EPS = 1e-6
#: Statistics of the nodule under the predicted segmentation that the size-aware heads read.
SEG_FEATURE_NAMES = (
    "log_volume_mm3",
    "lung_window_mean",
    "lung_window_sd",
    "mediastinal_window_mean",
    "mediastinal_window_sd",
    "solid_fraction",
)
Decoder = Literal["unet64", "light16"]


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
        decoder: ``"unet64"`` (segmentation at the patch resolution) or ``"light16"`` (papers').
        seg_features: Feed the segmentation statistics (``SEG_FEATURE_NAMES``) to both heads.
        voxel_mm: Patch voxel spacing, for the volume statistic.
        attribute_skip: A linear path from the head input (pooled features + statistics) straight
            to the attribute logits, beside the embedding. Added and fitted by the head step's
            attribute readout (:meth:`CollaborativeNet.add_attribute_skip`); nothing else reads it.
    """

    in_channels: int = 2
    widths: tuple[int, int, int, int] = (16, 32, 64, 96)
    groups: int = 8
    seg_widths: tuple[int, int] = (24, 24)
    embedding_dim: int = 64
    use_attributes: bool = True
    concat_embedding: bool = True
    num_attributes: int = len(ATTRIBUTE_NAMES)
    decoder: Decoder = "unet64"
    seg_features: bool = True
    voxel_mm: float = 0.5
    attribute_skip: bool = False


#: The model shipped until the nodule-bounded input (checkpoints without the newer keys).
LEGACY_MODEL_CONFIG = {
    "widths": (32, 64, 128, 256),
    "seg_widths": (32, 16),
    "decoder": "light16",
    "seg_features": False,
}


@dataclass
class ModelOutput:
    """All heads of one forward pass (16³ maps at the backbone resolution)."""

    malignancy_logit: torch.Tensor  # [N]
    malignancy_probability: torch.Tensor  # [N]
    attributes: torch.Tensor  # [N, A] in [0, 1]
    embedding: torch.Tensor  # [N, E]
    segmentation: torch.Tensor  # [N, 1, D, D, D] probabilities (D = 64 for unet64, 16 for light16)
    segmentation_coarse: torch.Tensor  # [N, 1, 16, 16, 16] the same pooled to the feature grid
    features: torch.Tensor  # [N, C, 16, 16, 16] fusion output
    classifier_input: torch.Tensor  # [N, C (+S) (+E)] what the malignancy classifier reads
    cam: torch.Tensor  # [N, 1, 16, 16, 16] min-max normalised Grad-CAM
    nodule_attention: torch.Tensor  # [N]
    background_attention: torch.Tensor  # [N]


#: Up to this many channels per group, a channels-last GroupNorm may run on a contiguous copy.
_CONTIGUOUS_GROUPNORM_MAX_GROUP = 6


class _ConvNorm(nn.Sequential):
    """A convolution and its GroupNorm (``[0]``, ``[1]``: the keys of the ``nn.Sequential`` it was).

    In the channels-last layout that training uses on CPU (bf16), PyTorch's GroupNorm backward
    for groups of a few channels is several times slower than on a contiguous tensor. With
    ``contiguous_norm`` set (:func:`use_contiguous_groupnorm`, ``[train] contiguous_groupnorm``),
    groups of at most ``_CONTIGUOUS_GROUPNORM_MAX_GROUP`` channels are normalised on a contiguous
    copy whose output goes back to channels-last: the same function, a training step 13 % shorter
    on an AMX Xeon (``docs/measurements/groupnorm_layout.py``), but other kernels, so other
    rounding than the runs recorded without it. Contiguous tensors (inference, export) always
    take the plain path, so the exported graph is unchanged.
    """

    contiguous_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x)
        norm = self[1]
        if (
            self.contiguous_norm
            and isinstance(norm, nn.GroupNorm)
            and norm.num_channels // norm.num_groups <= _CONTIGUOUS_GROUPNORM_MAX_GROUP
            and y.dim() == 5
            and not y.is_contiguous()
            and y.is_contiguous(memory_format=torch.channels_last_3d)
        ):
            return norm(y.contiguous()).contiguous(memory_format=torch.channels_last_3d)
        return norm(y)


def use_contiguous_groupnorm(model: nn.Module, on: bool = True) -> int:
    """Switch the contiguous-copy GroupNorm (:class:`_ConvNorm`) of every block of ``model``.

    Returns:
        How many blocks have small enough groups to take it.
    """
    blocks = [m for m in model.modules() if isinstance(m, _ConvNorm)]
    for block in blocks:
        block.contiguous_norm = on
    return sum(
        1
        for b in blocks
        if isinstance(b[1], nn.GroupNorm) and b[1].num_channels // b[1].num_groups <= _CONTIGUOUS_GROUPNORM_MAX_GROUP
    )


def _conv_gn(c_in: int, c_out: int, kernel: int, groups: int, stride: int = 1, dilation: int = 1) -> _ConvNorm:
    padding = dilation * (kernel // 2)
    return _ConvNorm(
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


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when ``x`` is laid out that way (training on CPU with bf16), else NCDHW."""
    return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format


def space_to_depth(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``[N, C, D, H, W]`` → ``[N, C·f³, D/f, H/f, W/f]``: each f³ block becomes channels."""
    n, c, d, h, w = x.shape
    x = x.reshape(n, c, d // factor, factor, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, c * factor**3, d // factor, h // factor, w // factor)


def depth_to_space(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`."""
    n, c, d, h, w = x.shape
    c_out = c // factor**3
    x = x.reshape(n, c_out, factor, factor, factor, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(n, c_out, d * factor, h * factor, w * factor)


class _UNetDecoder(nn.Module):
    """16³ features → 32³ with skips from the stem and the input → a 64³ segmentation logit.

    The input's 2³ blocks enter at 32³ as channels and the last convolution predicts one logit per
    0.5 mm sub-voxel (depth-to-space), so the map has the patch's resolution while every
    convolution runs at 32³: a 3³ convolution at 64³ with 8–18 channels took half of a training
    step on the CPU (oneDNN runs such thin layers far from peak).
    """

    def __init__(self, c_feat: int, c_stem: int, c_in: int, widths: tuple[int, int], groups: int) -> None:
        super().__init__()
        w_reduce, w32 = widths
        self.reduce = nn.Conv3d(c_feat, w_reduce, 1)
        self.refine = nn.Sequential(
            _conv_gn(w_reduce + c_stem + 8 * c_in, w32, 3, groups),
            nn.ReLU(inplace=True),
            _conv_gn(w32, w32, 3, groups),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Conv3d(w32, 8, 1)
        # Start from "no nodule here" (p ≈ 0.05): the nodule fills about 1 % of the cube.
        if self.out.bias is not None:  # Conv3d has a bias by default
            nn.init.constant_(self.out.bias, -3.0)

    def forward(self, feats: torch.Tensor, stem: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(self.reduce(feats), size=stem.shape[2:], mode="trilinear", align_corners=False)
        # One dtype and one memory layout for the concatenation: under bf16 autocast the
        # interpolation runs in fp32 (a mixed cat is promoted to fp32 and cast back), and a cat of
        # mixed layouts comes out NCDHW, which the channels_last convolution then copies back in the
        # forward and the backward pass (benches/bench_training.py).
        fmt = _memory_format(stem)
        parts = [y.to(stem.dtype), stem, space_to_depth(x).to(stem.dtype)]
        y = self.refine(torch.cat([t.contiguous(memory_format=fmt) for t in parts], dim=1))
        return depth_to_space(self.out(y))


def segmentation_statistics(seg: torch.Tensor, x: torch.Tensor, voxel_mm: float) -> torch.Tensor:
    """``SEG_FEATURE_NAMES`` of the nodule under a soft segmentation ``[N, 1, D, D, D]``.

    The input ``x`` holds the two windowed channels (lung, mediastinal) at the same grid; the
    solid fraction is the share of the nodule above the mediastinal window's floor (-160 HU).
    Each statistic is scaled to about unit range so that one learning rate suits all. They are
    taken on a grid of at most 32³ (2³ averaging keeps the volume; at 64³ they cost a tenth of a
    training step).
    """
    # Fixed-kernel average pooling (= adaptive pooling for these divisible sizes, and exportable
    # to ONNX, which adaptive 3-D pooling is not).
    if seg.shape[-1] > 32:
        seg = F.avg_pool3d(seg, seg.shape[-1] // 32)
    voxel = voxel_mm * x.shape[-1] / seg.shape[-1]  # edge of one statistics voxel in mm
    if x.shape[-1] != seg.shape[-1]:
        x = F.avg_pool3d(x, x.shape[-1] // seg.shape[-1])
    weight = seg.float()
    mass = weight.sum(dim=(1, 2, 3, 4))
    denom = mass.clamp_min(_EPS)
    xf = x.float()
    means = (weight * xf).sum(dim=(2, 3, 4)) / denom[:, None]  # [N, 2]
    var = (weight * (xf - means[:, :, None, None, None]) ** 2).sum(dim=(2, 3, 4)) / denom[:, None]
    solid = (weight * (xf[:, 1:2] > 0).float()).sum(dim=(1, 2, 3, 4)) / denom
    log_volume = (torch.log1p(mass * voxel**3) - 5.0) / 2.0
    stats = [
        log_volume,
        means[:, 0],
        var[:, 0].clamp_min(_EPS).sqrt() * 4,
        means[:, 1],
        var[:, 1].clamp_min(_EPS).sqrt() * 4,
        solid,
    ]
    return torch.stack(stats, dim=1)


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
        if config.decoder == "unet64":
            self.seg_head: nn.Module = _UNetDecoder(w3, w0, config.in_channels, (s0, s1), g)
        elif config.decoder == "light16":
            self.seg_head = nn.Sequential(
                _conv_gn(w3, s0, 3, g),
                nn.ReLU(inplace=True),
                _conv_gn(s0, s1, 3, g),
                nn.ReLU(inplace=True),
                nn.Conv3d(s1, 1, 1),
            )
        else:
            raise ValueError(f"ModelConfig.decoder must be 'unet64' or 'light16', got {config.decoder!r}")
        self.fusion = nn.Conv3d(1, w3, 3, padding=1)
        n_stats = len(SEG_FEATURE_NAMES) if config.seg_features else 0
        self.attr_embed = nn.Linear(w3 + n_stats, config.embedding_dim)
        self.attr_out = nn.Linear(config.embedding_dim, config.num_attributes)
        self.attr_skip: nn.Linear | None = (
            nn.Linear(w3 + n_stats, config.num_attributes, bias=False) if config.attribute_skip else None
        )
        cls_in = w3 + n_stats + (config.embedding_dim if config.use_attributes and config.concat_embedding else 0)
        self.cls = nn.Linear(cls_in, 1)

    @property
    def feature_channels(self) -> int:
        return self.config.widths[3]

    @property
    def n_seg_features(self) -> int:
        """Segmentation statistics the heads read (0 without size-aware heads)."""
        return len(SEG_FEATURE_NAMES) if self.config.seg_features else 0

    def add_attribute_skip(self) -> nn.Linear:
        """The attribute skip path (``ModelConfig.attribute_skip``), added as zeros (outputs unchanged)
        when the model has none yet."""
        skip = self.attr_skip
        if skip is None:
            skip = nn.Linear(self.attr_embed.in_features, self.attr_out.out_features, bias=False)
            nn.init.zeros_(skip.weight)
            skip.to(self.attr_out.weight)
            self.attr_skip = skip
            self.config = replace(self.config, attribute_skip=True)
        return skip

    def _heads(
        self, pooled: torch.Tensor, stats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        head_in = pooled if stats is None else torch.cat([pooled, stats.to(pooled.dtype)], dim=1)
        pre_embedding = self.attr_embed(head_in)
        embedding = F.relu(pre_embedding)
        attribute_logits = self.attr_out(embedding)
        if self.attr_skip is not None:
            attribute_logits = attribute_logits + self.attr_skip(head_in)
        attributes = torch.sigmoid(attribute_logits)
        cls_in = (
            torch.cat([head_in, embedding], dim=1)
            if self.config.use_attributes and self.config.concat_embedding
            else head_in
        )
        logit = self.cls(cls_in).squeeze(1)
        return logit, attributes, pre_embedding, cls_in

    def logit_gradient(self, pooled: torch.Tensor, pre_embedding: torch.Tensor) -> torch.Tensor:
        """Closed-form ∂z/∂g of the malignancy logit z for the pooled features g (shape [N, C])."""
        c = self.feature_channels
        head_in = c + (len(SEG_FEATURE_NAMES) if self.config.seg_features else 0)
        weight = self.cls.weight[0]  # [C (+S) (+E)]
        dz_dg = weight[:c].unsqueeze(0).expand_as(pooled)
        if self.config.use_attributes and self.config.concat_embedding:
            w_e = weight[head_in:]  # [E]
            relu_mask = (pre_embedding > 0).to(pooled.dtype)  # [N, E]
            dz_dg = dz_dg + (relu_mask * w_e) @ self.attr_embed.weight[:, :c]  # [N, C]
        return dz_dg

    def probability_gradient(
        self, pooled: torch.Tensor, logit: torch.Tensor, pre_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Closed-form ∂p/∂g = p(1 − p)·∂z/∂g for the pooled features g (shape [N, C])."""
        p = torch.sigmoid(logit)
        return (p * (1 - p)).unsqueeze(1) * self.logit_gradient(pooled, pre_embedding)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        stem = F.relu(self.stem(x))
        feats = self.block3(self.block2(self.block1(stem)))
        if self.config.decoder == "unet64":
            seg = torch.sigmoid(self.seg_head(feats, stem, x))
            coarse = F.avg_pool3d(seg, seg.shape[-1] // feats.shape[-1])
        else:
            seg = coarse = torch.sigmoid(self.seg_head(feats))
        fused = F.relu(feats + self.fusion(coarse))
        pooled = fused.mean(dim=(2, 3, 4))
        stats = segmentation_statistics(seg.detach(), x, self.config.voxel_mm) if self.config.seg_features else None
        logit, attributes, pre_embedding, cls_in = self._heads(pooled, stats)
        p = torch.sigmoid(logit)
        # ω_k = p(1 − p)/N · ∂z/∂g_k. The positive per-sample factor p(1 − p)/N cancels in the
        # min-max normalisation, so it is left out: in float32 it underflows for confident
        # predictions (p → 1) and would turn the map into rounding noise.
        weights = self.logit_gradient(pooled, pre_embedding)
        raw_cam = (p - 0.5).view(-1, 1, 1, 1, 1) * (weights.view(*weights.shape, 1, 1, 1) * fused).sum(1, keepdim=True)
        cam = minmax_normalise(raw_cam)
        inside, outside = soft_region_means(cam, coarse)
        return ModelOutput(
            malignancy_logit=logit,
            malignancy_probability=p,
            attributes=attributes,
            embedding=F.relu(pre_embedding),
            segmentation=seg,
            segmentation_coarse=coarse,
            features=fused,
            classifier_input=cls_in,
            cam=cam,
            nodule_attention=inside,
            background_attention=outside,
        )


@dataclass(frozen=True)
class BoxNetConfig:
    """A segmentation-only network for the runtime's first pass (:class:`BoxNet`).

    Attributes:
        in_channels: Patch channels (one per HU window).
        widths: Output channels of the stem and of residual blocks 1–3; the decoder reuses the
            first two as its widths.
        groups: GroupNorm groups.
    """

    in_channels: int = 2
    widths: tuple[int, int, int, int] = (8, 16, 32, 32)
    groups: int = 4


class BoxNet(nn.Module):
    """The collaborative network's backbone and 0.5 mm decoder, thin, without the heads.

    The runtime's first pass only draws the nodule's box (:func:`nodule_edge.patch.run_nodule_bounded`),
    so it needs a segmentation, not a diagnosis. With the full network it cost two thirds of the
    second pass; this one, trained on segmentation alone, is a fraction of that
    (docs/measurements/runtime_path_latency.md). Its forward returns the probability map
    ``[N, 1, S, S, S]`` at the patch's resolution.
    """

    def __init__(self, config: BoxNetConfig = BoxNetConfig()) -> None:
        super().__init__()
        self.config = config
        w0, w1, w2, w3 = config.widths
        g = config.groups
        self.stem = _conv_gn(config.in_channels, w0, 7, g, stride=2)
        self.block1 = _ResidualBlock(w0, w1, g, stride=2, dilation=1)
        self.block2 = _ResidualBlock(w1, w2, g, stride=1, dilation=2)
        self.block3 = _ResidualBlock(w2, w3, g, stride=1, dilation=4)
        self.seg_head = _UNetDecoder(w3, w0, config.in_channels, (w0, w1), g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = F.relu(self.stem(x))
        feats = self.block3(self.block2(self.block1(stem)))
        return torch.sigmoid(self.seg_head(feats, stem, x))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

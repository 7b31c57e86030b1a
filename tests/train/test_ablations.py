"""Every Table-1 ablation config builds its model and takes a finite optimisation step."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from nodule_edge.train.config import TrainConfig, load_config, training_config_sha256
from nodule_edge.train.losses import LossWeights, total_loss
from nodule_edge.train.model import SEG_FEATURE_NAMES, CollaborativeNet
from nodule_edge.train.trainer import MALIGNANCY_COLUMN, model_config_from
from tests.train.test_config import FIRST_PASS_ABLATIONS, HEAD_STEP_ABLATIONS, WIDE_WIDTHS, _wide_shipped_config

REPO_ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = sorted((REPO_ROOT / "configs" / "ablations").glob("*.toml"))

# name: (use_attributes, concat_embedding, malignancy_only, debug) — the papers' Table-1 rows.
EXPECTED = {
    "no_extras": (False, False, False, False),
    "attributes_only": (True, False, False, False),
    "debug_only": (False, False, False, True),
    "attributes_debug_no_concat": (True, False, False, True),
    "malignancy_regression_debug": (True, True, True, True),
    "attributes_concat": (True, True, False, False),
    "attributes_concat_debug": (True, True, False, True),
    "papers_model": (True, True, False, True),
    "head_refit_full": (True, True, False, True),
    "head_refit_none": (True, True, False, True),
    "light16_decoder": (True, True, False, True),
    "self_box": (True, True, False, True),
    "epochs20": (True, True, False, True),
    "attribute_weight16": (True, True, False, True),
    "no_attribute_readout": (True, True, False, True),
    "no_attribute_skip": (True, True, False, True),
    "parity_penalty": (True, True, False, True),
    "no_parity_penalty": (True, True, False, True),
    "box_net": (True, True, False, True),
    "box_net_parity2": (True, True, False, True),
    "epochs20_box_net": (True, True, False, True),
    "head_l2_wide": (True, True, False, True),
    "head_calibrated": (True, True, False, True),
    "box_net_epochs40": (True, True, False, True),
    "weight_ema": (True, True, False, True),
    "lr_warmup": (True, True, False, True),
    "balanced_sure": (True, True, False, True),
    "contiguous_groupnorm": (True, True, False, True),
    "narrow_widths": (True, True, False, True),
    "network_seed1": (True, True, False, True),
    "outline_statistics": (True, True, False, True),
    "outline_statistics_debug2": (True, True, False, True),
    "outline_statistics_sign": (True, True, False, True),
    "outline_statistics_even": (True, True, False, True),
    "outline_offset": (True, True, False, True),
    "outline_offset_fitted": (True, True, False, True),
    "head_l2_wide_outline": (True, True, False, True),
}


def test_full_ablation_equals_the_shipped_config() -> None:
    full = load_config(REPO_ROOT / "configs" / "ablations" / "attributes_concat_debug.toml")
    shipped = load_config(REPO_ROOT / "configs" / "shipped.toml")
    assert (full.model, full.loss, full.train) == (shipped.model, shipped.loss, shipped.train)
    assert full.cv == dataclasses.replace(shipped.cv, export_dir=full.cv.export_dir)
    # The base's relative paths are re-expressed from the ablation's own folder.
    assert full.resolve(full.data.voi_dir).resolve() == shipped.resolve(shipped.data.voi_dir).resolve()
    assert full.resolve(full.cv.export_dir).resolve() == REPO_ROOT / "docs" / "ablations" / "attributes_concat_debug"


def test_the_size_aware_and_decoder_ablations_change_one_switch_each() -> None:
    # Both ran on the wider network shipped until narrow_widths, which they pin.
    shipped = _wide_shipped_config()
    papers = load_config(REPO_ROOT / "configs" / "ablations" / "papers_model.toml")
    light = load_config(REPO_ROOT / "configs" / "ablations" / "light16_decoder.toml")
    assert papers.model == dataclasses.replace(shipped.model, seg_features=False)
    assert light.model == dataclasses.replace(shipped.model, decoder="light16")
    assert (papers.train, light.train) == (shipped.train, shipped.train)


def _networks_reference(cfg: TrainConfig) -> TrainConfig:
    """The shipped run whose networks a head-step ablation re-evaluates: the wider network's
    (docs/ablations/wide_widths) for those recorded on it, which pin its widths; else today's."""
    return (
        _wide_shipped_config()
        if cfg.model.widths == WIDE_WIDTHS
        else load_config(REPO_ROOT / "configs" / "shipped.toml")
    )


def test_head_step_ablations_reuse_the_networks_of_the_shipped_run_they_were_recorded_on() -> None:
    for name in HEAD_STEP_ABLATIONS + FIRST_PASS_ABLATIONS:
        cfg = load_config(REPO_ROOT / "configs" / "ablations" / f"{name}.toml")
        shipped = _networks_reference(cfg)
        # What shapes the network's weights is that run's, in the same output folder.
        assert (cfg.model, cfg.loss, cfg.train) == (shipped.model, shipped.loss, shipped.train), name
        assert training_config_sha256(cfg) == training_config_sha256(shipped), name  # so the checkpoints resume
        assert cfg.resolve(cfg.data.voi_dir).resolve() == shipped.resolve(shipped.data.voi_dir).resolve(), name
        assert cfg.resolve(cfg.output_dir).resolve() == shipped.resolve(shipped.output_dir).resolve(), name
    weighted = load_config(REPO_ROOT / "configs" / "ablations" / "attribute_weight16.toml")
    assert weighted.head == dataclasses.replace(
        shipped.head, attribute_weight=16.0, attribute_readout=False, attribute_skip=False, parity_weight=0.0
    )
    no_skip = load_config(REPO_ROOT / "configs" / "ablations" / "no_attribute_skip.toml")
    assert no_skip.head == dataclasses.replace(shipped.head, attribute_skip=False, parity_weight=0.0)
    no_parity = load_config(REPO_ROOT / "configs" / "ablations" / "no_parity_penalty.toml")
    assert no_parity.head == dataclasses.replace(shipped.head, parity_weight=0.0)
    # A key at its default leaves the hashes of folds recorded before it existed unchanged.
    assert "attribute_weight" not in shipped.to_dict()["head"]


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_takes_one_optimisation_step(path: Path) -> None:
    cfg = load_config(path)
    use_attributes, concat, malignancy_only, debug = EXPECTED[path.stem]
    assert (
        cfg.model.use_attributes,
        cfg.model.concat_embedding,
        cfg.model.malignancy_only,
        cfg.loss.debug,
    ) == EXPECTED[path.stem]

    torch.manual_seed(0)
    model = CollaborativeNet(model_config_from(cfg)).train()
    n_stats = len(SEG_FEATURE_NAMES) if cfg.model.seg_features else 0
    assert model.cls.in_features == cfg.model.widths[3] + n_stats + (64 if use_attributes and concat else 0)
    assert model.attr_out.out_features == (1 if malignancy_only else 6)

    gen = torch.Generator().manual_seed(1)
    # 32³ inputs (8³ maps): the model is fully convolutional and the step stays fast.
    images = torch.rand(2, 2, 32, 32, 32, generator=gen)
    masks = (torch.rand(2, 1, 32, 32, 32, generator=gen) > 0.7).float()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    out = model(images)
    loss, parts = total_loss(
        out,
        labels=torch.tensor([1, 0]),
        label_mask=torch.tensor([True, True]),
        masks=masks,
        mask_present=torch.tensor([True, True]),
        attributes=torch.rand(2, 6, generator=gen),
        attr_present=torch.tensor([True, True]),
        weights=LossWeights(cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.delta, cfg.loss.adaptive),
        use_debug=cfg.loss.debug,
        use_attributes=cfg.model.use_attributes,
        attribute_columns=[MALIGNANCY_COLUMN] if cfg.model.malignancy_only else slice(None),
    )
    opt.zero_grad()
    loss.backward()
    # DDP needs a gradient for every parameter at every step, used by the loss or not.
    missing = [k for k, v in model.named_parameters() if v.grad is None]
    assert not missing, missing
    attr_grad = float(model.attr_out.weight.grad.abs().sum())
    opt.step()

    assert math.isfinite(loss.item())
    assert all(math.isfinite(v) for v in parts.values())
    changed = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    seg_out = "seg_head.out.weight" if cfg.model.decoder == "unet64" else "seg_head.4.weight"
    for name in ("stem.0.weight", "block3.conv2.0.weight", seg_out, "fusion.weight", "cls.weight"):
        assert name in changed, name
    if use_attributes:
        assert parts["reg"] > 0
        assert attr_grad > 0
    else:
        assert parts["reg"] == 0.0
        assert attr_grad == 0.0
    if not debug:
        assert parts["debug"] == 0.0


def test_the_head_step_ablations_change_only_the_refit() -> None:
    shipped = load_config(REPO_ROOT / "configs" / "shipped.toml")
    assert shipped.head.refit == "debugged"
    for name, refit in (("head_refit_none", "none"), ("head_refit_full", "full")):
        cfg = load_config(REPO_ROOT / "configs" / "ablations" / f"{name}.toml")
        assert cfg.head.refit == refit
        shipped = _networks_reference(cfg)
        assert (cfg.data, cfg.model, cfg.loss, cfg.train) == (
            dataclasses.replace(shipped.data, voi_dir=cfg.data.voi_dir, cache_dir=cfg.data.cache_dir),
            shipped.model,
            shipped.loss,
            shipped.train,
        )

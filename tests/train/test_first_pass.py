"""The runtime's first pass as a small network: the box net, its checkpoints and its CV run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nodule_edge.cli import main
from nodule_edge.errors import DataError
from nodule_edge.train.config import FirstPassSection
from nodule_edge.train.first_pass import _key, box_net_segmenter, load_box_net, save_box_net, train_box_net
from nodule_edge.train.model import BoxNet, BoxNetConfig, CollaborativeNet, ModelConfig
from nodule_edge.train.trainer import save_checkpoint

from .test_trainer import TINY_OVERRIDES

SIZE = 64


def _cubes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise cubes with a bright ball of random radius near the centre, and the ball's mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    images = rng.uniform(0.0, 0.3, (n, 2, SIZE, SIZE, SIZE)).astype(np.float16)
    masks = np.zeros((n, SIZE, SIZE, SIZE), np.float16)
    for i in range(n):
        c = 32 + rng.integers(-4, 5, 3)
        ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= rng.uniform(4, 10) ** 2
        images[i, :, ball] += np.float16(0.6)
        masks[i, ball] = 1
    return images, masks


def test_box_net_maps_patches_to_a_probability_map_at_the_patch_grid() -> None:
    net = BoxNet(BoxNetConfig(widths=(4, 8, 8, 8))).eval()
    with torch.no_grad():
        seg = net(torch.rand(2, 2, SIZE, SIZE, SIZE))
    assert seg.shape == (2, 1, SIZE, SIZE, SIZE)
    assert float(seg.min()) >= 0 and float(seg.max()) <= 1
    # A fraction of the collaborative network (a fifth of the shipped widths', a tenth of the wider
    # network it was designed beside): that is its point.
    assert sum(p.numel() for p in BoxNet().parameters()) < 0.25 * sum(
        p.numel() for p in CollaborativeNet(ModelConfig()).parameters()
    )


def test_training_lowers_the_loss_then_a_finished_net_is_reused(tmp_path: Path) -> None:
    images, masks = _cubes(6)
    section = FirstPassSection(widths=(4, 8, 8, 8), epochs=3, lr=3e-3, batch=3)
    out = tmp_path / "box_net.safetensors"
    idx = np.arange(6)
    messages: list[str] = []
    net, meta = train_box_net(section, images, masks, np.ones(6, bool), idx, out, progress=messages.append)
    losses = [h["loss"] for h in meta["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    # The same section and nodules: loaded, not trained again, same outputs.
    again, _ = train_box_net(section, images, masks, np.ones(6, bool), idx, out, progress=messages.append)
    assert any("finished earlier" in m for m in messages)
    x = np.asarray(images[:2], np.float32)
    np.testing.assert_array_equal(box_net_segmenter(net)(x), box_net_segmenter(again)(x))
    # Other nodules: trained again.
    messages.clear()
    train_box_net(section, images, masks, np.ones(6, bool), idx[:4], out, progress=messages.append)
    assert not any("finished earlier" in m for m in messages)


def test_save_and_load_give_identical_segmentations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = BoxNet(BoxNetConfig(widths=(4, 8, 8, 8))).eval()
    save_box_net(tmp_path / "b.safetensors", net, {"note": "test"})
    loaded, meta = load_box_net(tmp_path / "b.safetensors")
    assert meta["note"] == "test" and meta["box_net_config"]["widths"] == [4, 8, 8, 8]
    x = np.random.default_rng(1).random((3, 2, SIZE, SIZE, SIZE), dtype=np.float32)
    seg = box_net_segmenter(loaded, batch_size=2)(x)
    assert seg.shape == (3, SIZE, SIZE, SIZE) and seg.dtype == np.float32
    np.testing.assert_allclose(seg, box_net_segmenter(net)(x), atol=1e-6)  # batch sizes differ


def test_a_collaborative_checkpoint_is_not_a_box_net(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.safetensors", CollaborativeNet(ModelConfig(widths=(8, 8, 8, 8))), {})
    with pytest.raises(DataError, match="is not a box net"):
        load_box_net(tmp_path / "m.safetensors")
    with pytest.raises(DataError, match="missing"):
        load_box_net(tmp_path / "absent.safetensors")


def test_no_masks_in_the_training_split_is_an_error(tmp_path: Path) -> None:
    images, masks = _cubes(2)
    with pytest.raises(DataError, match="no nodule of the training split has a mask"):
        train_box_net(
            FirstPassSection(epochs=1), images, masks, np.zeros(2, bool), np.arange(2), tmp_path / "b.safetensors"
        )


def test_tiny_run_with_a_box_net_first_pass(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    args = ["train", str(tiny_config()), "--folds-only"]
    for item in [
        *TINY_OVERRIDES,
        'first_pass.network="box_net"',
        "first_pass.epochs=1",
        "first_pass.widths=[4, 8, 8, 8]",
    ]:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    fold = tmp_path / "out" / "fold0"
    assert (fold / "box_net.safetensors").is_file()
    assert [h["epoch"] for h in json.loads((fold / "box_net.json").read_text())["history"]] == [1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    first = summary["folds"]["0"]["first_pass"]
    assert first["network"] == "box_net" and first["box_net"]["first_pass"]["widths"] == [4, 8, 8, 8]
    assert 0 <= first["dice_mean"] <= 1 and 0 <= first["boxes_within_one_voxel_fraction"] <= 1
    assert summary["config"]["first_pass"]["network"] == "box_net"


def test_a_box_net_of_the_same_key_elsewhere_is_reused_and_left_alone(tmp_path: Path) -> None:
    """A head-step ablation in the shipped run's folder reads the shipped box net, never replaces it."""
    images, masks = _cubes(6)
    section = FirstPassSection(widths=(4, 8, 8, 8), epochs=1, lr=3e-3, batch=3)
    owner, own = tmp_path / "box_net.safetensors", tmp_path / "box_net.ablation.safetensors"
    idx = np.arange(6)
    train_box_net(section, images, masks, np.ones(6, bool), idx, owner)
    before = owner.read_bytes()
    messages: list[str] = []
    _, meta = train_box_net(
        section, images, masks, np.ones(6, bool), idx, own, reuse=(owner,), progress=messages.append
    )
    assert meta["checkpoint"] == str(owner) and not own.exists()
    assert any("finished earlier" in m and str(owner) in m for m in messages)
    # Another key (other nodules): trained into its own file, the owner's untouched.
    _, meta = train_box_net(section, images, masks, np.ones(6, bool), idx[:4], own, reuse=(owner,))
    assert meta["checkpoint"] == str(own) and own.is_file() and owner.read_bytes() == before


def test_the_miss_weight_at_its_default_keeps_the_key_box_nets_were_recorded_under() -> None:
    """Box nets trained before ``fn_weight`` existed are found again; another weight is another net."""
    section, idx = FirstPassSection(), np.arange(5)
    recorded = {"first_pass": {"network": "box_net", "widths": [8, 16, 32, 32], "epochs": 20, "lr": 2e-3, "batch": 8}}
    from nodule_edge._files import sha256_bytes

    old = sha256_bytes(json.dumps({**recorded, "nodules": [0, 1, 2, 3, 4], "seed": 0}, sort_keys=True).encode())
    assert _key(section, idx, 0) == old
    assert _key(FirstPassSection(fn_weight=0.7), idx, 0) != old


def test_a_heavier_miss_weight_trains_a_box_net_that_outlines_more(tmp_path: Path) -> None:
    images, masks = _cubes(6)
    idx = np.arange(6)
    volumes = []
    for weight in (0.5, 0.9):
        section = FirstPassSection(widths=(4, 8, 8, 8), epochs=2, lr=3e-3, batch=3, fn_weight=weight)
        net, _ = train_box_net(section, images, masks, np.ones(6, bool), idx, tmp_path / f"{weight}.safetensors")
        volumes.append(float((box_net_segmenter(net)(np.asarray(images, np.float32)) >= 0.5).sum()))
    assert volumes[1] > volumes[0]

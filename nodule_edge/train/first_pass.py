"""The runtime's first pass as its own small network: train it, load it, segment with it.

The runtime's path is two passes (:func:`nodule_edge.patch.run_nodule_bounded`): the first only
draws the nodule's box, the second diagnoses the bounded cube. With ``first_pass.network =
"box_net"`` the first pass is a :class:`~nodule_edge.train.model.BoxNet`, trained after the
collaborative network on the same nodules, on segmentation alone (soft Dice + BCE against the
readers' consensus mask; soft Tversky with ``fn_weight`` other than 0.5), on whole cubes as the
runtime's first pass reads them, with the training's flips and in-plane rotations. Evaluation, the head refit and the runtime all draw the
box from it (docs/measurements/runtime_path_latency.md says why).

Checkpoints are safetensors with a JSON sidecar, like the collaborative network's; a finished
one is reused when its sidecar records the same first-pass section and training nodules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nodule_edge._files import atomic_file, sha256_bytes, write_text_atomic
from nodule_edge.errors import DataError
from nodule_edge.train.config import FirstPassSection, section_dict
from nodule_edge.train.losses import dice_loss, tversky_loss
from nodule_edge.train.model import BoxNet, BoxNetConfig

__all__ = ["box_net_segmenter", "load_box_net", "save_box_net", "train_box_net"]

log = logging.getLogger(__name__)

_FORMAT = "nodule-edge-box-net-v1"


def _key(section: FirstPassSection, idx: np.ndarray, seed: int) -> str:
    """What a finished box net was trained under: the section, the nodules and the seed."""
    data = {
        "first_pass": section_dict("first_pass", dataclasses.asdict(section)),
        "nodules": [int(i) for i in np.sort(idx)],
        "seed": seed,
    }
    return sha256_bytes(json.dumps(data, sort_keys=True).encode())


def train_box_net(
    section: FirstPassSection,
    images: np.ndarray,
    masks: np.ndarray,
    has_mask: np.ndarray,
    idx: np.ndarray,
    out_path: Path,
    *,
    reuse: Sequence[Path] = (),
    seed: int = 0,
    bf16: bool = False,
    channels_last: bool = False,
    device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[BoxNet, dict[str, Any]]:
    """Train a box net on the nodules ``idx`` that have a mask, or load the one finished earlier.

    Args:
        section: The config's first-pass section (widths, epochs, learning rate, batch).
        images: Whole cubes ``[N, C, S, S, S]`` (the patch cache; float16 is fine).
        masks: Reference masks ``[N, S, S, S]`` on the patch grid.
        has_mask: ``[N]`` which nodules have a mask.
        idx: The training nodules (rows of ``images``).
        out_path: ``.safetensors`` destination; a JSON sidecar goes beside it.
        reuse: Further box nets to load instead of training when one was trained under the same
            key (section, nodules, seed): another config's in a shared run folder.
        seed: Seeds the initialisation, the order and the augmentation.
        bf16: Train under bf16 autocast.
        channels_last: Train in the channels-last 3-D memory format (with bf16 on AMX CPUs).
        device: Where it trains (default the CPU). Batches and augmentation are drawn on the CPU
            from the same seeded generators on every device, so only the arithmetic differs.
        progress: Called with one line per epoch.

    Returns:
        The trained network (eval mode, float32, on the CPU) and its sidecar's contents, with
        ``checkpoint``: the file it was loaded from or saved to.

    Raises:
        DataError: None of ``idx`` has a mask.
    """
    from nodule_edge.train.trainer import augment  # the collaborative network's augmentation

    say = progress or log.info
    key = _key(section, idx, seed)
    for path in (out_path, *reuse):
        if path.is_file() and path.with_suffix(".json").is_file():
            net, meta = load_box_net(path)
            if meta.get("key") == key:
                say(f"box net: finished earlier ({path}), not trained again")
                return net, {**meta, "checkpoint": str(path)}
    fit = np.sort(idx[has_mask[idx]])
    if len(fit) == 0:
        raise DataError("no nodule of the training split has a mask: the box net has nothing to learn")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = device or torch.device("cpu")
    net = BoxNet(BoxNetConfig(in_channels=images.shape[1], widths=tuple(section.widths)))  # type: ignore[arg-type]
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch stubs omit memory_format on Module.to
    opt = torch.optim.AdamW(net.parameters(), lr=section.lr, weight_decay=1e-4)
    steps = math.ceil(len(fit) / section.batch)
    history = []
    t_start = time.perf_counter()
    for epoch in range(section.epochs):
        # Cosine decay over the budget, as the collaborative network's schedule.
        for group in opt.param_groups:
            group["lr"] = section.lr * 0.5 * (1 + math.cos(math.pi * epoch / section.epochs))
        order = rng.permutation(fit)
        net.train()
        t0, total = time.perf_counter(), 0.0
        for step in range(steps):
            batch = np.sort(order[step * section.batch : (step + 1) * section.batch])
            x = torch.from_numpy(np.asarray(images[batch], np.float32))
            m = torch.from_numpy(np.asarray(masks[batch], np.float32))
            x, m = augment(x, m, gen)
            x, m = x.to(device, non_blocking=True), m.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                seg = net(x)
            seg = seg.float()[:, 0]
            # At 0.5 the Dice function itself, so that the shipped box nets train to the same bits.
            overlap = dice_loss(seg, m) if section.fn_weight == 0.5 else tversky_loss(seg, m, section.fn_weight)
            loss = overlap.mean() + F.binary_cross_entropy(seg.clamp(1e-6, 1 - 1e-6), m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "seconds": round(seconds, 1), "loss": round(total / steps, 4)})
        say(f"box net epoch {epoch + 1}/{section.epochs} {seconds:.1f}s seg loss {total / steps:.3f}")
    net = net.float().to("cpu", memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    meta = {
        "key": key,
        "first_pass": dataclasses.asdict(section),
        "n_nodules": len(fit),
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "history": history,
    }
    save_box_net(out_path, net, meta)
    return net, {**meta, "box_net_config": dataclasses.asdict(net.config), "checkpoint": str(out_path)}


def save_box_net(path: Path, net: BoxNet, meta: dict[str, Any]) -> None:
    """Weights as safetensors plus a JSON sidecar (its config and ``meta``), both atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": _FORMAT})
    sidecar = {**meta, "box_net_config": dataclasses.asdict(net.config)}
    write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=2))


def load_box_net(path: str | Path) -> tuple[BoxNet, dict[str, Any]]:
    """Load a box net written by :func:`save_box_net` (no pickle involved).

    Raises:
        DataError: The file or its sidecar is missing or is not a box net.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise DataError(f"box net {path} or its sidecar {sidecar} is missing")
    with safe_open(str(path), framework="pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt != _FORMAT:
        raise DataError(f"{path} is not a box net (format {fmt!r}, expected {_FORMAT!r})")
    meta = json.loads(sidecar.read_text())
    config: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["box_net_config"].items()}
    net = BoxNet(BoxNetConfig(**config))
    net.load_state_dict(load_file(str(path)))
    return net.eval(), meta


def box_net_segmenter(net: BoxNet, batch_size: int = 16) -> Callable[[np.ndarray], np.ndarray]:
    """The first pass ``patches [N, C, S, S, S] -> segmentation [N, S, S, S]`` (float32, no grad).

    What :func:`nodule_edge.patch.run_nodule_bounded` takes as ``segment``.
    """

    def segment(patches: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(patches), batch_size):
                x = torch.from_numpy(np.asarray(patches[start : start + batch_size], np.float32))
                out.append(net(x)[:, 0].float().numpy())
        return np.concatenate(out) if out else np.zeros((0, *patches.shape[2:]), np.float32)

    return segment

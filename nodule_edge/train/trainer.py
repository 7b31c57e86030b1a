"""Training loop: sure/unsure batches, augmentation, bf16 autocast, checkpoints, DDP, CV."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import ConfigError, DataError
from nodule_edge.outline import OUTLINE_FEATURE_NAMES, OutlineHead, outline_step
from nodule_edge.patch import DEFAULT_PATCH_SPEC, NoduleBox, PatchSpec, bound_to_nodule, run_nodule_bounded
from nodule_edge.train.checkpoints import (
    OPTIMISER_STATE_FILES,
    load_checkpoint,
    resume_state,
    save_checkpoint,
    save_resume_state,
)
from nodule_edge.train.config import TrainConfig, TrainSection, training_config_sha256
from nodule_edge.train.data import (
    NoduleRecord,
    PatchCache,
    build_patch_cache,
    calcification,
    patient_folds,
    read_sure_manifest,
    read_unsure_manifest,
    targets,
)
from nodule_edge.train.losses import LossWeights, total_loss
from nodule_edge.train.model import (
    CollaborativeNet,
    ModelConfig,
    ModelOutput,
    count_parameters,
    use_contiguous_groupnorm,
)

__all__ = [
    "evaluated_checkpoint",
    "learning_rate",
    "Dataset",
    "load_dataset",
    "model_config_from",
    "network_seed",
    "train_model",
    "predict",
    "predict_runtime_path",
    "reference_bounded",
    "bound_batch",
    "augment",
    "bf16_enabled",
    "channels_last_enabled",
    "save_checkpoint",
    "load_checkpoint",
]

log = logging.getLogger(__name__)
MALIGNANCY_COLUMN = ATTRIBUTE_NAMES.index("malignancy")


@dataclass
class Dataset:
    """Records, cached patches and targets, aligned by index."""

    records: list[NoduleRecord]
    cache: PatchCache
    attributes: np.ndarray  # [N, 6] in [0, 1]
    has_attributes: np.ndarray
    labels: np.ndarray  # [N] 0/1, -1 unknown
    diameters: np.ndarray
    patients: list[str]
    calcified: np.ndarray | None = None  # [N] 1 calcified, 0 not, NaN unknown (readers' majority)

    def __len__(self) -> int:
        return len(self.records)


def load_dataset(cfg: TrainConfig) -> Dataset:
    """Unsure records (+ optional sure manifest) with their patches built by the shared builder."""
    records = read_unsure_manifest(cfg.voi_path())
    if cfg.data.sure_manifest:
        sure = read_sure_manifest(cfg.resolve(cfg.data.sure_manifest))
        # External sure data replaces LIDC's proxy labels.
        records = [dataclasses.replace(r, label=None) for r in records] + sure
    # The cache holds whole cubes; the nodule box is applied per batch (training) or per pass.
    cache = build_patch_cache(
        records, dataclasses.replace(DEFAULT_PATCH_SPEC, nodule_box=None), cfg.resolve(cfg.data.cache_dir)
    )
    attrs, has_attrs, labels, diameters = targets(records)
    return Dataset(
        records, cache, attrs, has_attrs, labels, diameters, [r.patient_id for r in records], calcification(records)
    )


def model_config_from(cfg: TrainConfig) -> ModelConfig:
    m = cfg.model
    return ModelConfig(
        use_attributes=m.use_attributes,
        concat_embedding=m.concat_embedding,
        num_attributes=1 if m.malignancy_only else len(ATTRIBUTE_NAMES),
        embedding_dim=m.embedding_dim,
        decoder=m.decoder,  # type: ignore[arg-type]  # a str the config validated against the decoder names
        seg_features=m.seg_features,
        widths=tuple(m.widths),  # type: ignore[arg-type]  # four widths, validated by the config
        voxel_mm=DEFAULT_PATCH_SPEC.spacing_mm,
    )


def patch_spec_from(cfg: TrainConfig) -> PatchSpec:
    """The model input this run trains on: the default spec, bounded to the nodule or not."""
    return DEFAULT_PATCH_SPEC if cfg.train.nodule_box else dataclasses.replace(DEFAULT_PATCH_SPEC, nodule_box=None)


def bf16_enabled(setting: str, device: torch.device) -> bool:
    """bf16 autocast when asked, or on 'auto' where the hardware runs it natively."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # CPU: bf16 pays off with AVX512-BF16 / AMX, which oneDNN reports through this check.
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips of every axis, in-plane 90° rotations and in-plane transposes, per sample.

    z is never swapped with an in-plane axis: slices are thicker than pixels in the source scans
    and the nodule box keeps less context in z than in-plane (:class:`~nodule_edge.patch.NoduleBox`),
    so a transposed sample would be one the model never meets at run time. Nothing is cut:
    no augmentation changes what part of the nodule is visible.
    """
    n = images.shape[0]
    flips = torch.rand(n, 3, generator=gen) < 0.5
    turns = torch.randint(0, 4, (n,), generator=gen)
    transpose = torch.rand(n, generator=gen) < 0.5
    out_i, out_m = [], []
    for k in range(n):
        img, msk = images[k], masks[k]
        axes = [a for a in range(3) if flips[k, a]]
        if axes:
            img = img.flip([a + 1 for a in axes])
            msk = msk.flip(axes)
        if transpose[k]:
            img = img.transpose(2, 3)
            msk = msk.transpose(1, 2)
        img = torch.rot90(img, int(turns[k]), (2, 3))
        msk = torch.rot90(msk, int(turns[k]), (1, 2))
        out_i.append(img)
        out_m.append(msk)
    return torch.stack(out_i).contiguous(), torch.stack(out_m).contiguous()


def bound_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    has_mask: torch.Tensor,
    box: NoduleBox,
    spacing_mm: float,
    gen: torch.Generator | None,
    unbounded_probability: float = 0.0,
) -> torch.Tensor:
    """The training path of the nodule-bounded input: box of the reference mask plus margins.

    Each side's margin is drawn from ``[margin, margin + jitter]`` (``gen`` given) or set to the
    runtime's middle value (``gen`` None); voxels outside become 0, the windowed air value. Samples
    without a mask, and a random ``unbounded_probability`` share (the runtime's first pass sees
    an unbounded cube), keep their whole cube. The box never cuts into the reference mask.
    """
    n, size = images.shape[0], images.shape[-1]
    binary = masks >= box.threshold
    present = has_mask.bool() & binary.flatten(1).any(dim=1)
    if gen is not None and unbounded_probability > 0:
        present &= torch.rand(n, generator=gen) >= unbounded_probability
    if not bool(present.any()):
        return images
    margin = torch.tensor(box.margin_mm, dtype=torch.float32) / spacing_mm  # [3] voxels
    if gen is None:
        lo_m = hi_m = (margin + box.jitter_mm / 2 / spacing_mm).expand(n, 3)
    else:
        lo_m = margin + torch.rand(n, 3, generator=gen) * box.jitter_mm / spacing_mm
        hi_m = margin + torch.rand(n, 3, generator=gen) * box.jitter_mm / spacing_mm
    index = torch.arange(size, dtype=torch.float32)
    keep = torch.ones_like(binary)
    for axis in range(3):
        other = tuple(a + 1 for a in range(3) if a != axis)
        profile = binary.any(dim=other)  # [N, size]
        first = torch.where(profile.any(1), profile.float().argmax(1), torch.zeros(n, dtype=torch.long)).float()
        last = torch.where(
            profile.any(1), size - 1 - profile.flip(1).float().argmax(1), torch.full((n,), size - 1)
        ).float()
        inside = (index >= first[:, None] - lo_m[:, axis : axis + 1] - 1e-6) & (
            index <= last[:, None] + hi_m[:, axis : axis + 1] + 1e-6
        )
        shape = [n, 1, 1, 1]
        shape[axis + 1] = size
        keep = keep & inside.view(shape)
    keep = keep | ~present.view(n, 1, 1, 1)
    return images * keep.unsqueeze(1).to(images.dtype)


def self_bounded(
    model: CollaborativeNet, images: torch.Tensor, spec: PatchSpec, device: torch.device, bf16: bool
) -> torch.Tensor:
    """Whole cubes bounded by the model's own segmentation, as the runtime bounds them.

    A no-grad first pass segments each cube; :func:`~nodule_edge.patch.bound_to_nodule` (the
    runtime's function) draws the box at the runtime margins. A cube where the model finds no
    nodule stays whole, as at run time.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(device, bf16):
        seg = model(images.to(device)).segmentation.float()
    model.train(was_training)
    if seg.shape[-1] != images.shape[-1]:
        seg = F.interpolate(seg, size=images.shape[2:], mode="trilinear", align_corners=False)
    seg_np = seg[:, 0].cpu().numpy()
    cubes = images.numpy()
    return torch.from_numpy(np.stack([bound_to_nodule(cubes[k], seg_np[k], spec)[0] for k in range(len(cubes))]))


def _batch(ds: Dataset, idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "images": torch.from_numpy(ds.cache.images[idx].astype(np.float32)),
        "masks": torch.from_numpy(ds.cache.masks[idx].astype(np.float32)),
        "mask_present": torch.from_numpy(ds.cache.has_mask[idx]),
        "attributes": torch.from_numpy(ds.attributes[idx]),
        "attr_present": torch.from_numpy(ds.has_attributes[idx]),
        "labels": torch.from_numpy(np.maximum(ds.labels[idx], 0)),
        "label_mask": torch.from_numpy(ds.labels[idx] >= 0),
    }


@torch.no_grad()
def predict(
    model: CollaborativeNet,
    ds: Dataset,
    idx: np.ndarray,
    device: torch.device,
    bf16: bool,
    batch_size: int = 8,
    images: np.ndarray | None = None,
    with_features: bool = False,
) -> dict[str, np.ndarray]:
    """Run the model on patches; returns numpy arrays of every head.

    ``images`` (aligned with ``idx``) replaces the cached whole-cube patches, e.g. nodule-bounded
    ones; ``segmentation64`` is the segmentation at the patch resolution, ``cam16`` and ``seg16``
    the CAM and the segmentation on the 16³ feature grid; ``with_features`` adds the fusion
    features ``[N, C, 16³]`` (float32, 2 MB a nodule) that the head refit reads.
    """
    model.eval()
    keys = [
        "malignancy_probability",
        "malignancy_logit",
        "attributes",
        "nodule_attention",
        "background_attention",
        "embedding",
        "classifier_input",
    ]
    out: dict[str, list[np.ndarray]] = {
        k: [] for k in keys + ["segmentation64", "cam16", "seg16"] + (["features"] if with_features else [])
    }
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        batch = ds.cache.images[chunk] if images is None else images[start : start + batch_size]
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32)).to(device)
        with _autocast(device, bf16):
            o = model(x)
        for k in keys:
            out[k].append(getattr(o, k).float().cpu().numpy())
        seg = o.segmentation.float()
        if seg.shape[-1] != x.shape[-1]:
            seg = F.interpolate(seg, size=x.shape[2:], mode="trilinear", align_corners=False)
        out["segmentation64"].append(seg[:, 0].cpu().numpy().astype(np.float16))
        out["cam16"].append(o.cam.float()[:, 0].cpu().numpy())
        out["seg16"].append(o.segmentation_coarse.float()[:, 0].cpu().numpy())
        if with_features:
            out["features"].append(o.features.float().flatten(2).cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def reference_bounded(ds: Dataset, idx: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Cached patches bounded by their reference masks at the runtime margins (float16)."""
    if spec.nodule_box is None or len(idx) == 0:
        return ds.cache.images[idx]
    out = np.empty((len(idx), *ds.cache.images.shape[1:]), ds.cache.images.dtype)
    for start in range(0, len(idx), 32):
        chunk = idx[start : start + 32]
        bounded = bound_batch(
            torch.from_numpy(ds.cache.images[chunk].astype(np.float32)),
            torch.from_numpy(ds.cache.masks[chunk].astype(np.float32)),
            torch.from_numpy(ds.cache.has_mask[chunk]),
            spec.nodule_box,
            spec.spacing_mm,
            None,
        )
        out[start : start + len(chunk)] = bounded.numpy().astype(np.float16)
    return out


def predict_runtime_path(
    model: CollaborativeNet,
    ds: Dataset,
    idx: np.ndarray,
    device: torch.device,
    spec: PatchSpec,
    images: np.ndarray | None = None,
    bf16: bool = False,
    with_features: bool = False,
    segment: Callable[[np.ndarray], np.ndarray] | None = None,
    outline_head: OutlineHead | None = None,
    with_outline_statistics: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What the runtime does with a cube (:func:`nodule_edge.patch.run_nodule_bounded`).

    The same function the runtime calls draws the box, so the evaluation measures the shipped
    path. ``segment`` is the first pass when it is not the model's own segmentation (a box net,
    :mod:`nodule_edge.train.first_pass`). With ``outline_head`` the outline term is added to the
    malignancy outputs (:mod:`nodule_edge.outline`); with it or ``with_outline_statistics`` the
    first pass's outline statistics come back as ``outline_statistics``. Returns the second
    pass's predictions and whether the first pass found a nodule.
    """
    source = np.asarray(ds.cache.images[idx] if images is None else images, np.float32)

    # With a nodule box the model's own first pass only draws the box: its features are never read.
    own_first_pass = spec.nodule_box is not None and segment is None
    passes = iter((False, with_features) if own_first_pass else (with_features,))

    def run(patches: np.ndarray) -> dict[str, np.ndarray]:
        out = predict(model, ds, idx, device, bf16, images=patches, with_features=next(passes, with_features))
        out["segmentation"] = out["segmentation64"].astype(np.float32)
        return out

    outline = outline_head is not None or with_outline_statistics
    finish = outline_step(spec, outline_head) if outline and spec.nodule_box is not None else None
    if outline and finish is None:
        raise ConfigError("outline statistics come from the runtime's first pass: the patch spec has no nodule box")
    return run_nodule_bounded(run, source, spec, segment=segment, finish=finish)


def _distributed() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def network_seed(train: TrainSection) -> int:
    """The seed of the network's initialisation, batch order and augmentation: ``train.network_seed``
    when set (>= 0), else ``train.seed``, which also draws the CV split, the validation patients,
    the box net and the head step's inner folds."""
    return train.network_seed if train.network_seed >= 0 else train.seed


def train_model(
    cfg: TrainConfig,
    ds: Dataset,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    out_dir: Path,
    max_epochs: int,
    progress: Callable[[str], None] | None = None,
    early_stopping: bool = True,
    outline: np.ndarray | None = None,
) -> dict[str, Any]:
    """Train one model; resumes from ``out_dir/last.safetensors`` when present.

    Args:
        outline: ``[len(ds), 7]`` the first pass's outline statistics of every nodule
            (``[train] outline_offset``): a linear term on them, standardised on the labelled
            training nodules and trained with the network, is added to the malignancy logit in the
            loss and in validation; it is saved with the resume state and, in raw units
            (:class:`nodule_edge.outline.OutlineHead`), as ``outline_offset`` in each checkpoint's
            sidecar. None trains the network alone.

    Returns:
        History and the best epoch (by validation AUC when validation has both classes, else loss),
        and with ``outline`` the trained term as ``outline_offset``.
    """
    rank, world = _distributed()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bf16 = bf16_enabled(cfg.train.bf16, device)
    # The network's own seed (initialisation, batch order, augmentation); the split stays cfg.train.seed's.
    seed = network_seed(cfg.train)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    rng = np.random.default_rng(seed * 1000 + rank)
    # Under DDP every rank draws the same epoch order and takes its own slice of each step, so the
    # ranks together make one pass over the sure data (single-process sampling is unchanged).
    order_rng = np.random.default_rng(seed * 1000) if world > 1 else rng

    spec = patch_spec_from(cfg)
    model = CollaborativeNet(model_config_from(cfg)).to(device)
    channels_last = channels_last_enabled(cfg.train.channels_last, device, bf16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch stubs omit memory_format on Module.to
    if cfg.train.contiguous_groupnorm:
        use_contiguous_groupnorm(model)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    offset = (
        _OutlineOffset(outline, ds.labels, train_idx[ds.labels[train_idx] >= 0], device, cfg.train.outline_offset_start)
        if outline is not None
        else None
    )
    trained = [*model.parameters(), *(offset.term.parameters() if offset is not None else ())]
    opt = torch.optim.AdamW(trained, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    modules: dict[str, torch.nn.Module] | None = {"outline_offset": offset.term} if offset is not None else None
    weights = LossWeights(cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.delta, cfg.loss.adaptive)
    attr_cols: slice | list[int] = [MALIGNANCY_COLUMN] if cfg.model.malignancy_only else slice(None)

    sure = train_idx[ds.labels[train_idx] >= 0]
    if cfg.train.balance_sure and len(np.unique(ds.labels[sure])) < 2:
        raise DataError("train.balance_sure needs malignant and benign nodules in the training split")
    unsure = train_idx[ds.has_attributes[train_idx] | ds.cache.has_mask[train_idx]]
    if len(sure) == 0:
        raise DataError("no labelled (sure) nodules in the training split")
    steps = math.ceil(len(sure) / (cfg.train.batch_sure * world))
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)

    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "score": -math.inf}
    start_epoch = 1
    last = out_dir / "last.safetensors"
    # Saved with the resume state: a resumed run draws the batches and augmentations an
    # uninterrupted one would, so it trains the same network.
    generators: dict[str, np.random.Generator | torch.Generator] = {"batches": rng, "augment": gen}
    if order_rng is not rng:
        generators["order"] = order_rng
    optimiser_restored = True
    if last.is_file():
        start_epoch, history, best, optimiser_restored = resume_state(
            last, model, opt, training_config_sha256(cfg), generators, modules
        )
        log.info("resumed %s at epoch %d", out_dir, start_epoch)
    bad_epochs = 0 if not history else history[-1].get("bad_epochs", 0)
    ema = _ema_model(model, cfg.train.ema_decay, out_dir / "ema.safetensors", resumed=start_epoch > 1)
    # What validation sees and what is evaluated and shipped: the averaged weights under EMA.
    evaluated: CollaborativeNet = ema.module if ema is not None else model  # type: ignore[assignment]
    if early_stopping and len(val_idx) and bad_epochs >= cfg.train.patience:
        start_epoch = max_epochs + 1  # a resumed run that had already stopped early stays stopped
    # A finished network needs no optimiser state (a fold restored from committed checkpoints,
    # which do not keep it); one that goes on training does.
    if not optimiser_restored and start_epoch <= max_epochs:
        raise ConfigError(
            f"{out_dir} holds a network trained to epoch {start_epoch - 1} but not the state to go on training it "
            f"({' and '.join(OPTIMISER_STATE_FILES)} missing): restore those files, or move the folder away to "
            "train from scratch"
        )
    meta_base = {
        "config": cfg.to_dict(),
        "config_sha256": cfg.sha256(),
        "training_config_sha256": training_config_sha256(cfg),
        "patch_spec": spec.to_json(),
        "attribute_names": list(ATTRIBUTE_NAMES),
    }
    # Validation reads the training path (reference box at the runtime margins), built once.
    val_images = reference_bounded(ds, val_idx, spec) if len(val_idx) else None

    for epoch in range(start_epoch, max_epochs + 1):
        net.train()
        # Cosine decay over the epoch budget: short CPU budgets converge better than with a flat rate.
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg.train, epoch, 0, steps, max_epochs)
        t0 = time.perf_counter()
        if cfg.train.balance_sure:
            half = cfg.train.batch_sure // 2
            class_orders = [order_rng.permutation(sure[ds.labels[sure] == c]) for c in (1, 0)]
        else:
            sure_order = order_rng.permutation(sure)
        sums: dict[str, float] = {}
        for step in range(steps):
            if cfg.train.warmup_epochs:
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg.train, epoch, step, steps, max_epochs)
            if cfg.train.balance_sure:
                at = (step * world + rank) * half
                s_idx = np.concatenate(
                    [
                        np.take(class_orders[0], np.arange(at, at + half), mode="wrap"),
                        np.take(class_orders[1], np.arange(at, at + cfg.train.batch_sure - half), mode="wrap"),
                    ]
                )
            else:
                s_idx = sure_order[((step * world + rank) * cfg.train.batch_sure) % len(sure_order) :][
                    : cfg.train.batch_sure
                ]
                if len(s_idx) < cfg.train.batch_sure:
                    s_idx = np.concatenate([s_idx, rng.choice(sure, cfg.train.batch_sure - len(s_idx))])
            u_idx = (
                rng.choice(unsure, cfg.train.batch_unsure, replace=len(unsure) < cfg.train.batch_unsure)
                if cfg.train.batch_unsure
                else np.zeros(0, int)
            )
            idx = np.concatenate([s_idx, u_idx]).astype(np.int64)
            b = _batch(ds, idx, device)
            # Unsure samples serve segmentation and attributes only.
            b["label_mask"][len(s_idx) :] = False
            images, masks = b["images"], b["masks"]
            if cfg.train.augment:
                images, masks = augment(images, masks, gen)
            if spec.nodule_box is not None:
                own = (
                    torch.rand(len(idx), generator=gen) < cfg.train.self_box_probability
                    if cfg.train.self_box_probability > 0
                    else torch.zeros(len(idx), dtype=torch.bool)
                )
                own_boxed = self_bounded(model, images[own], spec, device, bf16) if bool(own.any()) else None
                images = bound_batch(
                    images,
                    masks,
                    b["mask_present"],
                    spec.nodule_box,
                    spec.spacing_mm,
                    gen,
                    cfg.train.unbounded_probability,
                )
                if own_boxed is not None:
                    images[own] = own_boxed
            images = images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            with _autocast(device, bf16):
                out = net(images)
            if offset is not None:
                out = offset.add_to(out, idx)
            loss, parts = total_loss(
                out,
                labels=b["labels"].to(device),
                label_mask=b["label_mask"].to(device),
                masks=masks.unsqueeze(1).to(device),
                mask_present=b["mask_present"].to(device),
                attributes=b["attributes"].to(device),
                attr_present=b["attr_present"].to(device),
                weights=weights,
                use_debug=cfg.loss.debug,
                use_attributes=cfg.model.use_attributes,
                attribute_columns=attr_cols,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if offset is not None and world > 1:
                offset.all_reduce_gradients(world)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        train_parts = {k: v / steps for k, v in sums.items()}
        val = (
            _validate(evaluated, ds, val_idx, device, bf16, val_images, offset.logits(val_idx) if offset else None)
            if len(val_idx)
            else {}
        )
        score = val.get("auc", float("nan"))
        if not score == score:  # NaN: fall back to negative classification loss
            score = -val.get("bce", 0.0)
        improved = score > best["score"]
        if improved:
            best = {"epoch": epoch, "score": score}
            bad_epochs = 0
        else:
            bad_epochs += 1
        record = {
            "epoch": epoch,
            "seconds": round(time.perf_counter() - t0, 1),
            "train": train_parts,
            "val": val,
            "bad_epochs": bad_epochs,
            # Per epoch, since a resumed run may continue on another CPU kind (model card).
            "bf16": bf16,
        }
        history.append(record)
        if rank == 0:
            meta = {**meta_base, "outline_offset": offset.head().to_dict()} if offset is not None else meta_base
            if improved:
                save_checkpoint(out_dir / "best.safetensors", evaluated, {**meta, "epoch": epoch, "val": val})
            if ema is not None:
                # Before the resume state: a run stopped between the two repeats this epoch.
                save_checkpoint(out_dir / "ema.safetensors", evaluated, {**meta, "epoch": epoch})
            save_resume_state(last, model, opt, epoch, history, best, meta, generators, modules)
            msg = f"epoch {epoch}/{max_epochs} {record['seconds']}s loss " + " ".join(
                f"{k}={v:.3f}" for k, v in train_parts.items()
            )
            msg += " | val " + " ".join(f"{k}={v:.3f}" for k, v in val.items() if isinstance(v, float))
            (progress or log.info)(msg)
        if early_stopping and len(val_idx) and bad_epochs >= cfg.train.patience:
            break
    if world > 1:
        import torch.distributed as dist

        # Only rank 0 writes checkpoints; the others must not read them before they exist.
        dist.barrier()
    return {
        "history": history,
        "best_epoch": best["epoch"],
        "best_score": best["score"],
        "steps_per_epoch": steps,
        "bf16": bf16,
        "parameters": count_parameters(model),
        **({"outline_offset": _trained_offset(offset, last, optimiser_restored)} if offset is not None else {}),
    }


def _trained_offset(offset: _OutlineOffset, last: Path, optimiser_restored: bool) -> dict[str, Any]:
    """The outline offset in raw units: the trained term, or for a finished run restored without
    its optimiser state (which holds the term) the one its checkpoint's sidecar records."""
    if not optimiser_restored:
        recorded: dict[str, Any] = json.loads(last.with_suffix(".json").read_text())["outline_offset"]
        return recorded
    return offset.head().to_dict()


class _OutlineOffset:
    """The linear term on the first pass's outline statistics that ``[train] outline_offset``
    trains beside the network, on statistics standardised on the labelled training nodules,
    returned in raw units as the head step's :class:`~nodule_edge.outline.OutlineHead`. It starts
    at zero (``start = "zero"``: the network's loss unchanged at step 0) or at the L2 logistic
    regression of those nodules' labels on the statistics (``"fitted"``, the head step's L2)."""

    def __init__(
        self, outline: np.ndarray, labels: np.ndarray, labelled: np.ndarray, device: torch.device, start: str = "zero"
    ) -> None:
        from nodule_edge.train.head import OUTLINE_L2, fit_logistic

        width = len(OUTLINE_FEATURE_NAMES)
        if outline.shape != (len(labels), width) or not np.isfinite(outline[labelled]).all():
            raise DataError(
                f"outline statistics of shape {outline.shape} for {len(labels)} nodules (expected [N, {width}], "
                "finite on every labelled training nodule)"
            )
        self.mean = outline[labelled].mean(0)
        sd = outline[labelled].std(0)
        self.sd = np.where(sd > 0, sd, 1.0)
        self.standardised = torch.from_numpy((outline - self.mean) / self.sd).float()
        self.device = device
        self.term = torch.nn.Linear(width, 1).to(device)
        torch.nn.init.zeros_(self.term.weight)
        torch.nn.init.zeros_(self.term.bias)
        if start == "fitted":
            # The head step's L2 is on the mean loss; fit_logistic's on the summed one.
            w, b = fit_logistic(
                np.asarray(self.standardised[labelled], np.float64),
                labels[labelled].astype(np.float64),
                2 * OUTLINE_L2 * len(labelled),
            )
            with torch.no_grad():
                self.term.weight.copy_(torch.from_numpy(w).float().unsqueeze(0))
                self.term.bias.fill_(b)

    def add_to(self, out: ModelOutput, idx: np.ndarray) -> ModelOutput:
        """``out`` with the term of the nodules ``idx`` added to its malignancy logit and probability."""
        logit = out.malignancy_logit.float() + self.term(self.standardised[idx].to(self.device)).squeeze(1)
        return dataclasses.replace(out, malignancy_logit=logit, malignancy_probability=torch.sigmoid(logit))

    def logits(self, idx: np.ndarray) -> np.ndarray:
        """The term of the nodules ``idx`` (no gradient)."""
        with torch.no_grad():
            return self.term(self.standardised[idx].to(self.device)).squeeze(1).double().cpu().numpy()

    def all_reduce_gradients(self, world: int) -> None:
        """Average the term's gradients over the DDP ranks (the term is not inside the DDP module)."""
        import torch.distributed as dist

        for param in self.term.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= world

    def head(self) -> OutlineHead:
        """The term in raw units: ``w · (s − mean) / sd + b = (w / sd) · s + (b − w · mean / sd)``."""
        w = self.term.weight.detach().double().cpu().numpy()[0] / self.sd
        b = float(self.term.bias.detach().double().cpu()[0]) - float(w @ self.mean)
        return OutlineHead(tuple(float(v) for v in w), b)


def learning_rate(train: TrainSection, epoch: int, step: int, steps: int, max_epochs: int) -> float:
    """The learning rate of ``step`` (0-based) of ``epoch`` (1-based): cosine decay over the epoch
    budget, one value per epoch, times a linear warm-up over the first ``train.warmup_epochs``
    epochs' steps when set."""
    warm = min(1.0, ((epoch - 1) * steps + step + 1) / (train.warmup_epochs * steps)) if train.warmup_epochs else 1.0
    # The product in this order is the rate of the runs recorded before the warm-up existed.
    return train.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max_epochs)) * warm


def evaluated_checkpoint(cfg: TrainConfig, which: str) -> str:
    """File name of the weights a run evaluates and ships for ``which`` (``"last"`` or ``"best"``):
    under weight EMA the last weights are the averaged ones (``ema.safetensors``)."""
    return "ema.safetensors" if which == "last" and cfg.train.ema_decay > 0 else f"{which}.safetensors"


def _ema_model(
    model: CollaborativeNet, decay: float, path: Path, *, resumed: bool
) -> torch.optim.swa_utils.AveragedModel | None:
    """The exponential moving average of ``model``'s weights (``None`` when ``decay`` is 0).

    A resumed run continues the average saved at ``path``; without it the average restarts from
    the resumed weights (logged).
    """
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    if resumed:
        if path.is_file():
            ema.module.load_state_dict(load_checkpoint(path)[0].state_dict())
            ema.n_averaged.fill_(1)  # continue the average instead of restarting it
        else:
            log.warning("%s is missing: the weight average restarts from the resumed weights", path)
    return ema


def channels_last_enabled(setting: str, device: torch.device, bf16: bool) -> bool:
    """channels_last_3d pays off with bf16 on CPU (oneDNN's blocked kernels; benches/bench_training.py)."""
    if setting in ("on", "off"):
        return setting == "on"
    return device.type == "cpu" and bf16


def _validate(
    model: CollaborativeNet,
    ds: Dataset,
    idx: np.ndarray,
    device: torch.device,
    bf16: bool,
    images: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> dict[str, float]:
    """Validation AUC, BCE and attribute MAE of ``model`` on the nodules ``idx``; ``offset`` is a
    logit added to each nodule's (the outline offset's, ``[train] outline_offset``)."""
    from nodule_edge.metrics import roc_auc

    pred = predict(model, ds, idx, device, bf16, images=images)
    labels = ds.labels[idx]
    sel = labels >= 0
    probability = pred["malignancy_probability"]
    if offset is not None:
        probability = 1 / (1 + np.exp(-(np.asarray(pred["malignancy_logit"], np.float64) + offset)))
    p = np.clip(probability[sel], 1e-6, 1 - 1e-6)
    y = labels[sel]
    has_a = ds.has_attributes[idx]
    out = {
        "auc": roc_auc(y, p) if sel.any() else float("nan"),
        "bce": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if sel.any() else float("nan"),
    }
    if has_a.any() and pred["attributes"].shape[1] == ds.attributes.shape[1]:
        out["attr_mae"] = float(np.abs(pred["attributes"][has_a] - ds.attributes[idx][has_a]).mean() * 4)
    return out


def split_fold(ds: Dataset, cfg: TrainConfig, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-disjoint (train, val, test) indices for one CV fold."""
    folds = np.asarray(patient_folds(ds.patients, cfg.cv.folds, cfg.train.seed))
    test = np.flatnonzero(folds == fold)
    rest = np.flatnonzero(folds != fold)
    rest_patients = [ds.patients[i] for i in rest]
    # Validation: a patient-disjoint share of the training fold, for early stopping.
    n_val_folds = max(2, round(1 / cfg.cv.val_fraction))
    inner = np.asarray(patient_folds(rest_patients, n_val_folds, cfg.train.seed + 1 + fold))
    val = rest[inner == 0]
    train = rest[inner != 0]
    if set(ds.patients[i] for i in train) & set(ds.patients[i] for i in test):
        raise ConfigError("internal error: a patient spans train and test")
    return train, val, test

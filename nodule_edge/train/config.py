"""Validated training configuration (TOML or JSON; unknown keys are rejected).

A config may start from another with ``extends = "shipped.toml"`` (a path relative to the file):
the base is loaded first and the file's own keys override it table by table, so an ablation states
only what it changes. The dataclass defaults equal ``configs/shipped.toml``
(``tests/train/test_config.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodule_edge._files import sha256_bytes
from nodule_edge.data_paths import lidc_voi_dir
from nodule_edge.errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelSection",
    "LossSection",
    "TrainSection",
    "HeadSection",
    "FirstPassSection",
    "CVSection",
    "TrainConfig",
    "load_config",
    "training_config_sha256",
]


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives. Relative paths are resolved against the config file's folder."""

    # Empty: the one data rule, $NODULE_EDGE_DATA or ../shared/data (nodule_edge.data_paths).
    # configs/shipped.toml names its folder explicitly: the path is part of the fold hashes
    # that docs/cv/foldK.json were written under.
    voi_dir: str = ""
    sure_manifest: str = ""  # optional CSV of pathology-labelled nodules; empty = LIDC proxy
    cache_dir: str = "cache"


@dataclass(frozen=True)
class ModelSection:
    """Architecture switches (see :class:`nodule_edge.train.model.ModelConfig`)."""

    use_attributes: bool = True
    concat_embedding: bool = True
    malignancy_only: bool = False  # regress the malignancy rating alone (Table-1 ablation)
    embedding_dim: int = 64
    decoder: str = "unet64"  # unet64 (segmentation at 0.5 mm) | light16 (the papers' 16³ head)
    seg_features: bool = True  # size-aware heads: segmentation statistics enter both heads
    widths: tuple[int, ...] = (16, 32, 64, 96)  # stem and residual blocks 1–3


@dataclass(frozen=True)
class LossSection:
    """Loss weights; ``debug`` switches the contrastive saliency loss on."""

    debug: bool = True
    adaptive: bool = True
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    delta: float = 0.5


@dataclass(frozen=True)
class TrainSection:
    """Optimisation and augmentation."""

    epochs: int = 12
    batch_sure: int = 8
    batch_unsure: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 6
    seed: int = 0
    bf16: str = "auto"  # auto | on | off (CPU autocast); CUDA uses bf16 autocast when on/auto
    channels_last: str = "auto"  # auto (on for bf16 on CPU) | on | off
    augment: bool = True
    nodule_box: bool = True  # read the nodule-bounded input (nodule_edge.patch.NoduleBox)
    unbounded_probability: float = 0.2  # share of training samples shown the whole cube (the runtime's first pass)
    # Share of bounded samples whose box comes from the model's own first pass, exactly as the
    # runtime draws it (nodule_edge.patch.bound_to_nodule), instead of the readers' mask: the
    # second pass then learns the box errors it meets at run time (docs/cv/README.md, path parity).
    self_box_probability: float = 0.0
    threads: int = 2  # 0 = torch default
    max_steps_per_epoch: int = 0  # 0 = one pass over the sure training set
    # Recipe switches the issue asks to compare (docs/ablations/README.md); each off by default.
    # Weight EMA: validate, evaluate and ship an exponential moving average of the weights, updated
    # after every step with this decay (torch.optim.swa_utils); 0 = off.
    ema_decay: float = 0.0
    # Linear learning-rate warm-up over this many epochs' steps, under the cosine decay; 0 = off.
    warmup_epochs: int = 0
    # Sure batches half malignant, half benign (each class cycled in its own shuffled order)
    # instead of one shuffled order of all sure nodules.
    balance_sure: bool = False
    # Speed: in the channels-last layout, normalise GroupNorms of at most 6 channels per group on a
    # contiguous copy (nodule_edge.train.model._ConvNorm): the same function, a shorter step, other
    # rounding, so pinned off where a run must reproduce networks recorded without it (ablations).
    contiguous_groupnorm: bool = True
    # Train the network beside the outline term it will ship with: the fold's box net is trained
    # first, its outline statistics of every nodule (nodule_edge.outline) are standardised on the
    # labelled training nodules, and a linear term on them, trained with the network, is added to
    # the classifier's logit in the loss and in validation. The network then learns what the
    # outline does not say instead of the size the term reads better (docs/ablations/README.md,
    # outline_offset); the head step starts its term from the trained one. Needs the "debugged"
    # head step with outline_statistics and the box net as the first pass.
    outline_offset: bool = False
    # Where that term starts: "zero" (the network's loss unchanged at step 0; at lr 1e-3 the term
    # then stays far below the head step's weights, so the network still learns the size:
    # docs/ablations/README.md, outline_offset) or "fitted" (the L2 logistic regression of the
    # labelled training nodules' labels on the standardised statistics, so that the network learns
    # what the outline leaves unexplained from the first step).
    outline_offset_start: str = "zero"
    # Seed of the network alone (initialisation, batch order, augmentation) at the same split, box
    # nets and head-step folds: reruns of one recipe measure training-to-training spread
    # (docs/ablations/README.md, network_seed1); -1 = train.seed.
    network_seed: int = -1


#: The "debugged" head refit's classifier L2 strengths until ``head.l2_grid`` existed (absent from
#: the hash at this value, so folds recorded before the key still match).
DEBUGGED_L2_GRID: tuple[float, ...] = (0.01, 0.03, 0.1)

#: The shipped grid since 2026-12-06: widened below 0.01, where the inner CV kept choosing the old
#: grid's edge (docs/ablations/README.md, head_l2_wide_outline).
SHIPPED_L2_GRID: tuple[float, ...] = (0.001, 0.003, *DEBUGGED_L2_GRID)


@dataclass(frozen=True)
class HeadSection:
    """The head refit after training (:mod:`nodule_edge.train.head`)."""

    # none | full | debugged: refit after training (nodule_edge.train.head): "full" the classifier
    # alone by logistic regression, "debugged" the attribute and malignancy heads under the
    # training objective with the debug loss.
    refit: str = "debugged"
    # Weight of the attribute MSE in the "debugged" refit, as a multiple of loss.gamma. The
    # attributes are scaled to [0, 1] (rating r -> (r - 1) / 4), so 16 makes the refit's attribute
    # loss the MSE in rating points (an ablation: docs/ablations/README.md).
    attribute_weight: float = 1.0
    # After the "debugged" refit, refit the attribute output layer alone to the L1 error in rating
    # points; the malignancy outputs and Grad-CAM do not read it (nodule_edge/train/head.py).
    attribute_readout: bool = True
    # With the readout, also fit a linear skip from the head input to the attribute logits
    # (CollaborativeNet.add_attribute_skip); nothing else reads it. Ignored without the readout,
    # as the readout is without the "debugged" refit.
    attribute_skip: bool = True
    # Weight of a path-parity penalty in the "debugged" refit: mean |p(runtime path) - p(readers'
    # box)| over the training fold (docs/cv/README.md, item 8); 0 = off. Ignored by the other refits.
    parity_weight: float = 2.0
    # Classifier L2 strengths the "debugged" refit scores by inner patient-grouped CV (mean loss,
    # standardised inputs; nodule_edge.train.head.refit_heads), smallest first.
    l2_grid: tuple[float, ...] = SHIPPED_L2_GRID
    # After the "debugged" refit, rescale the classifier's logit by Platt scaling fitted on the
    # inner CV's out-of-fold logits (nodule_edge.train.head.platt_calibration): same ranking,
    # calibrated probabilities. Ignored by the other refits.
    calibrate: bool = False
    # labels | ratings: what the "debugged" refit fits the classifier's cross-entropy and debug
    # loss to: the proxy labels of the labelled nodules, or the readers' mean malignancy rating
    # on the unit scale of every rated nodule (those rated 3 on average included; p > 0.5 still
    # means a mean rating above 3). Ignored by the other refits. Probed on two folds, not shipped:
    # docs/cv/README.md, item 10 (docs/cv/probes/probe_rating_targets.py).
    classifier_target: str = "labels"
    # With the "debugged" refit, fit a linear term on seven statistics of the runtime's first-pass
    # outline beside the classifier (nodule_edge.outline: z = z_network + w . statistics + b),
    # under the same objective (debug loss, parity penalty; the term is the same on both paths).
    # Probe: docs/cv/README.md, item 15; ablation: configs/ablations/outline_statistics.toml.
    # Ignored by the other refits and without train.nodule_box (no first pass draws an outline).
    outline_statistics: bool = True
    # Weight of the debug loss in the "debugged" refit, as a multiple of loss.alpha (the training's
    # weight). Ablation: configs/ablations/outline_statistics_debug2.toml.
    debug_weight: float = 1.0
    # Temperature of the class in the "debugged" refit's debug loss: 0 reads it as the map does,
    # sign(p - 0.5), which passes no gradient to the class; > 0 reads tanh(logit / T), so the debug
    # loss also steers which class the logit (and an outline term) takes
    # (nodule_edge.train.head.HeadObjective.sign_temperature). Ablation:
    # configs/ablations/outline_statistics_sign.toml.
    debug_sign_temperature: float = 1.0
    # Scale each nodule's debug loss in the "debugged" refit by 2|p - 0.5| as the training does
    # (loss.adaptive); false weighs every labelled nodule alike, so those near p = 0.5, whose class
    # an outline term can change, count too. Ignored when loss.adaptive is false.
    debug_adaptive: bool = False


@dataclass(frozen=True)
class FirstPassSection:
    """The runtime's first pass, which only draws the nodule's box (:mod:`nodule_edge.train.first_pass`)."""

    # model: the network's own segmentation | box_net: a small segmentation-only network
    # (nodule_edge.train.model.BoxNet), trained after the network on the same nodules
    # (before it with [train] outline_offset, whose term reads its outline).
    network: str = "box_net"
    widths: tuple[int, ...] = (8, 16, 32, 32)  # box_net: stem and residual blocks 1-3
    epochs: int = 20
    lr: float = 2e-3
    batch: int = 8
    # The weight of missed voxels in the soft-overlap part of its loss (soft Tversky; 0.5: soft
    # Dice, as shipped). Above 0.5 a miss costs more than a false voxel. Tried because the box
    # net's outlines are shorter than the readers'; at 0.7 they grew larger, not closer to the
    # readers' (fold 0; docs/cv/README.md, item 18).
    fn_weight: float = 0.5


@dataclass(frozen=True)
class CVSection:
    """Patient-disjoint cross-validation."""

    folds: int = 5
    run_folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    val_fraction: float = 0.2
    fold_epochs: tuple[int, ...] = ()  # per-run-fold epoch cap (shorter folds when time is short)
    final: bool = True  # train the final model on all data with the CV-chosen epoch count
    evaluate: str = (
        "last"  # last (the checkpoint the final model's recipe gives) | best (by validation AUC, early stopping)
    )
    export_dir: str = ""  # where each finished fold's summary is also written as foldK.json (e.g. docs/cv)


#: (section, key) -> the default that reproduces the behaviour from before the key existed.
_ADDED_KEYS: dict[tuple[str, str], Any] = {
    ("train", "self_box_probability"): 0.0,
    ("train", "ema_decay"): 0.0,
    ("train", "warmup_epochs"): 0,
    ("train", "balance_sure"): False,
    ("train", "contiguous_groupnorm"): False,
    ("train", "network_seed"): -1,
    ("train", "outline_offset"): False,
    ("train", "outline_offset_start"): "zero",
    ("head", "attribute_weight"): 1.0,
    ("head", "attribute_readout"): False,
    ("head", "attribute_skip"): False,
    ("head", "parity_weight"): 0.0,
    ("head", "l2_grid"): DEBUGGED_L2_GRID,
    ("head", "calibrate"): False,
    ("head", "classifier_target"): "labels",
    ("head", "outline_statistics"): False,
    ("head", "debug_weight"): 1.0,
    ("head", "debug_sign_temperature"): 0.0,
    ("head", "debug_adaptive"): True,
    ("first_pass", "fn_weight"): 0.5,
}


#: section -> its defaults, which reproduce the behaviour from before the section existed.
_ADDED_SECTIONS: dict[str, Any] = {"first_pass": FirstPassSection(network="model")}


def section_dict(name: str, section: dict[str, Any]) -> dict[str, Any]:
    """A config section's fields without the keys added after runs were recorded that are at their
    old-behaviour default (``_ADDED_KEYS``): what hashes and keys of finished work are computed on."""
    return {k: v for k, v in section.items() if (name, k) not in _ADDED_KEYS or v != _ADDED_KEYS[(name, k)]}


@dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration."""

    name: str = "shipped"
    output_dir: str = "runs/shipped"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    head: HeadSection = field(default_factory=HeadSection)
    first_pass: FirstPassSection = field(default_factory=FirstPassSection)
    cv: CVSection = field(default_factory=CVSection)
    base_dir: str = "."  # folder of the config file (set by load_config)

    def resolve(self, path: str) -> Path:
        """Resolve a config-relative path."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def voi_path(self) -> Path:
        """The VOI folder: ``data.voi_dir`` resolved against the config, or the default data folder."""
        return self.resolve(self.data.voi_dir) if self.data.voi_dir else lidc_voi_dir()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        # Keys added after runs were recorded appear only when set: at their default they
        # reproduce the earlier behaviour, and the config hashes of finished folds still match.
        for name in list(data):
            if isinstance(data[name], dict):
                data[name] = section_dict(name, data[name])
        for section, default_section in _ADDED_SECTIONS.items():
            if data[section] == section_dict(section, dataclasses.asdict(default_section)):
                data.pop(section)
        return data

    def sha256(self) -> str:
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True).encode())


def training_config_sha256(cfg: TrainConfig | dict[str, Any]) -> str:
    """Hash of what shapes the network's weights: data, model, loss and train sections.

    A checkpoint is resumed or reused only under the same hash; the classifier refit and the CV
    bookkeeping may change around it. Takes a config or its :meth:`TrainConfig.to_dict` (which a
    checkpoint's sidecar records, so a checkpoint's hash can be recomputed under this rule).
    The data folders are relative to each config file, so a config in ``configs/ablations`` spells
    the shipped one's VOI folder differently: the folder counts by its last two path components
    (``data/lidc_voi``), and the cache not at all.
    """
    data = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    keep = {k: data[k] for k in ("data", "model", "loss", "train")}
    keep["data"] = {k: v for k, v in keep["data"].items() if k != "cache_dir"}
    keep["data"]["voi_dir"] = "/".join(Path(str(keep["data"].get("voi_dir", ""))).parts[-2:])
    # A longer budget (epochs, patience) continues a run; threads do not change what is learned.
    keep["train"] = {k: v for k, v in keep["train"].items() if k not in ("threads", "epochs", "patience")}
    if keep["train"].get("outline_offset"):
        # The network then trains beside the box net's outline statistics: its recipe shapes it too.
        keep["first_pass"] = data.get("first_pass", {})
    return sha256_bytes(json.dumps(keep, sort_keys=True).encode())


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"base_dir"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(k for k in fields if k != 'base_dir')}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "base_dir":
            continue
        f = fields[name]
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
            continue
        kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, tuple) and default and isinstance(default[0], float):
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise ConfigError(f"{where}: expected a non-empty list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{where}: unsupported value {value!r}")


def _validate(cfg: TrainConfig) -> None:
    t, cv = cfg.train, cfg.cv
    checks = [
        (t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}"),
        (t.batch_sure > 0 and t.batch_unsure >= 0, "train.batch_sure must be > 0 and batch_unsure >= 0"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.bf16 in ("auto", "on", "off"), f"train.bf16 must be auto, on or off, got {t.bf16!r}"),
        (
            0 <= t.unbounded_probability <= 1,
            f"train.unbounded_probability must be in [0, 1], got {t.unbounded_probability}",
        ),
        (
            0 <= t.self_box_probability <= 1,
            f"train.self_box_probability must be in [0, 1], got {t.self_box_probability}",
        ),
        (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (t.network_seed >= -1, f"train.network_seed must be >= 0 (or -1: train.seed), got {t.network_seed}"),
        (
            0 <= t.warmup_epochs < t.epochs,
            f"train.warmup_epochs must be >= 0 and below train.epochs ({t.epochs}), got {t.warmup_epochs}",
        ),
        (
            not t.balance_sure or t.batch_sure >= 2,
            f"train.balance_sure needs train.batch_sure >= 2 (one of each class), got {t.batch_sure}",
        ),
        (
            t.channels_last in ("auto", "on", "off"),
            f"train.channels_last must be auto, on or off, got {t.channels_last!r}",
        ),
        (
            cfg.model.decoder in ("unet64", "light16"),
            f"model.decoder must be unet64 or light16, got {cfg.model.decoder!r}",
        ),
        (
            len(cfg.model.widths) == 4 and min(cfg.model.widths) > 0 and all(w % 8 == 0 for w in cfg.model.widths),
            f"model.widths must be four positive multiples of 8 (GroupNorm groups), got {list(cfg.model.widths)}",
        ),
        (
            all(v > 0 for v in cfg.head.l2_grid),
            f"head.l2_grid must hold positive numbers, got {list(cfg.head.l2_grid)}",
        ),
        (cv.folds >= 2, f"cv.folds must be >= 2, got {cv.folds}"),
        (
            all(0 <= f < cv.folds for f in cv.run_folds),
            f"cv.run_folds {list(cv.run_folds)} must lie in 0..{cv.folds - 1}",
        ),
        (
            cfg.head.refit in ("none", "full", "debugged"),
            f"head.refit must be none, full or debugged, got {cfg.head.refit!r}",
        ),
        (
            cfg.head.classifier_target in ("labels", "ratings"),
            f"head.classifier_target must be labels or ratings, got {cfg.head.classifier_target!r}",
        ),
        (cfg.head.debug_weight >= 0, f"head.debug_weight must be >= 0, got {cfg.head.debug_weight}"),
        (
            cfg.head.debug_sign_temperature >= 0,
            f"head.debug_sign_temperature must be >= 0, got {cfg.head.debug_sign_temperature}",
        ),
        (
            cfg.head.attribute_weight >= 0,
            f"head.attribute_weight must be >= 0, got {cfg.head.attribute_weight}",
        ),
        (
            cfg.head.parity_weight >= 0,
            f"head.parity_weight must be >= 0, got {cfg.head.parity_weight}",
        ),
        (cv.evaluate in ("last", "best"), f"cv.evaluate must be last or best, got {cv.evaluate!r}"),
        (0 < cv.val_fraction < 1, f"cv.val_fraction must be in (0, 1), got {cv.val_fraction}"),
        (
            not cv.fold_epochs or len(cv.fold_epochs) == len(cv.run_folds),
            "cv.fold_epochs must have one entry per run fold",
        ),
        (cfg.loss.delta >= 0, f"loss.delta must be >= 0, got {cfg.loss.delta}"),
        (
            cfg.first_pass.network in ("model", "box_net"),
            f"first_pass.network must be model or box_net, got {cfg.first_pass.network!r}",
        ),
        (
            len(cfg.first_pass.widths) == 4
            and min(cfg.first_pass.widths) > 0
            and all(w % 4 == 0 for w in cfg.first_pass.widths),
            f"first_pass.widths must be four positive multiples of 4 (GroupNorm groups), got {list(cfg.first_pass.widths)}",
        ),
        (
            cfg.first_pass.epochs > 0 and cfg.first_pass.lr > 0 and cfg.first_pass.batch > 0,
            "first_pass.epochs, lr and batch must be > 0",
        ),
        (
            0 < cfg.first_pass.fn_weight < 1,
            f"first_pass.fn_weight must lie in (0, 1), got {cfg.first_pass.fn_weight}",
        ),
        (
            not cfg.train.outline_offset
            or (
                cfg.train.nodule_box
                and cfg.first_pass.network == "box_net"
                and cfg.head.refit == "debugged"
                and cfg.head.outline_statistics
            ),
            "train.outline_offset trains the network beside the box net's outline term: it needs train.nodule_box, "
            'first_pass.network = "box_net", head.refit = "debugged" and head.outline_statistics = true, got '
            f"nodule_box={cfg.train.nodule_box}, network={cfg.first_pass.network!r}, refit={cfg.head.refit!r}, "
            f"outline_statistics={cfg.head.outline_statistics}",
        ),
        (
            cfg.train.outline_offset_start in ("zero", "fitted"),
            f"train.outline_offset_start must be zero or fitted, got {cfg.train.outline_offset_start!r}",
        ),
        (
            cfg.train.outline_offset_start == "zero" or cfg.train.outline_offset,
            "train.outline_offset_start says where the outline offset starts: it needs train.outline_offset = true",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _read_with_bases(path: Path, chain: list[Path]) -> dict[str, Any]:
    """The file's tables over those of the file it ``extends`` (recursively, cycles refused)."""
    if path.resolve() in chain:
        raise ConfigError(f"config {path} extends itself through {' -> '.join(p.name for p in chain)}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (extended by {chain[-1]})" if chain else ""))
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse config {path}: {exc}") from exc
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"{path.name}: extends must be a file name, got {base_name!r}")
    base_path = path.parent / base_name
    base = _rebase_paths(_read_with_bases(base_path, [*chain, path.resolve()]), base_path.parent, path.parent)
    return _merge(base, raw)


# Keys holding paths relative to their config file; a base's are re-expressed relative to the
# file that extends it, so `extends` works across folders (configs/ablations/ -> configs/).
_PATH_KEYS = (
    ("output_dir",),
    ("data", "voi_dir"),
    ("data", "cache_dir"),
    ("data", "sure_manifest"),
    ("cv", "export_dir"),
)


def _rebase_paths(raw: dict[str, Any], base_dir: Path, new_dir: Path) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for keys in _PATH_KEYS:
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            node = child if isinstance(child, dict) else {}
        value = node.get(keys[-1])
        if isinstance(value, str) and value and not Path(value).is_absolute():
            node[keys[-1]] = os.path.relpath(base_dir.resolve() / value, new_dir.resolve())
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load and validate a TOML or JSON training config.

    Args:
        path: The config file.
        overrides: Dotted keys to override, e.g. ``{"train.epochs": 2}`` (validated the same way).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = _read_with_bases(path, [])
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    cfg = _build(TrainConfig, raw, path.name)
    cfg = dataclasses.replace(cfg, base_dir=str(path.resolve().parent))
    _validate(cfg)
    return cfg

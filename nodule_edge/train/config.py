"""Validated training configuration (TOML or JSON; unknown keys are rejected)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodule_edge.errors import ConfigError

__all__ = ["DataConfig", "ModelSection", "LossSection", "TrainSection", "CVSection", "TrainConfig", "load_config"]


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives. Relative paths are resolved against the config file's folder."""

    voi_dir: str = "../shared/data/lidc_voi"
    sure_manifest: str = ""  # optional CSV of pathology-labelled nodules; empty = LIDC proxy
    cache_dir: str = "cache"


@dataclass(frozen=True)
class ModelSection:
    """Architecture switches (see :class:`nodule_edge.train.model.ModelConfig`)."""

    use_attributes: bool = True
    concat_embedding: bool = True
    malignancy_only: bool = False  # regress the malignancy rating alone (Table-1 ablation)
    embedding_dim: int = 64


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

    epochs: int = 30
    batch_sure: int = 8
    batch_unsure: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 8
    seed: int = 0
    bf16: str = "auto"  # auto | on | off (CPU autocast); CUDA uses bf16 autocast when on/auto
    augment: bool = True
    context_min_mm: float = 8.0  # random z-context truncation down to this full extent
    context_probability: float = 0.5
    threads: int = 0  # 0 = torch default
    max_steps_per_epoch: int = 0  # 0 = one pass over the sure training set


@dataclass(frozen=True)
class CVSection:
    """Patient-disjoint cross-validation."""

    folds: int = 5
    run_folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    val_fraction: float = 0.2
    fold_epochs: tuple[int, ...] = ()  # per-run-fold epoch cap (shorter folds when time is short)
    final: bool = True  # train the final model on all data with the CV-chosen epoch count


@dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration."""

    name: str = "shipped"
    output_dir: str = "runs/shipped"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    cv: CVSection = field(default_factory=CVSection)
    base_dir: str = "."  # folder of the config file (set by load_config)

    def resolve(self, path: str) -> Path:
        """Resolve a config-relative path."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        return data

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


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
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
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
        (0 <= t.context_probability <= 1, f"train.context_probability must be in [0, 1], got {t.context_probability}"),
        (cv.folds >= 2, f"cv.folds must be >= 2, got {cv.folds}"),
        (all(0 <= f < cv.folds for f in cv.run_folds), f"cv.run_folds {list(cv.run_folds)} must lie in 0..{cv.folds - 1}"),
        (0 < cv.val_fraction < 1, f"cv.val_fraction must be in (0, 1), got {cv.val_fraction}"),
        (not cv.fold_epochs or len(cv.fold_epochs) == len(cv.run_folds), "cv.fold_epochs must have one entry per run fold"),
        (cfg.loss.delta >= 0, f"loss.delta must be >= 0, got {cfg.loss.delta}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load and validate a TOML or JSON training config.

    Args:
        path: The config file.
        overrides: Dotted keys to override, e.g. ``{"train.epochs": 2}`` (validated the same way).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse config {path}: {exc}") from exc
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

"""Training on a CUDA GPU: the same command as on the CPU (skipped without a GPU)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from nodule_edge.train.config import load_config
from nodule_edge.train.trainer import bf16_enabled, load_checkpoint, load_dataset, train_model


@pytest.mark.gpu
def test_the_same_training_runs_on_a_cuda_gpu_under_bf16(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = load_config(
        tiny_config(),
        {"train.epochs": 2, "train.max_steps_per_epoch": 2, "train.batch_sure": 4, "train.batch_unsure": 2},
    )
    ds = load_dataset(cfg)
    labelled = np.flatnonzero(ds.labels >= 0)
    fit = train_model(cfg, ds, labelled, labelled, tmp_path / "run", 2)
    assert fit["bf16"] == bf16_enabled("auto", torch.device("cuda"))
    history = json.loads((tmp_path / "run" / "last.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(v) for h in history for v in h["train"].values())
    model, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")  # saved from the GPU, loads on the CPU
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.gpu
def test_the_whole_train_command_runs_on_a_cuda_gpu_box_net_included(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    from nodule_edge.train.run import run_training

    cfg = load_config(tiny_config(), {"cv.run_folds": [0], "first_pass.epochs": 2})
    summary = run_training(cfg, folds_only=True)
    fold = summary["folds"]["0"]
    assert fold["hardware"]["device"] == "cuda"
    assert fold["first_pass"]["network"] == "box_net" and fold["first_pass"]["box_net"]["n_nodules"] > 0
    assert 0.0 <= fold["malignancy"]["auc"] <= 1.0 and np.isfinite(fold["dice_mean"])

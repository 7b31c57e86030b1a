"""Trainer: a tiny end-to-end run through the CLI, resume, checkpoints and CLI errors."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nodule_edge.cli import main
from nodule_edge.errors import ConfigError, DataError
from nodule_edge.metrics import roc_auc
from nodule_edge.train.config import TrainConfig, TrainSection, load_config, training_config_sha256
from nodule_edge.train.model import CollaborativeNet, ModelConfig
from nodule_edge.train.run import run_training
from nodule_edge.train.trainer import (
    augment,
    bf16_enabled,
    evaluated_checkpoint,
    learning_rate,
    load_checkpoint,
    load_dataset,
    predict,
    save_checkpoint,
    train_model,
)

TINY_OVERRIDES = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_sure=2", "train.batch_unsure=2"]


def _safetensors_header(path: Path) -> dict:
    """Parse the safetensors header by hand: 8-byte length, then JSON (no pickle anywhere)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])


def test_tiny_run_through_the_cli_then_resume(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    config = tiny_config()
    args = ["train", str(config), "--folds-only"]
    for item in TINY_OVERRIDES:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "fold 0: AUC" in result.stdout

    fold = tmp_path / "out" / "fold0"
    for name in (
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "last_optim.safetensors",
        "last_optim.json",
    ):
        assert (fold / name).is_file(), name
    assert not list(fold.glob("*.tmp")), "no temporary files are left behind"
    assert {p.suffix for p in (tmp_path / "out").rglob("*") if p.is_file()} <= {".safetensors", ".json"}
    best = json.loads((fold / "best.json").read_text())
    assert best["epoch"] == 1
    assert best["model_config"]["use_attributes"] is True
    assert best["config"]["train"]["epochs"] == 1  # the overrides reached the run
    assert _safetensors_header(fold / "best.safetensors")["__metadata__"]["format"] == "nodule-edge-checkpoint-v1"
    first = json.loads((fold / "last.json").read_text())
    assert [h["epoch"] for h in first["history"]] == [1]
    # Each epoch records whether it ran under bf16 autocast, and the fold's result says so.
    ran_bf16 = bf16_enabled(best["config"]["train"]["bf16"], torch.device("cpu"))
    assert first["history"][0]["bf16"] is ran_bf16
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["folds"]["0"]["training_precision"] == ("bf16" if ran_bf16 else "fp32")
    assert "0" in summary["folds"] and "final" not in summary
    assert summary["folds"]["0"]["malignancy"]["n"] >= 1
    fold0 = summary["folds"]["0"]
    assert fold0["input"].startswith("nodule-bounded")
    assert 0 <= fold0["first_pass_found_nodule_fraction"] <= 1
    parity = fold0["path_parity"]
    assert (
        parity["n"] == fold0["n_nodules"]
        and 0 <= parity["mean_abs_delta_probability"] <= parity["max_abs_delta_probability"] <= 1
    )
    # The synthetic VOIs have 40 mm of z context: the nodule-intact context test ran.
    cs = fold0["context_sensitivity_nodule_intact"]
    assert (
        cs["n"] >= 1
        and abs(cs["mean_delta_probability"]) <= cs["mean_abs_delta_probability"] <= cs["max_abs_delta_probability"]
    )
    assert summary["data_context"]["median_z_context_mm"] > 24
    # The shipped head step ran: heads refitted under the training objective, saved beside the fold.
    refit = fold0["classifier_refit"]
    assert refit["method"] == "debugged"
    assert f"{refit['l2']:g}" in refit["inner_cv_by_l2"]
    assert (fold / "refit.safetensors").is_file()
    # The fold's result is on disk with its per-nodule predictions, for pooling in a later session.
    result = json.loads((fold / "result.json").read_text())
    assert result["fold_config_sha256"] == summary["fold_config_sha256"]
    assert len(result["predictions"]["index"]) == result["n_nodules"] == len(result["predictions"]["probability"])

    # Resume: the same run with a larger budget continues at epoch 2.
    cfg = load_config(
        config, {"train.epochs": 2, "train.max_steps_per_epoch": 1, "train.batch_sure": 2, "train.batch_unsure": 2}
    )
    messages: list[str] = []
    run_training(cfg, progress=messages.append, folds_only=True)
    assert any(m.startswith("epoch 2/2") for m in messages)
    assert not any(m.startswith("epoch 1/") for m in messages)
    last = json.loads((fold / "last.json").read_text())
    assert last["epoch"] == 2
    assert [h["epoch"] for h in last["history"]] == [1, 2]
    assert last["history"][0] == first["history"][0]
    # The optimiser state was restored: two steps in total, not one.
    scalars = json.loads((fold / "last_optim.json").read_text())["scalars"]
    assert scalars and all(v == 2.0 for k, v in scalars.items() if k.endswith(".step"))

    model, meta = load_checkpoint(fold / "best.safetensors")
    assert not model.training
    ds = load_dataset(cfg)
    pred = predict(model, ds, np.arange(3), torch.device("cpu"), bf16=False)
    assert pred["malignancy_probability"].shape == (3,)
    assert pred["attributes"].shape == (3, 6)
    assert pred["segmentation64"].shape == (3, 64, 64, 64)
    assert pred["cam16"].shape == (3, 16, 16, 16)
    assert pred["embedding"].shape == (3, 64)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(concat_embedding=False, num_attributes=1, embedding_dim=32)
    model = CollaborativeNet(config).eval()
    path = tmp_path / "ckpt" / "model.safetensors"
    save_checkpoint(path, model, {"epoch": 3, "note": "x", "values": np.arange(2)})
    loaded, meta = load_checkpoint(path)
    assert loaded.config == config
    assert meta["epoch"] == 3 and meta["values"] == [0, 1]
    x = torch.rand(2, 2, 32, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for name in ("malignancy_logit", "attributes", "segmentation", "cam", "embedding"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    header = _safetensors_header(path)
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    raw = path.read_bytes()
    # A pickle starts with PROTO (0x80) and a protocol number 2–5; a torch file is a zip ("PK").
    # (A safetensors header length can start with 0x80 too, hence the second byte.)
    assert not (raw[:1] == b"\x80" and raw[1] in (2, 3, 4, 5)) and not raw.startswith(b"PK"), (
        "not a pickle or torch zip"
    )


def test_load_checkpoint_without_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, CollaborativeNet(), {})
    path.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="sidecar"):
        load_checkpoint(path)


def test_training_without_labelled_nodules_is_an_error(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = load_config(tiny_config())
    ds = load_dataset(cfg)
    unlabelled = np.flatnonzero(ds.labels < 0)
    assert len(unlabelled) >= 1
    with pytest.raises(DataError, match="no labelled"):
        train_model(cfg, ds, unlabelled, np.zeros(0, np.int64), tmp_path / "x", 1)


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        ("[train]\nepochz = 1\n", [], "epochz"),
        ("[train\n", [], "cannot parse"),
        (None, [], "does not exist"),
        ("", ["--set", "train.epochs=two"], "train.epochs"),
    ],
)
def test_cli_train_with_a_bad_config_is_one_line_without_traceback(
    tmp_path: Path, content: str | None, extra: list[str], needle: str
) -> None:
    config = tmp_path / "bad.toml"
    if content is not None:
        config.write_text(content)
    result = CliRunner().invoke(main, ["train", str(config), *extra])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert needle in err


def test_augment_moves_image_and_mask_together_and_keeps_z() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(6, 16, 16, 16)
    mask[:, 2:5, 3:12, 6:9] = 1  # thin in z, long in y
    images = torch.stack([mask, 1 - mask], dim=1)
    out_i, out_m = augment(images, mask, gen)
    assert out_i.shape == images.shape and out_m.shape == mask.shape
    assert torch.equal(out_i[:, 0], out_m)
    assert not torch.equal(out_m, mask), "some sample was flipped, rotated or transposed"
    for m in out_m:
        # z stays z (a flip may mirror it): the slab is 3 slices thick whatever happened in-plane.
        assert int(m.any(dim=(1, 2)).sum()) == 3
        assert float(m.sum()) == float(mask[0].sum())  # nothing cut


def test_bf16_setting() -> None:
    cpu = torch.device("cpu")
    assert bf16_enabled("on", cpu) is True
    assert bf16_enabled("off", cpu) is False
    assert isinstance(bf16_enabled("auto", cpu), bool)


def test_a_checkpoint_of_another_training_config_is_not_resumed(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = load_config(
        tiny_config(),
        {"train.epochs": 1, "train.max_steps_per_epoch": 1, "train.batch_sure": 2, "train.batch_unsure": 2},
    )
    ds = load_dataset(cfg)
    labelled = np.flatnonzero(ds.labels >= 0)
    train_model(cfg, ds, labelled, np.zeros(0, np.int64), tmp_path / "run", 1)
    # A longer budget continues the same run...
    longer = load_config(
        tiny_config(),
        {"train.epochs": 2, "train.max_steps_per_epoch": 1, "train.batch_sure": 2, "train.batch_unsure": 2},
    )
    assert len(train_model(longer, ds, labelled, np.zeros(0, np.int64), tmp_path / "run", 2)["history"]) == 2
    # ...another learning rate is another model, and is refused with the folder named.
    other = load_config(
        tiny_config(),
        {
            "train.epochs": 3,
            "train.lr": 0.5,
            "train.max_steps_per_epoch": 1,
            "train.batch_sure": 2,
            "train.batch_unsure": 2,
        },
    )
    with pytest.raises(ConfigError, match=r"run holds a checkpoint trained with another configuration"):
        train_model(other, ds, labelled, np.zeros(0, np.int64), tmp_path / "run", 3)


def test_self_bounded_draws_the_runtime_box_from_the_models_own_segmentation() -> None:
    import dataclasses
    from types import SimpleNamespace

    from nodule_edge.patch import DEFAULT_PATCH_SPEC, bound_to_nodule
    from nodule_edge.train.trainer import self_bounded

    spec = dataclasses.replace(DEFAULT_PATCH_SPEC, size=32)

    class Segmenter(torch.nn.Module):
        """A 16³ segmentation: a block in the first cube, nothing in the second."""

        def forward(self, x: torch.Tensor) -> SimpleNamespace:
            seg = torch.zeros(x.shape[0], 1, 16, 16, 16)
            seg[0, 0, 6:9, 5:11, 7:10] = 1.0
            return SimpleNamespace(segmentation=seg)

    model = Segmenter().train()
    cubes = torch.rand(2, 2, 32, 32, 32)
    out = self_bounded(model, cubes, spec, torch.device("cpu"), bf16=False)
    assert model.training, "the training mode is restored"
    seg = torch.nn.functional.interpolate(
        model(cubes).segmentation, size=(32, 32, 32), mode="trilinear", align_corners=False
    )
    expected, found = bound_to_nodule(cubes[0].numpy(), seg[0, 0].numpy(), spec)
    assert found and not np.array_equal(expected, cubes[0].numpy()), "the box cuts the cube"
    np.testing.assert_array_equal(out[0].numpy(), expected)
    np.testing.assert_array_equal(out[1].numpy(), cubes[1].numpy())  # no nodule found: whole cube


def test_a_key_added_later_hashes_only_when_set(tmp_path: Path) -> None:
    from nodule_edge.train.run import fold_config_sha256

    base = tmp_path / "a.toml"
    base.write_text("")
    changed = tmp_path / "b.toml"
    changed.write_text("[train]\nself_box_probability = 0.5\n")
    default, set_ = load_config(base), load_config(changed)
    assert "self_box_probability" not in default.to_dict()["train"]
    assert set_.to_dict()["train"]["self_box_probability"] == 0.5
    assert fold_config_sha256(default) != fold_config_sha256(set_)
    bad = tmp_path / "c.toml"
    bad.write_text("[train]\nself_box_probability = 1.5\n")
    with pytest.raises(ConfigError, match="self_box_probability"):
        load_config(bad)


def test_tiny_run_with_self_boxes(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    args = ["train", str(tiny_config()), "--folds-only", "--set", "train.self_box_probability=1.0"]
    for item in TINY_OVERRIDES:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = json.loads((tmp_path / "out" / "fold0" / "last.json").read_text())
    assert meta["config"]["train"]["self_box_probability"] == 1.0


def test_learning_rate_is_the_cosine_schedule_under_a_linear_warm_up() -> None:
    plain = TrainSection(lr=1e-3)
    assert learning_rate(plain, 1, 7, 10, 4) == 1e-3
    # Bit for bit the rate of the runs recorded before the warm-up existed.
    assert learning_rate(plain, 3, 0, 10, 4) == 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4))
    warm = TrainSection(lr=1e-3, warmup_epochs=2)
    rates = [learning_rate(warm, epoch, step, 10, 4) for epoch in (1, 2) for step in range(10)]
    assert rates[0] == pytest.approx(1e-3 / 20)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10])) and all(a < b for a, b in zip(rates[10:19], rates[11:20]))
    assert rates[19] == learning_rate(plain, 2, 0, 10, 4)  # the warm-up ends on the cosine schedule
    assert learning_rate(warm, 3, 0, 10, 4) == learning_rate(plain, 3, 0, 10, 4)


def _tiny(tiny_config: Callable[..., Path], **overrides: object) -> TrainConfig:
    base = {"train.epochs": 2, "train.max_steps_per_epoch": 2, "train.batch_sure": 4, "train.batch_unsure": 2}
    return load_config(tiny_config(), {**base, **overrides})


def _weights(path: Path) -> torch.Tensor:
    model, _ = load_checkpoint(path)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_weight_ema_is_what_validation_sees_and_continues_on_resume(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = _tiny(tiny_config, **{"train.ema_decay": 0.999999})
    assert (
        evaluated_checkpoint(cfg, "last") == "ema.safetensors"
        and evaluated_checkpoint(cfg, "best") == "best.safetensors"
    )
    ds = load_dataset(cfg)
    labelled = np.flatnonzero(ds.labels >= 0)
    run = tmp_path / "run"
    fit = train_model(cfg, ds, labelled, labelled, run, 1)
    # The first update copies the weights; with a decay this close to 1 the average then stays put
    # while the raw weights move on.
    ema1, raw1 = _weights(run / "ema.safetensors"), _weights(run / "last.safetensors")
    assert not torch.allclose(ema1, raw1)
    # Validation read the averaged weights: best.safetensors (epoch 1) is the average.
    assert fit["best_epoch"] == 1 and torch.equal(_weights(run / "best.safetensors"), ema1)
    train_model(cfg, ds, labelled, labelled, run, 2)  # resumes at epoch 2
    ema2, raw2 = _weights(run / "ema.safetensors"), _weights(run / "last.safetensors")
    assert torch.allclose(ema2, ema1, atol=1e-5)  # continued, not restarted from the resumed weights
    assert not torch.allclose(ema2, raw2)
    # A decay near 0 makes the average the raw weights: it follows the trained model.
    near = _tiny(tiny_config, **{"train.ema_decay": 1e-9})
    train_model(near, ds, labelled, np.zeros(0, np.int64), tmp_path / "near", 1)
    torch.testing.assert_close(
        _weights(tmp_path / "near" / "ema.safetensors"), _weights(tmp_path / "near" / "last.safetensors")
    )


def test_balanced_sure_batches_are_half_malignant(
    tiny_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nodule_edge.train.trainer as trainer

    batches: list[np.ndarray] = []
    real_batch = trainer._batch

    def record(ds: trainer.Dataset, idx: np.ndarray, device: torch.device) -> dict:
        batches.append(idx.copy())
        return real_batch(ds, idx, device)

    monkeypatch.setattr(trainer, "_batch", record)
    cfg = _tiny(tiny_config, **{"train.balance_sure": True, "train.max_steps_per_epoch": 4})
    ds = load_dataset(cfg)
    labelled = np.flatnonzero(ds.labels >= 0)
    assert (ds.labels[labelled] == 1).mean() != 0.5  # the synthetic classes are not balanced themselves
    train_model(cfg, ds, labelled, np.zeros(0, np.int64), tmp_path / "run", 2)
    assert len(batches) >= 4  # two epochs of at least two steps
    sure_labels = np.stack([ds.labels[b[:4]] for b in batches])  # the first batch_sure rows are the sure ones
    assert (sure_labels.sum(axis=1) == 2).all(), sure_labels
    with pytest.raises(ConfigError, match="balance_sure"):
        _tiny(tiny_config, **{"train.balance_sure": True, "train.batch_sure": 1})


def test_a_resumed_run_trains_the_network_an_uninterrupted_run_trains(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """The batch order and augmentation draws are saved with the resume state (docs/ablations:
    a fold resumed after its first epoch once trained another network than the uninterrupted run)."""
    cfg = _tiny(tiny_config)
    ds = load_dataset(cfg)
    labelled = np.flatnonzero(ds.labels >= 0)
    train_model(cfg, ds, labelled, np.zeros(0, np.int64), tmp_path / "straight", 2)
    train_model(cfg, ds, labelled, np.zeros(0, np.int64), tmp_path / "resumed", 1)
    train_model(cfg, ds, labelled, np.zeros(0, np.int64), tmp_path / "resumed", 2)
    straight = json.loads((tmp_path / "straight" / "last.json").read_text())["history"]
    resumed = json.loads((tmp_path / "resumed" / "last.json").read_text())["history"]
    assert [h["train"] for h in resumed] == [h["train"] for h in straight]
    assert torch.equal(
        _weights(tmp_path / "resumed" / "last.safetensors"), _weights(tmp_path / "straight" / "last.safetensors")
    )


def test_a_finished_run_restores_without_its_optimiser_state_and_an_unfinished_one_says_what_is_missing(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Committed checkpoints keep the network, not the optimiser state (docs/ablations/rerun_epyc):
    a run with nothing left to train needs none, one that would go on training is refused."""
    cfg = _tiny(tiny_config)
    ds = load_dataset(cfg)
    labelled = np.flatnonzero(ds.labels >= 0)
    run = tmp_path / "run"
    first = train_model(cfg, ds, labelled, np.zeros(0, np.int64), run, 2)
    trained = _weights(run / "last.safetensors")
    for name in ("last_optim.safetensors", "last_optim.json"):
        (run / name).unlink()
    again = train_model(cfg, ds, labelled, np.zeros(0, np.int64), run, 2)
    assert again["history"] == json.loads((run / "last.json").read_text())["history"]
    assert [h["train"] for h in again["history"]] == [h["train"] for h in first["history"]]
    assert torch.equal(_weights(run / "last.safetensors"), trained), "nothing was trained again"
    with pytest.raises(ConfigError, match=r"run holds a network trained to epoch 2 .*last_optim\.safetensors"):
        train_model(cfg, ds, labelled, np.zeros(0, np.int64), run, 3)


def test_a_fold_restored_from_its_network_and_box_net_alone_reproduces_its_result(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """What docs/ablations/rerun_epyc/checkpoints keeps per fold is enough to evaluate the fold again."""
    overrides = {"first_pass.network": "box_net", "first_pass.widths": [4, 8, 8, 8], "train.epochs": 1}
    original = run_training(load_config(tiny_config(), overrides), folds_only=True)["folds"]["0"]
    restored = tmp_path / "restored" / "fold0"
    restored.mkdir(parents=True)
    for name in ("last.safetensors", "last.json", "box_net.safetensors", "box_net.json"):
        (restored / name).write_bytes((tmp_path / "out" / "fold0" / name).read_bytes())
    again = run_training(
        load_config(tiny_config(), {**overrides, "output_dir": str(tmp_path / "restored")}), folds_only=True
    )["folds"]["0"]
    assert again["epochs_run"] == original["epochs_run"] == 1
    assert again["malignancy"] == original["malignancy"]
    assert again["classifier_refit"] == original["classifier_refit"]
    assert not (restored / "last_optim.safetensors").exists(), "nothing was trained"


def test_run_files_belong_to_the_config_named_in_the_folders_summary(tmp_path: Path) -> None:
    """Head-step ablations re-evaluate the shipped networks in runs/shipped: the shipped files stay."""
    from nodule_edge.train.run import RunFiles

    fresh = RunFiles.of(tmp_path, "shipped")  # nothing there yet: this run writes the plain names
    assert fresh.owner and fresh.summary == tmp_path / "summary.json"
    assert fresh.refit(2) == tmp_path / "fold2" / "refit.safetensors"
    assert fresh.refit(None) == tmp_path / "final" / "refit.safetensors"
    assert fresh.box_nets(0) == (tmp_path / "fold0" / "box_net.safetensors",)
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"name": "shipped"}}))
    assert RunFiles.of(tmp_path, "shipped").owner
    other = RunFiles.of(tmp_path, "head_refit_full")
    assert not other.owner
    assert other.summary == tmp_path / "summary.head_refit_full.json"
    assert other.result(1) == tmp_path / "fold1" / "result.head_refit_full.json"
    assert other.refit(None) == tmp_path / "final" / "refit.head_refit_full.safetensors"
    assert other.box_nets(0) == (
        tmp_path / "fold0" / "box_net.head_refit_full.safetensors",
        tmp_path / "fold0" / "box_net.safetensors",
    )
    assert other.folder(3) == tmp_path / "fold3"  # networks are shared (and guarded by their hash)
    (tmp_path / "summary.json").write_text("{not json")  # a damaged summary is rewritten by whoever runs
    assert RunFiles.of(tmp_path, "head_refit_full").owner


def test_a_head_step_ablation_in_the_shipped_folder_leaves_the_shipped_files_alone(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    overrides = {"first_pass.network": "box_net", "first_pass.widths": [4, 8, 8, 8]}
    owner = load_config(tiny_config(), overrides)
    run_training(owner, folds_only=True)
    out = tmp_path / "out"
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "fold0" / "refit.safetensors" in written and out / "fold0" / "box_net.safetensors" in written

    ablation = load_config(tiny_config(), {**overrides, "name": "no_parity", "head.parity_weight": 0.0})
    messages: list[str] = []
    run_training(ablation, progress=messages.append, folds_only=True)
    assert all(p.read_bytes() == data for p, data in written.items()), "the owner's files are unchanged"
    fold = out / "fold0"
    assert (fold / "refit.no_parity.safetensors").is_file() and (fold / "result.no_parity.json").is_file()
    assert not (fold / "box_net.no_parity.safetensors").exists()  # the same box net, read from the owner's file
    assert any("box net: finished earlier" in m and str(fold / "box_net.safetensors") in m for m in messages)
    summary = json.loads((out / "summary.no_parity.json").read_text())
    assert summary["folds"]["0"]["classifier_refit"]["method"] == "debugged"
    assert json.loads((out / "summary.json").read_text())["config"]["name"] == "tiny"
    # The ablation resumes from its own result file, not from the owner's.
    messages.clear()
    run_training(ablation, progress=messages.append, folds_only=True)
    assert any(m.startswith("fold 0: finished earlier") for m in messages)


def test_network_seed_changes_the_network_and_not_the_split(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    from nodule_edge.train.trainer import network_seed, split_fold

    assert network_seed(TrainSection(seed=3)) == 3 and network_seed(TrainSection(seed=3, network_seed=1)) == 1
    base = _tiny(tiny_config, **{"train.epochs": 1})
    other = _tiny(tiny_config, **{"train.epochs": 1, "train.network_seed": 1})
    ds = load_dataset(base)
    assert all(np.array_equal(a, b) for a, b in zip(split_fold(ds, base, 0), split_fold(ds, other, 0)))
    labelled = np.flatnonzero(ds.labels >= 0)
    train_model(base, ds, labelled, np.zeros(0, np.int64), tmp_path / "a", 1)
    train_model(other, ds, labelled, np.zeros(0, np.int64), tmp_path / "b", 1)
    assert not torch.equal(_weights(tmp_path / "a" / "last.safetensors"), _weights(tmp_path / "b" / "last.safetensors"))
    # The same seed spelled either way trains the same network.
    same = _tiny(tiny_config, **{"train.epochs": 1, "train.network_seed": 0})
    train_model(same, ds, labelled, np.zeros(0, np.int64), tmp_path / "c", 1)
    assert torch.equal(_weights(tmp_path / "a" / "last.safetensors"), _weights(tmp_path / "c" / "last.safetensors"))


def test_a_tiny_run_with_the_outline_term(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    """[head] outline_statistics: the head step fits the outline term, the fold result and the refit's
    sidecar carry it, and the evaluation adds it on the runtime path."""
    from nodule_edge.outline import OUTLINE_FEATURE_NAMES, OutlineHead

    cfg = load_config(
        tiny_config(),
        {"first_pass.network": "box_net", "first_pass.widths": [4, 8, 8, 8], "head.outline_statistics": True},
    )
    summary = run_training(cfg, folds_only=True)
    refit = summary["folds"]["0"]["classifier_refit"]
    head = OutlineHead.from_dict(refit["outline_head"])
    assert refit["outline_head"]["names"] == list(OUTLINE_FEATURE_NAMES)
    assert any(w != 0 for w in head.weights), "the term was fitted"
    _, meta = load_checkpoint(tmp_path / "out" / "fold0" / "refit.safetensors")
    assert meta["classifier_refit"]["outline_head"] == refit["outline_head"]
    fold0 = summary["folds"]["0"]
    assert 0 <= fold0["path_parity"]["mean_abs_delta_probability"] <= 1
    assert 0 <= fold0["cam_on_nodule_fraction_gt_mask"] <= 1


def test_outline_statistics_are_ignored_without_a_nodule_box(tiny_config: Callable[..., Path]) -> None:
    """The term is on by default (the shipped head step); a whole-cube model has no first pass to
    outline the nodule, so its head step fits none instead of refusing the config."""
    cfg = load_config(tiny_config(), {"head.outline_statistics": True, "train.nodule_box": False})
    assert load_config(tiny_config(), {"head.outline_statistics": True, "head.refit": "full"}).head.refit == "full"
    refit = run_training(cfg, folds_only=True)["folds"]["0"]["classifier_refit"]
    assert refit["method"] == "debugged" and "outline_head" not in refit


def test_the_outline_offset_trains_beside_the_network_and_resumes(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """[train] outline_offset: a term on statistics that carry the label takes their weight, it is
    in every checkpoint's sidecar in raw units, and a resumed run continues it."""
    from nodule_edge.outline import OUTLINE_FEATURE_NAMES, OutlineHead

    cfg = _tiny(tiny_config, **{"train.outline_offset": True, "train.max_steps_per_epoch": 3, "train.lr": 0.03})
    ds = load_dataset(cfg)
    labelled = np.flatnonzero(ds.labels >= 0)
    rng = np.random.default_rng(0)
    outline = rng.normal(size=(len(ds), len(OUTLINE_FEATURE_NAMES))) + 10.0
    outline[:, 2] += 3.0 * np.where(ds.labels == 1, 1.0, -1.0)  # the third statistic says the class
    fit = train_model(cfg, ds, labelled, labelled, tmp_path / "straight", 2, outline=outline)
    head = OutlineHead.from_dict(fit["outline_offset"])
    standardised = np.asarray(head.weights) * outline[labelled].std(0)  # raw units back to the trained scale
    assert standardised[2] > 0 and abs(standardised[2]) == np.abs(standardised).max(), standardised
    _, meta = load_checkpoint(tmp_path / "straight" / "last.safetensors")
    assert meta["outline_offset"] == fit["outline_offset"]
    train_model(cfg, ds, labelled, labelled, tmp_path / "resumed", 1, outline=outline)
    resumed = train_model(cfg, ds, labelled, labelled, tmp_path / "resumed", 2, outline=outline)
    assert resumed["outline_offset"] == fit["outline_offset"]
    # A finished run restored without its resume state reports the term its sidecar records.
    for name in ("last_optim.safetensors", "last_optim.json"):
        (tmp_path / "straight" / name).unlink()
    restored = train_model(cfg, ds, labelled, labelled, tmp_path / "straight", 2, outline=outline)
    assert restored["outline_offset"] == fit["outline_offset"]
    assert torch.equal(
        _weights(tmp_path / "resumed" / "last.safetensors"), _weights(tmp_path / "straight" / "last.safetensors")
    )
    with pytest.raises(DataError, match=r"outline statistics of shape \(3, 7\)"):
        train_model(cfg, ds, labelled, labelled, tmp_path / "bad", 1, outline=outline[:3])


def test_a_tiny_run_with_the_outline_offset(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    """The box net is trained before the network, the network beside its outline offset, and the head
    step starts its term from the trained one."""
    cfg = load_config(
        tiny_config(),
        {
            "first_pass.network": "box_net",
            "first_pass.widths": [4, 8, 8, 8],
            "head.outline_statistics": True,
            "train.outline_offset": True,
        },
    )
    messages: list[str] = []
    summary = run_training(cfg, progress=messages.append, folds_only=True)
    first_box_net = next(i for i, m in enumerate(messages) if "box net" in m)
    first_epoch = next(i for i, m in enumerate(messages) if m.startswith("epoch 1/"))
    assert first_box_net < first_epoch
    refit = summary["folds"]["0"]["classifier_refit"]
    _, meta = load_checkpoint(tmp_path / "out" / "fold0" / "last.safetensors")
    assert refit["outline_init"] == meta["outline_offset"]
    assert "outline_head" in refit
    shipped_like = load_config(tiny_config(), {"first_pass.network": "box_net", "head.outline_statistics": True})
    assert training_config_sha256(cfg) != training_config_sha256(shipped_like)
    with pytest.raises(ConfigError, match="train.outline_offset .* needs .*box_net"):
        load_config(tiny_config(), {"first_pass.network": "model", "train.outline_offset": True})


def test_a_fitted_outline_offset_starts_at_the_logistic_fit_of_the_statistics() -> None:
    """outline_offset_start = "fitted": the term starts at the L2 logistic regression of the labelled
    training nodules' labels on their statistics, and its raw-unit head gives the same logits."""
    from nodule_edge.outline import OUTLINE_FEATURE_NAMES, OutlineHead
    from nodule_edge.train.trainer import _OutlineOffset

    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30), np.ones(30), -np.ones(10)].astype(np.int64)
    outline = rng.normal(size=(len(labels), len(OUTLINE_FEATURE_NAMES))) * 2.0 + 5.0
    outline[:, 0] += 2.0 * labels  # the first statistic carries the class
    labelled = np.flatnonzero(labels >= 0)
    zero = _OutlineOffset(outline, labels, labelled, torch.device("cpu"))
    assert not zero.logits(labelled).any()
    fitted = _OutlineOffset(outline, labels, labelled, torch.device("cpu"), "fitted")
    logits = fitted.logits(labelled)
    assert roc_auc(labels[labelled], logits) > 0.85
    head = fitted.head()
    assert head.weights[0] > 0 and abs(head.weights[0]) == max(abs(w) for w in head.weights)
    np.testing.assert_allclose(OutlineHead.from_dict(head.to_dict()).logit(outline[labelled]), logits, atol=1e-4)

"""Training config: strict validation, overrides, and the shipped and ablation configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nodule_edge.errors import ConfigError
from nodule_edge.train.config import TrainConfig, load_config, training_config_sha256

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "configs" / "shipped.toml"
ABLATIONS = sorted((REPO_ROOT / "configs" / "ablations").glob("*.toml"))


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_from_an_empty_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.to_dict() == TrainConfig().to_dict()
    assert Path(cfg.base_dir) == tmp_path.resolve()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("epochz = 3\n", "epochz"),
        ("[bogus]\nx = 1\n", "bogus"),
        ("[train]\nepoch = 3\n", "epoch"),
        ("[model]\nuse_attribute = true\n", "use_attribute"),
        ("[cv]\nfold = 2\n", "fold"),
        ("base_dir = '/etc'\n[loss]\ndebugg = false\n", "debugg"),
    ],
)
def test_unknown_keys_are_rejected_by_name(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) \['{key}'\]"):
        load_config(_write(tmp_path, text))


def test_nested_unknown_key_names_its_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "[train]\nepoch = 3\n"))
    assert "c.toml.train" in str(info.value)
    assert "epochs" in str(info.value)  # the allowed keys are listed


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[train]\nepochs = "3"\n', "train.epochs"),
        ("[train]\nepochs = 3.5\n", "train.epochs"),
        ("[train]\nepochs = true\n", "train.epochs"),
        ("[loss]\ndebug = 1\n", "loss.debug"),
        ("[train]\nlr = true\n", "train.lr"),
        ('[train]\nlr = "fast"\n', "train.lr"),
        ("name = 3\n", "name"),
        ("[cv]\nrun_folds = [0.5]\n", "cv.run_folds"),
        ("[cv]\nrun_folds = 0\n", "cv.run_folds"),
        ("data = 3\n", "data"),
        ("[head]\nl2_grid = []\n", "head.l2_grid"),
        ('[head]\nl2_grid = ["0.01"]\n', "head.l2_grid"),
        ("[head]\nl2_grid = 0.01\n", "head.l2_grid"),
    ],
)
def test_wrong_types_are_rejected(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    "text",
    [
        "[train]\nepochs = 0\n",
        "[train]\nlr = -1.0\n",
        "[train]\nbf16 = 'maybe'\n",
        "[train]\ncontext_probability = 1.5\n",
        "[cv]\nfolds = 1\n",
        "[cv]\nfolds = 3\nrun_folds = [3]\n",
        "[cv]\nval_fraction = 1.0\n",
        "[loss]\ndelta = -0.1\n",
        "[head]\nl2_grid = [0.01, 0.0]\n",
    ],
)
def test_out_of_range_values_are_rejected(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, text))


def test_integer_is_accepted_for_a_float(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "[train]\nlr = 1\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_the_head_l2_grid_is_read_as_numbers_and_hashes_only_when_it_differs(tmp_path: Path) -> None:
    default = load_config(_write(tmp_path, "[head]\nl2_grid = [0.01, 0.03, 0.1]\n"))
    assert default.head.l2_grid == (0.01, 0.03, 0.1)
    # At the grid it had before the key existed it is absent from the hash, so folds recorded
    # before it still match; the shipped grid, the default since 2026-12-06, is hashed.
    assert "l2_grid" not in default.to_dict()["head"]
    shipped = load_config(_write(tmp_path, ""))
    assert shipped.head.l2_grid == (0.001, 0.003, 0.01, 0.03, 0.1)
    assert shipped.to_dict()["head"]["l2_grid"] and shipped.sha256() != default.sha256()
    wide = load_config(_write(tmp_path, "[head]\nl2_grid = [0.001, 1, 0.1]\n"))
    assert wide.head.l2_grid == (0.001, 1.0, 0.1) and wide.sha256() != default.sha256()
    # The grid changes the refit only: the network's checkpoints are reused.
    assert training_config_sha256(wide) == training_config_sha256(default)
    # So does Platt scaling after the refit; off, it is absent from the hash too.
    assert load_config(_write(tmp_path, "[head]\ncalibrate = false\n")).sha256() == shipped.sha256()
    calibrated = load_config(_write(tmp_path, "[head]\ncalibrate = true\n"))
    assert calibrated.head.calibrate and calibrated.sha256() != shipped.sha256()
    assert training_config_sha256(calibrated) == training_config_sha256(shipped)
    # And the classifier's targets: at "labels" absent from the hash; "ratings" a head step only.
    assert load_config(_write(tmp_path, '[head]\nclassifier_target = "labels"\n')).sha256() == shipped.sha256()
    rated = load_config(_write(tmp_path, '[head]\nclassifier_target = "ratings"\n'))
    assert rated.sha256() != shipped.sha256()
    assert training_config_sha256(rated) == training_config_sha256(shipped)
    with pytest.raises(ConfigError, match="head.classifier_target must be labels or ratings, got 'rating'"):
        load_config(_write(tmp_path, '[head]\nclassifier_target = "rating"\n'))


@pytest.mark.parametrize(
    ("key", "default", "value"),
    [
        ("ema_decay", "0.0", "0.99"),
        ("warmup_epochs", "0", "1"),
        ("balance_sure", "false", "true"),
        ("network_seed", "-1", "1"),
        ("outline_offset", "false", "true"),
    ],
)
def test_the_recipe_switches_hash_only_when_set(tmp_path: Path, key: str, default: str, value: str) -> None:
    shipped = load_config(_write(tmp_path, ""))
    off = load_config(_write(tmp_path, f"[train]\n{key} = {default}\n"))
    on = load_config(_write(tmp_path, f"[train]\n{key} = {value}\n"))
    # Off, the key is absent from both hashes: the shipped folds and checkpoints still match.
    assert off.sha256() == shipped.sha256() and training_config_sha256(off) == training_config_sha256(shipped)
    # On, it shapes the network: another training hash.
    assert training_config_sha256(on) != training_config_sha256(shipped)


def test_contiguous_groupnorm_is_on_by_default_and_off_hashes_as_before_the_key_existed(tmp_path: Path) -> None:
    shipped = load_config(_write(tmp_path, ""))
    off = load_config(_write(tmp_path, "[train]\ncontiguous_groupnorm = false\n"))
    assert shipped.train.contiguous_groupnorm and not off.train.contiguous_groupnorm
    # Off, the key is absent from the hashed dict (runs recorded before it existed still match);
    # on, as shipped, it is hashed: the two are different networks.
    assert "contiguous_groupnorm" not in off.to_dict()["train"]
    assert shipped.to_dict()["train"]["contiguous_groupnorm"] is True
    assert training_config_sha256(off) != training_config_sha256(shipped)


def test_the_box_nets_miss_weight_hashes_only_when_set(tmp_path: Path) -> None:
    shipped = load_config(_write(tmp_path, ""))
    heavier = load_config(_write(tmp_path, "[first_pass]\nfn_weight = 0.7\n"))
    assert "fn_weight" not in shipped.to_dict()["first_pass"]
    assert heavier.to_dict()["first_pass"]["fn_weight"] == 0.7 and shipped.sha256() != heavier.sha256()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[train]\nema_decay = 1.0\n", "ema_decay must be in"),
        ("[train]\nwarmup_epochs = 12\n", "warmup_epochs must be"),
        ("[train]\nbalance_sure = true\nbatch_sure = 1\n", "balance_sure needs"),
        ("[train]\nnetwork_seed = -2\n", "network_seed must be >= 0"),
        ("[first_pass]\nfn_weight = 1.0\n", r"first_pass.fn_weight must lie in \(0, 1\), got 1.0"),
        ("[train]\noutline_offset = true\n[head]\noutline_statistics = false\n", "outline_statistics=False"),
        ('[train]\noutline_offset = true\noutline_offset_start = "fit"\n', "must be zero or fitted, got 'fit'"),
        ('[train]\noutline_offset_start = "fitted"\n', "needs train.outline_offset = true"),
    ],
)
def test_bad_recipe_switches_are_refused_with_the_key_named(tmp_path: Path, content: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(_write(tmp_path, content))


def test_fold_epochs_must_match_run_folds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fold_epochs"):
        load_config(_write(tmp_path, "[cv]\nrun_folds = [0, 1]\nfold_epochs = [5]\n"))
    cfg = load_config(_write(tmp_path, "[cv]\nrun_folds = [0, 1]\nfold_epochs = [5, 3]\n"))
    assert cfg.cv.fold_epochs == (5, 3)


def test_overrides_are_applied_and_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, "[train]\nepochs = 10\n")
    base = load_config(path)
    cfg = load_config(path, {"train.epochs": 2, "model.use_attributes": False, "loss.alpha": 0.5, "name": "x"})
    assert (cfg.train.epochs, cfg.model.use_attributes, cfg.loss.alpha, cfg.name) == (2, False, 0.5, "x")
    # A section absent from the file is created by an override.
    assert load_config(path, {"cv.val_fraction": 0.25}).cv.val_fraction == 0.25
    assert cfg.sha256() != base.sha256()
    with pytest.raises(ConfigError, match="epochz"):
        load_config(path, {"train.epochz": 2})
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path, {"train.epochs": "two"})


def test_json_configs_are_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps({"train": {"epochs": 4}, "cv": {"run_folds": [1]}}), "c.json")
    cfg = load_config(path)
    assert cfg.train.epochs == 4 and cfg.cv.run_folds == (1,)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(_write(tmp_path, "[train\nepochs = 3\n"))


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    cfg = load_config(_write(tmp_path / "sub", '[data]\nvoi_dir = "../voi"\n'))
    assert cfg.resolve(cfg.data.voi_dir).resolve() == (tmp_path / "voi").resolve()
    assert cfg.resolve("/abs/path") == Path("/abs/path")


def test_config_hash_ignores_the_config_location(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_config(_write(tmp_path / "a", "[train]\nepochs = 3\n"))
    b = load_config(_write(tmp_path / "b", "[train]\nepochs = 3\n"))
    assert a.sha256() == b.sha256()
    assert "base_dir" not in a.to_dict()


def test_shipped_config_loads() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.name == "shipped"
    assert cfg.model.use_attributes and cfg.model.concat_embedding and not cfg.model.malignancy_only
    assert cfg.loss.debug and cfg.loss.adaptive
    assert cfg.resolve(cfg.data.voi_dir).resolve() == (REPO_ROOT.parent / "shared" / "data" / "lidc_voi").resolve()
    assert cfg.resolve(cfg.output_dir).resolve() == (REPO_ROOT / "runs" / "shipped").resolve()


#: Head-step ablations: the shipped networks, another refit after training.
HEAD_STEP_ABLATIONS = (
    "head_refit_full",
    "head_refit_none",
    "attribute_weight16",
    "no_attribute_readout",
    "no_attribute_skip",
    "parity_penalty",
    "no_parity_penalty",
    "outline_statistics",
    "outline_statistics_debug2",
    "outline_statistics_sign",
    "outline_statistics_even",
    "head_l2_wide_outline",
)

#: First-pass ablations: the shipped networks, another first pass (its own network, trained per fold).
FIRST_PASS_ABLATIONS = ("box_net", "box_net_parity2")

#: Head-step ablations in a folder of their own, with copies of the shipped networks (so that the
#: shipped run's refit checkpoints stay the shipped config's).
COPIED_NETWORK_ABLATIONS = ("head_l2_wide", "head_calibrated")

#: First-pass ablations in a folder of their own, whose networks are trained there again under the
#: shipped training config (the same hash and seed as the shipped run's).
OWN_FOLDER_FIRST_PASS_ABLATIONS = ("box_net_epochs40",)

#: Recipe ablations: the train keys each one changes (the three recipe switches also train with the
#: contiguous GroupNorm copy: the same function, other rounding; their networks differ anyway;
#: two of them record the one thread their folds ran at, which the fold hash includes).
RECIPE_ABLATION_KEYS = {
    "self_box": ("self_box_probability",),
    "epochs20": ("epochs",),
    "epochs20_box_net": ("epochs",),
    "weight_ema": ("ema_decay", "contiguous_groupnorm", "threads"),
    "lr_warmup": ("warmup_epochs", "contiguous_groupnorm", "threads"),
    "balanced_sure": ("balance_sure", "contiguous_groupnorm"),
    "contiguous_groupnorm": ("contiguous_groupnorm",),
    "narrow_widths": (),
    "network_seed1": ("network_seed",),
    "outline_offset": ("outline_offset",),
    "outline_offset_fitted": ("outline_offset", "outline_offset_start"),
}

#: The stem and block widths shipped until narrow_widths (docs/ablations/wide_widths, the former docs/cv).
WIDE_WIDTHS = (24, 48, 96, 128)
#: What turns today's shipped config into the one shipped until narrow_widths.
WIDE_OVERRIDES = {"model.widths": list(WIDE_WIDTHS), "train.contiguous_groupnorm": False}

#: The shipped head step's classifier L2 grid before it widened (head_l2_wide_outline).
NARROW_L2 = {"head.l2_grid": [0.01, 0.03, 0.1]}

#: The shipped head step before the outline term (outline_statistics_sign).
HEAD_BEFORE_OUTLINE = {
    "head.outline_statistics": False,
    "head.debug_sign_temperature": 0.0,
    "head.debug_adaptive": True,
    **NARROW_L2,
}


def _wide_shipped_config() -> TrainConfig:
    """The shipped config with the wider network it had until narrow_widths (and its head step)."""
    return load_config(SHIPPED, {**WIDE_OVERRIDES, **HEAD_BEFORE_OUTLINE})


def test_there_are_the_table_1_ablations_and_the_two_design_ablations() -> None:
    assert {p.stem for p in ABLATIONS} == set(HEAD_STEP_ABLATIONS) | set(FIRST_PASS_ABLATIONS) | set(
        COPIED_NETWORK_ABLATIONS
    ) | set(OWN_FOLDER_FIRST_PASS_ABLATIONS) | set(RECIPE_ABLATION_KEYS) | {
        "papers_model",
        "light16_decoder",
        "no_extras",
        "attributes_only",
        "debug_only",
        "attributes_debug_no_concat",
        "malignancy_regression_debug",
        "attributes_concat",
        "attributes_concat_debug",
    }


@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_ablation_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    # The head-step ablations re-evaluated the shipped run's checkpoints (the wider networks that
    # runs/shipped held before narrow_widths; a rerun from scratch meets the narrow ones there and
    # stops with a ConfigError naming the folder); the others train their own.
    run = "shipped" if path.stem in HEAD_STEP_ABLATIONS + FIRST_PASS_ABLATIONS else f"ablations/{path.stem}"
    assert cfg.resolve(cfg.output_dir).resolve() == (REPO_ROOT / "runs" / run).resolve()
    shipped = load_config(SHIPPED)
    # Only the model and loss switches (and a recipe ablation's own train keys) differ from the
    # shipped run: same data, cache, schedule and folds.
    for attr in ("voi_dir", "cache_dir"):
        assert cfg.resolve(getattr(cfg.data, attr)).resolve() == shipped.resolve(getattr(shipped.data, attr)).resolve()
    keys = RECIPE_ABLATION_KEYS.get(path.stem, ())
    if cfg.model.widths == WIDE_WIDTHS:
        # Recorded on the wider network that shipped before narrow_widths: they pin its widths and
        # the GroupNorm layout it trained with, so that their folds still reproduce.
        keys += ("contiguous_groupnorm",)
    own = {key: getattr(shipped.train, key) for key in keys}
    assert dataclasses.replace(cfg.train, **own) == shipped.train
    assert cfg.cv == dataclasses.replace(shipped.cv, export_dir=cfg.cv.export_dir)
    assert cfg.resolve(cfg.cv.export_dir).resolve() == (REPO_ROOT / "docs" / "ablations" / path.stem).resolve()


def test_own_folder_first_pass_ablations_train_the_networks_they_were_recorded_with() -> None:
    shipped = _wide_shipped_config()
    for name in OWN_FOLDER_FIRST_PASS_ABLATIONS:
        cfg = load_config(REPO_ROOT / "configs" / "ablations" / f"{name}.toml")
        # Same training hash and seed as the wider shipped run (docs/ablations/wide_widths): the
        # networks are that run's when training is deterministic.
        assert training_config_sha256(cfg) == training_config_sha256(shipped), name
        assert (cfg.head, cfg.first_pass.network) == (shipped.head, shipped.first_pass.network), name
        assert cfg.first_pass != shipped.first_pass, name


def test_dataclass_defaults_equal_the_shipped_config() -> None:
    """configs/shipped.toml is the source of the defaults: a config without keys is the shipped run."""
    shipped = load_config(SHIPPED)
    default = TrainConfig()
    assert (default.model, default.loss, default.train, default.head) == (
        shipped.model,
        shipped.loss,
        shipped.train,
        shipped.head,
    )
    assert dataclasses.replace(default.cv, export_dir=shipped.cv.export_dir) == shipped.cv


def test_extends_overrides_table_by_table_and_rebases_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path, '[data]\nvoi_dir = "voi"\n[train]\nepochs = 5\nlr = 0.5\n', name="base.toml")
    cfg = load_config(_write(tmp_path / "sub", 'extends = "../base.toml"\n[train]\nepochs = 7\n'))
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.5)
    assert cfg.resolve(cfg.data.voi_dir).resolve() == (tmp_path / "voi").resolve()


def test_extends_cycles_and_missing_bases_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, 'extends = "b.toml"\n', name="a.toml")
    _write(tmp_path, 'extends = "a.toml"\n', name="b.toml")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match="missing.toml does not exist"):
        load_config(_write(tmp_path, 'extends = "missing.toml"\n', name="c.toml"))


def test_an_empty_voi_dir_uses_the_one_data_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODULE_EDGE_DATA", str(tmp_path / "elsewhere"))
    cfg = load_config(_write(tmp_path, '[data]\nvoi_dir = ""\n'))
    assert cfg.voi_path() == tmp_path / "elsewhere" / "lidc_voi"
    named = load_config(_write(tmp_path, '[data]\nvoi_dir = "voi"\n', "named.toml"))
    assert named.voi_path().resolve() == (tmp_path / "voi").resolve()


#: Result folders whose folds were written under another name: they were the shipped run's
#: folds before the head step changed, moved aside; re-running their config re-evaluates them.
MOVED_RESULTS = {
    "head_refit_none": "docs/cv before the debugged refit (commit 7c5f1cf)",
    "no_attribute_readout": "docs/cv before the attribute readout step",
    "no_attribute_skip": "docs/cv before the attribute skip",
    "no_parity_penalty": "docs/cv before the path-parity penalty",
    "own_first_pass_epyc": "docs/cv before the box net first pass (networks trained on the AMD EPYC)",
    "rerun_xeon": "the shipped config before the box net, networks retrained on the AMX Xeon",
}


#: Recorded folders that a config reproduces only with command-line overrides (`--set`, the
#: command in each folder's README): config and overrides.
REPRODUCED_WITH_OVERRIDES = {
    # docs/cv until 2026-12-05: the shipped config with the wide network.
    "wide_widths": (
        SHIPPED,
        {**WIDE_OVERRIDES, **HEAD_BEFORE_OUTLINE, "cv.export_dir": "../docs/ablations/wide_widths"},
    ),
    # docs/cv from narrow_widths until outline_statistics_sign shipped.
    "no_outline_term": (SHIPPED, {**HEAD_BEFORE_OUTLINE, "cv.export_dir": "../docs/ablations/no_outline_term"}),
    # docs/cv from outline_statistics_sign until head_l2_wide_outline shipped (its networks were
    # trained on the AMX Xeon and are gone; the hash still says which config made the folds).
    "narrow_l2_xeon": (SHIPPED, {**NARROW_L2, "cv.export_dir": "../docs/ablations/narrow_l2_xeon"}),
    # The same head step on networks trained again in fp32 on the AVX2 EPYC (2026-12-05): the
    # networks and box nets of docs/cv since head_l2_wide_outline shipped.
    "rerun_epyc": (SHIPPED, {**NARROW_L2, "cv.export_dir": "../docs/ablations/rerun_epyc"}),
}


#: Recorded folders of the shipped config itself, its networks trained again elsewhere (the export
#: folder, set on the command line, is outside the fold hash).
SHIPPED_RERUNS: dict[str, str] = {}


RECORDED = [REPO_ROOT / "docs" / "cv"] + sorted(
    p for p in (REPO_ROOT / "docs" / "ablations").iterdir() if list(p.glob("fold*.json"))
)


@pytest.mark.parametrize("folder", RECORDED, ids=[p.name for p in RECORDED])
def test_each_recorded_ablation_is_what_its_config_reproduces(folder: Path) -> None:
    """A restarted run skips a finished fold only under the same fold hash: the config must keep it."""
    import json

    from nodule_edge.train.run import fold_config_sha256

    recorded = {json.loads(p.read_text())["fold_config_sha256"] for p in folder.glob("fold*.json")}
    assert len(recorded) == 1, f"{folder.name} pools folds of {len(recorded)} configurations"
    if folder.name in MOVED_RESULTS:
        return
    if folder.name in REPRODUCED_WITH_OVERRIDES:
        config, overrides = REPRODUCED_WITH_OVERRIDES[folder.name]
        assert recorded == {fold_config_sha256(load_config(config, overrides))}, f"{config.name} + {overrides}"
        # The overrides are what reproduces it: the config alone does not.
        assert recorded != {fold_config_sha256(load_config(config))}
        return
    shipped = folder.name == "cv" or folder.name in SHIPPED_RERUNS
    config = SHIPPED if shipped else REPO_ROOT / "configs" / "ablations" / f"{folder.name}.toml"
    assert recorded == {fold_config_sha256(load_config(config))}, f"{config.name} no longer reproduces {folder}"


def test_the_training_hash_names_the_voi_folder_not_how_a_config_file_spells_it(tmp_path: Path) -> None:
    (tmp_path / "configs" / "ablations").mkdir(parents=True)
    base = tmp_path / "configs" / "base.toml"
    base.write_text('[data]\nvoi_dir = "../data/lidc_voi"\n')
    child = tmp_path / "configs" / "ablations" / "child.toml"
    child.write_text('extends = "../base.toml"\n[head]\nrefit = "full"\n')
    a, b = load_config(base), load_config(child)
    assert a.data.voi_dir != b.data.voi_dir  # each spelt relative to its own file
    assert training_config_sha256(a) == training_config_sha256(b)
    assert training_config_sha256(a) == training_config_sha256(a.to_dict())  # a sidecar's config
    other = tmp_path / "configs" / "other.toml"
    other.write_text('[data]\nvoi_dir = "../data/other_voi"\n')
    assert training_config_sha256(load_config(other)) != training_config_sha256(a)

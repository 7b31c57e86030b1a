"""The head refits: a logistic regression of the classifier, and the debugged refit of both heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.metrics import roc_auc
from nodule_edge.train.checkpoints import load_checkpoint, save_checkpoint
from nodule_edge.train.config import HeadSection, TrainConfig
from nodule_edge.train.head import (
    L2_GRID,
    HeadInputs,
    HeadObjective,
    _cam_margin,
    _cam_region_means,
    _classifier_targets,
    _fit,
    _head_metrics,
    _prepare,
    fit_logistic,
    platt_calibration,
    refit_classifier,
    refit_heads,
)
from nodule_edge.train.model import CollaborativeNet, ModelConfig
from nodule_edge.train.run import head_objective


def _data(n: int = 240, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) * np.linspace(0.01, 100, dim)  # wildly different scales
    signal = x[:, 0] / 0.01 + 0.5 * x[:, 3] / x[:, 3].std()
    y = (signal + rng.normal(scale=0.8, size=n) > 0).astype(float)
    return x, y, [f"p{i // 2}" for i in range(n)]


def test_fit_logistic_recovers_a_known_direction() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 3))
    y = (rng.random(2000) < 1 / (1 + np.exp(-(2 * x[:, 0] - 1 * x[:, 2] + 0.5)))).astype(float)
    w, b = fit_logistic(x, y, l2=1e-3)
    np.testing.assert_allclose(w, [2, 0, -1], atol=0.25)
    assert b == pytest.approx(0.5, abs=0.2)
    # A large penalty shrinks the weights towards zero but not the intercept.
    w_big, _ = fit_logistic(x, y, l2=1e5)
    assert np.abs(w_big).max() < 0.05


def test_refit_writes_the_standardised_fit_into_cls() -> None:
    x, y, patients = _data(dim=9)
    torch.manual_seed(0)
    # No attributes, no statistics: the classifier reads exactly the pooled features (C inputs).
    model = CollaborativeNet(
        ModelConfig(
            widths=(8, 8, 8, 9 - 1 + 1), use_attributes=False, concat_embedding=False, seg_features=False, groups=1
        )
    )
    assert model.cls.in_features == x.shape[1]
    info = refit_classifier(model, x, y, patients)
    assert info["l2"] in L2_GRID and set(info["inner_cv_auc_by_l2"]) == {f"{v:g}" for v in L2_GRID}
    assert info["training_auc_after"] > 0.85 and info["training_auc_after"] > info["training_auc_before"] + 0.1
    with torch.no_grad():
        logits = model.cls(torch.from_numpy(x).float())[:, 0].double().numpy()
    assert roc_auc(y, logits) == pytest.approx(info["training_auc_after"], abs=1e-3)
    # The same as fitting the standardised inputs directly.
    mean, sd = x.mean(0), x.std(0)
    w, b = fit_logistic((x - mean) / sd, y, info["l2"])
    np.testing.assert_allclose(logits, (x - mean) / sd @ w + b, rtol=1e-3, atol=1e-3)


def test_refit_refuses_inputs_that_do_not_fit_the_classifier() -> None:
    model = CollaborativeNet(
        ModelConfig(widths=(8, 8, 8, 8), use_attributes=False, concat_embedding=False, seg_features=False, groups=1)
    )
    x, y, patients = _data(dim=5)
    with pytest.raises(ValueError, match="do not fit a classifier of 8 inputs"):
        refit_classifier(model, x, y, patients)
    x, _, patients = _data(dim=8)
    with pytest.raises(ValueError, match="both classes"):
        refit_classifier(model, x, np.zeros(len(x)), patients)


# --- The debugged refit of the attribute and malignancy heads -------------------------------------

SMALL = ModelConfig(widths=(8, 8, 8, 16), seg_widths=(8, 8), groups=4, embedding_dim=8)


def _head_inputs(model: CollaborativeNet, n: int = 24, seed: int = 0) -> tuple[HeadInputs, object]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 32, 32, 32, generator=gen)
    with torch.no_grad():
        out = model.eval()(x)
    width = model.feature_channels + model.n_seg_features
    rng = np.random.default_rng(seed)
    inputs = HeadInputs(
        head_in=out.classifier_input[:, :width].double().numpy(),
        features=out.features.flatten(2).numpy(),
        segmentation=out.segmentation_coarse.flatten(1).numpy(),
        labels=(np.arange(n) % 2).astype(np.int64),
        attributes=rng.random((n, model.config.num_attributes)),
        has_attributes=np.ones(n, bool),
    )
    return inputs, out


def _seeded_heads() -> tuple[Any, Any, Any]:
    """A seeded small model's heads on its own head inputs: (model output, heads, data)."""
    torch.manual_seed(0)
    model = CollaborativeNet(SMALL)
    inputs, out = _head_inputs(model)
    heads, data = _prepare(model, inputs, np.arange(len(inputs)))
    return out, heads, data


def test_head_replica_reproduces_the_models_logit_and_gradcam_region_means() -> None:
    out, heads, data = _seeded_heads()
    with torch.no_grad():
        logit, attributes, omega = heads.forward(heads.params, data.x)
        inside, outside = _cam_region_means(logit, omega, data.features, data.f_in, data.f_out)
    np.testing.assert_allclose(logit.numpy(), out.malignancy_logit.numpy(), atol=1e-4)
    np.testing.assert_allclose(attributes.numpy(), out.attributes.numpy(), atol=1e-5)
    # The min-max normalised CAM's region means, from two arg voxels and two precomputed means.
    np.testing.assert_allclose(inside.numpy(), out.nodule_attention.numpy(), atol=1e-4)
    np.testing.assert_allclose(outside.numpy(), out.background_attention.numpy(), atol=1e-4)


def test_the_debug_margin_is_the_maps_margin_and_its_smooth_class_passes_a_gradient() -> None:
    """sign_temperature 0: inside − outside of the predicted class's normalised map, no gradient to
    the class; τ > 0: tanh(z/τ) times the malignant map's margin, equal to it for |z| ≫ τ, with a
    gradient to z."""
    _, heads, data = _seeded_heads()
    with torch.no_grad():
        _, _, omega = heads.forward(heads.params, data.x)
    logit = torch.linspace(-3, 3, len(omega), dtype=torch.float64).requires_grad_(True)
    inside, outside = _cam_region_means(logit, omega, data.features, data.f_in, data.f_out)
    exact = _cam_margin(logit, omega, data)
    np.testing.assert_allclose(exact.detach().numpy(), (inside - outside).detach().numpy())
    # The class enters the normalised map only through its sign: no gradient reaches z.
    assert torch.autograd.grad(exact.sum(), logit)[0].abs().max() < 1e-9
    sharp = _cam_margin(logit, omega, data, temperature=1e-3)
    np.testing.assert_allclose(sharp.detach().numpy(), exact.detach().numpy(), atol=1e-9)
    smooth = _cam_margin(logit, omega, data, temperature=1.0)
    assert torch.autograd.grad(smooth.sum(), logit)[0].abs().min() > 0
    # The smooth margin is never larger in size and keeps the exact one's sign.
    assert (smooth.detach().abs() <= exact.detach().abs() + 1e-12).all()
    assert (torch.sign(smooth.detach()) == torch.sign(exact.detach())).all()


def test_debugged_refit_is_written_into_the_model_and_learns_the_labels() -> None:
    torch.manual_seed(0)
    model = CollaborativeNet(SMALL)
    inputs, _ = _head_inputs(model, n=40)
    # Labels that a head-input direction separates: the refit must find them.
    score = inputs.head_in[:, 3] - inputs.head_in[:, 3].mean()
    inputs.labels = (score > np.median(score)).astype(np.int64)
    patients = [f"p{i // 2}" for i in range(len(inputs))]
    info = refit_heads(model, inputs, patients, HeadObjective(steps=150), l2_grid=(0.01, 0.1), inner_folds=2)
    assert info["l2"] in (0.01, 0.1) and set(info["inner_cv_by_l2"]) == {"0.01", "0.1"}
    assert info["training_after"]["auc"] > max(0.9, info["training_before"]["auc"])
    # What the refit measured is what the model now computes.
    width = model.feature_channels + model.n_seg_features
    x = torch.from_numpy(inputs.head_in).float()
    with torch.no_grad():
        logit = model._heads(x[:, : model.feature_channels], x[:, model.feature_channels : width])[0]
    assert roc_auc(inputs.labels, logit.double().numpy()) == pytest.approx(info["training_after"]["auc"], abs=1e-6)


def test_debugged_refit_refuses_inputs_that_do_not_fit() -> None:
    model = CollaborativeNet(SMALL)
    inputs, _ = _head_inputs(model, n=8)
    with pytest.raises(ValueError, match="8 nodules"):
        refit_heads(model, inputs, ["p"] * 3)
    narrow = HeadInputs(
        inputs.head_in[:, :5],
        inputs.features,
        inputs.segmentation,
        inputs.labels,
        inputs.attributes,
        inputs.has_attributes,
    )
    with pytest.raises(ValueError, match="width 5"):
        refit_heads(model, narrow, ["p"] * 8)
    inputs.labels[:] = 1
    with pytest.raises(ValueError, match="both classes"):
        refit_heads(model, inputs, ["p"] * 8)


def test_the_attribute_weight_reaches_the_refit_and_fits_the_attributes_closer() -> None:
    shipped, weighted = TrainConfig(), TrainConfig(head=HeadSection(attribute_weight=16.0))
    assert head_objective(shipped).gamma == shipped.loss.gamma
    assert head_objective(weighted).gamma == 16.0 * shipped.loss.gamma
    torch.manual_seed(0)
    model = CollaborativeNet(SMALL)
    inputs, _ = _head_inputs(model, n=40)
    # Ratings that two head inputs predict: the heavier attribute term must fit them closer.
    lo, hi = inputs.head_in.min(0), inputs.head_in.max(0)
    scaled = (inputs.head_in - lo) / np.where(hi > lo, hi - lo, 1)
    inputs.attributes = np.repeat((0.2 + 0.6 * scaled[:, [1, 4]].mean(1))[:, None], inputs.attributes.shape[1], 1)
    heads, data = _prepare(model, inputs, np.arange(len(inputs)))
    maes = [
        _head_metrics(heads, _fit(heads, data, 0.01, head_objective(cfg), True), data)["attribute_mae"]
        for cfg in (shipped, weighted)
    ]
    assert maes[1] < 0.8 * maes[0]


def test_the_attribute_readout_lowers_the_attribute_error_and_leaves_the_malignancy_alone() -> None:
    assert head_objective(TrainConfig()).attribute_readout
    assert not head_objective(TrainConfig(head=HeadSection(attribute_readout=False))).attribute_readout
    models, infos = [], []
    for readout in (False, True):
        torch.manual_seed(0)
        model = CollaborativeNet(SMALL)
        inputs, _ = _head_inputs(model, n=40)
        score = inputs.head_in[:, 3] - inputs.head_in[:, 3].mean()
        inputs.labels = (score > np.median(score)).astype(np.int64)
        lo, hi = inputs.head_in.min(0), inputs.head_in.max(0)
        scaled = (inputs.head_in - lo) / np.where(hi > lo, hi - lo, 1)
        inputs.attributes = np.repeat(scaled[:, [1]] * 0.6 + 0.2, inputs.attributes.shape[1], 1)
        objective = HeadObjective(steps=100, attribute_readout=readout)
        patients = [f"p{i // 2}" for i in range(len(inputs))]
        infos.append(refit_heads(model, inputs, patients, objective, l2_grid=(0.03,), inner_folds=2))
        models.append(model)
    plain, readout_info = infos
    assert "attribute_readout" not in plain
    step = readout_info["attribute_readout"]
    assert (
        step["training_mae_after"]
        < step["training_mae_before"]
        == pytest.approx(plain["training_after"]["attribute_mae"])
    )
    assert readout_info["training_after"]["attribute_mae"] == pytest.approx(step["training_mae_after"])
    # Only the attribute output layer differs: the classifier (and so Grad-CAM) is the same.
    for name, a in models[0].state_dict().items():
        b = models[1].state_dict()[name]
        assert torch.equal(a, b) == (not name.startswith("attr_out")), name


def test_the_attribute_skip_lowers_the_error_further_and_survives_a_checkpoint(tmp_path: Path) -> None:
    assert head_objective(TrainConfig()).attribute_skip
    models, infos = [], []
    for skip in (False, True):
        torch.manual_seed(0)
        model = CollaborativeNet(SMALL)
        inputs, _ = _head_inputs(model, n=40)
        inputs.labels = (inputs.head_in[:, 3] > np.median(inputs.head_in[:, 3])).astype(np.int64)
        lo, hi = inputs.head_in.min(0), inputs.head_in.max(0)
        scaled = (inputs.head_in - lo) / np.where(hi > lo, hi - lo, 1)
        # Each rating follows another head input: more than the small embedding passes on.
        inputs.attributes = 0.2 + 0.6 * scaled[:, : inputs.attributes.shape[1]]
        objective = HeadObjective(steps=100, attribute_readout=True, attribute_skip=skip)
        patients = [f"p{i // 2}" for i in range(len(inputs))]
        infos.append(refit_heads(model, inputs, patients, objective, l2_grid=(0.03,), inner_folds=2))
        models.append(model)
    plain, skipped = infos
    assert plain["attribute_readout"]["skip_l2"] is None and skipped["attribute_readout"]["skip_l2"] > 0
    assert skipped["training_after"]["attribute_mae"] < 0.9 * plain["training_after"]["attribute_mae"]
    assert models[0].attr_skip is None and models[1].config.attribute_skip
    # Only the attribute output differs (and the skip is new): the classifier and Grad-CAM are the same.
    a, b = models[0].state_dict(), models[1].state_dict()
    assert set(b) - set(a) == {"attr_skip.weight"}
    for name, value in a.items():
        assert torch.equal(value, b[name]) == (not name.startswith("attr_out")), name
    # What the refit measured is what the model computes, also after a checkpoint round trip.
    save_checkpoint(tmp_path / "refit.safetensors", models[1], {})
    loaded, _ = load_checkpoint(tmp_path / "refit.safetensors")
    width = loaded.feature_channels + loaded.n_seg_features
    x = torch.from_numpy(inputs.head_in).float()
    with torch.no_grad():
        attributes = loaded._heads(x[:, : loaded.feature_channels], x[:, loaded.feature_channels : width])[1]
    mae = float(np.abs(attributes.double().numpy() - inputs.attributes).mean() * 4)
    assert mae == pytest.approx(skipped["training_after"]["attribute_mae"], abs=1e-4)


def test_the_parity_penalty_pulls_the_two_paths_together() -> None:
    assert head_objective(TrainConfig(head=HeadSection(parity_weight=2.0))).parity_weight == 2.0
    infos = []
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        model = CollaborativeNet(SMALL)
        inputs, _ = _head_inputs(model, n=40)
        inputs.labels = (inputs.head_in[:, 3] > np.median(inputs.head_in[:, 3])).astype(np.int64)
        # The training path sees the same nodules with other statistics (another box).
        rng = np.random.default_rng(1)
        inputs.reference_head_in = inputs.head_in.copy()
        stats = slice(model.feature_channels, None)
        inputs.reference_head_in[:, stats] += rng.normal(size=inputs.head_in[:, stats].shape) * inputs.head_in[
            :, stats
        ].std(0)
        objective = HeadObjective(steps=150, parity_weight=weight)
        patients = [f"p{i // 2}" for i in range(len(inputs))]
        infos.append(refit_heads(model, inputs, patients, objective, l2_grid=(0.01,), inner_folds=2))
    plain, penalised = (info["training_after"] for info in infos)
    assert penalised["path_parity"] < 0.7 * plain["path_parity"]
    assert penalised["auc"] > 0.8


def test_rating_targets_fit_every_rated_nodule_to_its_mean_rating() -> None:
    assert not head_objective(TrainConfig()).rating_targets
    assert head_objective(TrainConfig(head=HeadSection(classifier_target="ratings"))).rating_targets
    torch.manual_seed(0)
    model = CollaborativeNet(SMALL)
    inputs, _ = _head_inputs(model, n=40)
    malignancy = ATTRIBUTE_NAMES.index("malignancy")
    # Mean ratings that a head-input direction predicts; the proxy label is the rating's side of 3.
    direction = inputs.head_in[:, 3]
    unit = 0.1 + 0.8 * (direction - direction.min()) / (direction.max() - direction.min())
    inputs.attributes[:, malignancy] = unit
    inputs.labels = np.where(unit > 0.5, 1, 0).astype(np.int64)
    inputs.labels[::5] = -1  # rated 3 on average: no label, a rating all the same
    inputs.has_attributes[1] = False  # a labelled nodule without ratings keeps its label
    heads, data = _prepare(model, inputs, np.arange(len(inputs)))
    _, plain_rows = _classifier_targets(data, False)
    rated_target, rated_rows = _classifier_targets(data, True)
    assert plain_rows.sum() == (inputs.labels >= 0).sum()
    assert rated_rows.sum() == len(inputs) and float(rated_target[1]) == inputs.labels[1]
    np.testing.assert_allclose(rated_target[inputs.has_attributes].numpy(), unit[inputs.has_attributes])
    errors = []
    for rating_targets in (False, True):
        params = _fit(heads, data, 0.01, HeadObjective(steps=300, rating_targets=rating_targets), True)
        with torch.no_grad():
            p = torch.sigmoid(heads.forward(params, data.x)[0]).numpy()
        errors.append(float(np.abs(p - unit)[inputs.has_attributes].mean()))
    # Fitted to the ratings, p follows the mean rating; fitted to the labels, it is pushed to 0 or 1.
    assert errors[1] < 0.5 * errors[0]


# --- Platt scaling after the debugged refit -------------------------------------------------------


def test_platt_scaling_undoes_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(scale=2.0, size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(np.int64)
    # A model three times too confident and shifted by one: Platt scaling recovers 1/3 and -1/3.
    info = platt_calibration(3.0 * true_logit + 1.0, y)
    assert info["applied"]
    assert info["scale"] == pytest.approx(1 / 3, rel=0.1) and info["shift"] == pytest.approx(-1 / 3, abs=0.15)
    assert info["out_of_fold_nll_after"] < info["out_of_fold_nll_before"]


def test_platt_scaling_is_not_applied_to_logits_that_rank_backwards() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.5).astype(np.int64)
    info = platt_calibration(-(2.0 * y - 1.0) + rng.normal(scale=0.5, size=200), y)
    assert not info["applied"] and info["scale"] < 0
    assert info["out_of_fold_nll_after"] == info["out_of_fold_nll_before"]
    with pytest.raises(ValueError, match="both classes"):
        platt_calibration(np.zeros(5), np.zeros(5))


def test_the_calibrated_refit_rescales_only_the_classifier_and_keeps_its_ranking() -> None:
    models, infos, logits = [], [], []
    for calibrate in (False, True):
        torch.manual_seed(0)
        model = CollaborativeNet(SMALL)
        inputs, _ = _head_inputs(model, n=40)
        score = inputs.head_in[:, 3] - inputs.head_in[:, 3].mean()
        inputs.labels = (score + np.random.default_rng(0).normal(scale=score.std(), size=40) > 0).astype(np.int64)
        patients = [f"p{i // 2}" for i in range(len(inputs))]
        objective = HeadObjective(steps=100, attribute_readout=False)
        infos.append(
            refit_heads(model, inputs, patients, objective, l2_grid=(0.03,), inner_folds=2, calibrate=calibrate)
        )
        x = torch.from_numpy(inputs.head_in).float()
        with torch.no_grad():
            logits.append(
                model._heads(x[:, : model.feature_channels], x[:, model.feature_channels :])[0].double().numpy()
            )
        models.append(model)
    plain, calibrated = infos
    assert "calibration" not in plain
    cal = calibrated["calibration"]
    assert cal["applied"] and cal["scale"] > 0
    # The calibrated logit is the plain one rescaled, so the ranking (AUC, Grad-CAM's sign) is the same.
    np.testing.assert_allclose(logits[1], cal["scale"] * logits[0] + cal["shift"], rtol=1e-4, atol=1e-4)
    for name, a in models[0].state_dict().items():
        b = models[1].state_dict()[name]
        assert torch.equal(a, b) == (not name.startswith("cls")), name


def _outline_labelled(
    n: int, seed: int, loc: float, scale: float, column: int
) -> tuple[CollaborativeNet, HeadInputs, list[str]]:
    """A seeded small network and head inputs whose outline statistics alone carry the labels (the
    ``column``-th statistic above its median is malignant), two nodules per patient."""
    from nodule_edge.outline import OUTLINE_FEATURE_NAMES

    torch.manual_seed(0)
    model = CollaborativeNet(SMALL)
    inputs, _ = _head_inputs(model, n=n)
    rng = np.random.default_rng(seed)
    inputs.outline = rng.normal(loc=loc, scale=scale, size=(len(inputs), len(OUTLINE_FEATURE_NAMES)))
    inputs.labels = (inputs.outline[:, column] > np.median(inputs.outline[:, column])).astype(np.int64)
    return model, inputs, [f"p{i // 2}" for i in range(len(inputs))]


def _network_logit(model: CollaborativeNet, inputs: HeadInputs) -> np.ndarray:
    """The network's own malignancy logit on the head inputs (its classifier as it stands now)."""
    x = torch.from_numpy(inputs.head_in).float()
    width = model.feature_channels + model.n_seg_features
    with torch.no_grad():
        return model._heads(x[:, : model.feature_channels], x[:, model.feature_channels : width])[0].double().numpy()


def test_the_outline_term_learns_what_the_network_does_not_see_and_is_returned_in_raw_units() -> None:
    """Labels carried by the outline statistics alone: the refit gives the term the weight, and the
    returned OutlineHead plus the rewritten network reproduce the refit's logits."""
    from nodule_edge.outline import OutlineHead
    from nodule_edge.train.head import OUTLINE_L2

    model, inputs, patients = _outline_labelled(n=60, seed=3, loc=5.0, scale=2.0, column=1)
    info = refit_heads(model, inputs, patients, HeadObjective(steps=200), l2_grid=(0.01,), inner_folds=2)
    head = OutlineHead.from_dict(info["outline_head"])
    assert info["outline_l2"] == OUTLINE_L2  # the model card reads it from the final model's record
    assert abs(head.weights[1]) == max(abs(w) for w in head.weights) and head.weights[1] > 0
    assert info["training_after"]["auc"] > 0.95
    logit = _network_logit(model, inputs) + head.logit(inputs.outline)
    assert roc_auc(inputs.labels, logit) == pytest.approx(info["training_after"]["auc"], abs=1e-6)
    # Without the statistics the same refit cannot find these labels on held-out nodules.
    torch.manual_seed(0)
    plain = refit_heads(
        CollaborativeNet(SMALL),
        HeadInputs(**{**inputs.__dict__, "outline": None}),
        patients,
        HeadObjective(steps=200),
        l2_grid=(0.01,),
        inner_folds=2,
    )
    held_out = {name: run["inner_cv_by_l2"]["0.01"]["auc"] for name, run in (("plain", plain), ("outline", info))}
    assert "outline_head" not in plain and held_out["plain"] < held_out["outline"] - 0.1


def test_the_outline_term_starts_from_the_term_the_network_was_trained_beside() -> None:
    """[train] outline_offset: the head step's term starts at the trained one (raw units), so with no
    step taken it returns that term, and the starting logit is the network's plus it."""
    from nodule_edge.outline import OutlineHead

    model, inputs, patients = _outline_labelled(n=40, seed=5, loc=3.0, scale=1.5, column=0)
    trained = OutlineHead((2.0, -0.5, 0.25, 0.0, 0.0, 1.0, -1.0), -4.0)
    before = _network_logit(model, inputs) + trained.logit(inputs.outline)
    info = refit_heads(
        model, inputs, patients, HeadObjective(steps=0), l2_grid=(0.01,), inner_folds=2, outline_init=trained
    )
    assert info["outline_init"] == trained.to_dict()
    assert info["training_before"]["auc"] == pytest.approx(roc_auc(inputs.labels, before), abs=1e-6)
    # No step taken: the same weights, and network plus term the same function (the constant may
    # move between the classifier's bias and the term's).
    head = OutlineHead.from_dict(info["outline_head"])
    np.testing.assert_allclose(head.weights, trained.weights, atol=1e-9)
    np.testing.assert_allclose(_network_logit(model, inputs) + head.logit(inputs.outline), before, atol=1e-4)


def test_outline_statistics_of_the_wrong_shape_are_refused() -> None:
    model = CollaborativeNet(SMALL)
    inputs, _ = _head_inputs(model)
    inputs.outline = np.zeros((len(inputs), 3))
    with pytest.raises(ValueError, match="outline statistics"):
        refit_heads(model, inputs, [f"p{i}" for i in range(len(inputs))])

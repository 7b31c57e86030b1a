"""The classifier refit: a logistic regression on the classifier inputs, written back into cls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodule_edge.metrics import roc_auc
from nodule_edge.train.head import L2_GRID, fit_logistic, refit_classifier
from nodule_edge.train.model import CollaborativeNet, ModelConfig


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
    model = CollaborativeNet(ModelConfig(widths=(8, 8, 8, 9 - 1 + 1), use_attributes=False, concat_embedding=False, seg_features=False, groups=1))
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
    model = CollaborativeNet(ModelConfig(widths=(8, 8, 8, 8), use_attributes=False, concat_embedding=False, seg_features=False, groups=1))
    x, y, patients = _data(dim=5)
    with pytest.raises(ValueError, match="do not fit a classifier of 8 inputs"):
        refit_classifier(model, x, y, patients)
    x, _, patients = _data(dim=8)
    with pytest.raises(ValueError, match="both classes"):
        refit_classifier(model, x, np.zeros(len(x)), patients)

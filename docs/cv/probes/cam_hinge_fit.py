"""A linear classifier on the head inputs fitted with a hinge on the evaluation's Grad-CAM check
and a logit-parity penalty instead of the debug loss (docs/cv/README.md, items 12-13). Probe code,
not the package's: the head-step lead it came from did not hold up (probe_cam_hinge_inner.py).
Imported by probe_cam_hinge.py and probe_cam_hinge_inner.py (probe_cam_hinge.py's recorded output,
cam_hinge.txt, was written by an inline copy of the same loop; rerun through this module from its
cached inputs it prints the same lines)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nodule_edge.metrics import roc_auc


@dataclass(frozen=True)
class CamHingeSettings:
    """The ``cam_hinge`` classifier fit (:func:`fit_cam_hinge_classifier`).

    The defaults are the setting probe_cam_hinge.py liked on one run's networks with its test
    folds in view (docs/cv/README.md, item 12); probe_cam_hinge_inner.py tests it (item 13).

    Attributes:
        l2: L2 on the weights (standardised inputs, mean loss).
        cam_weight: Weight of the Grad-CAM hinge.
        cam_margin: Margin of the hinge, in units of the feature weights' norm.
        parity_weight: Weight of the mean |logit(runtime path) − logit(readers' box)|.
        steps: Full-batch Adam steps from zero weights.
        plain_steps: The first steps fit cross-entropy and L2 alone (the plain logistic), the
            hinge and the parity penalty join after them.
        lr: Adam learning rate.
    """

    l2: float = 1e-3
    cam_weight: float = 1.0
    cam_margin: float = 0.02
    parity_weight: float = 1.0
    steps: int = 800
    plain_steps: int = 300
    lr: float = 0.02


#: The setting item 12 liked (probe_cam_hinge_inner.py fits it as "fixed").
CAM_HINGE = CamHingeSettings()


def cam_difference(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean fusion features inside minus outside a soft mask, per nodule: ``[N, C]``.

    The Grad-CAM map is (p − 0.5)·Σ_k ω_k F_k, so its mean inside the mask exceeds its mean
    outside exactly when (p − 0.5)·ω·(F̄_in − F̄_out) > 0 — the evaluation's check
    (``cam_on_nodule_fraction_gt_mask``), which the min-max normalisation does not change.

    Args:
        features: ``[N, C, V]`` fusion features on the 16³ grid, flattened.
        mask: ``[N, V]`` the mask on the same grid, in [0, 1].
    """
    f = np.asarray(features, np.float32)
    m = np.asarray(mask, np.float32)
    if f.ndim != 3 or m.shape != (f.shape[0], f.shape[2]):
        raise ValueError(f"features of shape {f.shape} and a mask of shape {m.shape} do not match")
    inside = np.einsum("ncv,nv->nc", f, m) / np.maximum(m.sum(1), 1e-8)[:, None]
    outside = np.einsum("ncv,nv->nc", f, 1 - m) / np.maximum((1 - m).sum(1), 1e-8)[:, None]
    return (inside - outside).astype(np.float64)


def fit_cam_hinge_classifier(
    head_in: np.ndarray,
    reference_head_in: np.ndarray,
    difference: np.ndarray,
    labels: np.ndarray,
    fit_rows: np.ndarray,
    settings: CamHingeSettings = CAM_HINGE,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """A linear classifier on the head input that keeps Grad-CAM on the nodule and the paths together.

    On inputs standardised over every row, minimises over the rows ``fit_rows`` (labelled, with
    a readers' mask) by full-batch Adam from zero::

        mean BCE + l2·|w|²
        + cam_weight · mean relu(margin − sign(z)·(w_f · d) / |w_f|)
        + parity_weight · mean |z(runtime path) − z(readers' box)|

    where ``w_f`` are the weights of the ``C`` pooled fusion features (the ones Grad-CAM reads)
    and ``d`` is :func:`cam_difference` against the readers' mask; the last two terms join after
    ``plain_steps``. sign(z) is the predicted class, whose map the runtime shows.

    Args:
        head_in: ``[N, C + S]`` runtime-path head inputs (pooled features, then statistics).
        reference_head_in: ``[N, C + S]`` the same on the readers' box.
        difference: ``[N, C]`` fusion features inside minus outside the readers' mask.
        labels: ``[N]`` 0/1 for the rows fitted.
        fit_rows: the rows to fit.
        settings: The objective's weights and the optimiser's budget.

    Returns:
        Weights ``[C + S]`` and bias for the raw head input, and what the fit reached on its rows.
    """
    x_all = np.asarray(head_in, np.float64)
    r_all = np.asarray(reference_head_in, np.float64)
    d_all = np.asarray(difference, np.float64)
    rows = np.asarray(fit_rows)
    c = d_all.shape[1]
    if r_all.shape != x_all.shape or len(d_all) != len(x_all) or c >= x_all.shape[1]:
        raise ValueError(
            f"head inputs {x_all.shape}, readers'-box inputs {r_all.shape} and CAM differences {d_all.shape} do not match"
        )
    y_rows = np.asarray(labels, np.float64)[rows]
    if len(np.unique(y_rows)) < 2 or not np.isin(y_rows, (0.0, 1.0)).all():
        raise ValueError("the cam_hinge classifier fit needs 0/1 labels of both classes on its rows")
    mean = x_all.mean(0)
    sd = x_all.std(0) + 1e-6
    x = torch.from_numpy((x_all[rows] - mean) / sd)
    r = torch.from_numpy((r_all[rows] - mean) / sd)
    d = torch.from_numpy(d_all[rows] / sd[:c])
    y = torch.from_numpy(y_rows)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=settings.lr)
    for step in range(settings.steps):
        z = x @ w + b
        loss = F.binary_cross_entropy_with_logits(z, y) + settings.l2 * (w**2).sum()
        if step >= settings.plain_steps:
            if settings.cam_weight:
                margin = torch.sign(z.detach()) * (d @ w[:c]) / w[:c].norm().clamp_min(1e-8)
                loss = loss + settings.cam_weight * F.relu(settings.cam_margin - margin).mean()
            if settings.parity_weight:
                loss = loss + settings.parity_weight * ((x - r) @ w).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w_std = w.detach().numpy()
    weight = w_std / sd
    bias = float(b.item() - (w_std * mean / sd).sum())
    z_fit = x_all[rows] @ weight + bias
    z_ref = r_all[rows] @ weight + bias
    info = {
        "method": "cam_hinge",
        "settings": dict(settings.__dict__),
        "n_fitted": int(len(rows)),
        "training_auc": roc_auc(y_rows, z_fit),
        "training_cam_on_nodule_fraction": float((np.sign(z_fit) * (d_all[rows] @ weight[:c]) > 0).mean()),
        "training_path_parity": float(np.abs(_sigmoid(z_fit) - _sigmoid(z_ref)).mean()),
    }
    return weight, bias, info


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))

"""Refit the heads on the trained network's features: a last step after training.

Probing the first nodule-bounded model (fold 0, docs/cv/README.md "What capped the model") showed the
jointly trained classifier using its features poorly: its logit reached AUC 0.853 on its *own*
training nodules and 0.857 on the test fold, while an L2-regularised logistic regression on the
same classifier inputs (pooled features + segmentation statistics) reached 0.915 on that test
fold. The network learns good features under five losses; its last linear layer does not converge
to a good classifier within the budget. So after training, the classifier is refitted as a
logistic regression on the runtime path's classifier inputs of the training nodules, with the L2
strength chosen by patient-grouped inner cross-validation, and written back into ``model.cls``
(standardisation folded into the weights). The graph and the runtime are unchanged, the attribute
and segmentation heads untouched; Grad-CAM reads ``cls.weight`` and so changes with the refit
(it moved off the nodule in the CV: ``refit = "full"``, an ablation).

``refit = "debugged"`` (:func:`refit_heads`, the shipped setting) keeps the papers' debug loss in
the refit: the attribute embedding, the attribute output and the classifier are refitted together
on the runtime path's fusion features of the training nodules, under the training objective
itself (BCE + adaptive contrastive saliency loss + attribute MSE) with an L2 penalty on
standardised inputs, warm-started from the trained heads and run to convergence (full batch).
The backbone and the segmentation are untouched, so the features, the statistics and the
segmentation are fixed and the exact min-max normalised Grad-CAM of every training nodule is cheap
to recompute at each step. The L2 strength of the classifier is chosen by inner patient-grouped CV
over the training fold, among the strengths that keep Grad-CAM on the nodule (docs/cv/README.md).

In that objective the attribute term is small (the ratings are scaled to [0, 1], so its MSE is
1/16 of the MSE in rating points), and the refitted attribute head underfits: its MAE on the
training fold equals the test fold's. Weighting the term up in the joint refit lowers the MAE but
also the malignancy AUC (the classifier reads the shared embedding; docs/ablations/README.md,
``attribute_weight16``). So with ``attribute_readout`` a last step refits the attribute output
layer alone, embedding and classifier fixed, to the L1 error in rating points — the MAE the
model card reports. Nothing else reads that layer: probability, logit and Grad-CAM are unchanged.
With ``attribute_skip`` the readout also fits a linear path from the head input straight to the
attribute logits (:meth:`CollaborativeNet.add_attribute_skip`): the embedding serves the
classifier too, and the ratings read the pooled features and statistics better directly
(docs/cv/probes/probe_attribute_direct.py). The classifier does not read the skip either.

With ``parity_weight`` > 0 the refit's objective also carries the mean |p(runtime path) −
p(readers' box)| over the training nodules (``HeadInputs.reference_head_in``): the refitted
classifier leaned on segmentation statistics that the first pass's box and the readers' box
measure differently, and path parity (docs/cv/README.md, item 8) is what the runtime's user pays.

With ``HeadInputs.outline`` (``[head] outline_statistics``) the refit also fits a linear term on
the first pass's outline statistics beside the classifier (:mod:`nodule_edge.outline`; L2
``OUTLINE_L2``): the logit the objective, the debug loss and the parity penalty see is the
network's plus the term, which the network does not hold: :func:`refit_heads` returns it as
``outline_head`` (raw units), and the runtime adds it after the second pass (docs/cv/README.md,
item 15).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.metrics import roc_auc
from nodule_edge.outline import OUTLINE_FEATURE_NAMES, OutlineHead
from nodule_edge.train.config import SHIPPED_L2_GRID
from nodule_edge.train.data import patient_folds
from nodule_edge.train.model import CollaborativeNet

__all__ = [
    "L2_GRID",
    "platt_calibration",
    "HeadInputs",
    "HeadObjective",
    "ATTRIBUTE_READOUT_STEPS",
    "ATTRIBUTE_SKIP_L2",
    "OUTLINE_L2",
    "fit_logistic",
    "refit_classifier",
    "refit_heads",
]

log = logging.getLogger(__name__)

#: Full-batch Adam steps of the attribute readout refit (a 64 → 6 layer: converged well before;
#: docs/cv/probes/probe_attribute_output.py).
ATTRIBUTE_READOUT_STEPS = 1000

#: L2 of the attribute skip (standardised inputs, summed loss): the middle of the plateau of fold
#: 0's test MAE over 0-0.003 (docs/cv/probes/attribute_direct_fold0.txt); folds 1-4 are clean of it.
ATTRIBUTE_SKIP_L2 = 0.003

#: L2 of the outline term (7 weights on standardised statistics, mean loss), fixed rather than
#: taken from the classifier's grid: seven weights on about 460 labelled nodules hardly overfit,
#: and the probes' inner-CV choices for them (summed loss 0.01-1 over ~460 nodules, i.e. about
#: 2e-5 to 2e-3 on the mean; docs/cv/probes/probe_box_outline_head.py) sit far below that grid.
OUTLINE_L2 = 1e-3

#: Ratings r in 1..5 are scaled to [0, 1] as (r − 1) / 4: errors in rating points are 4× larger.
RATING_SPAN = 4.0

#: L2 strengths tried (on standardised inputs, summed loss), smallest to largest.
L2_GRID: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 30) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (the intercept is not penalised).

    Returns:
        Weights and intercept for the inputs as given.
    """
    design = np.c_[np.ones(len(x)), x]
    w = np.zeros(design.shape[1])
    penalty = np.full(len(w), l2)
    penalty[0] = 1e-8
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ w, -30, 30)))
        grad = design.T @ (p - y) + penalty * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[1:], float(w[0])


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    return mean, np.where(sd > 1e-8, sd, 1.0)


def refit_classifier(
    model: CollaborativeNet,
    features: np.ndarray,
    labels: np.ndarray,
    patients: list[str],
    seed: int = 0,
    inner_folds: int = 5,
) -> dict[str, Any]:
    """Refit ``model.cls`` on classifier inputs ``features`` ``[N, D]`` of labelled nodules.

    The L2 strength is the one with the best pooled out-of-fold AUC over ``inner_folds``
    patient-grouped folds of these nodules; the final fit uses all of them. Every weight changes,
    so Grad-CAM (whose channel weights are the classifier's) changes with them: evaluate the CAM
    after a refit.

    Returns:
        What was chosen and measured (JSON-serialisable), for the fold summary.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    if x.ndim != 2 or len(x) != len(y) or x.shape[1] != model.cls.in_features:
        raise ValueError(
            f"classifier inputs of shape {x.shape} do not fit a classifier of {model.cls.in_features} inputs and {len(y)} labels"
        )
    if len(np.unique(y)) < 2:
        raise ValueError("refitting the classifier needs both classes among the labelled nodules")
    folds = np.asarray(patient_folds(patients, inner_folds, seed))
    scores: dict[str, float] = {}
    for l2 in L2_GRID:
        oof = np.zeros(len(y))
        for k in range(inner_folds):
            test = folds == k
            if test.all() or not test.any():
                continue
            mean, sd = _standardise(x[~test])
            w, b = fit_logistic((x[~test] - mean) / sd, y[~test], l2)
            oof[test] = ((x[test] - mean) / sd) @ w + b
        scores[f"{l2:g}"] = roc_auc(y, oof)
    best = max(L2_GRID, key=lambda v: (scores[f"{v:g}"], v))
    mean, sd = _standardise(x)
    w, b = fit_logistic((x - mean) / sd, y, best)
    before_auc = roc_auc(y, x @ model.cls.weight.detach().double().numpy()[0])
    weight = w / sd
    bias = float(b - (w * mean / sd).sum())
    with torch.no_grad():
        model.cls.weight.copy_(torch.from_numpy(weight).to(model.cls.weight.dtype).unsqueeze(0))
        model.cls.bias.fill_(bias)
    info: dict[str, Any] = {
        "n_labelled": int(len(y)),
        "l2": best,
        "inner_cv_auc_by_l2": scores,
        "training_auc_before": before_auc,
        "training_auc_after": roc_auc(y, x @ weight + bias),
    }
    log.info(
        "classifier refitted: L2 %g (inner-CV AUC %.3f), training AUC %.3f -> %.3f",
        best,
        scores[f"{best:g}"],
        before_auc,
        info["training_auc_after"],
    )
    return info


@dataclass
class HeadInputs:
    """What the heads read, per nodule, on the runtime path (its second pass).

    Attributes:
        head_in: ``[N, C + S]`` pooled fusion features and segmentation statistics.
        features: ``[N, C, V]`` fusion features on the 16³ grid, flattened (float32).
        segmentation: ``[N, V]`` the soft segmentation on the same grid.
        labels: ``[N]`` 1 malignant, 0 benign, -1 unlabelled.
        attributes: ``[N, A]`` reader attributes scaled to [0, 1].
        has_attributes: ``[N]`` which nodules have attribute ratings.
        reference_head_in: ``[N, C + S]`` the same on the training path (box of the readers'
            mask), for the path-parity penalty; None without it.
        outline: ``[N, 7]`` the first pass's outline statistics (:mod:`nodule_edge.outline`),
            for an outline term beside the classifier; None without it. They come from the
            first pass on the whole cube, so both paths share them.
    """

    head_in: np.ndarray
    features: np.ndarray
    segmentation: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    has_attributes: np.ndarray
    reference_head_in: np.ndarray | None = None
    outline: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class HeadObjective:
    """The training objective restricted to the heads (weights as in ``LossWeights``).

    Attributes:
        alpha: Weight of the (adaptive) contrastive saliency loss.
        gamma: Weight of the attribute MSE.
        delta: Margin of the saliency loss.
        adaptive: Scale each nodule's saliency loss by 2|p − 0.5| (detached).
        attribute_l2: L2 penalty of the attribute embedding and output (standardised inputs).
        steps: Full-batch Adam steps.
        lr: Adam learning rate.
        attribute_readout: After the joint refit, refit the attribute output layer alone to the
            L1 error in rating points (``ATTRIBUTE_READOUT_STEPS`` steps, ``attribute_l2``).
        attribute_skip: With the readout, add and fit the attribute skip path too (L2
            ``ATTRIBUTE_SKIP_L2``).
        parity_weight: Weight of the path-parity penalty, the mean |p(runtime path) − p(training
            path)| over the nodules (needs ``HeadInputs.reference_head_in``); 0 = off.
        sign_temperature: 0: the debug loss reads the class as the map has it, sign(p − 0.5), and
            so passes no gradient to which class the logit takes; τ > 0: ``tanh(z / τ)`` in its
            place (equal to the sign for |z| ≫ τ), so the debug loss also steers the logit's
            class, and with it an outline term, towards the side whose map lies on the nodule
            (:func:`_cam_margin`).
        rating_targets: Fit the classifier's cross-entropy (and the debug loss) to the readers'
            mean malignancy rating on the unit scale, (r − 1) / 4, of every rated nodule, those
            rated 3 on average included, instead of the 0/1 labels of the labelled ones (a
            labelled nodule without ratings keeps its label). p > 0.5 still means a mean rating
            above 3, the proxy label's threshold.
    """

    alpha: float = 1.0
    gamma: float = 1.0
    delta: float = 0.5
    adaptive: bool = True
    attribute_l2: float = 0.01
    steps: int = 300
    lr: float = 0.01
    attribute_readout: bool = False
    attribute_skip: bool = False
    parity_weight: float = 0.0
    rating_targets: bool = False
    sign_temperature: float = 0.0


class _Heads:
    """The heads of a :class:`CollaborativeNet` in float64 on standardised inputs."""

    def __init__(
        self,
        model: CollaborativeNet,
        mean: torch.Tensor,
        sd: torch.Tensor,
        outline: tuple[torch.Tensor, torch.Tensor] | None = None,
        outline_init: OutlineHead | None = None,
    ) -> None:
        self.c = model.feature_channels
        self.h = self.c + model.n_seg_features
        self.concat = model.config.use_attributes and model.config.concat_embedding
        self.mean, self.sd = mean, sd
        we = model.attr_embed.weight.detach().double()
        wc = model.cls.weight.detach().double()[0].clone()
        bc = model.cls.bias.detach().double()[0] + wc[: self.h] @ mean
        wc[: self.h] = wc[: self.h] * sd
        # W·x = (W·sd)·((x − mean)/sd) + W·mean: the same function on standardised inputs.
        self.params = {
            "We": we * sd,
            "be": model.attr_embed.bias.detach().double() + we @ mean,
            "Wo": model.attr_out.weight.detach().double().clone(),
            "bo": model.attr_out.bias.detach().double().clone(),
            "wc": wc,
            "bc": bc.reshape(1),
        }
        if model.attr_skip is not None:
            ws = model.attr_skip.weight.detach().double()
            self.params["Ws"] = ws * sd
            self.params["bo"] = self.params["bo"] + ws @ mean
        # The outline term starts at zero (the network's function unchanged) on standardised
        # statistics, or at ``outline_init`` (the term the network was trained beside,
        # [train] outline_offset); write_back returns it as an OutlineHead in raw units.
        self.outline = outline
        if outline is not None:
            self.params["wo"] = torch.zeros(len(outline[0]), dtype=torch.float64)
            if outline_init is not None:
                # w · s + b = (w · sd) · (s − mean) / sd + (w · mean + b), on this fit's standardisation.
                w = torch.tensor(outline_init.weights, dtype=torch.float64)
                self.params["wo"] = w * outline[1]
                self.params["bc"] = self.params["bc"] + float(w @ outline[0]) + outline_init.bias

    def forward(
        self, p: dict[str, torch.Tensor], x: torch.Tensor, outline: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logit ``[N]``, attributes ``[N, A]`` and Grad-CAM channel weights ``[N, C]`` (raw units).

        ``outline``: the standardised outline statistics, when the heads have an outline term."""
        pre = x @ p["We"].T + p["be"]
        emb = F.relu(pre)
        attributes = torch.sigmoid(_attribute_logits(p, x, emb))
        cls_in = torch.cat([x, emb], 1) if self.concat else x
        logit = cls_in @ p["wc"] + p["bc"]
        if "wo" in p and outline is not None:
            logit = logit + outline @ p["wo"]
        omega = p["wc"][: self.c].expand(len(x), -1)
        if self.concat:
            omega = omega + ((pre > 0).double() * p["wc"][self.h :]) @ p["We"][:, : self.c]
        # ∂z/∂g for the raw pooled features g (x = (g − mean)/sd), as CollaborativeNet.logit_gradient.
        return logit, attributes, omega / self.sd[: self.c]

    def write_back(self, model: CollaborativeNet, p: dict[str, torch.Tensor]) -> OutlineHead | None:
        """Write the heads into ``model``; the outline term, which the network does not hold, is returned."""
        mean, sd = self.mean, self.sd
        wc = p["wc"].clone()
        bc = p["bc"][0] - (wc[: self.h] / sd) @ mean
        wc[: self.h] = wc[: self.h] / sd
        bo = p["bo"]
        if "Ws" in p:
            skip = model.add_attribute_skip()
            bo = bo - (p["Ws"] / sd) @ mean
            with torch.no_grad():
                skip.weight.copy_((p["Ws"] / sd).to(skip.weight.dtype))
        with torch.no_grad():
            model.attr_embed.weight.copy_((p["We"] / sd).to(model.attr_embed.weight.dtype))
            model.attr_embed.bias.copy_((p["be"] - (p["We"] / sd) @ mean).to(model.attr_embed.bias.dtype))
            model.attr_out.weight.copy_(p["Wo"].to(model.attr_out.weight.dtype))
            model.attr_out.bias.copy_(bo.to(model.attr_out.bias.dtype))
            model.cls.weight.copy_(wc.unsqueeze(0).to(model.cls.weight.dtype))
            model.cls.bias.fill_(float(bc))
        if self.outline is None or "wo" not in p:
            return None
        outline_mean, outline_sd = self.outline
        weights = p["wo"] / outline_sd
        return OutlineHead(tuple(float(w) for w in weights), float(-(weights @ outline_mean)))


def _attribute_logits(p: dict[str, torch.Tensor], x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Attribute logits from the embedding and, when fitted, the skip from the head input ``x``."""
    logits = embedding @ p["Wo"].T + p["bo"]
    return logits + x @ p["Ws"].T if "Ws" in p else logits


def _cam_region_means(
    logit: torch.Tensor, omega: torch.Tensor, features: torch.Tensor, f_in: torch.Tensor, f_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean min-max normalised Grad-CAM inside and outside the nodule, exactly as the model has it.

    The raw CAM (p − 0.5)·Σ_k ω_k F_k is linear in ω, so its region means are ω·F̄_in and
    ω·F̄_out (precomputed); only the min and max voxels need the full maps, and they are found
    without gradient (the gradient of a min or max flows through its arg voxel alone).
    """
    s = torch.sigmoid(logit) - 0.5
    with torch.no_grad():
        raw = torch.bmm(omega.float().unsqueeze(1), features).squeeze(1) * s.float().unsqueeze(1)
        lo_i, hi_i = raw.argmin(1), raw.argmax(1)
    n = torch.arange(len(logit))
    lo = s * (omega * features[n, :, lo_i].double()).sum(1)
    hi = s * (omega * features[n, :, hi_i].double()).sum(1)
    span = (hi - lo).clamp_min(1e-8)
    inside = (s * (omega * f_in).sum(1) - lo) / span
    outside = (s * (omega * f_out).sum(1) - lo) / span
    return inside, outside


def _cam_margin(logit: torch.Tensor, omega: torch.Tensor, data: _Data, temperature: float = 0.0) -> torch.Tensor:
    """Mean normalised Grad-CAM inside minus outside the nodule, the debug loss's margin.

    The normalised map of the predicted class is the malignant class's map (``p > 0.5``) or its
    complement, so the margin is exactly ``sign(z)·D`` with ``D`` the malignant map's margin; with
    ``temperature`` τ > 0 it is ``tanh(z / τ)·D``, which passes a gradient to the class (to ``z``)
    as well as to the map (``HeadObjective.sign_temperature``).
    """
    if temperature <= 0:
        inside, outside = _cam_region_means(logit, omega, data.features, data.f_in, data.f_out)
        return inside - outside
    inside, outside = _cam_region_means(torch.ones_like(logit), omega, data.features, data.f_in, data.f_out)
    return torch.tanh(logit / temperature) * (inside - outside)


class _Data:
    def __init__(
        self,
        inputs: HeadInputs,
        rows: np.ndarray,
        mean: torch.Tensor,
        sd: torch.Tensor,
        outline: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.x = (torch.from_numpy(np.asarray(inputs.head_in[rows], np.float64)) - mean) / sd
        self.features = torch.from_numpy(np.ascontiguousarray(inputs.features[rows], np.float32))
        seg = torch.from_numpy(np.asarray(inputs.segmentation[rows], np.float32))
        self.f_in = (
            torch.bmm(self.features, seg.unsqueeze(2)).squeeze(2) / seg.sum(1, keepdim=True).clamp_min(1e-6)
        ).double()
        self.f_out = (
            torch.bmm(self.features, (1 - seg).unsqueeze(2)).squeeze(2) / (1 - seg).sum(1, keepdim=True).clamp_min(1e-6)
        ).double()
        self.y = torch.from_numpy(np.asarray(inputs.labels[rows], np.float64))
        self.labelled = self.y >= 0
        self.attributes = torch.from_numpy(np.asarray(inputs.attributes[rows], np.float64))
        self.has_attributes = torch.from_numpy(np.asarray(inputs.has_attributes[rows], bool))
        self.x_reference = (
            None
            if inputs.reference_head_in is None
            else (torch.from_numpy(np.asarray(inputs.reference_head_in[rows], np.float64)) - mean) / sd
        )
        self.outline = (
            None
            if inputs.outline is None or outline is None
            else (torch.from_numpy(np.asarray(inputs.outline[rows], np.float64)) - outline[0]) / outline[1]
        )


def _classifier_targets(data: _Data, rating_targets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the classifier's cross-entropy and the debug loss are fitted to, and on which rows."""
    if not rating_targets:
        return data.y.clamp_min(0.0), data.labelled
    rating = data.attributes[:, ATTRIBUTE_NAMES.index("malignancy")]
    return torch.where(data.has_attributes, rating, data.y.clamp_min(0.0)), data.has_attributes | data.labelled


def _fit(heads: _Heads, data: _Data, l2: float, objective: HeadObjective, attributes: bool) -> dict[str, torch.Tensor]:
    p = {k: v.clone().requires_grad_(True) for k, v in heads.params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=objective.lr)
    target, lab = _classifier_targets(data, objective.rating_targets)
    for _ in range(objective.steps):
        logit, attrs, omega = heads.forward(p, data.x, data.outline)
        loss = F.binary_cross_entropy_with_logits(logit[lab], target[lab])
        if objective.alpha:
            csl = F.relu(objective.delta - _cam_margin(logit, omega, data, objective.sign_temperature))
            if objective.adaptive:
                csl = csl * 2 * (torch.sigmoid(logit).detach() - 0.5).abs()
            loss = loss + objective.alpha * csl[lab].mean()
        if attributes and objective.gamma and bool(data.has_attributes.any()):
            m = data.has_attributes
            loss = loss + objective.gamma * F.mse_loss(attrs[m], data.attributes[m][:, : attrs.shape[1]])
        if objective.parity_weight and data.x_reference is not None:
            reference_logit = heads.forward(p, data.x_reference, data.outline)[0]
            loss = loss + objective.parity_weight * (torch.sigmoid(logit) - torch.sigmoid(reference_logit)).abs().mean()
        attribute_weights = [p[k] for k in ("We", "Wo", "Ws") if k in p]
        if "wo" in p:
            loss = loss + OUTLINE_L2 * (p["wo"] ** 2).sum()
        loss = loss + l2 * (p["wc"] ** 2).sum() + objective.attribute_l2 * sum((w**2).sum() for w in attribute_weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def _fit_attribute_readout(
    heads: _Heads, params: dict[str, torch.Tensor], data: _Data, objective: HeadObjective
) -> dict[str, torch.Tensor]:
    """Refit the attribute output layer of ``params`` (and the skip, with ``attribute_skip``) alone
    to the L1 error in rating points."""
    m = data.has_attributes
    x = data.x[m]
    with torch.no_grad():
        embedding = F.relu(x @ params["We"].T + params["be"])
    target = data.attributes[m][:, : params["Wo"].shape[0]]
    fitted = {k: params[k].clone().requires_grad_(True) for k in ("Wo", "bo")}
    if objective.attribute_skip or "Ws" in params:
        skip = params.get("Ws", torch.zeros(params["Wo"].shape[0], x.shape[1], dtype=x.dtype))
        fitted["Ws"] = skip.clone().requires_grad_(True)
    opt = torch.optim.Adam(list(fitted.values()), lr=objective.lr)
    for _ in range(ATTRIBUTE_READOUT_STEPS):
        attributes = torch.sigmoid(_attribute_logits(fitted, x, embedding))
        loss = RATING_SPAN * F.l1_loss(attributes, target) + objective.attribute_l2 * (fitted["Wo"] ** 2).sum()
        if "Ws" in fitted:
            loss = loss + ATTRIBUTE_SKIP_L2 * (fitted["Ws"] ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {**params, **{k: v.detach() for k, v in fitted.items()}}


def _head_metrics(heads: _Heads, p: dict[str, torch.Tensor], data: _Data) -> dict[str, float]:
    """AUC, Grad-CAM-on-nodule fraction and attribute MAE (rating points) of heads ``p`` on ``data``."""
    with torch.no_grad():
        logit, attrs, omega = heads.forward(p, data.x, data.outline)
        inside, outside = _cam_region_means(logit, omega, data.features, data.f_in, data.f_out)
    lab = data.labelled.numpy()
    out = {
        "auc": roc_auc(data.y.numpy()[lab], logit.numpy()[lab])
        if len(np.unique(data.y.numpy()[lab])) == 2
        else float("nan")
    }
    out["cam_on_nodule_fraction"] = float((inside > outside).double().mean())
    m = data.has_attributes
    if bool(m.any()) and attrs.shape[1] == data.attributes.shape[1]:
        out["attribute_mae"] = float((attrs[m] - data.attributes[m]).abs().mean() * 4)
    if data.x_reference is not None:
        with torch.no_grad():
            reference_logit = heads.forward(p, data.x_reference, data.outline)[0]
        out["path_parity"] = float((torch.sigmoid(logit) - torch.sigmoid(reference_logit)).abs().mean())
    return out


def refit_heads(
    model: CollaborativeNet,
    inputs: HeadInputs,
    patients: list[str],
    objective: HeadObjective = HeadObjective(),
    l2_grid: tuple[float, ...] = SHIPPED_L2_GRID,
    inner_folds: int = 3,
    seed: int = 0,
    min_cam_fraction: float = 0.9,
    calibrate: bool = False,
    outline_init: OutlineHead | None = None,
) -> dict[str, Any]:
    """Refit attribute embedding, attribute output and classifier under the training objective.

    Each strength of ``l2_grid`` is scored by ``inner_folds`` patient-grouped
    folds of these nodules (pooled out-of-fold AUC and Grad-CAM-on-nodule fraction); the chosen one
    has the best AUC among those whose CAM fraction reaches ``min_cam_fraction`` (the model card's
    target), else the strongest. The final fit uses every nodule and is written into ``model``.

    With ``calibrate``, the classifier's logit is then rescaled by Platt scaling fitted on the
    inner folds' out-of-fold logits at the chosen strength (``logit' = a·logit + b``, folded into
    the classifier's weights and bias): the ranking within a model, and so its AUC and where its
    Grad-CAM points, stay the same; its probabilities are those the inner folds say are
    calibrated. Skipped (and said so) when the fitted scale is not positive.

    With ``inputs.outline``, the outline term starts at ``outline_init`` (raw units: the term the
    network was trained beside, ``[train] outline_offset``) instead of zero, in every fit.

    Returns:
        What was chosen and measured (JSON-serialisable), for the fold summary.
    """
    if inputs.head_in.shape[1] != model.feature_channels + model.n_seg_features:
        raise ValueError(
            f"head inputs of width {inputs.head_in.shape[1]} do not fit a model whose heads read {model.feature_channels + model.n_seg_features}"
        )
    if len(patients) != len(inputs):
        raise ValueError(f"{len(patients)} patients given for {len(inputs)} nodules")
    if inputs.outline is not None and inputs.outline.shape != (len(inputs), len(OUTLINE_FEATURE_NAMES)):
        raise ValueError(
            f"outline statistics of shape {inputs.outline.shape} for {len(inputs)} nodules (expected [N, {len(OUTLINE_FEATURE_NAMES)}])"
        )
    if len(np.unique(inputs.labels[inputs.labels >= 0])) < 2:
        raise ValueError("refitting the heads needs both classes among the labelled nodules")
    torch.manual_seed(seed)
    attributes = model.config.use_attributes
    info: dict[str, Any] = {
        "method": "debugged",
        "objective": dict(objective.__dict__),
        "n_nodules": int(len(inputs)),
        "n_labelled": int((inputs.labels >= 0).sum()),
    }
    if outline_init is not None and inputs.outline is not None:
        info["outline_init"] = outline_init.to_dict()
    folds = np.asarray(patient_folds(patients, inner_folds, seed))
    logits = {value: np.zeros(len(inputs)) for value in l2_grid}
    on_nodule = {value: np.zeros(len(inputs), bool) for value in l2_grid}
    for k in range(inner_folds):
        fit_rows, test_rows = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        if len(test_rows) == 0 or len(fit_rows) == 0:
            continue
        # One standardisation and one copy of the features per inner fold, shared by every strength.
        heads, fit_data = _prepare(model, inputs, fit_rows, outline_init)
        test_data = _Data(inputs, test_rows, heads.mean, heads.sd, heads.outline)
        for value in l2_grid:
            params = _fit(heads, fit_data, value, objective, attributes)
            with torch.no_grad():
                logit, _, omega = heads.forward(params, test_data.x, test_data.outline)
                inside, outside = _cam_region_means(logit, omega, test_data.features, test_data.f_in, test_data.f_out)
            logits[value][test_rows], on_nodule[value][test_rows] = logit.numpy(), (inside > outside).numpy()
    lab = inputs.labels >= 0
    scores = {
        f"{v:g}": {
            "auc": roc_auc(inputs.labels[lab], logits[v][lab]),
            "cam_on_nodule_fraction": float(on_nodule[v].mean()),
        }
        for v in l2_grid
    }
    log.info("head refit, inner CV by L2: %s", scores)
    allowed = [v for v in l2_grid if scores[f"{v:g}"]["cam_on_nodule_fraction"] >= min_cam_fraction]
    l2 = max(allowed, key=lambda v: (scores[f"{v:g}"]["auc"], v)) if allowed else max(l2_grid)
    info["inner_cv_by_l2"] = scores
    heads, data = _prepare(model, inputs, np.arange(len(inputs)), outline_init)
    before = _head_metrics(heads, heads.params, data)
    params = _fit(heads, data, l2, objective, attributes)
    readout = objective.attribute_readout and attributes and bool(data.has_attributes.any())
    joint_mae = _head_metrics(heads, params, data).get("attribute_mae") if readout else None
    if readout:
        params = _fit_attribute_readout(heads, params, data, objective)
    if calibrate:
        info["calibration"] = platt_calibration(logits[l2][lab], inputs.labels[lab])
        if info["calibration"]["applied"]:
            scale, shift = info["calibration"]["scale"], info["calibration"]["shift"]
            params = {**params, "wc": params["wc"] * scale, "bc": params["bc"] * scale + shift}
            if "wo" in params:
                params["wo"] = params["wo"] * scale
    outline_head = heads.write_back(model, params)
    if outline_head is not None:
        info["outline_head"] = outline_head.to_dict()
        info["outline_l2"] = OUTLINE_L2
    info.update(l2=l2, training_before=before, training_after=_head_metrics(heads, params, data))
    if readout:
        info["attribute_readout"] = {
            "loss": "L1 in rating points",
            "steps": ATTRIBUTE_READOUT_STEPS,
            "skip_l2": ATTRIBUTE_SKIP_L2 if "Ws" in params else None,
            "training_mae_before": joint_mae,
            "training_mae_after": info["training_after"].get("attribute_mae"),
        }
    log.info("heads refitted with L2 %g: training %s -> %s", l2, before, info["training_after"])
    return info


def platt_calibration(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Platt scaling ``sigmoid(a·logit + b)`` fitted to out-of-fold ``logits`` of labelled nodules.

    Returns:
        ``scale`` a, ``shift`` b, whether they are to be ``applied`` (a > 0), and the mean negative
        log-likelihood of the out-of-fold logits before and after (JSON-serialisable).
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("Platt scaling needs both classes among the labelled nodules")
    w, b = fit_logistic(z[:, None], y, 1e-6)

    def nll(scores: np.ndarray) -> float:
        return float(np.mean(np.logaddexp(0.0, scores) - y * scores))

    scale = float(w[0])
    applied = scale > 0
    if not applied:
        log.warning("Platt scaling skipped: the out-of-fold logits' fitted scale is %.3g (not positive)", scale)
    return {
        "method": "Platt scaling on the inner-CV out-of-fold logits at the chosen L2",
        "scale": scale,
        "shift": float(b),
        "applied": applied,
        "out_of_fold_nll_before": nll(z),
        "out_of_fold_nll_after": nll(scale * z + b) if applied else nll(z),
    }


def _prepare(
    model: CollaborativeNet, inputs: HeadInputs, rows: np.ndarray, outline_init: OutlineHead | None = None
) -> tuple[_Heads, _Data]:
    head_in = torch.from_numpy(np.asarray(inputs.head_in[rows], np.float64))
    mean, sd = head_in.mean(0), head_in.std(0).clamp_min(1e-6)
    outline = None
    if inputs.outline is not None:
        statistics = torch.from_numpy(np.asarray(inputs.outline[rows], np.float64))
        outline = (statistics.mean(0), statistics.std(0).clamp_min(1e-6))
    heads = _Heads(model, mean, sd, outline, outline_init)
    return heads, _Data(inputs, rows, mean, sd, outline)

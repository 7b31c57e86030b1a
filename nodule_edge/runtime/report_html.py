"""``nodule-edge evaluate --report``: one self-contained HTML page about an evaluation run.

The page makes no network request: every plot and overlay is an embedded base64 PNG data URI,
the CSS is inline, there is no script, and a Content-Security-Policy forbids anything else, so it
can be opened on an air-gapped reading station or attached to a ticket as one file.

Plots (matplotlib, Agg canvas per figure; pyplot and the global backend are never touched):

* ROC curves of the model's probability, the retrieval score and the diameter-only baseline
  against the LIDC proxy labels (reader-mean malignancy > 3 malignant, < 3 benign, = 3 left out;
  ``../shared/data/README.md`` and :func:`nodule_edge.manifest.lidc_proxy_label`), AUCs from
  :func:`nodule_edge.metrics.roc_auc`;
* a reliability diagram with its expected calibration error (:data:`CALIBRATION_BINS`
  equal-width bins of the probability);
* predicted against reader-mean rating for the six attributes, with their mean absolute error;
* the Dice distribution and the saliency-trust distribution (nodule - background attention);
* a gallery of the most confident errors, re-run through the inferer and drawn with
  :func:`nodule_edge.runtime.overlays.render_overlay` as ``infer`` draws them.

Example:
    >>> ev = evaluate_voi_dir(inferer, "../shared/data/lidc_voi", "out/predictions.csv")
    >>> write_evaluation_report(ev, "out/evaluation.html", inferer=inferer, command="nodule-edge evaluate ...")
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nodule_edge import __version__
from nodule_edge._files import write_text_atomic
from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import NoduleEdgeError, OutputError, require
from nodule_edge.metrics import roc_auc
from nodule_edge.runtime.evaluate import EvaluatedNodule, Evaluation

__all__ = [
    "CALIBRATION_BINS",
    "REPORT_NAME",
    "expected_calibration_error",
    "confident_errors",
    "write_evaluation_report",
]

log = logging.getLogger(__name__)

#: Equal-width probability bins of the reliability diagram and the ECE.
CALIBRATION_BINS = 10
#: Default file name, written beside the predictions CSV.
REPORT_NAME = "evaluation.html"
_GALLERY_SIZE = 8
_DPI = 100
# Inline styles and data: images only; no script, no fetch of any kind.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
figure { display: inline-block; margin: 0.5em; } figcaption { font-size: 0.9em; color: #333; }
.failed { color: #a00; }
"""


# ------------------------------------------------------------------------------------ numbers


def expected_calibration_error(
    labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over ``bins`` equal-width probability bins on [0, 1].

    ECE = sum over bins of (bin count / n) * |fraction malignant - mean probability|; a
    probability of exactly 1 falls in the last bin.

    Args:
        labels: 0/1 labels.
        probabilities: Predicted probabilities in [0, 1], same length.
        bins: Number of bins.

    Returns:
        The ECE (NaN without samples) and one dict per bin: ``low``, ``high``, ``count``,
        ``mean_probability``, ``fraction_positive`` (NaN for an empty bin).
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in shape: {y.shape} vs {p.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        count = int(sel.sum())
        mean_p = float(p[sel].mean()) if count else float("nan")
        frac = float(y[sel].mean()) if count else float("nan")
        if count:
            ece += count / len(p) * abs(frac - mean_p)
        table.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "mean_probability": mean_p,
                "fraction_positive": frac,
            }
        )
    return (ece if len(p) else float("nan")), table


def confident_errors(nodules: Sequence[EvaluatedNodule], n: int = _GALLERY_SIZE) -> list[EvaluatedNodule]:
    """The ``n`` labelled nodules on the wrong side of 0.5 with the largest ``|p - label|``."""

    def error(x: EvaluatedNodule) -> float:
        return -1.0 if x.record.label is None else abs(x.malignancy_probability - x.record.label)

    return sorted((x for x in nodules if error(x) >= 0.5), key=error, reverse=True)[:n]


def _roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(bool)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / max(int((~y).sum()), 1)], np.r_[0.0, tp / max(int(y.sum()), 1)]


# ------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend switch)."""
    require("matplotlib", "report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _data_uri_png(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fig_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return _data_uri_png(buf.getvalue())


def _roc_figure(nodules: Sequence[EvaluatedNodule]) -> tuple[str, dict[str, tuple[float, int]]]:
    fig = _figure(6.0, 5.5)
    ax = fig.add_subplot()
    labelled = [x for x in nodules if x.record.label is not None]
    scores = {
        "model probability": [(x.record.label, x.malignancy_probability) for x in labelled],
        "network without the outline term": [
            (x.record.label, x.network_probability) for x in labelled if x.network_probability is not None
        ],
        "outline term alone": [(x.record.label, x.outline_logit) for x in labelled if x.outline_logit is not None],
        "retrieval score": [(x.record.label, x.retrieval_score) for x in labelled if x.retrieval_score is not None],
        "diameter only (manifest diameter_mm)": [
            (x.record.label, x.record.diameter_mm) for x in labelled if x.record.diameter_mm is not None
        ],
    }
    aucs: dict[str, tuple[float, int]] = {}
    for name, pairs in scores.items():
        if not pairs:
            continue
        y = np.asarray([a for a, _ in pairs])
        s = np.asarray([b for _, b in pairs], dtype=np.float64)
        auc = roc_auc(y, s)
        aucs[name] = (auc, len(pairs))
        if auc == auc:  # both classes present
            fpr, tpr = _roc_curve(y, s)
            ax.step(fpr, tpr, where="post", label=f"{name}: AUC {auc:.3f} (n={len(pairs)})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="chance")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="false positive rate (benign called malignant)",
        ylabel="true positive rate (sensitivity)",
        title="ROC, LIDC proxy labels",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _fig_uri(fig), aucs


def _calibration_figure(nodules: Sequence[EvaluatedNodule]) -> tuple[str, float, list[dict[str, float]]]:
    labelled = [x for x in nodules if x.record.label is not None]
    y = np.asarray([x.record.label for x in labelled])
    p = np.asarray([x.malignancy_probability for x in labelled])
    ece, table = expected_calibration_error(y, p)
    fig = _figure(6.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    full = [b for b in table if b["count"]]
    centres = [(b["low"] + b["high"]) / 2 for b in table]
    width = 1.0 / CALIBRATION_BINS
    top.bar(
        [(b["low"] + b["high"]) / 2 for b in full],
        [b["fraction_positive"] for b in full],
        width=width * 0.9,
        color="#7aa6d6",
        edgecolor="#2a5a8a",
        label="fraction malignant in bin",
    )
    top.plot(
        [b["mean_probability"] for b in full],
        [b["fraction_positive"] for b in full],
        "o",
        color="#c0392b",
        label="mean probability vs fraction (per bin)",
    )
    top.plot([0, 1], [0, 1], color="0.4", linestyle=":", label="perfect calibration")
    top.set(
        xlim=(0, 1),
        ylim=(0, 1),
        ylabel="fraction malignant (proxy)",
        title=f"Reliability: ECE {ece:.3f} ({CALIBRATION_BINS} equal-width bins, n={len(p)})",
    )
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b["count"] for b in table], width=width * 0.9, color="0.6")
    bottom.set(xlabel="predicted malignancy probability", ylabel="nodules")
    return _fig_uri(fig), ece, table


def _attributes_figure(nodules: Sequence[EvaluatedNodule]) -> tuple[str, dict[str, float]]:
    rated = [x for x in nodules if x.record.ratings is not None]
    fig = _figure(12.0, 7.5)
    axes = fig.subplots(2, 3).ravel()
    maes: dict[str, float] = {}
    for k, (name, ax) in enumerate(zip(ATTRIBUTE_NAMES, axes)):
        truth = np.asarray([x.record.ratings[k] for x in rated if x.record.ratings is not None], dtype=np.float64)
        pred = np.asarray([x.attributes[name] for x in rated], dtype=np.float64)
        mae = float(np.mean(np.abs(pred - truth))) if len(rated) else float("nan")
        maes[name] = mae
        ax.scatter(truth, pred, s=8, alpha=0.45, color="#2a5a8a", edgecolors="none")
        ax.plot([1, 5], [1, 5], color="0.5", linestyle=":")
        ax.set(
            xlim=(0.8, 5.2),
            ylim=(0.8, 5.2),
            xlabel="reader-mean rating",
            ylabel="predicted",
            title=f"{name}: MAE {mae:.2f} (n={len(rated)})",
        )
        ax.set_aspect("equal")
    return _fig_uri(fig), maes


def _dice_trust_figure(nodules: Sequence[EvaluatedNodule], trust_margin: float) -> tuple[str, dict[str, float]]:
    dices = np.asarray([x.dice for x in nodules if x.dice is not None], dtype=np.float64)
    diff = np.asarray([x.nodule_attention - x.background_attention for x in nodules], dtype=np.float64)
    trusted = float(np.mean([x.trustworthy for x in nodules])) if nodules else float("nan")
    facts = {
        "dice_n": float(len(dices)),
        "dice_mean": float(dices.mean()) if len(dices) else float("nan"),
        "dice_median": float(np.median(dices)) if len(dices) else float("nan"),
        "trust_fraction": trusted,
    }
    fig = _figure(12.0, 4.5)
    left, right = fig.subplots(1, 2)
    left.hist(dices, bins=np.linspace(0, 1, 21), color="#5b9e5b", edgecolor="white")
    left.set(
        xlabel="Dice (prediction >= 0.5 vs reader mask)",
        ylabel="nodules",
        title=f"Dice: mean {facts['dice_mean']:.3f}, median {facts['dice_median']:.3f} (n={len(dices)})",
    )
    if len(diff):
        right.hist(diff, bins=30, color="#d69a3a", edgecolor="white")
    right.axvline(trust_margin, color="#a00", linestyle="--", label=f"trust margin {trust_margin:g}")
    right.set(
        xlabel="nodule attention - background attention",
        ylabel="nodules",
        title=f"Saliency trust: {trusted:.1%} trustworthy (n={len(diff)})",
    )
    right.legend(fontsize=8)
    return _fig_uri(fig), facts


def _gallery(nodules: Sequence[EvaluatedNodule], inferer: Any | None) -> list[tuple[str, str | None]]:
    """(caption, overlay data URI or None) for the most confident errors, re-run through ``inferer``."""
    from nodule_edge.runtime.overlays import render_overlay

    shown = []
    for x in confident_errors(nodules):
        rec = x.record
        truth = "malignant" if rec.label == 1 else "benign"
        malignancy = f"{rec.ratings[-1]:.2f}" if rec.ratings else "n/a"
        caption = f"{rec.id}: p(malignant) {x.malignancy_probability:.2f}, proxy label {truth} (reader-mean malignancy {malignancy})"
        uri = None
        if inferer is not None:
            try:
                result = inferer.infer(rec.image_path, worlds=[rec.center_lps_mm], exclude_ids={rec.id})
            except NoduleEdgeError as exc:  # it ran a moment ago; say so rather than lose the page
                log.info("gallery: re-running %s failed: %s", rec.id, exc)
            else:
                n = result.nodules[0]
                p = n.prediction
                title = f"{rec.id}: p={p.malignancy_probability:.2f} ({truth} by readers)  attention in/out {p.nodule_attention:.2f}/{p.background_attention:.2f}"
                buf = io.BytesIO()
                render_overlay(n.patch[0], p.segmentation, p.saliency, title).save(buf, format="PNG")
                uri = _data_uri_png(buf.getvalue())
        shown.append((caption, uri))
    return shown


# ------------------------------------------------------------------------------------ page


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def _table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _render_page(evaluation: Evaluation, inferer: Any | None = None, command: str = "") -> str:
    """The report's HTML text (see :func:`write_evaluation_report`)."""
    ev = evaluation
    nodules = ev.nodules
    labelled = [x for x in nodules if x.record.label is not None]
    excluded = sum(1 for x in nodules if x.record.ratings is not None and x.record.label is None)
    roc_uri, aucs = _roc_figure(nodules)
    cal_uri, ece, _ = _calibration_figure(nodules)
    attr_uri, maes = _attributes_figure(nodules)
    dt_uri, dt = _dice_trust_figure(nodules, ev.trust_margin)
    gallery = _gallery(nodules, inferer)

    facts = [
        ("model version", ev.model_version or "n/a"),
        ("backend", ev.backend or "n/a"),
        ("VOI folder", ev.voi_dir),
        ("nodules attempted", ev.total),
        ("nodules evaluated", len(nodules)),
        ("failed rows", len(ev.errors)),
        ("date (UTC)", ev.started.strftime("%Y-%m-%d %H:%M:%S")),
        ("run time", f"{ev.seconds:.0f} s"),
        ("command", command or "n/a"),
        ("nodule-edge", __version__),
        ("predictions CSV", ev.predictions_csv),
        ("errors CSV", ev.errors_csv),
    ]
    auc_rows = [(name, _fmt(auc), n) for name, (auc, n) in aucs.items()]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nodule-edge evaluation: {_e(ev.model_version or 'model')}, {len(nodules)} nodules</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>nodule-edge evaluation of {_e(ev.voi_dir.name or ev.voi_dir)}</h1>",
        '<p class="note">Research use only. Malignancy labels here are LIDC reader ratings, not pathology: '
        "reader-mean malignancy &gt; 3 is counted malignant, &lt; 3 benign, exactly 3 is left out of the ROC and "
        f"calibration ({len(labelled)} labelled nodules, {excluded} with mean rating 3 left out).</p>",
        "<h2>Run</h2>",
        _table(facts),
    ]
    if ev.errors:
        parts.append(
            f'<p class="failed">{len(ev.errors)} of {ev.total} nodules failed and are not in any figure; the metrics are over the other {len(nodules)}.</p>'
        )
    parts += [
        "<h2>Malignancy: ROC</h2>",
        _table(auc_rows, ["score", "AUC", "labelled nodules"]),
        _img(roc_uri, "ROC curves"),
        "<h2>Calibration</h2>",
        f"<p>Expected calibration error {_fmt(ece)} over {CALIBRATION_BINS} equal-width bins of the predicted probability "
        "(bin weight = its share of the labelled nodules; |fraction malignant - mean probability|).</p>",
        _img(cal_uri, "reliability diagram"),
        "<h2>Attributes: predicted vs reader mean</h2>",
        _table([(name, _fmt(mae, 2)) for name, mae in maes.items()], ["attribute", "MAE (1-5 scale)"]),
        _img(attr_uri, "attribute scatter plots"),
        "<h2>Segmentation and saliency trust</h2>",
        f"<p>Dice over {int(dt['dice_n'])} nodules with a mask: mean {_fmt(dt['dice_mean'])}, median {_fmt(dt['dice_median'])}. "
        f"Saliency trust (nodule attention minus background attention &gt; {ev.trust_margin:g}): {_fmt(dt['trust_fraction'] * 100, 1)}% trustworthy.</p>",
        _img(dt_uri, "Dice and saliency trust distributions"),
        f"<h2>Most confident errors (up to {_GALLERY_SIZE}, largest |p - label|)</h2>",
    ]
    if not gallery:
        parts.append("<p>No labelled nodule is on the wrong side of 0.5.</p>")
    elif inferer is None:
        parts.append('<p class="note">Overlays not drawn (no inferer given).</p>')
    for caption, uri in gallery:
        image = (
            _img(uri, caption) if uri else "" if inferer is None else '<p class="failed">overlay could not be drawn</p>'
        )
        parts.append(f"<figure>{image}<figcaption>{_e(caption)}</figcaption></figure>")
    if gallery:
        parts.append(
            '<p class="note">CT lung window, saliency heat map, predicted segmentation in green; axial, coronal, sagittal through the centre.</p>'
        )
    parts.append("<h2>Failed rows</h2>")
    if ev.errors:
        parts.append(_table([(f.id, f.error, f.reason) for f in ev.errors.failures], ["voi_id", "error", "reason"]))
    else:
        parts.append("<p>None.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_evaluation_report(
    evaluation: Evaluation, path: str | Path, inferer: Any | None = None, command: str = ""
) -> Path:
    """Write the self-contained HTML report of an evaluation run, atomically.

    Args:
        evaluation: What :func:`~nodule_edge.runtime.evaluate.evaluate_voi_dir` returned.
        path: The HTML file to write; its folder must exist.
        inferer: Re-runs the most confident errors to draw their overlays (None: captions only).
        command: The command line, shown in the run's facts.

    Returns:
        ``path``.
    """
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    page = _render_page(evaluation, inferer, command)
    write_text_atomic(path, page)
    log.info("evaluation report written to %s (%d bytes)", path, path.stat().st_size)
    return path

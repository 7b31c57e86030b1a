"""`nodule-edge evaluate --report`: the numbers behind the plots, a self-contained page, and a real browser.

The browser test opens the page in Debian's headless Chromium (``make browser`` installs it) through
the ``playwright`` package (dev extra), takes a screenshot and records every request the page makes.
"""

from __future__ import annotations

import base64
import dataclasses
import html.parser
from pathlib import Path

import numpy as np
import pytest

from nodule_edge.manifest import NoduleRecord
from nodule_edge.metrics import roc_auc
from nodule_edge.runtime import NoduleInferer
from nodule_edge.runtime.evaluate import EvaluatedNodule, evaluate_voi_dir

pytest.importorskip("matplotlib", reason="the report needs matplotlib: pip install 'nodule-edge[report]'")

from nodule_edge.runtime.report_html import (  # noqa: E402 - after the skip
    CALIBRATION_BINS,
    confident_errors,
    expected_calibration_error,
    write_evaluation_report,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# ------------------------------------------------------------------------------------ numbers


def test_ece_by_hand():
    # One nodule in each of bins 0, 1, 8, 9: (0.05 + 0.15 + 0.15 + 0.05) / 4.
    ece, table = expected_calibration_error([0, 0, 1, 1], [0.05, 0.15, 0.85, 0.95])
    assert ece == pytest.approx(0.1)
    assert len(table) == CALIBRATION_BINS == 10
    assert [b["count"] for b in table] == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert np.isnan(table[5]["mean_probability"])
    # One bin, half malignant, mean probability 0.3: |0.5 - 0.3|.
    assert expected_calibration_error([0, 1, 1, 0], [0.3, 0.31, 0.32, 0.33])[0] == pytest.approx(0.5 - 0.315)
    # A probability of exactly 1 is in the last bin, not past it.
    ece, table = expected_calibration_error([1, 1], [1.0, 0.9])
    assert table[-1]["count"] == 2 and ece == pytest.approx(0.05)
    assert np.isnan(expected_calibration_error([], [])[0])
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error([0, 1], [0.5])


def _nodule(i: int, label: int | None, p: float) -> EvaluatedNodule:
    rec = NoduleRecord(
        id=f"N{i}", patient_id=f"P{i}", image_path=Path(f"N{i}.nii.gz"), center_lps_mm=(0.0, 0.0, 0.0), label=label
    )
    return EvaluatedNodule(
        record=rec,
        malignancy_probability=p,
        attributes={},
        dice=None,
        nodule_attention=0.5,
        background_attention=0.1,
        trustworthy=True,
        retrieval_score=None,
    )


def test_confident_errors_are_the_wrong_side_of_half_most_confident_first():
    nodules = [
        _nodule(0, 0, 0.9),
        _nodule(1, 1, 0.4),
        _nodule(2, 0, 0.2),
        _nodule(3, 1, 0.02),
        _nodule(4, None, 0.99),
        _nodule(5, 0, 0.55),
    ]
    assert [n.record.id for n in confident_errors(nodules)] == ["N3", "N0", "N1", "N5"]
    assert [n.record.id for n in confident_errors(nodules, 2)] == ["N3", "N0"]


# ------------------------------------------------------------------------------------ the page


class _Sources(html.parser.HTMLParser):
    """Every URL-valued attribute of the page (src, href, srcset, action, poster, data)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [
            v for k, v in attrs if k in {"src", "href", "srcset", "action", "poster", "data"} and v is not None
        ]


@pytest.fixture(scope="module")
def report(tiny_bundle, synthetic_voi_dir, break_voi_dir, tmp_path_factory):
    """The report of an evaluation in which SYN-0002 has its centre outside its volume."""
    root = tmp_path_factory.mktemp("report")
    voi = break_voi_dir(synthetic_voi_dir, root / "voi", outside="SYN-0002_R_1")
    inferer = NoduleInferer(tiny_bundle, backend="cpu", top_k=20)
    ev = evaluate_voi_dir(inferer, voi, root / "predictions.csv")
    path = write_evaluation_report(
        ev, root / "evaluation.html", inferer=inferer, command="nodule-edge evaluate voi --out predictions.csv --report"
    )
    return ev, path


def test_page_is_self_contained_with_every_section(report):
    ev, path = report
    text = path.read_text(encoding="utf-8")
    parser = _Sources()
    parser.feed(text)
    assert parser.urls, "no image at all"
    for url in parser.urls:
        assert url.startswith("data:image/png;base64,"), url[:80]
        assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert "http://" not in text and "https://" not in text
    assert "default-src 'none'" in text  # the browser would refuse anything else too
    for heading in (
        "Malignancy: ROC",
        "Calibration",
        "Attributes: predicted vs reader mean",
        "Segmentation and saliency trust",
        "Most confident errors",
        "Failed rows",
    ):
        assert heading in text, heading
    assert "model probability" in text and "retrieval score" in text and "diameter only" in text
    assert f"{CALIBRATION_BINS} equal-width bins" in text
    # Facts of the run, and the failed row with its reason.
    assert (
        ev.model_version in text
        and ev.backend in text
        and "nodule-edge evaluate voi --out predictions.csv --report" in text
    )
    assert "SYN-0002_R_1" in text and "CoordinateError" in text and "1 of 6 nodules failed" in text
    # ROC, calibration, attributes, Dice/trust, plus one overlay per confident error.
    assert len(parser.urls) == 4 + len(confident_errors(ev.nodules))
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_gallery_shows_the_confident_errors_overlays(report):
    ev, path = report
    text = path.read_text(encoding="utf-8")
    errors = confident_errors(ev.nodules)
    if not errors:
        pytest.skip("the seeded tiny model makes no confident error on these six nodules")
    for n in errors:
        assert f"{n.record.id}: p(malignant) {n.malignancy_probability:.2f}" in text


def test_report_without_inferer_has_captions_only(report, tmp_path):
    ev, _ = report
    path = write_evaluation_report(ev, tmp_path / "r.html")
    parser = _Sources()
    parser.feed(path.read_text(encoding="utf-8"))
    assert len(parser.urls) == 4


def test_a_model_with_an_outline_term_shows_the_network_and_the_term_apart(report, tmp_path):
    ev, _ = report
    assert "network without the outline term" not in write_evaluation_report(ev, tmp_path / "plain.html").read_text(
        encoding="utf-8"
    )
    # A term that ranks the labelled nodules perfectly on its own (+2 malignant, -2 benign).
    nodules = [
        dataclasses.replace(n, outline_logit=0.0 if n.record.label is None else 4.0 * n.record.label - 2.0)
        for n in ev.nodules
    ]
    labelled = [n for n in nodules if n.record.label is not None]
    text = write_evaluation_report(dataclasses.replace(ev, nodules=nodules), tmp_path / "r.html").read_text(
        encoding="utf-8"
    )
    network_auc = roc_auc(
        np.asarray([n.record.label for n in labelled]), np.asarray([n.network_probability for n in labelled])
    )
    n = len(labelled)
    assert f"<td>outline term alone</td><td>1.000</td><td>{n}</td>" in text
    assert f"<td>network without the outline term</td><td>{network_auc:.3f}</td><td>{n}</td>" in text


def test_report_into_a_missing_folder_is_an_output_error(report, tmp_path):
    from nodule_edge.errors import OutputError

    ev, _ = report
    with pytest.raises(OutputError, match="does not exist"):
        write_evaluation_report(ev, tmp_path / "missing" / "r.html")
    assert not (tmp_path / "missing").exists()


def test_matplotlib_state_is_left_alone(report, tmp_path):
    """The report draws on its own Agg canvases: the global backend and pyplot are untouched."""
    import sys

    import matplotlib

    before = matplotlib.get_backend() if "matplotlib.pyplot" in sys.modules else None
    write_evaluation_report(report[0], tmp_path / "r.html")
    if before is None:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        assert matplotlib.get_backend() == before


# ------------------------------------------------------------------------------------ browser


def _open_in_chromium(page_path: Path, screenshot: Path) -> tuple[list[str], dict]:
    """Open ``page_path`` in headless Chromium: every requested URL, and what the page shows."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: run `make browser` as root (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            # Record, but never send: no request leaves the machine even if the page asked for one.
            page.route(
                "**/*",
                lambda route: route.continue_() if route.request.url.startswith(("file:", "data:")) else route.abort(),
            )
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            shown = page.evaluate(
                "() => ({images: document.images.length, broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length, height: document.body.scrollHeight})"
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return requests, shown


@pytest.mark.slow
def test_the_browser_sees_the_network_requests_of_a_page_that_makes_them(tmp_path):
    """Control: the recorder below does catch http(s) requests, so its silence on the report means something."""
    page = tmp_path / "leaky.html"
    page.write_text(
        '<html><body><p>leaky</p><img src="http://127.0.0.1:9/x.png"><link rel="stylesheet" href="https://127.0.0.1:9/s.css"></body></html>'
    )
    requests, _ = _open_in_chromium(page, tmp_path / "leaky.png")
    assert any(u.startswith("http://127.0.0.1:9/") for u in requests), requests
    assert any(u.startswith("https://127.0.0.1:9/") for u in requests), requests


@pytest.mark.slow
def test_report_renders_in_a_real_browser_without_network(report, tmp_path):
    from PIL import Image

    _, path = report
    shot = tmp_path / "evaluation.png"
    requests, shown = _open_in_chromium(path, shot)
    network = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert network == [], network
    assert requests[0] == path.resolve().as_uri()
    assert shown["images"] >= 4 and shown["broken"] == 0, shown
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] >= 1500, pixels.shape  # the whole page, not the first screen only
    assert pixels.std() > 20, "screenshot is (nearly) blank"
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200, f"only {len(colours)} distinct colours: plots and overlays did not render"

"""``nodule-edge index build``, ``add`` and ``query``: the similar-nodule index."""

from __future__ import annotations

import sys
from typing import Any

import click

from nodule_edge.cli import _common
from nodule_edge.cli._common import _handle_errors, bundle_option


@click.group()
def index() -> None:
    """Build, extend and query the similar-nodule index."""


def _index_entries(inferer: Any, records: list[Any], errors: Any) -> tuple[list[Any], Any]:
    """Run the runtime on every nodule of a VOI manifest: entries (reader metadata) and model outputs.

    A nodule the runtime refuses (centre outside its volume, unreadable file) is recorded in
    ``errors`` (a :class:`~nodule_edge.row_errors.RowErrors`) and left out of the index.
    """
    import numpy as np

    from nodule_edge.index import IndexEntry

    entries, probabilities, attributes = [], [], []
    with click.progressbar(records, label="running the model", file=sys.stderr) as bar:
        for rec in bar:
            result = errors.attempt(rec.id, inferer.infer, rec.image_path, worlds=[rec.center_lps_mm])
            if result is None:
                continue
            pred = result.nodules[0].prediction
            probabilities.append(pred.malignancy_probability)
            attributes.append(list(pred.attributes.values()))
            entries.append(
                IndexEntry(
                    id=rec.id,
                    label=rec.label,
                    attributes=list(rec.ratings) if rec.ratings else None,
                    diameter_mm=rec.diameter_mm,
                    malignancy_probability=pred.malignancy_probability,
                )
            )
    return entries, (np.asarray(probabilities), np.asarray(attributes))


def _index_errors_csv(index_dir: str) -> str:
    # The index folder holds only checksummed files (an extra file is refused at load), so the
    # failures go beside it.
    from pathlib import Path

    return str(Path(index_dir).resolve().parent / "errors.csv")


@index.command("build")
@click.argument("voi_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="Index folder to write.")
@click.option(
    "--kind",
    type=click.Choice(["attributes", "machine_expert"]),
    default="attributes",
    show_default=True,
    help="Vector: six attribute scores, or probability + malignancy rating.",
)
@bundle_option
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop at the first nodule the model cannot run on, instead of recording it in errors.csv beside the index.",
)
@_handle_errors
def index_build(voi_dir: str, out_dir: str, kind: str, bundle: str | None, fail_fast: bool) -> None:
    """Build an index from the nodules of VOI_DIR (runs the model on each).

    A nodule the runtime refuses is left out and recorded in errors.csv beside the index folder;
    the index of the others is written and the exit code is 9.
    """
    import numpy as np

    from nodule_edge.errors import DataError
    from nodule_edge.index import AttributeIndex, vector_for
    from nodule_edge.manifest import read_unsure_manifest
    from nodule_edge.row_errors import RowErrors

    records = read_unsure_manifest(voi_dir)
    inferer = _common._make_inferer(bundle, "auto", 0)
    errors = RowErrors(fail_fast)
    entries, (probs, attrs) = _index_entries(inferer, records, errors)
    errors_csv = errors.write_csv(_index_errors_csv(out_dir))
    if not entries:
        raise DataError(
            f"the model ran on none of the {len(records)} nodules of {voi_dir}; no index written (reasons in {errors_csv})"
        )
    index = AttributeIndex.create(kind, capacity=max(len(entries), 16))
    index.add(entries, np.stack([vector_for(kind, a, p) for a, p in zip(attrs, probs)]))
    index.save(out_dir)
    click.echo(f"index of {len(index)} nodules ({kind}) written to {out_dir}")
    errors.raise_if_failed(len(records), errors_csv, noun="nodules")


@index.command("add")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("voi_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@bundle_option
@click.option(
    "--fail-fast",
    is_flag=True,
    help="Stop at the first nodule the model cannot run on, instead of recording it in errors.csv beside the index.",
)
@_handle_errors
def index_add(index_dir: str, voi_dir: str, bundle: str | None, fail_fast: bool) -> None:
    """Add the nodules of VOI_DIR to an existing index (ids must be new).

    A nodule the runtime refuses is left out and recorded in errors.csv beside the index folder;
    the others are added and the exit code is 9.
    """
    import numpy as np

    from nodule_edge.errors import IndexError_
    from nodule_edge.index import AttributeIndex, vector_for
    from nodule_edge.manifest import read_unsure_manifest
    from nodule_edge.row_errors import RowErrors

    index = AttributeIndex.load(index_dir)
    records = read_unsure_manifest(voi_dir)
    # Refuse known ids before the model runs on every nodule, not after.
    present = [rec.id for rec in records if rec.id in index]
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise IndexError_(
            f"{len(present)} nodules of {voi_dir} are already in the index {index_dir} ({shown}); ids must be new"
        )
    inferer = _common._make_inferer(bundle, "auto", 0)
    errors = RowErrors(fail_fast)
    entries, (probs, attrs) = _index_entries(inferer, records, errors)
    errors_csv = errors.write_csv(_index_errors_csv(index_dir))
    if entries:
        index.add(entries, np.stack([vector_for(index.kind, a, p) for a, p in zip(attrs, probs)]))
        index.save(index_dir)
    click.echo(f"index now holds {len(index)} nodules")
    errors.raise_if_failed(len(records), errors_csv, noun="nodules")


@index.command("query")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option(
    "--attributes",
    "attributes",
    required=True,
    metavar="S,SPH,M,L,SPI,MAL",
    help="Six ratings on the 1-5 scale (subtlety, sphericity, margin, lobulation, spiculation, malignancy).",
)
@click.option(
    "--probability",
    type=click.FloatRange(0, 1),
    default=None,
    help="Classifier probability (needed for a machine_expert index).",
)
@click.option("-k", "k", default=20, show_default=True, type=click.IntRange(1, 1000), help="Neighbours to return.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_handle_errors
def index_query(index_dir: str, attributes: str, probability: float | None, k: int, as_json: bool) -> None:
    """Query an index with attribute ratings; prints the nearest nodules and the retrieval score."""
    import json

    import numpy as np

    from nodule_edge.index import AttributeIndex, vector_for

    try:
        ratings = [float(v) for v in attributes.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected six numbers, got {attributes!r}", param_hint="--attributes") from None
    if len(ratings) != 6:
        raise click.BadParameter(f"expected six numbers, got {len(ratings)}", param_hint="--attributes")
    index = AttributeIndex.load(index_dir)
    neighbours = index.query(np.asarray([vector_for(index.kind, ratings, probability)]), k=min(k, len(index)))[0]
    score = index.retrieval_score(neighbours)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "retrieval_score": score,
                    "neighbours": [
                        {"id": n.id, "distance": n.distance, "label": n.label, "diameter_mm": n.diameter_mm}
                        for n in neighbours
                    ],
                },
                indent=2,
            )
        )
        return
    for n in neighbours:
        label = "unknown" if n.label is None else {1: "malignant", 0: "benign"}[n.label]
        click.echo(
            f"{n.id}  distance {n.distance:.3f}  {label}" + (f"  {n.diameter_mm:.1f} mm" if n.diameter_mm else "")
        )
    click.echo("retrieval score: " + ("n/a" if score is None else f"{score:.3f}"))

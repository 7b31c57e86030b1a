"""Build a runtime bundle from a checkpoint: ONNX, fast CPU engine, index, model card, manifest.

The index holds the nodules of a manifest (the shipped bundle: the shipped model's training
nodules): their vectors come from running the exported fp32 model on their patches, their
metadata (label, reader ratings, diameter) from the manifest. Both vector kinds of the papers are
evaluated leave-one-out and the better one (by AUC of the retrieval score) is kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nodule_edge._files import staged_folder
from nodule_edge.errors import BundleError
from nodule_edge.export.onnx_export import export_box_net_onnx, export_onnx
from nodule_edge.outline import runtime_finish
from nodule_edge.patch import PatchSpec, run_nodule_bounded
from nodule_edge.runtime.bundle import load_bundle, write_manifest
from nodule_edge.runtime.engines.base import metadata_from_props

__all__ = ["build_bundle", "index_from_predictions"]

log = logging.getLogger(__name__)


def index_from_predictions(records: list[Any], outputs: dict[str, np.ndarray], kind: str) -> Any:
    """An :class:`AttributeIndex` of ``kind`` over model outputs for the given records."""
    from nodule_edge.index import AttributeIndex, IndexEntry, vector_for

    entries = [
        IndexEntry(
            id=r.id,
            label=r.label,
            attributes=list(r.ratings) if r.ratings is not None else None,
            diameter_mm=r.diameter_mm,
            malignancy_probability=float(outputs["malignancy_probability"][i]),
        )
        for i, r in enumerate(records)
    ]
    vectors = np.stack(
        [
            vector_for(kind, outputs["attributes"][i], float(outputs["malignancy_probability"][i]))
            for i in range(len(records))
        ]
    )
    index = AttributeIndex.create(kind, capacity=max(len(records), 16))
    index.add(entries, vectors)
    return index


def _run_engine(
    onnx_path: Path, patches: np.ndarray, spec: PatchSpec, first_pass: Path | None = None, batch: int = 8
) -> dict[str, np.ndarray]:
    """The exported fp32 model on whole-cube patches, through the runtime's (two-pass) path.

    ``first_pass``: the bundle's first-pass model (a box net), else the model's own segmentation.
    Segmentation and saliency maps are dropped after use (the index needs the heads only).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(chunk: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, {"patch": chunk.astype(np.float32)})))

    segment = None
    if first_pass is not None:
        first = ort.InferenceSession(str(first_pass), providers=["CPUExecutionProvider"])

        def segment(chunk: np.ndarray) -> np.ndarray:
            return np.asarray(first.run(["segmentation"], {"patch": chunk.astype(np.float32)})[0])

    # With an outline term the index stores what the runtime will query with: the final probability.
    head = metadata_from_props(dict(session.get_modelmeta().custom_metadata_map)).outline_head
    finish = runtime_finish(spec, head)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names if n not in ("segmentation", "saliency")}
    for start in range(0, len(patches), batch):
        out, _ = run_nodule_bounded(
            run, np.asarray(patches[start : start + batch], np.float32), spec, segment=segment, finish=finish
        )
        for n in chunks:
            chunks[n].append(out[n])
    return {n: np.concatenate(v) for n, v in chunks.items() if v}


def build_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    index_manifest_dir: str | Path | None,
    cache_dir: str | Path | None = None,
    cpu_engine: bool = True,
    model_card: str | Path | None = None,
    metrics: dict[str, Any] | None = None,
    explanations: dict[str, Any] | None = None,
    first_pass: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export everything the runtime loads into a verified bundle folder (written atomically).

    ``first_pass``: a box net checkpoint (:mod:`nodule_edge.train.first_pass`) that the runtime's
    first pass runs instead of the model's own segmentation; exported as ``first_pass.onnx``.
    """
    say = progress or log.info
    out_dir = Path(out_dir)
    # An existing bundle is replaced only once the new one is complete and verified.
    with staged_folder(out_dir, overwrite=True, what="bundle") as tmp:
        artifacts: dict[str, str] = {}
        say("exporting ONNX (fp32 reference)")
        result = export_onnx(checkpoint, tmp / "model.onnx", extra_metadata={"metrics": metrics or {}})
        artifacts["onnx_fp32"] = "model.onnx"
        spec = PatchSpec.from_json(result.metadata["patch_spec"])
        extra: dict[str, Any] = {
            "model_version": result.metadata["model_version"],
            "patch_spec": json.loads(spec.to_json()),
        }
        first_pass_path = None
        if first_pass is not None:
            say("exporting the first pass (box net)")
            export_box_net_onnx(
                first_pass, tmp / "first_pass.onnx", spec=spec, model_version=result.metadata["model_version"]
            )
            artifacts["first_pass"] = "first_pass.onnx"
            first_pass_path = tmp / "first_pass.onnx"
            extra["first_pass"] = {"network": "box_net", "artifact": "first_pass.onnx"}
        if explanations is not None:
            # The runtime's Grad-CAM/occlusion agreement threshold (README, Explanations).
            extra["explanations"] = explanations
        patches = None
        records = None
        if index_manifest_dir is not None:
            from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

            records = read_unsure_manifest(index_manifest_dir)
            # The quality flags' thresholds: the ranges of the data the model was trained on, which
            # the index nodules are for the shipped bundle (README, "Quality flags").
            from nodule_edge.runtime.quality import training_ranges_from_voi_dir

            extra["training_data"] = training_ranges_from_voi_dir(index_manifest_dir, say).to_json()
            # Whole cubes: the nodule box is drawn per nodule by the model's first pass, as at run time.
            cache = build_patch_cache(records, replace(spec, nodule_box=None), cache_dir)
            patches = cache.images
        if cpu_engine:
            from nodule_edge.export.int8 import build_cpu_engine

            if patches is None:
                raise BundleError(
                    "the INT8 CPU engine is calibrated on real patches: pass --index-from VOI_DIR (or --no-cpu-engine)"
                )

            say("building the fast CPU engine")
            calib = (
                None
                if patches is None
                else patches[
                    np.random.default_rng(0).choice(len(patches), min(64, len(patches)), replace=False)
                ].astype(np.float32)
            )
            engine_path = build_cpu_engine(tmp / "model.onnx", tmp, calib)
            artifacts["cpu_engine"] = Path(engine_path).name
        if records is not None and patches is not None:
            say(f"running the model on {len(records)} index nodules")
            outputs = _run_engine(tmp / "model.onnx", patches, spec, first_pass_path)
            extra["index"] = _choose_and_save_index(records, outputs, tmp, say)
            artifacts["index"] = "index"
            thumbs = (np.clip(patches[:, 0, patches.shape[2] // 2], 0, 1) * 255).astype(np.uint8)
            np.save(tmp / "index_thumbnails.npy", thumbs, allow_pickle=False)
            (tmp / "index_thumbnail_ids.txt").write_text("\n".join(r.id for r in records))
            artifacts["index_thumbnails"] = "index_thumbnails.npy"
            artifacts["index_thumbnail_ids"] = "index_thumbnail_ids.txt"
        if model_card is not None:
            card = Path(model_card).read_text()
            if "index" in extra:
                ix = extra["index"]
                scores = ", ".join(f"{k} {_auc(v['auc'])}" for k, v in ix["evaluation"].items())
                card += f"\n## Similar-nodule index\n\n{ix['entries']} nodules; vector: **{ix['kind']}**, the better by retrieval AUC ({scores}; {ix['evaluation_note']}).\n"
            (tmp / "MODEL_CARD.md").write_text(card)
            artifacts["model_card"] = "MODEL_CARD.md"
        # mkdtemp makes the folders private; a shipped bundle must be readable by every user.
        for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        write_manifest(tmp, artifacts, extra)
        load_bundle(tmp)  # verify before it replaces anything
    return out_dir


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _choose_and_save_index(
    records: list[Any], outputs: dict[str, np.ndarray], tmp: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    from nodule_edge.index import evaluate_retrieval

    labelled = [i for i, r in enumerate(records) if r.label is not None]
    if not labelled:
        raise BundleError("the index manifest has no labelled nodules: cannot evaluate retrieval")
    evaluations = {}
    from nodule_edge.index import vector_for

    for kind in ("attributes", "machine_expert"):
        vectors = np.stack(
            [
                vector_for(kind, outputs["attributes"][i], float(outputs["malignancy_probability"][i]))
                for i in range(len(records))
            ]
        )
        # Leave-one-patient-out: a query never retrieves its own patient's other nodules.
        ev = evaluate_retrieval(
            kind,
            vectors,
            [r.label for r in records],
            [r.id for r in records],
            k=20,
            groups=[r.patient_id for r in records],
        )
        evaluations[kind] = ev
        say(
            f"retrieval ({kind}): leave-one-patient-out AUC {ev.auc:.3f}, accuracy {ev.accuracy:.3f} (index nodules, model outputs)"
        )
    best = max(evaluations, key=lambda k: evaluations[k].auc or 0.0)
    index_from_predictions(records, outputs, best).save(tmp / "index")
    return {
        "kind": best,
        "entries": len(records),
        "evaluation": {
            k: {"auc": v.auc, "accuracy": v.accuracy, "n_evaluated": v.n_evaluated} for k, v in evaluations.items()
        },
        "evaluation_note": "leave-one-patient-out over the index nodules with the shipped model's outputs (the model was trained on them: optimistic)",
    }

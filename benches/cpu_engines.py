"""CPU engine candidates compared: accuracy against fp32 ONNX Runtime, and interleaved timing.

The harness behind the README's "The fast CPU engine" table (``docs/measurements/
cpu_engine_compare.json``) and ``benches/bench_engines.py``: ONNX Runtime settings, the static INT8
artifact (:mod:`nodule_edge.export.int8`), OpenVINO fp32/bf16/INT8 and ONNX Runtime's OpenVINO
execution provider, each a :class:`Candidate` loaded as a
:class:`~nodule_edge.runtime.engines.base.CpuEngine`. Run it from the repository root::

    python -m benches.cpu_engines compare nodule_edge/assets/bundle/model.onnx \\
        --voi-dir ../shared/data/lidc_voi --int8 nodule_edge/assets/bundle/model.int8.onnx --timing-rounds 0
    python -m benches.cpu_engines time nodule_edge/assets/bundle/model.onnx --int8 nodule_edge/assets/bundle/model.int8.onnx
    python -m benches.cpu_engines build nodule_edge/assets/bundle/model.onnx OUT_DIR

Real LIDC patches (:func:`load_lidc_patches`) need the training extra's data module (SimpleITK,
not torch).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nodule_edge._files import write_json_atomic
from nodule_edge.data_paths import lidc_voi_dir
from nodule_edge.errors import EngineError
from nodule_edge.export.int8 import build_cpu_engine
from nodule_edge.metrics import roc_auc
from nodule_edge.outline import runtime_finish
from nodule_edge.patch import run_nodule_bounded
from nodule_edge.runtime.engines.base import CpuEngine, check_first_pass, default_threads, metadata_from_props
from nodule_edge.runtime.engines.onnxruntime import load_ort_model, session_options_for
from nodule_edge.runtime.engines.openvino import Precision, load_cpu_engine, openvino_available

__all__ = ["CANDIDATES", "Candidate", "compare_engines", "load_lidc_patches", "main", "time_candidates"]

log = logging.getLogger(__name__)

_CAL_SEED = 0


def _onnxruntime_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@dataclass(frozen=True)
class Candidate:
    """One way of running the model on the CPU.

    Attributes:
        name: Short name used in tables and benchmarks.
        artifact: ``"fp32"`` (the exported model) or ``"int8"`` (:func:`build_cpu_engine`).
        backend: ``"onnxruntime"``, ``"openvino"`` or ``"ort-openvino-ep"`` (ONNX Runtime's
            OpenVINO execution provider, from the ``onnxruntime-openvino`` wheel).
        precision: Floating-point precision hint (OpenVINO only).
        optimization: ONNX Runtime graph optimisation level.
        threads: Intra-op threads (None: one per core).
        spinning: ONNX Runtime worker-thread spinning.
    """

    name: str
    artifact: Literal["fp32", "int8"]
    backend: Literal["onnxruntime", "openvino", "ort-openvino-ep"]
    precision: Precision = "f32"
    optimization: Literal["basic", "extended", "all"] = "all"
    threads: int | None = None
    spinning: bool = True

    def unavailable_reason(self) -> str | None:
        """Why this candidate cannot run here, or None when it can."""
        if self.backend == "openvino" and not openvino_available():
            return "openvino is not installed (pip install 'nodule-edge[openvino]')"
        if self.backend == "ort-openvino-ep" and "OpenVINOExecutionProvider" not in _onnxruntime_providers():
            return "this onnxruntime has no OpenVINOExecutionProvider (needs the onnxruntime-openvino wheel, which replaces onnxruntime)"
        return None

    def load(self, model_path: str | Path, segmentation_pass: bool = True) -> CpuEngine:
        """Load the candidate's engine from the artifact at ``model_path`` (with OpenVINO also the
        graph cut to its segmentation, unless ``segmentation_pass`` is false)."""
        if self.backend == "ort-openvino-ep":
            return _load_ort_openvino_ep(Path(model_path), self.threads, self.precision)
        if self.backend == "onnxruntime":
            options = session_options_for(self.threads, optimization=self.optimization, spinning=self.spinning)
            return load_ort_model(Path(model_path), options)
        # The runtime's first pass runs the graph cut to the segmentation (CpuFastEngine).
        return load_cpu_engine(
            model_path,
            backend=self.backend,
            threads=self.threads,
            precision=self.precision,
            segmentation_pass=segmentation_pass,
        )


def _load_ort_openvino_ep(path: Path, threads: int | None, precision: Precision) -> CpuEngine:
    provider_options: dict[str, str] = {"device_type": "CPU", "num_of_threads": str(threads or default_threads())}
    if precision == "bf16":
        provider_options["load_config"] = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})
    else:
        provider_options["precision"] = "FP32"
    engine = load_ort_model(
        path, session_options_for(threads), [("OpenVINOExecutionProvider", provider_options), "CPUExecutionProvider"]
    )
    engine.backend = "ort-openvino-ep"
    engine.precision = precision
    return engine


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("ort-fp32", "fp32", "onnxruntime"),
    Candidate("ort-fp32-basic", "fp32", "onnxruntime", optimization="basic"),
    Candidate("ort-fp32-extended", "fp32", "onnxruntime", optimization="extended"),
    Candidate("ort-fp32-1thread", "fp32", "onnxruntime", threads=1),
    Candidate("ort-fp32-nospin", "fp32", "onnxruntime", spinning=False),
    Candidate("ort-int8", "int8", "onnxruntime"),
    Candidate("ort-int8-extended", "int8", "onnxruntime", optimization="extended"),
    Candidate("openvino-fp32", "fp32", "openvino"),
    Candidate("openvino-bf16", "fp32", "openvino", precision="bf16"),
    Candidate("openvino-int8", "int8", "openvino"),
    Candidate("openvino-int8-bf16", "int8", "openvino", precision="bf16"),
    Candidate("ortov-ep-bf16", "fp32", "ort-openvino-ep", precision="bf16"),
    Candidate("ortov-ep-int8", "int8", "ort-openvino-ep"),
)
"""Every candidate the benchmark and :func:`compare_engines` know; the first is the reference."""

_REFERENCE = "ort-fp32"
_DEFAULT_COMPARE = (
    "ort-fp32",
    "ort-int8",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
    "openvino-int8-bf16",
    "ortov-ep-bf16",
    "ortov-ep-int8",
)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation; 1 where both rows are constant and equal, 0 where one is."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    flat_a, flat_b = (a * a).sum(axis=1) == 0, (b * b).sum(axis=1) == 0
    out = np.divide(num, den, out=np.zeros(len(a)), where=den > 0)
    out[flat_a & flat_b] = 1.0
    return out


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide((a * b).sum(axis=1), den, out=np.ones(len(a)), where=den > 0)


def _run_all(
    engine: CpuEngine, patches: np.ndarray, batch: int, first_pass: CpuEngine | None = None
) -> dict[str, np.ndarray]:
    """Every output on the runtime's path: with a nodule box in the model's patch spec the first
    pass bounds the cube and the second pass answers, each engine with its own first pass (as
    ``nodule-edge infer`` runs it): the bundle's box net on the same library when the model has
    one beside it (``first_pass.onnx``), else the model's own segmentation."""
    metadata = metadata_from_props(engine.metadata)
    spec, finish = metadata.patch_spec, runtime_finish(metadata.patch_spec, metadata.outline_head)
    segment = engine.segment if first_pass is None else (lambda x: first_pass.run(x)["segmentation"])
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(patches), batch):
        out, _ = run_nodule_bounded(
            engine.run,
            np.asarray(patches[start : start + batch], dtype=np.float32),
            spec,
            segment=segment,
            finish=finish,
        )
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


def _accuracy(
    outputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: np.ndarray | None,
    ratings: np.ndarray | None,
) -> dict[str, float]:
    stats: dict[str, float] = {}
    if labels is not None:
        known = labels >= 0
        stats["auc"] = roc_auc(labels[known], outputs["malignancy_probability"][known])
        stats["auc_delta"] = stats["auc"] - roc_auc(labels[known], reference["malignancy_probability"][known])
    if ratings is not None:
        rated = np.isfinite(ratings).all(axis=1)
        mae = float(np.abs(outputs["attributes"][rated] - ratings[rated]).mean())
        ref_mae = float(np.abs(reference["attributes"][rated] - ratings[rated]).mean())
        stats["attribute_mae"] = mae
        stats["attribute_mae_delta"] = mae - ref_mae
    cam = _pearson_rows(outputs["saliency"], reference["saliency"])
    stats["cam_pearson_mean"] = float(cam.mean())
    stats["cam_pearson_min"] = float(cam.min())
    stats["malignancy_max_abs"] = float(
        np.abs(outputs["malignancy_probability"] - reference["malignancy_probability"]).max()
    )
    stats["attributes_max_abs"] = float(np.abs(outputs["attributes"] - reference["attributes"]).max())
    seg, ref_seg = outputs["segmentation"] >= 0.5, reference["segmentation"] >= 0.5
    inter = (seg & ref_seg).reshape(len(seg), -1).sum(axis=1)
    total = seg.reshape(len(seg), -1).sum(axis=1) + ref_seg.reshape(len(seg), -1).sum(axis=1)
    stats["segmentation_dice_vs_ref_min"] = float(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0).min())
    for name in ("nodule_attention", "background_attention"):
        stats[f"{name}_max_abs"] = float(np.abs(outputs[name] - reference[name]).max())
    stats["embedding_cosine_min"] = float(_cosine_rows(outputs["embedding"], reference["embedding"]).min())
    return stats


def _time_round_robin(
    engines: dict[str, CpuEngine], patches: np.ndarray, batch: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median and minimum ms per patch, candidates interleaved so background load hits all alike."""
    x = np.ascontiguousarray(patches[:batch], dtype=np.float32)
    if len(x) < batch:
        x = np.concatenate([x] * (batch // len(x) + 1))[:batch]
    for engine in engines.values():
        for _ in range(2):
            engine.run(x)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.run(x)
            times[name].append((time.perf_counter() - start) * 1000.0 / batch)
    return {name: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v))} for name, v in times.items()}


def _timing_table(
    engines: dict[str, CpuEngine], patches: np.ndarray, batches: Iterable[int], rounds: int
) -> dict[str, dict[str, float]]:
    """``b{N}_median_ms``, ``b{N}_min_ms`` (per patch) and ``b{N}_ratio`` (to the reference) per engine."""
    table: dict[str, dict[str, float]] = {name: {} for name in engines}
    for size in batches:
        timings = _time_round_robin(engines, patches, size, rounds)
        ref_ms = timings[_REFERENCE]["median_ms"]
        for name, t in timings.items():
            table[name][f"b{size}_median_ms"] = t["median_ms"]
            table[name][f"b{size}_min_ms"] = t["min_ms"]
            table[name][f"b{size}_ratio"] = t["median_ms"] / ref_ms
    return table


def time_candidates(
    onnx_path: str | Path,
    int8_path: str | Path,
    candidates: Iterable[str] | None = None,
    batches: Sequence[int] = (1, 8),
    rounds: int = 10,
) -> dict[str, Any]:
    """Latency of candidates, interleaved round by round, with ratios to ``ort-fp32``.

    Args:
        onnx_path: The fp32 model.
        int8_path: The INT8 model from :func:`build_cpu_engine`.
        candidates: Names from :data:`CANDIDATES` (default: all); unavailable ones are skipped.
        batches: Batch sizes to time.
        rounds: Rounds per batch size.

    Returns:
        ``{"reference": ..., "candidates": {name: {"b1_median_ms": ..., "b1_min_ms": ...,
        "b1_ratio": ...}}, "skipped": {name: reason}}``, times in ms per patch.
    """
    by_name = {c.name: c for c in CANDIDATES}
    names = [_REFERENCE] + [n for n in (candidates or by_name) if n != _REFERENCE]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise EngineError(f"unknown CPU engine candidates {unknown}; known: {sorted(by_name)}")
    skipped = {n: reason for n in names if (reason := by_name[n].unavailable_reason())}
    artifacts = {"fp32": Path(onnx_path), "int8": Path(int8_path)}
    engines = {n: by_name[n].load(artifacts[by_name[n].artifact]) for n in names if n not in skipped}
    patches = np.random.default_rng(_CAL_SEED).random((max(batches), 2, 64, 64, 64), dtype=np.float32)
    return {"reference": _REFERENCE, "candidates": _timing_table(engines, patches, batches, rounds), "skipped": skipped}


def compare_engines(
    onnx_path: str | Path,
    patches: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    ratings: np.ndarray | None = None,
    calibration_patches: np.ndarray | None = None,
    candidates: Iterable[str] = _DEFAULT_COMPARE,
    int8_path: str | Path | None = None,
    work_dir: str | Path | None = None,
    batch: int = 8,
    timing_rounds: int = 0,
) -> dict[str, Any]:
    """Compare CPU engines with the fp32 ONNX Runtime reference on the same patches.

    Each engine runs the runtime's path (two passes with a nodule-bounded model, each engine
    bounding the cube by its own first pass), so the accuracy columns are what a user of that
    backend gets.

    Accuracy: AUC and attribute MAE (vs reader means) and their change from the reference;
    per-patch Pearson correlation of the saliency (CAM) maps with the reference; largest absolute
    changes of the other outputs; segmentation Dice vs the reference at 0.5; embedding cosine.
    Timing (``timing_rounds`` > 0): ms per patch at batch 1 and ``batch``, all candidates
    interleaved round by round so a busy machine slows them alike (read the ratios).

    Args:
        onnx_path: The fp32 model.
        patches: Evaluation patches ``[N, 2, 64, 64, 64]``.
        labels: Binary labels per patch (-1 = unknown), for AUC.
        ratings: Reader-mean ratings ``[N, 6]`` on the 1–5 scale (NaN rows = unknown), for MAE.
        calibration_patches: Patches for building the INT8 model (disjoint from ``patches``);
            needed unless ``int8_path`` is given or no INT8 candidate is asked for.
        candidates: Names from :data:`CANDIDATES`; unavailable ones are reported as skipped.
        int8_path: An already built INT8 model to use instead of building one.
        work_dir: Where to build the INT8 model (default: a temporary folder).
        batch: Batch size for the accuracy runs and the batched timing.
        timing_rounds: Interleaved timing rounds per batch size (0: no timing).

    Returns:
        ``{"reference": name, "n": count, "candidates": {name: stats}, "skipped": {name: reason}}``.
    """
    by_name = {c.name: c for c in CANDIDATES}
    names = [_REFERENCE] + [n for n in candidates if n != _REFERENCE]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise EngineError(f"unknown CPU engine candidates {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in names]
    skipped = {c.name: reason for c in chosen if (reason := c.unavailable_reason())}
    chosen = [c for c in chosen if c.name not in skipped]
    if labels is not None:
        labels = np.asarray(labels)
    if ratings is not None:
        ratings = np.asarray(ratings, dtype=np.float64)

    tmp_dir = None
    artifacts: dict[str, Path] = {"fp32": Path(onnx_path)}
    try:
        if any(c.artifact == "int8" for c in chosen):
            if int8_path is not None:
                artifacts["int8"] = Path(int8_path)
            else:
                if work_dir is None:
                    tmp_dir = tempfile.mkdtemp(prefix="nodule-edge-cpu-engine-")
                    work_dir = tmp_dir
                artifacts["int8"] = build_cpu_engine(onnx_path, work_dir, calibration_patches)
        engines = {c.name: c.load(artifacts[c.artifact]) for c in chosen}
        # The bundle's box net runs in fp32 on each candidate's library and precision, as the
        # engines run it (the INT8 engines too: README, "The model and its patch"), and only
        # beside the model it was exported for (the engines' own check).
        box_net = Path(onnx_path).with_name("first_pass.onnx")
        first = {c.name: c.load(box_net, segmentation_pass=False) for c in chosen} if box_net.is_file() else {}
        for name, first_pass in first.items():
            check_first_pass(metadata_from_props(engines[name].metadata), first_pass.metadata, box_net)
        reference = _run_all(engines[_REFERENCE], patches, batch, first.get(_REFERENCE))
        results: dict[str, dict[str, float]] = {}
        for name, engine in engines.items():
            outputs = reference if name == _REFERENCE else _run_all(engine, patches, batch, first.get(name))
            results[name] = _accuracy(outputs, reference, labels, ratings)
            log.info("%s: %s", name, json.dumps({k: round(v, 4) for k, v in results[name].items()}))
        if timing_rounds > 0:
            for name, timing in _timing_table(engines, patches, sorted({1, batch}), timing_rounds).items():
                results[name].update(timing)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"reference": _REFERENCE, "n": int(len(patches)), "candidates": results, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# Real LIDC patches and the command line
# --------------------------------------------------------------------------------------------


def load_lidc_patches(
    voi_dir: str | Path,
    cache_dir: str | Path | None,
    n_eval: int = 150,
    n_calibration: int = 32,
    seed: int = _CAL_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint evaluation and calibration patches from the LIDC VOIs, split by patient.

    Evaluation nodules have a proxy label (mean malignancy ≠ 3), so AUC uses all of them;
    calibration nodules come from other patients. Needs the training extra's data module
    (SimpleITK) but not torch.

    Returns:
        ``(eval_patches, labels int, ratings float [n, 6], calibration_patches)``; patches stay
        float16 as cached (engines and the calibration reader convert batch by batch).
    """
    from nodule_edge.train.data import build_patch_cache, read_unsure_manifest

    records = read_unsure_manifest(voi_dir)
    cache = build_patch_cache(records, cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    patients = sorted({r.patient_id for r in records})
    rng.shuffle(patients)
    eval_idx: list[int] = []
    cal_idx: list[int] = []
    cal_patients: set[str] = set()
    by_patient: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_patient.setdefault(rec.patient_id, []).append(i)
    for patient in patients:
        idx = by_patient[patient]
        if len(cal_idx) < n_calibration:
            cal_idx.extend(idx)
            cal_patients.add(patient)
        elif len(eval_idx) < n_eval:
            eval_idx.extend(i for i in idx if records[i].label is not None)
    eval_idx, cal_idx = eval_idx[:n_eval], cal_idx[:n_calibration]
    if len(eval_idx) < n_eval:
        raise EngineError(
            f"only {len(eval_idx)} labelled nodules available for evaluation in {voi_dir}, asked for {n_eval}"
        )
    labels = np.array([records[i].label for i in eval_idx], dtype=np.int64)
    ratings = np.array(
        [records[i].ratings if records[i].ratings is not None else (np.nan,) * 6 for i in eval_idx], dtype=np.float64
    )
    return cache.images[eval_idx], labels, ratings, cache.images[cal_idx]


def _format_table(report: dict[str, Any]) -> str:
    cols = [
        ("b1_median_ms", "b1 ms", "{:.1f}"),
        ("b1_ratio", "b1 ×fp32", "{:.2f}"),
        ("b8_median_ms", "b8 ms/patch", "{:.1f}"),
        ("b8_ratio", "b8 ×fp32", "{:.2f}"),
        ("auc_delta", "ΔAUC", "{:+.4f}"),
        ("attribute_mae_delta", "ΔMAE", "{:+.4f}"),
        ("cam_pearson_mean", "CAM r mean", "{:.4f}"),
        ("cam_pearson_min", "CAM r min", "{:.4f}"),
        ("malignancy_max_abs", "max|Δp|", "{:.4f}"),
        ("embedding_cosine_min", "emb cos min", "{:.4f}"),
    ]
    lines = ["| candidate | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, stats in report["candidates"].items():
        cells = [fmt.format(stats[key]) if key in stats else "–" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in report["skipped"].items():
        lines.append(f"| {name} | skipped: {reason} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benches.cpu_engines {build,compare,time} ...``."""
    parser = argparse.ArgumentParser(prog="python -m benches.cpu_engines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "compare", "time"):
        p = sub.add_parser(name)
        p.add_argument("onnx", type=Path, help="the fp32 model.onnx")
        p.add_argument(
            "--voi-dir",
            type=Path,
            default=None,
            help="LIDC VOI folder (default: $NODULE_EDGE_DATA/lidc_voi, else ../shared/data/lidc_voi)",
        )
        p.add_argument("--cache-dir", type=Path, default=Path("cache"), help="patch cache folder")
        p.add_argument("--calibration", type=int, default=32, help="calibration patches")
        p.add_argument("-v", "--verbose", action="store_true")
    sub.choices["build"].add_argument("out_dir", type=Path)
    cmp = sub.choices["compare"]
    cmp.add_argument("-n", type=int, default=150, help="evaluation patches (labelled)")
    cmp.add_argument("--int8", type=Path, default=None, help="use this INT8 model instead of building one")
    cmp.add_argument("--work-dir", type=Path, default=None, help="keep the built INT8 model here")
    cmp.add_argument("--candidates", default=",".join(_DEFAULT_COMPARE), help="comma-separated candidate names")
    cmp.add_argument("--timing-rounds", type=int, default=10, help="interleaved timing rounds (0: accuracy only)")
    cmp.add_argument("--json", type=Path, default=None, help="also write the report here")
    timing = sub.choices["time"]
    timing.add_argument("--int8", type=Path, required=True, help="the INT8 model (from 'build')")
    timing.add_argument(
        "--candidates", default=",".join(c.name for c in CANDIDATES), help="comma-separated candidate names"
    )
    timing.add_argument("--rounds", type=int, default=10, help="interleaved rounds per batch size")
    timing.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = parser.parse_args(argv)
    if args.command == "time":
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        report = time_candidates(
            args.onnx,
            args.int8,
            [c for c in args.candidates.split(",") if c],
            [int(b) for b in args.batches.split(",")],
            args.rounds,
        )
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    patches, labels, ratings, calibration = load_lidc_patches(
        args.voi_dir or lidc_voi_dir(),
        args.cache_dir,
        n_eval=getattr(args, "n", 0) or 0,
        n_calibration=args.calibration,
    )
    if args.command == "build":
        sys.stdout.write(f"{build_cpu_engine(args.onnx, args.out_dir, calibration)}\n")
        return 0
    report = compare_engines(
        args.onnx,
        patches,
        labels=labels,
        ratings=ratings,
        calibration_patches=calibration,
        candidates=[c for c in args.candidates.split(",") if c],
        int8_path=args.int8,
        work_dir=args.work_dir,
        timing_rounds=args.timing_rounds,
    )
    if args.json is not None:
        write_json_atomic(args.json, report)
    sys.stdout.write(_format_table(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

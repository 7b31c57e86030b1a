"""Turn a pytest-benchmark JSON into the ratios that matter, and gate CI on them.

Each ratio is ours ÷ reference, both medians from the same run (lower is better), so that a
shared, noisy CI machine can still say whether a change made something slower relative to what
it is judged against.

Usage:
    python benches/ratios.py RESULTS.json                       # print the table
    python benches/ratios.py RESULTS.json --baseline benches/baseline_ratios.json   # gate
    python benches/ratios.py RESULTS.json --write-baseline benches/baseline_ratios.json

Refreshing the baseline on purpose (after an intended change, on a quiet machine): run
``make bench`` twice, check the table, then ``--write-baseline``, and commit the file with the
reason in the commit message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

#: (label, ours, reference): each side is (test function, substring of the parametrisation id).
RATIOS: list[tuple[str, tuple[str, str], tuple[str, str]]] = [
    (
        "front end, 300-slice uncompressed: open+patch / naive",
        ("test_open_and_patch", "synthetic"),
        ("test_naive", "synthetic"),
    ),
    (
        "front end, real JPEG Lossless chest: open+patch / naive",
        ("test_open_and_patch", "chest"),
        ("test_naive", "chest"),
    ),
    (
        "front end: ROI patch / whole read + patch (uncompressed)",
        ("test_roi_patch", "synthetic"),
        ("test_whole_read_patch", "synthetic"),
    ),
    (
        "header scan, real chest: dicomsdl / pydicom",
        ("test_header_reader", "dicomsdl"),
        ("test_header_reader", "pydicom"),
    ),
    (
        "ROI decode, real chest: imagecodecs / GDCM",
        ("test_decode_roi_slices", "imagecodecs"),
        ("test_decode_roi_slices", "gdcm"),
    ),
    (
        "ROI decode, real chest: imagecodecs / pydicom",
        ("test_decode_roi_slices", "imagecodecs"),
        ("test_decode_roi_slices", "pydicom"),
    ),
    (
        "index query 1k: hnsw / exact numpy",
        ("test_hnsw_query_latency", "n=1000]"),
        ("test_exact_numpy_query_latency", "n=1000]"),
    ),
    (
        "index query 100k: hnsw / exact numpy",
        ("test_hnsw_query_latency", "n=100000]"),
        ("test_exact_numpy_query_latency", "n=100000]"),
    ),
    (
        "index query 1M: hnsw / exact numpy",
        ("test_hnsw_query_latency", "n=1000000]"),
        ("test_exact_numpy_query_latency", "n=1000000]"),
    ),
    ("engine batch 1: fast CPU / ONNX Runtime fp32", ("test_engine", "cpu-fast-1"), ("test_engine", "cpu-1")),
    ("engine batch 8: fast CPU / ONNX Runtime fp32", ("test_engine", "cpu-fast-8"), ("test_engine", "cpu-8")),
    (
        "engine, runtime path (first pass + pass) / one pass (cpu-fast, batch 1)",
        ("test_engine_runtime_path", "bundle"),
        ("test_engine", "cpu-fast-1"),
    ),
    (
        "engine, runtime path: the bundle's first pass / full-graph first pass",
        ("test_engine_runtime_path", "bundle"),
        ("test_engine_runtime_path", "full_graph"),
    ),
    (
        "engine, first pass: box net / segmentation graph (cpu-fast, batch 1)",
        ("test_first_pass_network", "box_net"),
        ("test_first_pass_network", "segmentation_graph"),
    ),
    (
        "Grad-CAM outputs: all / without saliency (fp32)",
        ("test_gradcam_extra_cost", "all"),
        ("test_gradcam_extra_cost", "without_gradcam"),
    ),
    (
        "end to end, real chest study: in-process / naive (torch eager + autograd CAM)",
        ("test_e2e_inprocess", ""),
        ("test_e2e_naive", ""),
    ),
    ("CLI cold start / in-process end to end", ("test_cli_cold_start", ""), ("test_e2e_inprocess", "")),
    ("output writing / in-process end to end", ("test_write_outputs", ""), ("test_e2e_inprocess", "")),
    (
        "infer-batch, 20 real nodules: one batch run / 20 infer runs",
        ("test_infer_batch", ""),
        ("test_infer_separate_runs", ""),
    ),
    (
        "occlusion (defaults) / Grad-CAM path, median LIDC nodule",
        ("test_occlusion", "median"),
        ("test_gradcam_path", "median"),
    ),
    (
        "occlusion (defaults) / Grad-CAM path, large LIDC nodule",
        ("test_occlusion", "large"),
        ("test_gradcam_path", "large"),
    ),
    (
        "training step (full bench): now / before the nodule-bounded model",
        ("test_training_step", "now"),
        ("test_training_step", "before"),
    ),
    (
        "training step (full bench): wide (shipped until 2026-12-05) / before the nodule-bounded model",
        ("test_training_step", "wide"),
        ("test_training_step", "before"),
    ),
]
#: A ratio may grow by this factor over the baseline before CI fails (shared, noisy machines;
#: single-round references such as the naive pipeline vary by tens of percent between runs).
TOLERANCE = 2.0
#: Ratios whose reference takes less than this are reported but not gated: at microseconds,
#: Python overhead and scheduling noise dominate.
MIN_GATED_REFERENCE_MS = 1.0


def _find(benchmarks: list[dict], test: str, param: str) -> dict | None:
    for bench in benchmarks:
        name = bench["name"]
        base, _, rest = name.partition("[")
        if base == test and (param in "[" + rest if param else not rest):
            return bench
    return None


def compute(results: dict) -> dict[str, dict[str, float]]:
    """Ratios present in a benchmark run (label → ours, reference, ratio; medians in ms)."""
    out: dict[str, dict[str, float]] = {}
    for label, (t_ours, p_ours), (t_ref, p_ref) in RATIOS:
        ours = _find(results["benchmarks"], t_ours, p_ours)
        ref = _find(results["benchmarks"], t_ref, p_ref)
        if ours is None or ref is None:
            continue
        o, r = ours["stats"]["median"] * 1000, ref["stats"]["median"] * 1000
        # A ratio whose side runs in a precision the CPU decides (cpu-fast: bf16 with native bf16,
        # else f32) is its own ratio per precision, with its own baseline.
        precision = (ours.get("extra_info") or {}).get("precision")
        key = f"{label} [{precision}]" if precision else label
        out[key] = {"ours_ms": round(o, 3), "reference_ms": round(r, 3), "ratio": round(o / r, 4)}
    return out


def table(ratios: dict[str, dict[str, float]], results: dict) -> str:
    machine = results.get("machine_info", {})
    lines = [
        f"Measured on {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, {machine.get('cpu', {}).get('count', '?')} cores, {results.get('datetime', '')[:10]}",
        "",
        "| comparison | ours (median ms) | reference (median ms) | ratio | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in ratios.items():
        lines.append(
            f"| {label} | {r['ours_ms']:.2f} | {r['reference_ms']:.2f} | {r['ratio']:.3f} | {1 / r['ratio']:.1f}× |"
        )
    return "\n".join(lines)


def gate(ratios: dict[str, dict[str, float]], baseline: dict[str, float], tolerance: float) -> list[str]:
    """Ratios that regressed past ``tolerance`` × baseline (missing ones are reported, not failed)."""
    failures = []
    for label, base in baseline.items():
        if label not in ratios:
            print(
                f"note: '{label}' was not measured in this run (skipped, or run in another precision)", file=sys.stderr
            )
            continue
        if ratios[label]["reference_ms"] < MIN_GATED_REFERENCE_MS:
            print(f"note: '{label}' not gated (reference under {MIN_GATED_REFERENCE_MS} ms)", file=sys.stderr)
            continue
        now = ratios[label]["ratio"]
        if not math.isfinite(now) or now > base * tolerance:
            failures.append(f"{label}: ratio {now:.3f} > baseline {base:.3f} × {tolerance}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--baseline", type=Path, help="fail when a ratio regresses past the tolerance")
    parser.add_argument("--write-baseline", type=Path, help="write the measured ratios as the new baseline")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    ratios = compute(results)
    print(table(ratios, results))
    ratios_path = args.results.with_name(args.results.stem + "_ratios.json")
    ratios_path.write_text(json.dumps(ratios, indent=2))
    if args.write_baseline:
        args.write_baseline.write_text(json.dumps({k: v["ratio"] for k, v in ratios.items()}, indent=2) + "\n")
        print(f"baseline written to {args.write_baseline}")
    if args.baseline:
        failures = gate(ratios, json.loads(args.baseline.read_text()), args.tolerance)
        if failures:
            print("latency regressions:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
        print(f"all ratios within {args.tolerance}× of the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())

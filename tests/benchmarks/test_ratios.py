"""The CI latency gate (benches/ratios.py): ratios from one run, gated against a baseline."""

from __future__ import annotations

import json
from pathlib import Path

from benches.ratios import compute, gate

BASELINE = Path(__file__).resolve().parents[2] / "benches" / "baseline_ratios.json"
LABEL = "engine batch 1: fast CPU / ONNX Runtime fp32"


def _run(fast_ms: float, reference_ms: float, precision: str) -> dict:
    def bench(name: str, ms: float, extra: dict) -> dict:
        return {"name": name, "stats": {"median": ms / 1000}, "extra_info": extra}

    return {
        "benchmarks": [
            bench("test_engine[cpu-fast-1]", fast_ms, {"precision": precision}),
            bench("test_engine[cpu-1]", reference_ms, {"precision": "f32"}),
        ]
    }


def test_the_fast_engine_is_judged_against_the_baseline_of_the_precision_it_ran_in() -> None:
    baseline = json.loads(BASELINE.read_text())
    assert {f"{LABEL} [bf16]", f"{LABEL} [f32]"} <= set(baseline)
    # An f32-only CPU (no avx512_bf16 or AMX): 0.74 is its own normal, not a bf16 regression.
    f32 = compute(_run(72.5, 98.4, "f32"))
    assert set(f32) == {f"{LABEL} [f32]"}
    assert gate(f32, baseline, 2.0) == []
    # The same ratio with bf16 is far past the bf16 baseline.
    bf16 = compute(_run(72.5, 98.4, "bf16"))
    (failure,) = gate(bf16, baseline, 2.0)
    assert failure.startswith(f"{LABEL} [bf16]: ratio 0.737")
    # And a slower f32 engine fails the f32 baseline.
    assert gate(compute(_run(160.0, 98.4, "f32")), baseline, 2.0) != []

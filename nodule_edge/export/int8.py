"""The INT8 CPU artifact: a static INT8 (QDQ) ONNX model that ONNX Runtime and OpenVINO both run.

Measured on this project's 2-core AMD EPYC (Zen 5: avx512_bf16 and avx512_vnni, no AMX) against
the fp32 ONNX Runtime session, the reference and fallback (README, "The fast CPU engine";
``benches/bench_engines.py``; ``python -m benches.cpu_engines compare|time``):

* 3D convolutions are ~92 % of the fp32 time. ONNX Runtime's graph levels, thread counts and
  spinning barely move it (its NCHWc layout transformer is 2D-only); only lower precision helps.
* ORT's static INT8 QLinearConv (QDQ, fused at ``ORT_ENABLE_EXTENDED`` and above; at ``BASIC``
  the QDQ graph runs in fp32 and is no faster) makes the whole model ~3x cheaper (0.34x the fp32
  CPU time), but only once the 2-channel 7³ stem stays fp32: MLAS's INT8 im2col path is ~6x
  *slower* than fp32 there. Convolutions with fewer than 16 input or output channels therefore
  stay fp32 (:func:`conv_nodes_to_exclude`), and so does everything that is not a Conv (CAM
  arithmetic, normalisations, heads).
* OpenVINO (optional extra ``nodule-edge[openvino]``) runs the same QDQ file with oneDNN's VNNI
  kernels and, on CPUs with native bf16, the fp32 remainder in bf16: 0.24x the fp32 CPU time.

So one artifact, ``model.int8.onnx`` (bundle role ``cpu_engine``, backend ``cpu-int8``), serves
both libraries: the runtime's :func:`~nodule_edge.runtime.engines.openvino.load_cpu_engine` uses
OpenVINO when it is installed and ONNX Runtime otherwise. The quantised file keeps the fp32
file's ``metadata_props`` (the runtime reads its patch spec and output names from the artifact)
and adds ``cpu_engine`` and ``quantization`` entries saying how it was made.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nodule_edge._files import atomic_file, sha256_file
from nodule_edge.errors import EngineError, MissingDependencyError, OutputError, require

__all__ = ["INT8_FILENAME", "MIN_QUANT_CHANNELS", "BuildMethod", "build_cpu_engine", "conv_nodes_to_exclude"]

log = logging.getLogger(__name__)

BuildMethod = Literal["int8"]

INT8_FILENAME = "model.int8.onnx"
# Convolutions with fewer channels than this (in or out, per group) stay fp32: MLAS's INT8
# im2col path is far slower than its fp32 one for the 2-channel 7³ stem (measured), and the
# single-channel CAM/segmentation convolutions are too small to gain anything.
MIN_QUANT_CHANNELS = 16


def conv_nodes_to_exclude(model: Any, min_channels: int = MIN_QUANT_CHANNELS) -> list[str]:
    """Names of the Conv nodes that should stay fp32: fewer than ``min_channels`` in or out.

    Args:
        model: An ``onnx.ModelProto``.
        min_channels: Per-group channel threshold.
    """
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    excluded = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        shape = weights.get(node.input[1])
        if shape is None or shape[0] < min_channels or shape[1] < min_channels:
            excluded.append(node.name)
    return excluded


class _PatchReader:
    """Feeds calibration patches one at a time (batch 1, as the engine mostly runs)."""

    def __init__(self, patches: np.ndarray, input_name: str) -> None:
        self._patches = patches
        self._input_name = input_name
        self._iter: Iterator[int] = iter(range(len(patches)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = next(self._iter, None)
        if index is None:
            return None
        return {self._input_name: np.ascontiguousarray(self._patches[index : index + 1], dtype=np.float32)}

    def rewind(self) -> None:
        self._iter = iter(range(len(self._patches)))


def _check_calibration(patches: np.ndarray | None) -> np.ndarray:
    if patches is None:
        raise EngineError(
            "INT8 quantisation needs calibration patches (real patches, e.g. 32 LIDC patches from "
            "nodule_edge.train.data.build_patch_cache); random data gives wrong activation ranges"
        )
    patches = np.asarray(patches)
    if patches.ndim != 5 or len(patches) == 0:
        raise EngineError(f"calibration patches must be a non-empty [N, C, S, S, S] array, got shape {patches.shape}")
    if not np.isfinite(patches).all():
        raise EngineError("calibration patches contain NaN or infinite values")
    return patches


def build_cpu_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    calibration_patches: np.ndarray | None,
    method: BuildMethod = "int8",
    *,
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax",
    min_channels: int = MIN_QUANT_CHANNELS,
) -> Path:
    """Build the fast CPU engine from the fp32 export.

    ``"int8"``: static INT8 quantisation with ONNX Runtime in QDQ format (uint8 activations,
    per-channel int8 weights, only Conv with at least ``min_channels`` in and out channels), so
    the CAM arithmetic, normalisations and heads stay fp32. ONNX Runtime and OpenVINO both run
    the result.

    Args:
        onnx_path: The fp32 model from :func:`nodule_edge.export.onnx_export.export_onnx`.
        out_dir: Folder for ``model.int8.onnx`` (created; the file is replaced atomically).
        calibration_patches: Real patches ``[N, 2, 64, 64, 64]`` (float16 or float32); 32 suffice.
        method: Engine to build; only ``"int8"`` is offered (OpenVINO needs no other artifact).
        calibration_method: Activation range estimator. MinMax measured as accurate as the others.
        min_channels: Convolutions with fewer channels than this stay fp32.

    Returns:
        Path of the written artifact.

    Raises:
        EngineError: Missing model, unusable calibration patches, or the quantiser failed.
        OutputError: The artifact cannot be written (nothing partial is left).
    """
    onnx = require("onnx", "export")
    quantization = require("onnxruntime.quantization", "export")
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method != "int8":
        raise EngineError(f"unknown CPU engine build method {method!r}; expected 'int8'")
    methods = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "percentile": quantization.CalibrationMethod.Percentile,
        "entropy": quantization.CalibrationMethod.Entropy,
    }
    if calibration_method not in methods:
        raise EngineError(f"unknown calibration method {calibration_method!r}; expected one of {sorted(methods)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EngineError(f"fp32 model {onnx_path} does not exist")
    patches = _check_calibration(calibration_patches)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / INT8_FILENAME

    source = onnx.load(str(onnx_path))
    metadata = {p.key: p.value for p in source.metadata_props}
    input_name = source.graph.input[0].name
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".cpu-engine-", dir=out_dir))
    try:
        prepared = work / "prepared.onnx"
        # Symbolic shape inference cannot follow the exported GroupNorm reshapes; ONNX shape
        # inference and ORT's basic graph clean-up (what the quantiser needs) still run.
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        excluded = conv_nodes_to_exclude(onnx.load(str(prepared)), min_channels)
        quantized = work / "quantized.onnx"
        quantization.quantize_static(
            str(prepared),
            str(quantized),
            _PatchReader(patches, input_name),
            quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=methods[calibration_method],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        metadata["cpu_engine"] = "int8-qdq"
        metadata["quantization"] = json.dumps(
            {
                "format": "QDQ",
                "activations": "uint8 per-tensor",
                "weights": "int8 per-channel",
                "op_types": ["Conv"],
                "fp32_nodes": excluded,
                "calibration_method": calibration_method,
                "calibration_patches": int(len(patches)),
                "onnxruntime": ort.__version__,
                "source_onnx_sha256": sha256_file(onnx_path),
            }
        )
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        with atomic_file(target) as tmp:
            onnx.save(model, str(tmp))
    except (EngineError, MissingDependencyError, OutputError):
        raise
    except Exception as exc:  # the quantiser raises plain exceptions of many kinds
        raise EngineError(f"INT8 quantisation of {onnx_path} failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "built %s from %s in %.1f s (%d calibration patches, %d convs kept fp32)",
        target,
        onnx_path.name,
        time.perf_counter() - start,
        len(patches),
        len(excluded),
    )
    return target

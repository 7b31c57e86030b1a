"""A Triton Inference Server model repository for the exported model.

Layout written by :func:`write_triton_repository`::

    <out>/<model_name>/config.pbtxt          platform "onnxruntime_onnx"
    <out>/<model_name>/1/model.onnx          copy of the ONNX model
    <out>/<model_name>_trt/config.pbtxt      platform "tensorrt_plan"   (only with an engine)
    <out>/<model_name>_trt/1/model.plan      the TensorRT engine
    <out>/<model_name>_trt/1/model.plan.json its sidecar (TensorRT version, GPU, ONNX sha256)

``config.pbtxt`` is the ``ModelConfig`` protobuf in text format (Triton's
``docs/user_guide/model_configuration.md``). Inputs and outputs are read from the ONNX graph, not
hard-coded. With ``max_batch_size > 0`` Triton adds the batch dimension itself, so ``dims`` leave
it out; a tensor whose only dimension is the batch (``malignancy_probability`` is ``[N]``) is
declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }`` because Triton does not allow empty dims.
The text is rendered here rather than with ``tritonclient``'s ``model_config_pb2``: that package
pins an older protobuf than the one ``onnx`` brings, and the subset needed is small.

A TensorRT plan only loads in a Triton whose TensorRT version and GPU match the build (see
:mod:`nodule_edge.export.tensorrt`); its sidecar (:class:`~nodule_edge.runtime.engines.tensorrt_sidecar.EngineSidecar`) says which.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodule_edge._files import sha256_file, swap_folder
from nodule_edge.errors import ConfigError, EngineError, OutputError, require

__all__ = [
    "ONNX_PLATFORM",
    "TENSORRT_PLATFORM",
    "TritonTensor",
    "TritonRepository",
    "triton_tensors_from_onnx",
    "render_config_pbtxt",
    "write_triton_repository",
]

log = logging.getLogger(__name__)

ONNX_PLATFORM = ("onnxruntime_onnx", "onnxruntime", "model.onnx")
"""(platform, backend, default model file) of Triton's ONNX Runtime backend."""
TENSORRT_PLATFORM = ("tensorrt_plan", "tensorrt", "model.plan")
"""(platform, backend, default model file) of Triton's TensorRT backend."""

_INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

# onnx.TensorProto.DataType name → Triton DataType (model_config.proto).
_ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "STRING": "TYPE_STRING",
}


@dataclass(frozen=True)
class TritonTensor:
    """One input or output as Triton sees it.

    Attributes:
        name: Tensor name (same in the ONNX graph and the TensorRT engine).
        data_type: Triton data type, e.g. ``"TYPE_FP32"``.
        dims: Shape without the batch dimension when the model batches; ``-1`` for a dynamic
            dimension.
        reshape: Shape the backend sees when it differs from ``dims`` (``()`` for a tensor
            that is only the batch dimension); ``None`` for no reshape.
    """

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TritonRepository:
    """What :func:`write_triton_repository` wrote.

    Attributes:
        root: The model repository folder (pass it to ``tritonserver --model-repository``).
        onnx_model: Folder of the ONNX Runtime model.
        tensorrt_model: Folder of the TensorRT model, or ``None``.
        inputs: Inputs as declared in both configs.
        outputs: Outputs as declared in both configs.
    """

    root: Path
    onnx_model: Path
    tensorrt_model: Path | None
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]


def _tensor(value_info: Any, batched: bool, onnx: Any, source: str) -> TritonTensor:
    name = value_info.name
    if not _SAFE_NAME.match(name):
        raise ConfigError(
            f"{source}: tensor name {name!r} cannot be used in a Triton config (letters, digits, '_', '.', '-')"
        )
    ttype = value_info.type
    if not ttype.HasField("tensor_type"):
        raise ConfigError(
            f"{source}: {name!r} is not a tensor (sequence/map values are not supported by this exporter)"
        )
    elem = onnx.TensorProto.DataType.Name(ttype.tensor_type.elem_type)
    data_type = _ONNX_TO_TRITON.get(elem)
    if data_type is None:
        raise ConfigError(f"{source}: {name!r} has ONNX type {elem}, which Triton cannot serve")
    if not ttype.tensor_type.HasField("shape"):
        raise ConfigError(
            f"{source}: {name!r} has no shape in the ONNX graph; export with shapes (onnx.shape_inference) first"
        )
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.tensor_type.shape.dim]
    if not batched:
        if not dims:
            return TritonTensor(name, data_type, (1,), ())
        return TritonTensor(name, data_type, tuple(dims))
    first = ttype.tensor_type.shape.dim[0] if dims else None
    if first is None or first.HasField("dim_value"):
        shown = [d.dim_param or d.dim_value for d in ttype.tensor_type.shape.dim]
        raise ConfigError(
            f"{source}: {name!r} has shape {shown}; with max_batch_size > 0 its first dimension must be a dynamic batch dimension"
        )
    rest = tuple(dims[1:])
    if not rest:
        return TritonTensor(name, data_type, (1,), ())
    return TritonTensor(name, data_type, rest)


def triton_tensors_from_onnx(
    model: Any, max_batch_size: int = 16
) -> tuple[tuple[TritonTensor, ...], tuple[TritonTensor, ...]]:
    """Triton inputs and outputs of an ONNX model, read from its graph.

    Args:
        model: An ``onnx.ModelProto`` or the path of an ONNX file.
        max_batch_size: ``> 0`` drops the (dynamic) first dimension; ``0`` keeps full shapes.

    Returns:
        (inputs, outputs) in graph order. Graph inputs that are initializers are skipped.

    Raises:
        ConfigError: A tensor Triton cannot serve (type, missing shape, no batch dimension).
    """
    onnx = require("onnx", "export")
    source = "ONNX model"
    if isinstance(model, (str, Path)):
        source = str(model)
        model = onnx.load(str(model), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    batched = max_batch_size > 0
    inputs = tuple(_tensor(v, batched, onnx, source) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor(v, batched, onnx, source) for v in model.graph.output)
    if not inputs or not outputs:
        raise ConfigError(
            f"{source}: the graph has {len(inputs)} input(s) and {len(outputs)} output(s); both are needed"
        )
    return inputs, outputs


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]" if values else "[ ]"


def _tensor_block(tensor: TritonTensor, indent: str) -> list[str]:
    lines = [
        f"{indent}{{",
        f"{indent}  name: {json.dumps(tensor.name)}",
        f"{indent}  data_type: {tensor.data_type}",
        f"{indent}  dims: {_dims(tensor.dims)}",
    ]
    if tensor.reshape is not None:
        lines.append(f"{indent}  reshape: {{ shape: {_dims(tensor.reshape)} }}")
    lines.append(f"{indent}}}")
    return lines


def render_config_pbtxt(
    name: str,
    platform: tuple[str, str, str],
    max_batch_size: int,
    inputs: Sequence[TritonTensor],
    outputs: Sequence[TritonTensor],
    *,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    max_queue_delay_microseconds: int = 100,
) -> str:
    """Render a ``config.pbtxt`` (ModelConfig in protobuf text format).

    Args:
        name: Model name (must equal its folder name in the repository).
        platform: (platform, backend, default model file), e.g. :data:`ONNX_PLATFORM`.
        max_batch_size: Largest batch Triton may form; ``0`` disables batching.
        inputs: Model inputs.
        outputs: Model outputs.
        instance_kind: ``KIND_GPU``, ``KIND_CPU`` or ``KIND_AUTO``.
        instance_count: Model instances (per GPU for ``KIND_GPU``).
        max_queue_delay_microseconds: How long the dynamic batcher waits to fill a batch.

    Returns:
        The file's text.
    """
    platform_name, backend, filename = platform
    lines = [
        f"name: {json.dumps(name)}",
        f"platform: {json.dumps(platform_name)}",
        f"backend: {json.dumps(backend)}",
        f"default_model_filename: {json.dumps(filename)}",
        f"max_batch_size: {int(max_batch_size)}",
        "input [",
    ]
    for i, tensor in enumerate(inputs):
        block = _tensor_block(tensor, "  ")
        if i < len(inputs) - 1:
            block[-1] += ","
        lines.extend(block)
    lines += ["]", "output ["]
    for i, tensor in enumerate(outputs):
        block = _tensor_block(tensor, "  ")
        if i < len(outputs) - 1:
            block[-1] += ","
        lines.extend(block)
    lines.append("]")
    if max_batch_size > 0:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {int(max_queue_delay_microseconds)}", "}"]
    lines += ["instance_group [", "  {", f"    kind: {instance_kind}", f"    count: {int(instance_count)}", "  }", "]"]
    return "\n".join(lines) + "\n"


def _check_args(
    model_name: str, max_batch_size: int, instance_count: int, instance_kind: str, max_queue_delay_microseconds: int
) -> None:
    if not _SAFE_NAME.match(model_name):
        raise ConfigError(
            f"Triton model name {model_name!r} must be letters, digits, '_', '.', '-' (it becomes a folder name)"
        )
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be an integer >= 0, got {max_batch_size!r}")
    if not isinstance(instance_count, int) or instance_count < 1:
        raise ConfigError(f"instance_count must be an integer >= 1, got {instance_count!r}")
    if instance_kind not in _INSTANCE_KINDS:
        raise ConfigError(f"instance_kind must be one of {', '.join(_INSTANCE_KINDS)}, got {instance_kind!r}")
    if not isinstance(max_queue_delay_microseconds, int) or max_queue_delay_microseconds < 0:
        raise ConfigError(f"max_queue_delay_microseconds must be an integer >= 0, got {max_queue_delay_microseconds!r}")


def _copy_verified(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    if sha256_file(src) != sha256_file(dst):
        raise OutputError(f"copy of {src} to {dst} does not match the original (disk problem?)")


def write_triton_repository(
    onnx_path: str | Path,
    out_dir: str | Path,
    model_name: str = "nodule_edge",
    engine_path: str | Path | None = None,
    max_batch_size: int = 16,
    instance_count: int = 1,
    *,
    instance_kind: str = "KIND_GPU",
    max_queue_delay_microseconds: int = 100,
    overwrite: bool = False,
) -> TritonRepository:
    """Write a Triton model repository for the ONNX model and, optionally, its TensorRT engine.

    Each model folder is built in a temporary folder beside ``out_dir`` and renamed into place,
    so a Triton polling the repository never sees a half-written model.

    Args:
        onnx_path: The exported ONNX model.
        out_dir: Repository root; created if needed, other models in it are left alone.
        model_name: Name of the ONNX Runtime model; the TensorRT model is ``<model_name>_trt``.
        engine_path: A TensorRT engine built from ``onnx_path`` (its sidecar ``.json`` is copied
            and checked when present), or ``None`` for the ONNX model only.
        max_batch_size: Largest batch Triton's dynamic batcher forms (``0`` disables batching).
            For the TensorRT model it must not exceed the engine profile's maximum.
        instance_count: Instances per GPU (or in total for ``KIND_CPU``).
        instance_kind: ``KIND_GPU`` (default), ``KIND_CPU`` or ``KIND_AUTO`` for the ONNX model;
            the TensorRT model always uses ``KIND_GPU``.
        max_queue_delay_microseconds: Dynamic batcher queue delay.
        overwrite: Replace existing model folders of the same names.

    Returns:
        What was written.

    Raises:
        ConfigError: Bad argument, or a graph tensor Triton cannot serve.
        EngineError: The engine's sidecar says it was built from another ONNX model or with a
            smaller batch profile.
        OutputError: The repository cannot be written, or a model folder exists and
            ``overwrite`` is false; nothing partial is left.
    """
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    _check_args(model_name, max_batch_size, instance_count, instance_kind, max_queue_delay_microseconds)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX model {onnx_path} does not exist")
    onnx = require("onnx", "export")
    model = onnx.load(str(onnx_path), load_external_data=False)
    from onnx.external_data_helper import uses_external_data

    if any(uses_external_data(t) for t in model.graph.initializer):
        raise ConfigError(
            f"{onnx_path} keeps its weights in external data files; export a single-file model for Triton"
        )
    inputs, outputs = triton_tensors_from_onnx(model, max_batch_size)

    sidecar = None
    engine = Path(engine_path) if engine_path is not None else None
    if engine is not None:
        from nodule_edge.runtime.engines.tensorrt_sidecar import EngineSidecar, sidecar_path_for

        if not engine.is_file():
            raise ConfigError(f"TensorRT engine {engine} does not exist")
        if sidecar_path_for(engine).is_file():
            sidecar = EngineSidecar.read(sidecar_path_for(engine))
            if sidecar.onnx_sha256 != sha256_file(onnx_path):
                raise EngineError(
                    f"TensorRT engine {engine} was built from another ONNX model than {onnx_path} (sha256 differs); rebuild it"
                )
            if max_batch_size > sidecar.profile[2]:
                raise EngineError(
                    f"max_batch_size {max_batch_size} exceeds the engine's optimisation profile maximum {sidecar.profile[2]}"
                )
        else:
            log.warning(
                "TensorRT engine %s has no sidecar: its TensorRT version and GPU cannot be recorded or checked", engine
            )

    names = [model_name] + ([f"{model_name}_trt"] if engine is not None else [])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (out_dir / name).exists() and not overwrite:
                raise OutputError(
                    f"Triton model folder {out_dir / name} already exists (pass overwrite=True to replace it)"
                )
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging-"))
    except OSError as exc:
        raise OutputError(f"cannot create Triton repository {out_dir}: {exc}") from exc
    try:
        onnx_dir = staging / model_name
        (onnx_dir / "1").mkdir(parents=True)
        _copy_verified(onnx_path, onnx_dir / "1" / ONNX_PLATFORM[2])
        (onnx_dir / "config.pbtxt").write_text(
            render_config_pbtxt(
                model_name,
                ONNX_PLATFORM,
                max_batch_size,
                inputs,
                outputs,
                instance_kind=instance_kind,
                instance_count=instance_count,
                max_queue_delay_microseconds=max_queue_delay_microseconds,
            )
        )
        if engine is not None:
            trt_name = f"{model_name}_trt"
            trt_dir = staging / trt_name
            (trt_dir / "1").mkdir(parents=True)
            _copy_verified(engine, trt_dir / "1" / TENSORRT_PLATFORM[2])
            if sidecar is not None:
                sidecar.write(trt_dir / "1" / (TENSORRT_PLATFORM[2] + ".json"))
            (trt_dir / "config.pbtxt").write_text(
                render_config_pbtxt(
                    trt_name,
                    TENSORRT_PLATFORM,
                    max_batch_size,
                    inputs,
                    outputs,
                    instance_kind="KIND_GPU",
                    instance_count=instance_count,
                    max_queue_delay_microseconds=max_queue_delay_microseconds,
                )
            )
        for name in names:
            # Checked again here: another writer may have created the folder meanwhile.
            if (out_dir / name).exists() and not overwrite:
                raise OutputError(
                    f"Triton model folder {out_dir / name} already exists (pass overwrite=True to replace it)"
                )
            swap_folder(staging / name, out_dir / name)
    except OSError as exc:
        raise OutputError(f"cannot write Triton repository {out_dir}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote Triton model(s) %s to %s", ", ".join(names), out_dir)
    return TritonRepository(
        root=out_dir,
        onnx_model=out_dir / model_name,
        tensorrt_model=out_dir / f"{model_name}_trt" if engine is not None else None,
        inputs=inputs,
        outputs=outputs,
    )

"""TensorRT plans: build a serialized FP16 engine from the ONNX model, with its sidecar.

.. warning::
   Engine building has NOT been executed on any machine in this project: no machine here has a
   GPU or loadable TensorRT libraries. The TensorRT and CUDA calls below are written against
   the documented TensorRT 10 Python API (``tensorrt`` 10.x) and the NVIDIA ``cuda-python``
   runtime bindings, and are exercised in the unit tests only against a stand-in module. The GPU
   test (``pytest -m gpu``) builds and runs a real engine where a GPU exists.

What the build does (:func:`build_engine`):

* parses the ONNX file with ``trt.OnnxParser`` (native InstanceNormalization layers);
* enables FP16 and keeps the normalisation layers in FP32 with per-layer precision constraints
  (``layer.precision`` and ``set_output_type``) under ``OBEY_PRECISION_CONSTRAINTS``: GroupNorm and
  InstanceNorm statistics computed in FP16 drift or overflow, a documented TensorRT problem. The
  layers are chosen by :func:`select_fp32_layers` from their TensorRT layer type
  (``NORMALIZATION``) and from their names (the affine ``Add`` that the exporter names
  ``..group_norm``, ``InstanceNormalization`` plugin layers, decomposed norms under a ``norm``
  module path);
* adds one optimisation profile for the input's batch dimension (default min 1, opt 4, max 16);
* reads and updates a timing cache so rebuilds on the same machine are fast;
* writes the engine and its JSON sidecar (:class:`~nodule_edge.runtime.engines.tensorrt_sidecar.EngineSidecar`,
  ``<engine>.json``) atomically.

Loading, the sidecar check and execution are the runtime's
(:mod:`nodule_edge.runtime.engines.tensorrt`); this module builds on its sidecar and its
TensorRT/CUDA glue. :func:`build_engine_for_bundle` adds an engine to a model bundle
(``nodule-edge export --tensorrt``).

Requirements: TensorRT 10 (``pip install 'nodule-edge[trt]'``). TensorRT 11 removed weak typing
(``BuilderFlag.FP16`` and per-layer precision); with it only ``fp16=False`` builds work, and an FP16
build stops with an :class:`~nodule_edge.errors.EngineError` saying so.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodule_edge._files import sha256_bytes, sha256_file, write_bytes_atomic
from nodule_edge.errors import ConfigError, EngineError, OutputError
from nodule_edge.runtime.engines import tensorrt as trt_runtime
from nodule_edge.runtime.engines.tensorrt_sidecar import EngineSidecar, sidecar_path_for

__all__ = [
    "DEFAULT_FP32_LAYER_TYPES",
    "DEFAULT_FP32_NAME_PATTERNS",
    "MAX_PROFILE_BATCH",
    "TrtBuildSettings",
    "build_engine",
    "build_engine_for_bundle",
    "select_fp32_layers",
]

log = logging.getLogger(__name__)

MAX_PROFILE_BATCH = 16
"""Largest batch an optimisation profile may allow (the runtime never batches more patches)."""

DEFAULT_FP32_LAYER_TYPES: tuple[str, ...] = ("NORMALIZATION",)
"""TensorRT layer types always kept in FP32 (GroupNorm/InstanceNorm/LayerNorm become these)."""

DEFAULT_FP32_NAME_PATTERNS: tuple[str, ...] = (
    # ONNX op names and the torch exporter's node names: "node_InstanceNormalization_18",
    # "node_group_norm" (the affine Add of a decomposed GroupNorm), "InstanceNormalization_TRT".
    r"(group|instance|layer|batch)_?norm",
    # Decomposed norms under a module called norm/norm1/gn: "/encoder/norm1/ReduceMean".
    r"(^|[/._])(norm|gn)\d*([/._:]|$)",
)
"""Case-insensitive regular expressions on layer names; a match keeps that layer in FP32."""

_LAST_WEAKLY_TYPED_MAJOR = 10
_LAYER_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*$")


# --------------------------------------------------------------------------------------------
# Pure logic (no TensorRT needed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtBuildSettings:
    """How to build an engine.

    Attributes:
        fp16: Allow FP16 kernels (normalisation layers are still kept in FP32).
        fp32_layer_types: TensorRT ``LayerType`` names whose layers always run in FP32.
        fp32_name_patterns: Case-insensitive regexes; layers whose name matches run in FP32.
        precision_constraints: ``"obey"`` fails the build if an FP32 layer has no FP32 kernel;
            ``"prefer"`` only warns.
        min_batch: Smallest batch of the optimisation profile.
        opt_batch: Batch the kernels are tuned for.
        max_batch: Largest batch of the optimisation profile (at most ``MAX_PROFILE_BATCH``).
        input_name: The network input whose first dimension is the batch.
        workspace_bytes: Limit of TensorRT's workspace memory pool.
        timing_cache_path: Timing cache to read and update; ``None`` puts it beside the engine as
            ``<engine>.timing-cache``.
        use_timing_cache: Set to ``False`` to build without reading or writing a timing cache.
    """

    fp16: bool = True
    fp32_layer_types: tuple[str, ...] = DEFAULT_FP32_LAYER_TYPES
    fp32_name_patterns: tuple[str, ...] = DEFAULT_FP32_NAME_PATTERNS
    precision_constraints: str = "obey"
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = MAX_PROFILE_BATCH
    input_name: str = "patch"
    workspace_bytes: int = 1 << 30
    timing_cache_path: Path | None = None
    use_timing_cache: bool = True

    def __post_init__(self) -> None:
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in batches):
            raise ConfigError(f"optimisation profile batches must be integers, got min/opt/max = {batches}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch <= MAX_PROFILE_BATCH:
            raise ConfigError(
                f"optimisation profile needs 1 <= min <= opt <= max <= {MAX_PROFILE_BATCH}, "
                f"got min={self.min_batch}, opt={self.opt_batch}, max={self.max_batch}"
            )
        if self.precision_constraints not in ("obey", "prefer"):
            raise ConfigError(f"precision_constraints must be 'obey' or 'prefer', got {self.precision_constraints!r}")
        if not isinstance(self.workspace_bytes, int) or self.workspace_bytes <= 0:
            raise ConfigError(f"workspace_bytes must be a positive integer, got {self.workspace_bytes!r}")
        if not self.input_name:
            raise ConfigError("input_name must not be empty")
        for layer_type in self.fp32_layer_types:
            if not _LAYER_TYPE.match(str(layer_type)):
                raise ConfigError(
                    f"fp32_layer_types entry {layer_type!r} is not a TensorRT LayerType name such as 'NORMALIZATION'"
                )
        for pattern in self.fp32_name_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"fp32_name_patterns entry {pattern!r} is not a valid regular expression: {exc}"
                ) from exc
        if self.timing_cache_path is not None:
            object.__setattr__(self, "timing_cache_path", Path(self.timing_cache_path))

    @property
    def profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the optimisation profile."""
        return (self.min_batch, self.opt_batch, self.max_batch)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (:func:`nodule_edge._files.write_bytes_atomic`), creating the folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
    write_bytes_atomic(path, data)


def _timing_cache_path_for(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".timing-cache")


def _short_type(layer_type: Any) -> str:
    # Accepts "NORMALIZATION", "LayerType.NORMALIZATION" or a tensorrt.LayerType member.
    name = getattr(layer_type, "name", None)
    return str(name if isinstance(name, str) else layer_type).rsplit(".", 1)[-1].upper()


def select_fp32_layers(
    layers: Iterable[tuple[str, Any]],
    layer_types: Sequence[str] = DEFAULT_FP32_LAYER_TYPES,
    name_patterns: Sequence[str] = DEFAULT_FP32_NAME_PATTERNS,
) -> list[str]:
    """Pick the layers to keep in FP32 in an FP16 engine.

    Args:
        layers: ``(layer name, layer type)`` pairs in network order; the type may be a
            ``tensorrt.LayerType`` member or its name (``"NORMALIZATION"``,
            ``"LayerType.NORMALIZATION"``).
        layer_types: Layer types that are always kept in FP32.
        name_patterns: Case-insensitive regexes searched in the layer name.

    Returns:
        Names of the selected layers, in network order, without duplicates.
    """
    wanted = {_short_type(t) for t in layer_types}
    compiled = [re.compile(p, re.IGNORECASE) for p in name_patterns]
    selected: list[str] = []
    seen: set[str] = set()
    for name, layer_type in layers:
        if name in seen:
            continue
        if _short_type(layer_type) in wanted or any(p.search(name) for p in compiled):
            selected.append(name)
            seen.add(name)
    return selected


# --------------------------------------------------------------------------------------------
# Building (needs TensorRT and a GPU; see the module warning)
# --------------------------------------------------------------------------------------------


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    native = getattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM", None)
    if native is not None:
        # Native INormalizationLayer instead of the InstanceNormalization plugin, so the layer
        # can be constrained to FP32 (and no cuDNN plugin is needed).
        parser.set_flag(native)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        shown = "; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {shown or 'no error reported'}")
    return parser


def _input_tail(network: Any, input_name: str, onnx_path: Path) -> tuple[int, ...]:
    names = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        names.append(tensor.name)
        if tensor.name == input_name:
            shape = tuple(int(d) for d in tensor.shape)
            if not shape or shape[0] != -1:
                raise EngineError(
                    f"{onnx_path}: input {input_name!r} has shape {shape}; its first (batch) dimension must be dynamic"
                )
            if any(d < 0 for d in shape[1:]):
                raise EngineError(
                    f"{onnx_path}: input {input_name!r} has shape {shape}; only the batch dimension may be dynamic"
                )
            return shape[1:]
    raise EngineError(f"{onnx_path}: no network input named {input_name!r} (inputs: {', '.join(names) or 'none'})")


_FLOAT_DTYPE_NAMES = ("FLOAT", "HALF", "BF16")


def _apply_fp32_constraints(trt: Any, network: Any, settings: TrtBuildSettings) -> list[str]:
    float_types = {getattr(trt.DataType, n) for n in _FLOAT_DTYPE_NAMES if hasattr(trt.DataType, n)}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    candidates = []
    for layer in layers:
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        # Integer/shape layers cannot take an FP32 constraint (OBEY would fail the build).
        if outputs and all(out.dtype in float_types for out in outputs):
            candidates.append(layer)
    chosen = set(
        select_fp32_layers(
            ((layer.name, layer.type) for layer in candidates), settings.fp32_layer_types, settings.fp32_name_patterns
        )
    )
    kept: list[str] = []
    for layer in candidates:
        if layer.name not in chosen:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if layer.type == trt.LayerType.NORMALIZATION:
            try:
                # network.get_layer returns the base ILayer; down-cast to reach compute_precision.
                layer.__class__ = trt.INormalizationLayer
                layer.compute_precision = trt.float32
            except (AttributeError, TypeError) as exc:  # pragma: no cover - depends on the TRT build
                log.debug("cannot set compute_precision on %s: %s", layer.name, exc)
        kept.append(layer.name)
    return kept


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    settings: TrtBuildSettings | None = None,
    *,
    device: int = 0,
) -> EngineSidecar:
    """Build a serialized TensorRT engine from the ONNX model and write it with its sidecar.

    NOT EXECUTED on any machine of this project (no GPU); see the module docstring.

    Args:
        onnx_path: The exported ONNX model (input ``patch`` with a dynamic batch dimension).
        engine_path: Where to write the engine (e.g. ``model.plan``); the sidecar goes to
            ``<engine_path>.json``.
        settings: Build settings; the defaults are FP16 with FP32 normalisation, batch 1/4/16.
        device: CUDA device to build on.

    Returns:
        The sidecar that was written.

    Raises:
        MissingDependencyError: ``tensorrt`` or ``cuda-python`` is not installed.
        EngineError: Parsing or building failed, or FP16 was asked of TensorRT >= 11.
        OutputError: The engine, sidecar or timing cache cannot be written.
    """
    settings = settings or TrtBuildSettings()
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path)
    trt = trt_runtime.import_tensorrt()
    if settings.fp16 and trt_runtime.major_version(trt.__version__) > _LAST_WEAKLY_TYPED_MAJOR:
        raise EngineError(
            f"TensorRT {trt.__version__} removed weak typing (BuilderFlag.FP16 and per-layer precision), "
            f"so it cannot build the FP16 engine with FP32 normalisation: install TensorRT 10 "
            f"(pip install 'tensorrt>=10,<11') or build with fp16=False"
        )
    if not onnx_path.is_file():
        raise EngineError(f"ONNX model {onnx_path} does not exist")
    cudart = trt_runtime.cuda_runtime()
    trt_runtime.cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
    env = trt_runtime.current_environment(device)
    onnx_sha256 = sha256_file(onnx_path)
    onnx_metadata = trt_runtime.onnx_metadata_props(onnx_path)

    logger = trt_runtime.trt_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch: no creation flags.
    network = builder.create_network(0)
    _parser = _parse_onnx(trt, network, logger, onnx_path)  # must outlive the build
    tail = _input_tail(network, settings.input_name, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    fp32_layers: list[str] = []
    if settings.fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("GPU %s has no fast FP16; the FP16 engine may be slower than FP32", env.gpu_name)
        config.set_flag(trt.BuilderFlag.FP16)
        fp32_layers = _apply_fp32_constraints(trt, network, settings)
        flag = (
            trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS
            if settings.precision_constraints == "obey"
            else trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS
        )
        config.set_flag(flag)
        log.info(
            "keeping %d layer(s) in FP32: %s",
            len(fp32_layers),
            ", ".join(fp32_layers[:10]) + (" …" if len(fp32_layers) > 10 else ""),
        )
        if not fp32_layers:
            log.warning("FP16 build of %s found no normalisation layer to keep in FP32", onnx_path)

    profile = builder.create_optimization_profile()
    profile.set_shape(
        settings.input_name,
        (settings.min_batch, *tail),
        (settings.opt_batch, *tail),
        (settings.max_batch, *tail),
    )
    config.add_optimization_profile(profile)

    cache_path = None
    if settings.use_timing_cache:
        cache_path = settings.timing_cache_path or _timing_cache_path_for(engine_path)
        blob = b""
        if cache_path.is_file():
            blob = cache_path.read_bytes()
            log.info("using timing cache %s (%d bytes)", cache_path, len(blob))
        cache = config.create_timing_cache(blob)
        if cache is None and blob:
            log.warning("timing cache %s is unusable (other TensorRT version?); starting a new one", cache_path)
            cache = config.create_timing_cache(b"")
        # ignore_mismatch=False: a cache from another GPU/TensorRT must not steer tactic choice.
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s was made on another GPU or TensorRT; starting a new one", cache_path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)

    log.info(
        "building TensorRT %s engine for %s on %s (profile %s)",
        "FP16" if settings.fp16 else "FP32",
        onnx_path.name,
        env.gpu_name,
        settings.profile,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT messages logged above)"
        )
    data = bytes(memoryview(serialized))

    if cache_path is not None:
        _write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    from nodule_edge import __version__

    sidecar = EngineSidecar(
        tensorrt_version=env.tensorrt_version,
        gpu_name=env.gpu_name,
        compute_capability=env.compute_capability,
        onnx_sha256=onnx_sha256,
        engine_sha256=sha256_bytes(data),
        precision="fp16" if settings.fp16 else "fp32",
        input_name=settings.input_name,
        profile=settings.profile,
        fp32_layers=tuple(fp32_layers),
        onnx_file=onnx_path.name,
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        nodule_edge_version=__version__,
        onnx_metadata=onnx_metadata,
    )
    # Engine first: a crash in between leaves an engine whose sha256 does not match the old
    # sidecar, which the runtime's load_engine refuses.
    _write_bytes(engine_path, data)
    sidecar.write(sidecar_path_for(engine_path))
    log.info("wrote %s (%.1f MB) and %s", engine_path, len(data) / 1e6, sidecar_path_for(engine_path).name)
    return sidecar


# --------------------------------------------------------------------------------------------
# Bundle integration
# --------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    env = os.environ.get("NODULE_EDGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "nodule-edge"


def build_engine_for_bundle(
    bundle_dir: str | Path,
    settings: TrtBuildSettings | None = None,
    *,
    device: int = 0,
    timing_cache_dir: str | Path | None = None,
    engine_name: str = "model.plan",
) -> Path:
    """Build the TensorRT engine for a bundle's ONNX model and add it to the bundle.

    The engine and its sidecar are written into the bundle, which gets the artifact role
    ``tensorrt`` and a rewritten manifest. The timing cache stays outside the bundle (it is
    machine-specific): in ``timing_cache_dir`` or ``$NODULE_EDGE_CACHE``,
    ``$XDG_CACHE_HOME/nodule-edge``, ``~/.cache/nodule-edge``.

    NOT EXECUTED on any machine of this project (no GPU); see the module docstring.

    Args:
        bundle_dir: A bundle written by ``nodule-edge export``.
        settings: Build settings (their ``timing_cache_path`` wins over ``timing_cache_dir``).
        device: CUDA device to build on.
        timing_cache_dir: Folder of the timing cache.
        engine_name: File name of the engine inside the bundle.

    Returns:
        The engine's path.

    Raises:
        BundleError: The bundle is missing, modified or has no ONNX model.
        EngineError, MissingDependencyError, OutputError: See :func:`build_engine`.
    """
    from nodule_edge.errors import BundleError
    from nodule_edge.runtime.bundle import load_bundle, write_manifest

    bundle = load_bundle(bundle_dir)
    onnx_path = bundle.path("onnx_fp32")
    if onnx_path is None:
        raise BundleError(f"bundle {bundle.root} has no 'onnx_fp32' model to build a TensorRT engine from")
    settings = settings or TrtBuildSettings()
    if settings.use_timing_cache and settings.timing_cache_path is None:
        env = trt_runtime.current_environment(device)
        slug = re.sub(
            r"[^A-Za-z0-9.]+", "-", f"{env.gpu_name}-sm{env.compute_capability}-trt{env.tensorrt_version}"
        ).strip("-")
        cache_dir = Path(timing_cache_dir) if timing_cache_dir is not None else _default_cache_dir()
        settings = replace(settings, timing_cache_path=cache_dir / f"{slug}.timing-cache")
    engine_path = bundle.root / engine_name
    sidecar = build_engine(onnx_path, engine_path, settings, device=device)
    manifest = bundle.manifest
    artifacts = {**manifest.get("artifacts", {}), "tensorrt": engine_name}
    extra = {k: v for k, v in manifest.items() if k not in ("format", "artifacts", "files")}
    extra["tensorrt"] = {
        "tensorrt_version": sidecar.tensorrt_version,
        "gpu_name": sidecar.gpu_name,
        "compute_capability": sidecar.compute_capability,
        "precision": sidecar.precision,
        "profile": list(sidecar.profile),
    }
    write_manifest(bundle.root, artifacts, extra)
    load_bundle(bundle.root)
    return engine_path

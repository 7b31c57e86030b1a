"""The sidecar of a TensorRT engine, and the check that an engine fits this machine and model.

A TensorRT engine only runs on the TensorRT version and GPU it was built for. The builder
(:mod:`nodule_edge.export.tensorrt`) writes a JSON sidecar beside each engine (``model.plan`` →
``model.plan.json``, :class:`EngineSidecar`) recording the TensorRT version, GPU name, compute
capability, the ONNX file's sha256, the engine's own sha256 and the ONNX metadata (patch spec,
output names) the runtime needs; the runtime (:mod:`nodule_edge.runtime.engines.tensorrt`)
refuses an engine whose sidecar does not match, with one message that lists every difference
and how to rebuild. Pure Python: nothing here needs TensorRT or a GPU.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodule_edge._files import write_text_atomic
from nodule_edge.errors import EngineError, OutputError

__all__ = [
    "ENGINE_SIDECAR_FORMAT",
    "REBUILD_HINT",
    "EngineEnvironment",
    "EngineSidecar",
    "check_engine_compatibility",
    "engine_mismatches",
    "sidecar_path_for",
]

log = logging.getLogger(__name__)

ENGINE_SIDECAR_FORMAT = "nodule-edge-tensorrt-engine-v1"
REBUILD_HINT = "rebuild with: nodule-edge export --tensorrt ... on this machine"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CC = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine is tied to: the TensorRT version and the GPU.

    Attributes:
        tensorrt_version: ``tensorrt.__version__``, e.g. ``"10.3.0"``.
        gpu_name: CUDA device name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        compute_capability: ``"major.minor"``, e.g. ``"9.0"``.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class EngineSidecar:
    """The JSON written next to an engine (``<engine>.json``): what it was built for and from.

    Attributes:
        tensorrt_version: TensorRT version that built the engine.
        gpu_name: GPU the engine was built on.
        compute_capability: That GPU's compute capability, ``"major.minor"``.
        onnx_sha256: sha256 of the ONNX file the engine was built from.
        engine_sha256: sha256 of the serialized engine file.
        precision: ``"fp16"`` (with FP32 normalisation) or ``"fp32"``.
        input_name: The batched network input.
        profile: (min, opt, max) batch of the optimisation profile.
        fp32_layers: Names of the layers constrained to FP32.
        onnx_file: File name (not path) of the ONNX model, for messages.
        created_utc: ISO-8601 build time.
        nodule_edge_version: Package version that built the engine.
        onnx_metadata: The ONNX model's ``metadata_props`` (patch spec, output names, ...), so
            the runtime can describe the engine without opening the ONNX file.
        format: Sidecar format tag.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    engine_sha256: str
    precision: str
    input_name: str
    profile: tuple[int, int, int]
    fp32_layers: tuple[str, ...] = ()
    onnx_file: str = ""
    created_utc: str = ""
    nodule_edge_version: str = ""
    onnx_metadata: dict[str, str] = field(default_factory=dict, hash=False)
    format: str = ENGINE_SIDECAR_FORMAT

    @property
    def environment(self) -> EngineEnvironment:
        """The environment the engine was built in."""
        return EngineEnvironment(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "format": self.format,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "onnx_sha256": self.onnx_sha256,
            "engine_sha256": self.engine_sha256,
            "precision": self.precision,
            "input_name": self.input_name,
            "profile": {"min": self.profile[0], "opt": self.profile[1], "max": self.profile[2]},
            "fp32_layers": list(self.fp32_layers),
            "onnx_file": self.onnx_file,
            "created_utc": self.created_utc,
            "nodule_edge_version": self.nodule_edge_version,
            "onnx_metadata": dict(self.onnx_metadata),
        }

    def to_json(self) -> str:
        """Indented, key-sorted JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "sidecar") -> EngineSidecar:
        """Validate and build from a parsed JSON object.

        Raises:
            EngineError: Unknown format, missing or malformed field (named in the message).
        """
        if not isinstance(data, dict):
            raise EngineError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != ENGINE_SIDECAR_FORMAT:
            raise EngineError(
                f"{source}: unknown engine sidecar format {data.get('format')!r}, expected {ENGINE_SIDECAR_FORMAT!r}; {REBUILD_HINT}"
            )

        def text(key: str, required: bool = True) -> str:
            value = data.get(key, None if required else "")
            if not isinstance(value, str) or (required and not value):
                raise EngineError(f"{source}: field {key!r} must be a non-empty string, got {value!r}")
            return value

        for key in ("onnx_sha256", "engine_sha256"):
            if not _HEX64.match(text(key)):
                raise EngineError(f"{source}: field {key!r} is not a sha256 hex digest: {data[key]!r}")
        if not _CC.match(text("compute_capability")):
            raise EngineError(
                f"{source}: field 'compute_capability' must look like '8.6', got {data['compute_capability']!r}"
            )
        if text("precision") not in ("fp16", "fp32"):
            raise EngineError(f"{source}: field 'precision' must be 'fp16' or 'fp32', got {data['precision']!r}")
        profile = data.get("profile")
        if not isinstance(profile, dict) or not all(isinstance(profile.get(k), int) for k in ("min", "opt", "max")):
            raise EngineError(
                f"{source}: field 'profile' must be {{'min': int, 'opt': int, 'max': int}}, got {profile!r}"
            )
        layers = data.get("fp32_layers", [])
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise EngineError(f"{source}: field 'fp32_layers' must be a list of layer names")
        metadata = data.get("onnx_metadata", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise EngineError(f"{source}: field 'onnx_metadata' must map strings to strings")
        return cls(
            tensorrt_version=text("tensorrt_version"),
            gpu_name=text("gpu_name"),
            compute_capability=text("compute_capability"),
            onnx_sha256=text("onnx_sha256"),
            engine_sha256=text("engine_sha256"),
            precision=text("precision"),
            input_name=text("input_name"),
            profile=(profile["min"], profile["opt"], profile["max"]),
            fp32_layers=tuple(layers),
            onnx_file=text("onnx_file", required=False),
            created_utc=text("created_utc", required=False),
            nodule_edge_version=text("nodule_edge_version", required=False),
            onnx_metadata=dict(metadata),
        )

    @classmethod
    def from_json(cls, text: str, source: str = "sidecar") -> EngineSidecar:
        """Parse sidecar JSON text.

        Raises:
            EngineError: Not JSON, or not a valid sidecar.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EngineError(f"{source} is not valid JSON: {exc}; {REBUILD_HINT}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def read(cls, path: str | Path) -> EngineSidecar:
        """Read a sidecar file.

        Raises:
            EngineError: Missing, unreadable or invalid sidecar.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise EngineError(
                f"engine sidecar {path} is missing, so the engine's TensorRT version, GPU and model cannot be checked; {REBUILD_HINT}"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise EngineError(f"engine sidecar {path} cannot be read: {exc}") from exc
        return cls.from_json(text, str(path))

    def write(self, path: str | Path) -> Path:
        """Write the sidecar atomically (:func:`nodule_edge._files.write_text_atomic`), creating its folder.

        Raises:
            OutputError: The file cannot be written; nothing partial is left.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc}") from exc
        return write_text_atomic(path, self.to_json())


def sidecar_path_for(engine_path: str | Path) -> Path:
    """The sidecar of an engine: ``model.plan`` → ``model.plan.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def engine_mismatches(sidecar: EngineSidecar, current: EngineEnvironment, onnx_sha256: str | None = None) -> list[str]:
    """Every way an engine does not fit this machine (and model), one phrase each.

    Args:
        sidecar: What the engine was built for.
        current: This machine's TensorRT and GPU.
        onnx_sha256: sha256 of the ONNX model the engine must come from; ``None`` skips the check.

    Returns:
        Human-readable differences; empty when the engine fits.
    """
    problems: list[str] = []
    if sidecar.tensorrt_version != current.tensorrt_version:
        problems.append(
            f"TensorRT version: engine built with {sidecar.tensorrt_version}, this machine has {current.tensorrt_version}"
        )
    if sidecar.gpu_name != current.gpu_name:
        problems.append(f"GPU: engine built on {sidecar.gpu_name!r}, this machine has {current.gpu_name!r}")
    if sidecar.compute_capability != current.compute_capability:
        problems.append(
            f"compute capability: engine built for {sidecar.compute_capability}, this GPU is {current.compute_capability}"
        )
    if onnx_sha256 is not None and sidecar.onnx_sha256 != onnx_sha256.lower():
        problems.append(
            f"ONNX model: engine built from sha256 {sidecar.onnx_sha256[:12]}…, the model in use is {onnx_sha256.lower()[:12]}…"
        )
    return problems


def check_engine_compatibility(
    sidecar: EngineSidecar,
    current: EngineEnvironment,
    onnx_sha256: str | None = None,
    engine_path: str | Path | None = None,
) -> None:
    """Refuse an engine built for another TensorRT version, GPU or model.

    Args:
        sidecar: What the engine was built for.
        current: This machine's TensorRT and GPU (see :func:`current_environment`).
        onnx_sha256: sha256 of the ONNX model the engine must come from; ``None`` skips the check.
        engine_path: Engine file, named in the message.

    Raises:
        EngineError: Listing every mismatch, with the rebuild command.
    """
    problems = engine_mismatches(sidecar, current, onnx_sha256)
    if problems:
        what = f"TensorRT engine {engine_path}" if engine_path is not None else "TensorRT engine"
        raise EngineError(
            f"{what} does not match this machine: {'; '.join(problems)}. "
            f"An engine only runs with the TensorRT version, GPU and model it was built for; {REBUILD_HINT}"
        )

"""What every inference engine shares: the :class:`Engine` interface and the model's metadata.

The engine reads everything it needs from the artifact itself (ONNX ``metadata_props``, or a
TensorRT engine's sidecar): the patch spec, attribute names, output names. Backends live one per
module beside this one (``onnxruntime``, ``openvino``, ``tensorrt``); the table that names them
and picks one for ``auto`` is :mod:`nodule_edge.runtime.engines.backends`.

This module imports numpy and nothing that runs a model.
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from nodule_edge.errors import BundleError, EngineError
from nodule_edge.outline import OutlineHead
from nodule_edge.patch import PatchSpec

if TYPE_CHECKING:
    from nodule_edge.runtime.bundle import Bundle

__all__ = [
    "FIRST_PASS_FORMAT",
    "CpuEngine",
    "Engine",
    "check_first_pass",
    "ModelMetadata",
    "default_threads",
    "metadata_from_props",
    "need_artifact",
    "read_onnx_metadata",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: ``metadata_props["format"]`` of a bundle's first-pass model (``first_pass.onnx``): a box net
#: whose one output is ``segmentation``, run as the runtime's first pass instead of the model's own.
FIRST_PASS_FORMAT = "nodule-edge-first-pass-onnx-v1"


@dataclass(frozen=True)
class ModelMetadata:
    """What the runtime needs to know about a model, read from the artifact.

    Attributes:
        patch_spec: Size, spacing and channels of the model's input patch.
        attribute_names: Names of the attribute outputs, in order.
        output_names: Output names in model order.
        input_name: The batched network input.
        model_version: Version string of the model.
        raw: Every ``metadata_props`` entry as stored.
        outline_head: The malignancy logit's outline term (:mod:`nodule_edge.outline`), which the
            runtime adds after the second pass; None for a model without one.
    """

    patch_spec: PatchSpec
    attribute_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_name: str
    model_version: str
    raw: dict[str, str]
    outline_head: OutlineHead | None = None


def read_onnx_metadata(session: object) -> ModelMetadata:
    """Parse nodule-edge metadata from an ONNX Runtime session's model metadata.

    Args:
        session: An ``onnxruntime.InferenceSession`` (anything with ``get_modelmeta()``).

    Raises:
        BundleError: The model carries no nodule-edge metadata, or it is malformed.
    """
    return metadata_from_props(dict(session.get_modelmeta().custom_metadata_map))  # type: ignore[attr-defined]


def metadata_from_props(meta: dict[str, str]) -> ModelMetadata:
    """Parse nodule-edge metadata from an ONNX file's ``metadata_props``.

    Raises:
        BundleError: A required key is missing, or a value is malformed.
    """
    missing = [k for k in ("patch_spec", "attribute_names", "output_names", "input_name") if k not in meta]
    if missing:
        raise BundleError(f"model has no nodule-edge metadata {missing}: not exported by 'nodule-edge export'")
    try:
        parsed = ModelMetadata(
            patch_spec=PatchSpec.from_json(meta["patch_spec"]),
            attribute_names=tuple(json.loads(meta["attribute_names"])),
            output_names=tuple(json.loads(meta["output_names"])),
            input_name=meta["input_name"],
            model_version=meta.get("model_version", "unknown"),
            raw=dict(meta),
            outline_head=OutlineHead.from_dict(json.loads(meta["outline_head"])) if "outline_head" in meta else None,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"model metadata is malformed: {exc}") from exc
    if parsed.outline_head is not None and parsed.patch_spec.nodule_box is None:
        raise BundleError(
            "model metadata is malformed: an outline term needs a first pass, and the patch spec has no nodule box"
        )
    return parsed


class Engine(abc.ABC):
    """Interface of every backend.

    An engine loads and compiles its artifact when constructed (an ONNX Runtime session, an
    OpenVINO compiled model, a deserialised TensorRT plan) and reads the model's metadata from
    the artifact itself; :meth:`run` is then cheap and thread-safe.

    Example:
        >>> from nodule_edge.runtime.bundle import load_bundle
        >>> from nodule_edge.runtime.engines import create_engine
        >>> engine = create_engine(load_bundle(), "cpu")
        >>> engine.metadata.patch_spec.size
        64

    Attributes:
        backend: The backend's name in the table (``cpu``, ``cpu-fast``, ``tensorrt``, ...).
        metadata: The model's metadata, read from the artifact.
        providers: What actually executes the model, most specific first (ONNX Runtime's
            providers as the session reports them, ``openvino``, ``TensorRT 10.3.0 (fp16)``).
    """

    backend: str
    metadata: ModelMetadata
    providers: tuple[str, ...] = ()

    @classmethod
    def from_bundle(cls, bundle: Bundle, backend: str, threads: int | None = None) -> Engine:
        """Create the engine for ``backend`` from a verified bundle's artifact.

        Called by :func:`nodule_edge.runtime.engines.create_engine` once the backend's
        availability check passed; every engine named in the backend table implements it.

        Raises:
            NotImplementedError: The subclass is not in the backend table.
        """
        raise NotImplementedError(f"{cls.__name__} cannot be created from a bundle")

    @property
    def description(self) -> str:
        """Backend and what actually executes it, e.g. ``cpu-fast (openvino)``."""
        return f"{self.backend} ({self.providers[0]})" if self.providers else self.backend

    @abc.abstractmethod
    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch ``[N, C, S, S, S]`` float32; returns every output by name."""

    #: The bundle's first-pass model (``first_pass.onnx``), loaded by the engine's own library.
    _first_pass: Callable[[np.ndarray], np.ndarray] | None = None

    def segment(self, patches: np.ndarray) -> np.ndarray:
        """A segmentation ``[N, S, S, S]`` for the runtime's first pass.

        The first pass only draws the nodule's box (:func:`nodule_edge.patch.run_nodule_bounded`).
        With a first-pass model in the bundle (a box net) this runs it; otherwise the model's own
        ``segmentation`` output: this default runs the whole graph, and an engine that can compile
        the graph cut to the segmentation (``cpu-fast``, ``cpu-int8`` on OpenVINO) skips the heads
        and the in-graph Grad-CAM.
        """
        if self._first_pass is not None:
            return self._first_pass(patches)
        return self.run(patches)["segmentation"]

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract: most engines hold nothing to free
        """Free what the engine holds outside Python's memory (GPU buffers); a no-op by default."""


def check_first_pass(model: ModelMetadata, first_pass: dict[str, str], path: Path) -> None:
    """Refuse a first-pass model that does not belong to the model it runs before.

    Args:
        model: The collaborative model's metadata.
        first_pass: The first-pass model's ``metadata_props``.
        path: The first-pass file, for the message.

    Raises:
        BundleError: Not a first-pass model, another patch spec, or another model version.
    """
    if first_pass.get("format") != FIRST_PASS_FORMAT:
        raise BundleError(f"{path} is not a first-pass model (format {first_pass.get('format')!r})")
    try:
        spec = PatchSpec.from_json(first_pass["patch_spec"])
        outputs = tuple(json.loads(first_pass["output_names"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"first-pass model {path} has malformed metadata: {exc}") from exc
    if spec != model.patch_spec:
        raise BundleError(f"first-pass model {path} reads another patch ({spec}) than the model ({model.patch_spec})")
    if outputs != ("segmentation",):
        raise BundleError(f"first-pass model {path} must output 'segmentation' alone, has {list(outputs)}")
    if first_pass.get("model_version") != model.model_version:
        raise BundleError(
            f"first-pass model {path} belongs to model version {first_pass.get('model_version')!r}, not {model.model_version!r}"
        )


def need_artifact(bundle: Bundle, role: str) -> Path:
    """Path of the bundle's artifact ``role`` (``onnx_fp32``, ``cpu_engine``, ``tensorrt``).

    Raises:
        EngineError: The bundle has no such artifact.
    """
    path = bundle.path(role)
    if path is None:
        raise EngineError(f"the bundle {bundle.root} has no '{role}' artifact")
    return path


def default_threads() -> int:
    """Cores this process may run on (the affinity mask, so containers and taskset are honoured)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class CpuEngine:
    """A model file loaded by one CPU library, with one ``run`` call whichever library it is.

    What :class:`~nodule_edge.runtime.engines.openvino.CpuFastEngine` runs, and what the CPU
    benchmark (``benches/cpu_engines.py``) compares. Not thread-safe for the OpenVINO backend (one
    infer request); create one per thread.

    Attributes:
        path: The model file.
        backend: ``"onnxruntime"`` or ``"openvino"`` (``"ort-openvino-ep"`` in the benchmark).
        precision: Precision the non-quantised layers run in (``"f32"`` or ``"bf16"``).
        metadata: The model's ``metadata_props``.
        output_names: Output names in model order.
    """

    path: Path
    backend: str
    precision: str
    metadata: dict[str, str]
    output_names: tuple[str, ...]
    _run: Callable[[np.ndarray], dict[str, np.ndarray]] = field(repr=False)
    _segment: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch of patches.

        Args:
            patches: float32 ``[N, 2, 64, 64, 64]`` in [0, 1].

        Returns:
            Every output by name (fresh arrays the caller owns).

        Raises:
            EngineError: Not a 5-D batch, or the library failed.
        """
        return self._call(self._run, patches, "")

    def segment(self, patches: np.ndarray) -> np.ndarray:
        """The ``segmentation`` output alone (:meth:`Engine.segment`).

        Runs the graph cut to the segmentation where the library compiled one
        (``load_cpu_engine(..., segmentation_pass=True)`` on OpenVINO), else the whole graph.

        Raises:
            EngineError: Not a 5-D batch, or the library failed.
        """
        if self._segment is None:
            return self.run(patches)["segmentation"]
        return self._call(self._segment, patches, "the segmentation pass of ")

    def _call(self, fn: Callable[[np.ndarray], _T], patches: np.ndarray, what: str) -> _T:
        """``fn`` on a float32 5-D batch, the library's errors as :class:`EngineError` naming ``what``."""
        patches = np.ascontiguousarray(patches, dtype=np.float32)
        if patches.ndim != 5:
            raise EngineError(f"patches must be [N, C, S, S, S], got shape {patches.shape}")
        try:
            return fn(patches)
        except Exception as exc:  # ORT's and OpenVINO's errors share no base class but Exception
            raise EngineError(
                f"{self.backend} failed on {what}{self.path.name} with input {patches.shape}: {exc}"
            ) from exc

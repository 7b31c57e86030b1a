"""The backend table: every inference backend, in the order ``auto`` tries them, and how to make one.

:data:`BACKEND_TABLE` is the one list of backends. ``--backend auto`` resolution
(:func:`create_engine`), the CLI's ``--backend`` choices (``nodule_edge/cli/_common.py``) and the README's
backend table ("Engines and deployment") all read it: the README table is
:func:`backend_table_markdown`'s output, printed by ``python -m nodule_edge.runtime.engines``, and
``tests/runtime/engines/test_backends.py`` checks the two agree.

Engine modules are imported only when their backend is created, so a run on OpenVINO never
imports ONNX Runtime or TensorRT code.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodule_edge.errors import EngineError, MissingDependencyError

if TYPE_CHECKING:
    from nodule_edge.runtime.bundle import Bundle
    from nodule_edge.runtime.engines.base import Engine

__all__ = ["ALL_BACKENDS", "BACKENDS", "BACKEND_TABLE", "BackendSpec", "backend_table_markdown", "create_engine"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table.

    Attributes:
        name: What ``--backend`` and :func:`create_engine` take.
        module: Module under ``nodule_edge.runtime.engines`` that implements it.
        engine_class: The :class:`~nodule_edge.runtime.engines.base.Engine` subclass there.
        artifact: What it runs, for the README (file and library).
        status: When it is used and how far it is tested, for the README.
        auto: Whether ``auto`` tries it (in table order).
        unavailable: ``(bundle) -> reason or None``: why this backend cannot run that bundle
            here, checked before anything is loaded (the reason is the error message, and what
            ``auto`` logs for a skipped backend).
    """

    name: str
    module: str
    engine_class: str
    artifact: str
    status: str
    auto: bool
    unavailable: Callable[[Bundle], str | None]

    def create(self, bundle: Bundle, threads: int | None = None) -> Engine:
        """Check availability, then load this backend's engine from ``bundle``.

        Raises:
            EngineError: Unavailable here, or the engine cannot be loaded.
            MissingDependencyError: An optional library is not installed.
        """
        reason = self.unavailable(bundle)
        if reason:
            raise EngineError(reason)
        module = importlib.import_module(f"{__package__}.{self.module}")
        engine_class: type[Engine] = getattr(module, self.engine_class)
        return engine_class.from_bundle(bundle, self.name, threads)


def _missing_artifact(bundle: Bundle, role: str) -> str | None:
    return None if bundle.path(role) is not None else f"the bundle {bundle.root} has no '{role}' artifact"


def _tensorrt_unavailable(bundle: Bundle) -> str | None:
    # TensorRT itself is imported on load, after the engine file and its sidecar are checked.
    if bundle.path("tensorrt") is None:
        return "the bundle has no TensorRT engine (build one with 'nodule-edge export --tensorrt')"
    return None


def _cuda_unavailable(bundle: Bundle) -> str | None:
    from nodule_edge.runtime.engines.onnxruntime import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        return "ONNX Runtime has no CUDA provider here (install nodule-edge[gpu] on a CUDA machine)"
    return _missing_artifact(bundle, "onnx_fp32")


def _cpu_fast_unavailable(bundle: Bundle) -> str | None:
    from nodule_edge.runtime.engines.openvino import openvino_available

    missing = _missing_artifact(bundle, "onnx_fp32")
    if missing is None and not openvino_available():
        return "backend 'cpu-fast' runs on OpenVINO, which is not installed (pip install 'nodule-edge[openvino]')"
    return missing


BACKEND_TABLE: tuple[BackendSpec, ...] = (
    BackendSpec(
        "tensorrt",
        "tensorrt",
        "TensorRTEngine",
        "`model.plan` + sidecar",
        "**written against the TensorRT 10 Python API but never executed**: no machine available to this project has TensorRT libraries or an NVIDIA GPU",
        True,
        _tensorrt_unavailable,
    ),
    BackendSpec(
        "cuda",
        "onnxruntime",
        "OnnxEngine",
        "`model.onnx` on ONNX Runtime's CUDA provider",
        "needs `nodule-edge[gpu]` (replaces `onnxruntime`); the provider actually used is read back from the session",
        True,
        _cuda_unavailable,
    ),
    BackendSpec(
        "cpu-fast",
        "openvino",
        "CpuFastEngine",
        "`model.onnx` compiled by OpenVINO with bf16 precision",
        'default on CPU when `nodule-edge[openvino]` is installed; see "Performance"',
        True,
        _cpu_fast_unavailable,
    ),
    # cpu-int8 is faster still without OpenVINO but moves probabilities by up to 0.26 and ratings by
    # up to 1.4 points, and can invert the (p - 0.5)-signed saliency near p = 0.5 (README, Performance): asked for only.
    BackendSpec(
        "cpu-int8",
        "openvino",
        "CpuFastEngine",
        "`model.int8.onnx`, static INT8 (QDQ), OpenVINO or ONNX Runtime",
        'opt-in only (accuracy caveat in "Performance")',
        False,
        lambda bundle: _missing_artifact(bundle, "cpu_engine"),
    ),
    BackendSpec(
        "cpu",
        "onnxruntime",
        "OnnxEngine",
        "`model.onnx`, fp32 ONNX Runtime",
        "reference and fallback; parity with PyTorch ≤ 1e-4 (tests)",
        True,
        lambda bundle: _missing_artifact(bundle, "onnx_fp32"),
    ),
)
"""Every backend, fastest first: the order ``auto`` tries those marked ``auto``."""

_BY_NAME = {spec.name: spec for spec in BACKEND_TABLE}

#: Every backend name, in table order.
ALL_BACKENDS: tuple[str, ...] = tuple(spec.name for spec in BACKEND_TABLE)
#: Backends in the order ``auto`` tries them.
BACKENDS: tuple[str, ...] = tuple(spec.name for spec in BACKEND_TABLE if spec.auto)


def create_engine(bundle: Bundle, backend: str = "auto", threads: int | None = None) -> Engine:
    """Create the engine for ``backend``, or the first that works in :data:`BACKENDS` order.

    Args:
        bundle: A verified bundle.
        backend: ``auto`` or one of :data:`ALL_BACKENDS`.
        threads: Intra-op threads (default: the library's choice, or ``$NODULE_EDGE_THREADS``).

    Returns:
        The engine. With ``auto`` the choice, and why each faster backend was skipped, is logged
        at INFO.

    Raises:
        EngineError: Unknown backend, the backend is unavailable, or (``auto``) none works.
        MissingDependencyError: The asked-for backend's optional library is not installed.
    """
    threads = threads or (int(os.environ["NODULE_EDGE_THREADS"]) if os.environ.get("NODULE_EDGE_THREADS") else None)
    if backend != "auto":
        spec = _BY_NAME.get(backend)
        if spec is None:
            raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(('auto',) + ALL_BACKENDS)}")
        return spec.create(bundle, threads)
    reasons = []
    for candidate in BACKENDS:
        try:
            engine = _BY_NAME[candidate].create(bundle, threads)
        except (EngineError, MissingDependencyError, ImportError) as exc:
            reasons.append(f"{candidate}: {exc}")
            log.debug("backend %s unavailable: %s", candidate, exc)
            continue
        log.info("backend auto-selected: %s (skipped: %s)", candidate, "; ".join(reasons) or "none")
        return engine
    raise EngineError("no inference backend could be created: " + "; ".join(reasons))


def backend_table_markdown() -> str:
    """The README's backend table ("Engines and deployment"), rendered from :data:`BACKEND_TABLE`."""
    auto_rank = {name: i + 1 for i, name in enumerate(BACKENDS)}
    lines = ["| backend | `auto` order | artifact | module | status |", "|---|---|---|---|---|"]
    for spec in BACKEND_TABLE:
        rank = str(auto_rank[spec.name]) if spec.name in auto_rank else "never (ask for it)"
        module = f"`runtime/engines/{spec.module}.py`"
        lines.append(f"| `{spec.name}` | {rank} | {spec.artifact} | {module} | {spec.status} |")
    return "\n".join(lines) + "\n"

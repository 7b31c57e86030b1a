"""Export the collaborative model to one forward-only ONNX graph with an in-graph Grad-CAM.

The model's Grad-CAM is closed form (see :mod:`nodule_edge.train.model`), so the exported graph
is an ordinary forward computation: no autograd operators, and one graph gives the diagnosis, the
segmentation, the saliency map, the trust check and the retrieval embedding. Everything the
runtime needs (patch spec, attribute names and scale, output names, versions, hashes, metrics) is
stored in the file's ``metadata_props``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nodule_edge import __version__
from nodule_edge._files import atomic_file
from nodule_edge._files import sha256_file as file_sha256
from nodule_edge.attributes import ATTRIBUTE_NAMES, RATING_MAX, RATING_MIN
from nodule_edge.errors import require
from nodule_edge.export.graph_rewrites import REWRITES
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec
from nodule_edge.runtime.engines.base import FIRST_PASS_FORMAT

__all__ = [
    "OUTPUT_NAMES",
    "INPUT_NAME",
    "ExportResult",
    "export_box_net_onnx",
    "export_onnx",
    "file_sha256",
    "build_export_module",
]

log = logging.getLogger(__name__)

INPUT_NAME = "patch"
OUTPUT_NAMES: tuple[str, ...] = (
    "malignancy_probability",
    "attributes",
    "segmentation",
    "saliency",
    "nodule_attention",
    "background_attention",
    "embedding",
    # The classifier's evidence before the sigmoid: float32 probabilities read exactly 1.0 beyond a
    # logit of about 16.6, where occlusion and deletion curves need the logit (README, Explanations).
    "malignancy_logit",
)
OPSET = 18


def build_export_module(model: Any) -> Any:
    """Wrap a :class:`CollaborativeNet` so its forward returns the exported outputs as a tuple.

    The saliency (and a 16³ segmentation) are upsampled to the patch's 64³ with trilinear
    interpolation; attributes are mapped to the 1–5 rating scale.
    """
    require("torch", "export")
    import torch
    import torch.nn.functional as F

    class _Exported(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, patch: Any) -> tuple[Any, ...]:
            out = self.net(patch)
            size = patch.shape[-1]
            seg = out.segmentation
            if seg.shape[-1] != size:  # the papers' 16³ head (light16); unet64 is at the patch grid
                seg = F.interpolate(seg, size=(size, size, size), mode="trilinear", align_corners=False)
            seg = seg[:, 0]
            cam = F.interpolate(out.cam, size=(size, size, size), mode="trilinear", align_corners=False)[:, 0]
            ratings = out.attributes * (RATING_MAX - RATING_MIN) + RATING_MIN
            return (
                out.malignancy_probability,
                ratings,
                seg,
                cam.clamp(0.0, 1.0),
                out.nodule_attention,
                out.background_attention,
                out.embedding,
                out.malignancy_logit,
            )

    return _Exported(model).eval()


@dataclass(frozen=True)
class ExportResult:
    """Where the ONNX file went and what it says about itself."""

    path: Path
    sha256: str
    metadata: dict[str, str]


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    spec: PatchSpec | None = None,
    model_version: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a checkpoint to ONNX (fp32, dynamic batch) with metadata, written atomically.

    Args:
        checkpoint: A ``.safetensors`` checkpoint written by the trainer (JSON sidecar beside it).
        out_path: Destination ``.onnx`` file.
        spec: The patch spec the model was trained with (stored in the file); default: the one
            the checkpoint records (a checkpoint from before the nodule box: the whole cube).
        model_version: Version string stored in the metadata (default: package version + epoch).
        extra_metadata: More key/value pairs (e.g. model-card metrics), JSON-encoded when not str.

    Returns:
        The path, its sha256 and the metadata written.
    """
    require("torch", "export")
    require("onnx", "export")
    from nodule_edge.train.trainer import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    if spec is None:
        recorded = meta.get("patch_spec")
        spec = PatchSpec.from_json(recorded) if recorded else DEFAULT_PATCH_SPEC
        if "nodule_box" not in json.loads(recorded or "{}"):
            spec = replace(spec, nodule_box=None)
    module = build_export_module(model.float())
    metadata: dict[str, str] = {
        "format": "nodule-edge-onnx-v1",
        "nodule_edge_version": __version__,
        "model_version": model_version or f"{__version__}+epoch{meta.get('epoch', 0)}",
        "patch_spec": spec.to_json(),
        "attribute_names": json.dumps(list(ATTRIBUTE_NAMES)),
        "attribute_scale": json.dumps([RATING_MIN, RATING_MAX]),
        "input_name": INPUT_NAME,
        "output_names": json.dumps(list(OUTPUT_NAMES)),
        "config_sha256": str(meta.get("config_sha256", "")),
        "model_config": json.dumps(meta.get("model_config", {})),
        "checkpoint_sha256": file_sha256(checkpoint),
        "saliency": "Grad-CAM at the fusion output w.r.t. the malignancy probability, (p-0.5)-signed, min-max normalised, closed form",
    }
    outline_head = meta.get("classifier_refit", {}).get("outline_head")
    if outline_head is not None:
        # Added by the runtime after this graph, on the first pass's outline (nodule_edge.outline).
        metadata["outline_head"] = json.dumps(outline_head)
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    return _export_graph(module, spec, Path(out_path), OUTPUT_NAMES, metadata)


def _export_graph(
    module: Any, spec: PatchSpec, out_path: Path, output_names: tuple[str, ...], metadata: dict[str, str]
) -> ExportResult:
    """Trace ``module`` to ONNX (dynamic batch), apply :data:`REWRITES`, store ``metadata``,
    check and write it atomically."""
    import torch

    onnx = require("onnx", "export")
    example = torch.rand(2, spec.channels, spec.size, spec.size, spec.size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as tmp:
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                dynamic_shapes={"patch": {0: torch.export.Dim("batch", min=1, max=1024)}},
            )
        proto = onnx.load(str(tmp))
        for rewrite in REWRITES:
            proto = rewrite(proto)
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "nodule-edge"
        proto.producer_version = __version__
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    digest = file_sha256(out_path)
    log.info("exported %s (sha256 %s…)", out_path, digest[:12])
    return ExportResult(out_path, digest, metadata)


def export_box_net_onnx(
    checkpoint: str | Path, out_path: str | Path, *, spec: PatchSpec, model_version: str
) -> ExportResult:
    """Export a box net (:mod:`nodule_edge.train.first_pass`) as the runtime's first-pass model.

    One input (``patch``, dynamic batch) and one output, ``segmentation`` ``[N, S, S, S]``, the
    same names and shapes as the collaborative model's, so an engine runs either as its first
    pass. The metadata names the format, the patch spec (the collaborative model's: the first
    pass reads the same whole cubes) and the model version it belongs to.

    Args:
        checkpoint: A box net's ``.safetensors`` (JSON sidecar beside it).
        out_path: Destination ``.onnx`` file, written atomically.
        spec: The collaborative model's patch spec.
        model_version: The collaborative model's version: the two ship together.
    """
    require("torch", "export")
    require("onnx", "export")
    import torch

    from nodule_edge.train.first_pass import load_box_net

    net, _ = load_box_net(checkpoint)

    class _Exported(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, patch: Any) -> Any:
            return self.inner(patch)[:, 0]

    module = _Exported(net.float()).eval()
    metadata = {
        "format": FIRST_PASS_FORMAT,
        "nodule_edge_version": __version__,
        "model_version": model_version,
        "patch_spec": spec.to_json(),
        "input_name": INPUT_NAME,
        "output_names": json.dumps(["segmentation"]),
        "checkpoint_sha256": file_sha256(checkpoint),
    }
    return _export_graph(module, spec, Path(out_path), ("segmentation",), metadata)

"""The embeddable inference API: load once, then diagnose nodules in studies, files or arrays.

Example:
    >>> from nodule_edge.runtime import NoduleInferer
    >>> inferer = NoduleInferer()                      # verifies and loads the shipped bundle
    >>> result = inferer.infer("study/", voxels=[(120, 88, 54)])
    >>> nodule = result.nodules[0]
    >>> nodule.malignancy_probability, nodule.attributes["spiculation"], nodule.trustworthy

:class:`NoduleInferer` is thread-safe: engines, the index and studies hold no per-call state, so
one instance can serve many threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nodule_edge.errors import BundleError, CoordinateError, IndexError_, StudyError
from nodule_edge.outline import runtime_finish
from nodule_edge.patch import run_nodule_bounded
from nodule_edge.runtime.bundle import Bundle, load_bundle
from nodule_edge.runtime.engines import Engine, create_engine
from nodule_edge.runtime.measure import component_measurements, largest_central_component
from nodule_edge.runtime.quality import QualityFlag, TrainingRanges, nodule_flags, study_flags
from nodule_edge.runtime.study import Study, open_study, study_from_image
from nodule_edge.volume import Grid, Volume, float3

__all__ = ["NoduleInferer", "NodulePrediction", "NoduleResult", "StudyResult"]

log = logging.getLogger(__name__)

#: Below this |p − 0.5| the (p − 0.5)-signed saliency map is flagged as sign-uncertain.
SALIENCY_SIGN_MARGIN = 0.05


@dataclass
class NodulePrediction:
    """Model outputs for one patch (maps on the 64³ patch grid, LPS-aligned)."""

    malignancy_probability: float
    attributes: dict[str, float]
    nodule_attention: float
    background_attention: float
    trustworthy: bool
    embedding: np.ndarray
    segmentation: np.ndarray
    saliency: np.ndarray
    similar: list[Any] = field(default_factory=list)
    retrieval_score: float | None = None
    nodule_bounded: bool = False
    first_pass_found_nodule: bool = True
    #: The first pass's outline statistics (:data:`nodule_edge.outline.OUTLINE_FEATURE_NAMES`) for a
    #: model with an outline term, else None.
    outline_statistics: np.ndarray | None = None
    #: What the outline term added to the malignancy logit, for a model with one, else None.
    outline_logit: float | None = None
    #: Whether the outline term changed the class (p > 0.5 or not): the saliency then maps the
    #: network's evidence for the final class, the complement of its own map. None without a term.
    outline_changes_class: bool | None = None

    @property
    def saliency_sign_uncertain(self) -> bool:
        """The saliency is signed by (p − 0.5): within 0.05 of 0.5 a small change inverts it."""
        return abs(self.malignancy_probability - 0.5) < SALIENCY_SIGN_MARGIN


@dataclass
class NoduleResult:
    """One requested location and its diagnosis."""

    xyz_voxel: tuple[float, float, float]
    world_lps_mm: tuple[float, float, float]
    center_slice: dict[str, Any] | None
    prediction: NodulePrediction
    patch: np.ndarray
    volume_mm3: float
    longest_axial_diameter_mm: float
    quality_flags: list[QualityFlag] = field(default_factory=list)
    #: Maps and metrics of :meth:`NoduleInferer.explain` (None until asked for).
    explanations: Any = None

    @property
    def malignancy_probability(self) -> float:
        return self.prediction.malignancy_probability

    @property
    def attributes(self) -> dict[str, float]:
        return self.prediction.attributes

    @property
    def trustworthy(self) -> bool:
        """Grad-CAM on the nodule and, when explanations were computed, the methods agree."""
        return self.prediction.trustworthy and not self.trust_reasons

    @property
    def trust_reasons(self) -> list[str]:
        """Why :attr:`trustworthy` is false (empty when it is true)."""
        reasons = (
            [] if self.prediction.trustworthy else ["Grad-CAM attention is not higher inside the nodule than outside"]
        )
        return reasons + (self.explanations.trust_reasons if self.explanations is not None else [])


@dataclass
class StudyResult:
    """All nodules of one call, with the study they came from and per-stage timings."""

    study: Study
    nodules: list[NoduleResult]
    backend: str
    model_version: str
    timing_ms: dict[str, float]
    executor: str = ""
    quality_flags: list[QualityFlag] = field(default_factory=list)
    #: What the quality flags' training ranges were measured on; None when the bundle records
    #: none and only the range-free checks ran.
    training_data: str | None = None

    @property
    def all_quality_flags(self) -> list[tuple[int | None, QualityFlag]]:
        """Every flag with the index of its nodule (None for flags about the series)."""
        return [(None, f) for f in self.quality_flags] + [
            (i, f) for i, n in enumerate(self.nodules) for f in n.quality_flags
        ]


class NoduleInferer:
    """Load a bundle once; diagnose nodules from studies, volume files or in-memory arrays.

    The constructor does the expensive work once: it verifies the bundle, compiles the engine and
    loads the similar-nodule index and thumbnails. Studies are opened lazily per call: headers
    first, then only the slices the 64³ cube needs are decoded.

    Example:
        >>> from nodule_edge.runtime import NoduleInferer
        >>> inferer = NoduleInferer(backend="cpu-fast")
        >>> result = inferer.infer("study/", voxels=[(120, 88, 54)])  # doctest: +SKIP
        >>> result.nodules[0].prediction.malignancy_probability  # doctest: +SKIP
        0.93

    Args:
        bundle: Bundle folder (default: ``$NODULE_EDGE_BUNDLE`` or the shipped bundle), or a
            loaded :class:`Bundle`.
        backend: ``auto`` or one of ``tensorrt``, ``cuda``, ``cpu-fast``, ``cpu``.
        top_k: Similar nodules to retrieve.
        trust_margin: A prediction is ``trustworthy`` when the mean saliency inside the predicted
            nodule exceeds the mean outside by more than this.
        threads: ONNX Runtime intra-op threads (None: its default).
    """

    def __init__(
        self,
        bundle: str | Path | Bundle | None = None,
        backend: str = "auto",
        top_k: int = 20,
        trust_margin: float = 0.0,
        threads: int | None = None,
    ) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.engine: Engine = create_engine(self.bundle, backend, threads)
        self.spec = self.engine.metadata.patch_spec
        self.attribute_names = self.engine.metadata.attribute_names
        # A model with an outline term: the first pass's outline statistics and the term join the
        # second pass's outputs (nodule_edge.outline; docs/cv/README.md, item 15).
        self.outline_head = self.engine.metadata.outline_head
        self._finish = runtime_finish(self.spec, self.outline_head)
        self.top_k = top_k
        self.trust_margin = trust_margin
        self.index = None
        self.index_kind = None
        index_dir = self.bundle.path("index")
        if index_dir is not None and top_k > 0:
            from nodule_edge.index import AttributeIndex

            self.index = AttributeIndex.load(index_dir)
            self.index_kind = self.index.kind
        self.thumbnails = self._load_thumbnails()
        #: The training data's ranges the quality flags compare with (None for older bundles).
        self.training_ranges = TrainingRanges.from_json(self.bundle.manifest.get("training_data"))

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def executor(self) -> str:
        """What actually runs the backend (e.g. ``openvino``, ``CPUExecutionProvider``)."""
        return self.engine.providers[0] if self.engine.providers else self.engine.backend

    @property
    def model_version(self) -> str:
        return self.engine.metadata.model_version

    def _load_thumbnails(self) -> dict[str, np.ndarray]:
        path = self.bundle.path("index_thumbnails")
        ids_path = self.bundle.path("index_thumbnail_ids")
        if path is None or ids_path is None:
            return {}
        try:
            images = np.load(path, allow_pickle=False)
            ids = ids_path.read_text().splitlines()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"bundle thumbnails {path} cannot be read: {exc}") from exc
        if images.ndim != 3 or len(images) != len(ids):
            raise BundleError(
                f"bundle thumbnails {path} hold {images.shape} images for {len(ids)} ids in {ids_path.name}"
            )
        return dict(zip(ids, images))

    # -- public API -----------------------------------------------------------------------
    def open(self, source: str | Path, series_uid: str | None = None) -> Study:
        """Open a study (DICOM folder or volume file) without reading pixels yet."""
        return open_study(source, series_uid=series_uid)

    def infer(
        self,
        source: str | Path | Study,
        voxels: Sequence[Sequence[float]] = (),
        worlds: Sequence[Sequence[float]] = (),
        series_uid: str | None = None,
        exclude_ids: set[str] | None = None,
    ) -> StudyResult:
        """Diagnose nodules at voxel (column, row, slice) and/or world (LPS mm) locations.

        All points of one call share one header scan, one pixel read and one engine batch.
        """
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        study = source if isinstance(source, Study) else open_study(source, series_uid=series_uid)
        timing["open_study"] = _ms(t0)
        return self._infer_study(study, voxels, worlds, timing, exclude_ids)

    def infer_array(
        self,
        hu: np.ndarray,
        spacing_mm: Sequence[float],
        origin_lps_mm: Sequence[float] = (0.0, 0.0, 0.0),
        direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
        voxels: Sequence[Sequence[float]] = (),
        worlds: Sequence[Sequence[float]] = (),
    ) -> StudyResult:
        """Diagnose nodules in an in-memory HU volume ``[slice, row, column]`` with LPS geometry."""
        hu = np.asarray(hu)
        if hu.ndim != 3:
            raise CoordinateError(f"expected a 3-D HU array [slice, row, column], got shape {hu.shape}")
        grid = Grid(
            size=(hu.shape[2], hu.shape[1], hu.shape[0]),
            spacing_mm=float3(spacing_mm),
            origin=float3(origin_lps_mm),
            direction=tuple(float(d) for d in direction),
        )
        return self._infer_study(study_from_image(Volume(hu, grid)), voxels, worlds, {})

    def predict_patches(self, patches: np.ndarray, exclude_ids: set[str] | None = None) -> list[NodulePrediction]:
        """Run the model (and retrieval) on ready-made whole-cube patches ``[N, C, S, S, S]``.

        A model with a nodule box in its patch spec runs twice: the first pass's segmentation
        bounds the cube as the training VOIs were bounded, the second pass gives the answer.
        """
        outputs, found = run_nodule_bounded(
            self.engine.run, patches, self.spec, segment=self.engine.segment, finish=self._finish
        )
        return self._predictions(outputs, exclude_ids, found)

    @staticmethod
    def _outline_fields(outputs: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        """The outline term of nodule ``i`` as :meth:`OutlineHead.apply` recorded it (its
        statistics, its logit, whether it changed the class); nothing for a model without one."""
        if "outline_logit" not in outputs:
            return {}
        return {
            "outline_statistics": outputs["outline_statistics"][i],
            "outline_logit": float(outputs["outline_logit"][i]),
            "outline_changes_class": bool(outputs["outline_changes_class"][i]),
        }

    def model_run(self, prediction: NodulePrediction | None = None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """The second pass as explanations perturb it: the engine, plus the outline term of
        ``prediction``'s first pass (fixed: a perturbation of the second pass's cube does not
        move the first pass's outline) for a model that has one."""
        if self.outline_head is None or prediction is None or prediction.outline_statistics is None:
            return self.engine.run
        head, statistics = self.outline_head, prediction.outline_statistics

        def run(patches: np.ndarray) -> dict[str, np.ndarray]:
            return head.apply(self.engine.run(patches), np.repeat(statistics[None], len(patches), axis=0))

        return run

    def explain(
        self,
        result: StudyResult,
        methods: Sequence[str] | str = ("gradcam", "occlusion"),
        *,
        occlusion_options: dict[str, Any] | None = None,
        faithfulness: bool = False,
    ) -> StudyResult:
        """Add explanations (``gradcam``, ``occlusion``) and their metrics to every nodule of ``result``.

        With both methods their agreement is checked against the bundle's threshold; a nodule
        whose methods disagree becomes untrustworthy (``trust_reasons`` says why) and gets the
        ``explanations_disagree`` quality flag. The predictions do not change.

        Raises:
            OptionError: Unknown method, a method that needs PyTorch, or a bad occlusion option.
        """
        from nodule_edge.runtime.explain import explain_nodule, parse_methods

        chosen = parse_methods(methods)
        t0 = time.perf_counter()
        for nodule in result.nodules:
            nodule.explanations = explain_nodule(
                self, nodule, chosen, occlusion_options=occlusion_options, faithfulness=faithfulness
            )
            agreement = nodule.explanations.agreement
            for reason in nodule.explanations.trust_reasons:
                nodule.quality_flags.append(
                    QualityFlag("explanations_disagree", reason, agreement.spearman if agreement is not None else None)
                )
        result.timing_ms["explain"] = _ms(t0)
        return result

    # -- internals ------------------------------------------------------------------------
    def _infer_study(
        self,
        study: Study,
        voxels: Sequence[Sequence[float]],
        worlds: Sequence[Sequence[float]],
        timing: dict[str, float],
        exclude_ids: set[str] | None = None,
    ) -> StudyResult:
        if not voxels and not worlds:
            raise CoordinateError("no nodule location given: pass at least one voxel (--xyz) or world (--world) point")
        t0 = time.perf_counter()
        locations: list[tuple[np.ndarray, np.ndarray]] = []
        for v in voxels:
            xyz = _point(v, "voxel coordinate")
            locations.append((xyz, study.voxel_to_world(xyz)))
        for w in worlds:
            lps = _point(w, "LPS point")
            locations.append((study.world_to_voxel(lps), lps))
        timing["coordinates"] = _ms(t0)
        t0 = time.perf_counter()
        patches = study.build_patches([w for _, w in locations], self.spec)
        timing["read_and_patch"] = _ms(t0)
        for (_, lps), patch in zip(locations, patches):
            # NaN/inf voxels would come back as NaN predictions that look like results.
            if not np.isfinite(patch).all():
                raise StudyError(
                    f"the voxels around LPS {tuple(round(float(v), 2) for v in lps)} mm are not finite numbers "
                    "(NaN or infinite HU: check RescaleSlope/RescaleIntercept, or the array passed in)"
                )
        t0 = time.perf_counter()
        outputs, found = run_nodule_bounded(
            self.engine.run, patches, self.spec, segment=self.engine.segment, finish=self._finish
        )
        timing["engine"] = _ms(t0)
        t0 = time.perf_counter()
        predictions = self._predictions(outputs, exclude_ids, found)
        timing["retrieval_and_measure"] = _ms(t0)
        nodules = []
        for (xyz, lps), pred, patch in zip(locations, predictions, patches):
            # One connected-component pass serves the measurements and the quality flags.
            component = largest_central_component(pred.segmentation >= 0.5)
            measures = component_measurements(component, self.spec.spacing_mm)
            flags = nodule_flags(
                study,
                lps,
                patch,
                pred.segmentation,
                measures["volume_mm3"],
                pred.first_pass_found_nodule,
                pred.trustworthy,
                self.spec,
                self.training_ranges,
                component=component,
            )
            nodules.append(
                NoduleResult(
                    xyz_voxel=float3(xyz),
                    world_lps_mm=float3(lps),
                    center_slice=_slice_reference(study, float(xyz[2])),
                    prediction=pred,
                    patch=patch,
                    volume_mm3=measures["volume_mm3"],
                    longest_axial_diameter_mm=measures["longest_axial_diameter_mm"],
                    quality_flags=flags,
                )
            )
        return StudyResult(
            study,
            nodules,
            self.backend,
            self.model_version,
            timing,
            self.executor,
            study_flags(study, self.training_ranges),
            self.training_ranges.source if self.training_ranges else None,
        )

    def _predictions(
        self, outputs: dict[str, np.ndarray], exclude_ids: set[str] | None, found: np.ndarray | None = None
    ) -> list[NodulePrediction]:
        n = len(outputs["malignancy_probability"])
        bounded = self.spec.nodule_box is not None
        preds = []
        for i in range(n):
            ratings = outputs["attributes"][i]
            inside = float(outputs["nodule_attention"][i])
            outside = float(outputs["background_attention"][i])
            preds.append(
                NodulePrediction(
                    malignancy_probability=float(outputs["malignancy_probability"][i]),
                    attributes={name: float(r) for name, r in zip(self.attribute_names, ratings)},
                    nodule_attention=inside,
                    background_attention=outside,
                    trustworthy=bool(inside - outside > self.trust_margin),
                    embedding=outputs["embedding"][i],
                    segmentation=outputs["segmentation"][i],
                    saliency=outputs["saliency"][i],
                    nodule_bounded=bounded,
                    first_pass_found_nodule=True if found is None else bool(found[i]),
                    **self._outline_fields(outputs, i),
                )
            )
        if self.index is not None and len(self.index) and n:
            from nodule_edge.index import vector_for

            queries = np.stack(
                [vector_for(self.index.kind, list(p.attributes.values()), p.malignancy_probability) for p in preds]
            )
            try:
                neighbours = self.index.query(queries, k=min(self.top_k, len(self.index)), exclude_ids=exclude_ids)
            except IndexError_:
                raise
            for pred, similar in zip(preds, neighbours, strict=True):
                pred.similar = list(similar)
                pred.retrieval_score = self.index.retrieval_score(similar)
        return preds


def _point(value: Any, what: str) -> np.ndarray:
    """One (x, y, z) point as float64, or a CoordinateError naming the value as the caller gave it."""
    try:
        point = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CoordinateError(f"{what} {value!r} is not three numbers (x, y, z): {exc}") from exc
    if point.shape != (3,):
        raise CoordinateError(f"{what} {value!r} must be three numbers (x, y, z), got shape {point.shape}")
    return point


def _slice_reference(study: Study, k: float) -> dict[str, Any] | None:
    ref = study.slice_reference(int(round(k)))
    if ref is None:
        return None
    sop_uid, instance_number = ref
    return {"sop_instance_uid": sop_uid, "instance_number": instance_number}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)

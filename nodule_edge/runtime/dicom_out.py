"""DICOM outputs for ``nodule-edge infer --dicom-out``: a SEG of the nodules and a TID 1500 SR.

Both objects join the source study (same Study Instance UID, patient and study modules copied
from the source slices by highdicom; that is the only place patient data goes, and it is never
logged) in two new series:

* ``nodule_seg.dcm``: Segmentation Storage, BINARY, one segment per nodule (category SCT
  "Morphologically Abnormal Structure", type SCT "Nodule", anatomic region SCT "Lung", algorithm
  type AUTOMATIC, algorithm family DCM "Artificial Intelligence", name ``nodule-edge``, version =
  the model version). The mask is the predicted segmentation's central component (the one the
  volume and diameter are measured on), resampled from the 64³ patch grid onto the source lattice;
  only source slices it touches become frames.
* ``nodule_sr.dcm``: Comprehensive 3D SR holding a TID 1500 Measurement Report, device observer
  ``nodule-edge``, one TID 1411 volumetric group per nodule that references its SEG segment and
  carries the segment's tracking UID.

Measurement codes in each group:

========================================  =================================================  ======
Concept                                   Code                                               Unit
========================================  =================================================  ======
nodule volume                             (118565006, SCT, "Volume")                         mm3
longest axial diameter                    (81827009, SCT, "Diameter"), derivation Maximum    mm
malignancy probability (0…1)              (111047, DCM, "Probability of cancer")             1
LIDC ratings (continuous, 1…5)            (``<attribute>``, 99NODULEEDGE, "... rating")      {rating}
mean saliency inside / outside nodule     (NODULE_ATTN / BACKGROUND_ATTN, 99NODULEEDGE)      1
attention on nodule (trust check)         (TRUSTWORTHY, 99NODULEEDGE) = SCT Yes / No         —
explanation metrics (``--explain``)       (``<method>.<metric>``, 99NODULEEDGE)              1
Grad-CAM vs occlusion agreement           (EXPL_AGREEMENT, 99NODULEEDGE), Spearman          1
quality flag (one per flag)               (QUALITY_FLAG, 99NODULEEDGE) = (``<flag code>``,   —
                                          99NODULEEDGE)
first-pass outline measurements (a        (FERET_MM, VOLUME_MM3, HU_MEAN, HU_SD, HU_P90,     mm,
model with an outline term)               SOLID_FRACTION, COMPACTNESS; 99NODULEEDGE)         mm3,
                                                                                             [hnsf'U],
                                                                                             1
outline term of the malignancy logit      (OUTLINE_LOGIT, 99NODULEEDGE)                      1
the term changed the class                (OUTLINE_CLASS, 99NODULEEDGE) = SCT Yes / No       —
========================================  =================================================  ======

The outline measurements are :data:`nodule_edge.outline.OUTLINE_MEASUREMENTS` of the first pass's
outline, the malignancy head's inputs; the volume and diameter above are the SEG's segmentation's.

A nodule's group carries the series' quality flags and its own (README, "Quality flags"); the
flag codes are :data:`nodule_edge.runtime.quality.FLAG_CODES`.

``99NODULEEDGE`` is a private coding scheme (DICOM reserves the ``99`` prefix for local schemes);
it is declared in the SR's Coding Scheme Identification Sequence. The six attribute codes are the
names in :data:`nodule_edge.attributes.ATTRIBUTE_NAMES` (subtlety, sphericity, margin, lobulation,
spiculation, malignancy), rated on the LIDC-IDRI 1–5 scales as the model predicts them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nodule_edge import __version__
from nodule_edge.errors import OutputError, require
from nodule_edge.outline import OUTLINE_MEASUREMENTS, outline_measurements
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, patch_grid
from nodule_edge.runtime.measure import largest_central_component
from nodule_edge.volume import Volume, resample

if TYPE_CHECKING:
    from nodule_edge.runtime.inferer import NoduleInferer, NoduleResult, StudyResult

__all__ = [
    "CODING_SCHEME",
    "SEG_FILE",
    "SR_FILE",
    "SEG_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "dicom_writer",
    "write_dicom_outputs",
]

log = logging.getLogger(__name__)

CODING_SCHEME = "99NODULEEDGE"
SEG_FILE = "nodule_seg.dcm"
SR_FILE = "nodule_sr.dcm"
# High, fixed numbers keep the derived series after the acquired ones in PACS listings.
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902

_MANUFACTURER = "nodule-edge"
_THRESHOLD = 0.5
# Type 1 attributes a source slice must carry for the SEG/SR to reference it.
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
# Type 2 patient/study attributes highdicom copies unconditionally; anonymised series often drop
# them, and DICOM allows them to be present but empty.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def dicom_writer(inferer: NoduleInferer) -> Callable[[Path, StudyResult], list[str]]:
    """An ``extra_writers`` entry for :func:`nodule_edge.runtime.outputs.write_outputs`.

    Args:
        inferer: The :class:`~nodule_edge.runtime.inferer.NoduleInferer` that produced the
            results (its ``spec`` places the patch grid; the model version comes from the result).

    Returns:
        ``writer(out_dir, result) -> [SEG_FILE, SR_FILE]``.

    Raises:
        MissingDependencyError: highdicom is not installed (raised now, before any work).
    """
    require("highdicom", "dicom-out")
    spec: PatchSpec = getattr(inferer, "spec", None) or DEFAULT_PATCH_SPEC

    def writer(out_dir: Path, result: StudyResult) -> list[str]:
        return write_dicom_outputs(out_dir, result, spec)

    return writer


def write_dicom_outputs(out_dir: str | Path, result: StudyResult, spec: PatchSpec = DEFAULT_PATCH_SPEC) -> list[str]:
    """Write ``nodule_seg.dcm`` and ``nodule_sr.dcm`` for a DICOM-sourced study result.

    Args:
        out_dir: Existing folder to write into (the output pipeline's temporary folder).
        result: A :class:`~nodule_edge.runtime.inferer.StudyResult`.
        spec: Patch definition the segmentations were predicted on.

    Returns:
        The file names written, relative to ``out_dir``.

    Raises:
        OutputError: The study is not DICOM, a source slice cannot be read or lacks the UIDs a
            reference needs, or highdicom rejects the objects (the message says why).
        MissingDependencyError: highdicom is not installed.
    """
    hd = require("highdicom", "dicom-out")
    study = result.study
    if getattr(study, "kind", None) != "dicom":
        source = getattr(study, "path", None) or "an in-memory volume"
        raise OutputError(
            f"--dicom-out needs a DICOM study, but {source} is not a DICOM series: a DICOM SEG/SR must "
            "reference the source images; run without --dicom-out or pass the DICOM folder"
        )
    if not result.nodules:
        log.info("no nodules: no DICOM SEG/SR written")
        return []
    out_dir = Path(out_dir)
    headers = _slice_headers(study)
    rows, cols = int(study.size[1]), int(study.size[0])

    masks = [_mask_on_study(n, spec, study) for n in result.nodules]
    touched = sorted({k for m in masks for k in m})
    if not touched:
        # Every mask is empty: the SEG still needs source frames, so reference the centre slices.
        touched = sorted({_centre_slice(study, n) for n in result.nodules})
    frame_of = {k: i for i, k in enumerate(touched)}
    pixels = np.zeros((len(touched), rows, cols, len(masks)), dtype=bool)
    for s, mask in enumerate(masks):
        for k, plane in mask.items():
            pixels[frame_of[k], :, :, s] = plane

    sources = [_read_source(headers[k]) for k in touched]
    model_version = str(getattr(result, "model_version", "") or "unknown")
    tracking_uids = [hd.UID() for _ in result.nodules]
    segment_sources = [[sources[frame_of[k]] for k in sorted(m)] for m in masks]
    with _no_name_warnings():
        seg = _build_seg(hd, sources, pixels, model_version, tracking_uids)
        sr = _build_sr(hd, result, seg, sources, segment_sources, model_version, tracking_uids)
    try:
        seg.save_as(out_dir / SEG_FILE, enforce_file_format=True)
        sr.save_as(out_dir / SR_FILE, enforce_file_format=True)
    except (ValueError, TypeError) as exc:
        raise OutputError(f"cannot encode the DICOM SEG/SR: {exc}") from exc
    log.info(
        "wrote DICOM SEG (%d segments, %d frames) and TID 1500 SR for series %s",
        len(masks),
        int(getattr(seg, "NumberOfFrames", 0)),
        study.series_uid,
    )
    return [SEG_FILE, SR_FILE]


@contextlib.contextmanager
def _no_name_warnings():
    """Silence highdicom's person-name format warning, whose text quotes the patient's name.

    Scoped to building the two objects (``catch_warnings`` restores the filters on exit); every
    other warning still reaches the caller.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* is unlikely to represent the intended person name", category=UserWarning
        )
        yield


# ---------------------------------------------------------------------------------- source
def _slice_headers(study: Any) -> Sequence[Any]:
    """Slice headers (``.path``, ``.sop_instance_uid``) in the study's slice order."""
    headers = study.slices
    if len(headers) != int(study.n_slices):
        raise OutputError(
            f"series {study.series_uid} lists {len(headers)} slice files for {study.n_slices} slices; "
            "cannot map the segmentation onto source images"
        )
    return headers


def _read_source(header: Any) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = str(header.path)
    try:
        # highdicom needs geometry and identity only; skipping pixels avoids reading compressed data.
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=bool(getattr(header, "forced", False)))
    except (OSError, InvalidDicomError) as exc:
        raise OutputError(f"cannot re-read source slice {path} for the DICOM SEG: {exc}") from exc
    missing = [kw for kw in _REQUIRED_UIDS if not str(ds.get(kw, "") or "").strip()]
    if missing:
        raise OutputError(
            f"source slice {path} has no {', '.join(missing)}; a DICOM SEG/SR cannot reference images "
            "without them (was the series exported with UIDs removed?)"
        )
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


# ------------------------------------------------------------------------------ geometry
def _centre_slice(study: Any, nodule: Any) -> int:
    k = int(round(float(nodule.xyz_voxel[2])))
    return min(max(k, 0), int(study.n_slices) - 1)


def _mask_on_study(nodule: Any, spec: PatchSpec, study: Any) -> dict[int, np.ndarray]:
    """The nodule mask on the source lattice: ``{slice index: bool [rows, cols]}``, empty planes left out."""
    probability = np.asarray(nodule.prediction.segmentation, dtype=np.float32)
    mask = largest_central_component(probability >= _THRESHOLD)
    if not mask.any():
        return {}
    src = Volume(mask.astype(np.float32), patch_grid(nodule.world_lps_mm, spec))
    grid = study.reference_geometry(nodule.world_lps_mm, spec)
    block = resample(src, grid, "linear", 0.0) >= _THRESHOLD  # [slice, row, col] of the ROI
    x0, y0, z0 = (int(v) for v in grid.index_offset)
    rows, cols = int(study.size[1]), int(study.size[0])
    planes: dict[int, np.ndarray] = {}
    for z in np.flatnonzero(block.any(axis=(1, 2))):
        plane = np.zeros((rows, cols), dtype=bool)
        plane[y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = block[z]
        planes[z0 + int(z)] = plane
    return planes


# ----------------------------------------------------------------------------------- SEG
def _algorithm(hd: Any, model_version: str) -> Any:
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=_MANUFACTURER, family=codes.cid7162.ArtificialIntelligence, version=model_version
    )


def _build_seg(hd: Any, sources: list[Any], pixels: np.ndarray, model_version: str, tracking_uids: list[str]) -> Any:
    from pydicom.sr.codedict import codes

    algorithm = _algorithm(hd, model_version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"Nodule {i}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=uid,
            tracking_id=f"Nodule {i}",
            anatomic_regions=[codes.SCT.Lung],
        )
        for i, uid in enumerate(tracking_uids)
    ]
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=_MANUFACTURER,
            manufacturer_model_name=_MANUFACTURER,
            software_versions=[f"nodule-edge {__version__}", f"model {model_version}"[:64]],
            device_serial_number=model_version[:64],
            content_label="NODULES",
            content_description="nodule-edge nodule segmentation",
            series_description="nodule-edge nodule segmentation",
            # All masks empty: keep the (empty) frames, a SEG needs at least one.
            omit_empty_frames=bool(pixels.any()),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise OutputError(f"cannot build the DICOM SEG: {exc}") from exc


# ------------------------------------------------------------------------------------ SR
def _local(hd: Any, value: str, meaning: str) -> Any:
    return hd.sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


def _nodule_group(
    hd: Any,
    i: int,
    nodule: NoduleResult,
    seg: Any,
    sources: list[Any],
    series_uid: str,
    tracking_uid: str,
    model_version: str,
    study_flags: Sequence[Any] = (),
) -> Any:
    from pydicom.sr.codedict import codes

    algorithm = hd.sr.AlgorithmIdentification(name=_MANUFACTURER, version=model_version)
    p = nodule.prediction
    rating = hd.sr.CodedConcept(value="{rating}", scheme_designator="UCUM", meaning="rating")

    def measure(name: Any, value: float, unit: Any, **kw: Any) -> Any:
        return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm, **kw)

    measurements = [
        measure(codes.SCT.Volume, nodule.volume_mm3, codes.UCUM.CubicMillimeter),
        measure(
            codes.SCT.Diameter, nodule.longest_axial_diameter_mm, codes.UCUM.Millimeter, derivation=codes.SCT.Maximum
        ),
        measure(codes.DCM.ProbabilityOfCancer, p.malignancy_probability, codes.UCUM.NoUnits),
    ]
    for name, value in p.attributes.items():
        measurements.append(measure(_local(hd, name[:16], f"{name.capitalize()} rating"), value, rating))
    measurements += [
        measure(_local(hd, "NODULE_ATTN", "Mean saliency inside nodule"), p.nodule_attention, codes.UCUM.NoUnits),
        measure(
            _local(hd, "BACKGROUND_ATTN", "Mean saliency outside nodule"), p.background_attention, codes.UCUM.NoUnits
        ),
    ]
    if p.outline_statistics is not None and p.outline_logit is not None:
        # The outline term's inputs (the first pass's outline, not the SEG's segmentation) and what
        # they added to the malignancy logit (README, Outputs; nodule_edge.outline).
        values = outline_measurements(p.outline_statistics)
        for name, meaning, unit, _ in OUTLINE_MEASUREMENTS:
            measurements.append(
                measure(
                    _local(hd, name.upper(), f"First-pass outline {meaning.lower()}"),
                    values[name],
                    hd.sr.CodedConcept(value=unit, scheme_designator="UCUM", meaning=unit),
                )
            )
        measurements.append(
            measure(
                _local(hd, "OUTLINE_LOGIT", "Outline term of the malignancy logit"), p.outline_logit, codes.UCUM.NoUnits
            )
        )
    explained = nodule.explanations
    if explained is not None:
        for method, exp in explained.maps.items():
            for metric, value in exp.metrics.items():
                if isinstance(value, float):
                    meaning = f"{method} {metric}".replace("_", " ").capitalize()[:64]
                    measurements.append(measure(_local(hd, f"{method}.{metric}", meaning), value, codes.UCUM.NoUnits))
        if explained.agreement is not None and np.isfinite(explained.agreement.spearman):
            measurements.append(
                measure(
                    _local(hd, "EXPL_AGREEMENT", "Grad-CAM vs occlusion Spearman"),
                    explained.agreement.spearman,
                    codes.UCUM.NoUnits,
                )
            )
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=_local(hd, "TRUSTWORTHY", "Saliency concentrated on nodule"),
            value=codes.SCT.Yes if nodule.trustworthy else codes.SCT.No,
        )
    ]
    if p.outline_changes_class is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=_local(hd, "OUTLINE_CLASS", "Outline term changed the class"),
                value=codes.SCT.Yes if p.outline_changes_class else codes.SCT.No,
            )
        )
    evaluations += [
        hd.sr.QualitativeEvaluation(
            name=_local(hd, "QUALITY_FLAG", "Quality flag"),
            value=_local(hd, flag.code, flag.code.replace("_", " ").capitalize()[:64]),
        )
        for flag in [*study_flags, *nodule.quality_flags]
    ]
    # Built by hand: ReferencedSegment.from_segmentation (highdicom 0.28) fails on a one-segment
    # SEG, whose Segment Identification lives in the shared functional groups.
    if sources:
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=i + 1,
            source_images=[hd.sr.SourceImageForSegmentation.from_source_image(ds) for ds in sources],
        )
    else:
        # An empty segment has no source images of its own; point at the series.
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=i + 1,
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Nodule {i}"),
        referenced_segment=segment,
        finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _build_sr(
    hd: Any,
    result: StudyResult,
    seg: Any,
    sources: list[Any],
    segment_sources: list[list[Any]],
    model_version: str,
    tracking_uids: list[str],
) -> Any:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    series_uid = str(sources[0].SeriesInstanceUID)
    try:
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            # Same model, same device UID: the observer is recognisable across reports.
            uid=generate_uid(entropy_srcs=[_MANUFACTURER, model_version]),
            name=_MANUFACTURER,
            manufacturer_name=_MANUFACTURER,
            model_name=f"nodule-edge {__version__}"[:64],
        )
        context = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        )
        groups = [
            _nodule_group(hd, i, n, seg, own, series_uid, uid, model_version, result.quality_flags)
            for i, (n, own, uid) in enumerate(zip(result.nodules, segment_sources, tracking_uids))
        ]
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
            imaging_measurements=groups,
        )
        return hd.sr.Comprehensive3DSR(
            evidence=[*sources, seg],
            content=report,
            series_instance_uid=hd.UID(),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=_MANUFACTURER,
            is_complete=True,
            series_description="nodule-edge measurements",
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    designator=CODING_SCHEME,
                    name="nodule-edge local codes",
                    responsible_organization="nodule-edge",
                )
            ],
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise OutputError(f"cannot build the DICOM SR: {exc}") from exc

"""Decode slices of one series to HU: :func:`decode_slices` over the decoders of :mod:`.decoders`.

:data:`_DECODERS` is the order ``backend="auto"`` offers the slices to the decoders: JPEG Lossless,
JPEG-LS, JPEG 2000 Lossless and RLE Lossless to imagecodecs when installed, other lossless
compressed MONOCHROME2 (all of it without imagecodecs) to GDCM, the rest to pydicom. A file imagecodecs cannot decode goes on to the next decoders; a file GDCM refuses as
damaged goes to pydicom with a warning. A named backend uses that decoder alone, strictly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from nodule_edge.errors import ConfigError, MissingDependencyError, StudyError
from nodule_edge.runtime.dicom.decoders import (
    Crop,
    GdcmDecoder,
    ImagecodecsDecoder,
    NotDecoded,
    PydicomDecoder,
    SliceDecoder,
    overflow_error,
)
from nodule_edge.runtime.dicom.headers import SliceHeader

__all__ = [
    "Backend",
    "decode_slice",
    "decode_slices",
]

logger = logging.getLogger(__name__)

#: Decoders :func:`decode_slices` can be told to use.
Backend = Literal["auto", "imagecodecs", "gdcm", "pydicom"]

#: The decoders in the order ``backend="auto"`` offers them the slices left; each takes those it
#: can decode, and pydicom, last, takes the rest.
_DECODERS: tuple[type[SliceDecoder], ...] = (ImagecodecsDecoder, GdcmDecoder, PydicomDecoder)


def _chain(backend: Backend) -> list[SliceDecoder]:
    """The decoders ``backend`` asks for, in order (those installed, for ``"auto"``)."""
    if backend not in ("auto", *(cls.name for cls in _DECODERS)):
        raise ConfigError(f"decoder backend must be 'auto', 'imagecodecs', 'gdcm' or 'pydicom', got {backend!r}")
    if backend == "auto":
        return [d for d in (cls.load() for cls in _DECODERS) if d is not None]
    cls = next(cls for cls in _DECODERS if cls.name == backend)
    decoder = cls.load()
    if decoder is None:
        raise MissingDependencyError(cls.missing)
    return [decoder]


def _checked_crop(
    headers: Sequence[SliceHeader], rows: tuple[int, int] | None, cols: tuple[int, int] | None
) -> tuple[Crop, tuple[int, int]]:
    """The crop as slices and its shape, after checking the matrices, the crop and the rescale."""
    shapes = sorted({(h.rows, h.cols) for h in headers})
    if len(shapes) > 1:
        raise StudyError(f"slices to decode in one block mix matrices {shapes}")
    n_rows, n_cols = shapes[0] if shapes else (0, 0)
    r0, r1 = (0, n_rows) if rows is None else rows
    c0, c1 = (0, n_cols) if cols is None else cols
    if not (0 <= r0 < r1 <= n_rows and 0 <= c0 < c1 <= n_cols) and headers:
        raise ConfigError(f"crop rows {r0}:{r1}, columns {c0}:{c1} is not inside the {n_rows}x{n_cols} matrix")
    for header in headers:
        if not (math.isfinite(header.slope) and math.isfinite(header.intercept)):
            raise StudyError(
                f"{header.path}: RescaleSlope {header.slope:g} / RescaleIntercept {header.intercept:g} is not "
                "finite; its pixels cannot be turned into HU"
            )
    return (slice(r0, r1), slice(c0, c1)), (r1 - r0, c1 - c0)


def decode_slices(
    headers: Sequence[SliceHeader],
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    *,
    backend: Backend = "auto",
    threads: int = 1,
) -> np.ndarray:
    """Decode slices of one series to HU, optionally cropped.

    Whole slices are decoded (compressed data cannot be cut before decoding); the crop saves the
    rescale and the copies of what is not needed.

    Args:
        headers: Slices as kept by :func:`~nodule_edge.runtime.dicom.series.load_series`, all with the same matrix.
        rows: Half-open row range to keep (all rows when None).
        cols: Half-open column range to keep (all columns when None).
        backend: ``"auto"``: imagecodecs (``imagecodecs`` extra) for monochrome JPEG Lossless,
            JPEG-LS, JPEG 2000 Lossless and RLE Lossless with 16 bits allocated; GDCM (through
            SimpleITK, all slices in one call) for the other slices where it decodes exactly as
            pydicom does, i.e. lossless compressed syntaxes and MONOCHROME2; pydicom for the rest. A file imagecodecs cannot decode goes to GDCM
            or pydicom (logged once they have read it). When GDCM fails on the batch, each of its
            files is retried alone and a file GDCM refuses goes to pydicom (logged: GDCM refusing a
            lossless stream usually means damaged data). What GDCM prints to stderr goes to the
            debug log instead (and to a warning when it decoded the slices all the same).
            ``"imagecodecs"``, ``"gdcm"`` or ``"pydicom"`` use that decoder alone (tests,
            benchmarks); imagecodecs for those four syntaxes only.
        threads: Threads the imagecodecs and GDCM work is split across (both run with the GIL
            released; pydicom decoding stays on the calling thread, where it is bound by the GIL).

    Returns:
        float32 ``[len(headers), rows, cols]`` in HU (each slice's RescaleSlope/RescaleIntercept
        applied).

    Raises:
        StudyError: A file is gone, truncated, or its pixel data cannot be decoded, or its
            RescaleSlope/RescaleIntercept is not finite or overflows float32 (the message names
            the file); or the slices' matrices differ.
        ConfigError: Unknown ``backend``, or a crop outside the matrix.
        MissingDependencyError: ``backend="imagecodecs"`` without imagecodecs (libjpeg-turbo >= 3).
    """
    chain = _chain(backend)
    crop, shape = _checked_crop(headers, rows, cols)
    strict = backend != "auto"
    out = np.empty((len(headers), *shape), dtype=np.float32)
    pending = list(range(len(headers)))
    damaged: dict[int, Exception] = {}
    notes: list[str] = []
    for decoder in chain:
        share = [i for i in pending if strict or decoder.can_decode(headers[i])]
        if not share:
            continue
        decoded = decoder.decode([headers[i] for i in share], crop, threads=threads, strict=strict)
        done = [k for k in range(len(share)) if k not in decoded.failed]
        if len(done) == len(headers):
            out = decoded.hu
        elif len(done) == len(share):
            out[share] = decoded.hu
        else:
            out[[share[k] for k in done]] = decoded.hu[done]
        retry = {share[k] for k, exc in decoded.failed.items() if isinstance(exc, NotDecoded)}
        damaged.update((share[k], exc) for k, exc in decoded.failed.items() if not isinstance(exc, NotDecoded))
        pending = sorted(set(pending) - set(share) | retry)
        if decoded.note:
            notes.append(decoded.note)
    for i, exc in damaged.items():
        out[i] = chain[-1].decode([headers[i]], crop, threads=threads, strict=True).hu[0]
        logger.warning("%s; %s decoded it instead, but the slice may be damaged", exc, chain[-1].name)
    overflow = np.flatnonzero(~np.isfinite(out).all(axis=(1, 2)))  # GDCM casts to float32 silently
    if overflow.size:
        raise overflow_error(headers[int(overflow[0])])
    for note in notes:
        logger.warning("%s", note)
    return out


def decode_slice(header: SliceHeader, *, backend: Backend = "auto") -> np.ndarray:
    """Decode one slice's pixels to HU (see :func:`decode_slices`).

    Args:
        header: The slice, as kept by :func:`~nodule_edge.runtime.dicom.series.load_series`.
        backend: ``"auto"``, ``"gdcm"`` or ``"pydicom"`` (see :func:`decode_slices`).

    Returns:
        float32 ``[rows, cols]`` in HU (RescaleSlope/RescaleIntercept applied).

    Raises:
        StudyError: The file is gone, truncated, or its pixel data cannot be decoded.
    """
    return decode_slices([header], backend=backend)[0]

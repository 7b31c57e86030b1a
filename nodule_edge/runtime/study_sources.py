"""Where a :class:`~nodule_edge.runtime.study.Study` reads its voxels: DICOM slices, a volume file or an array.

Each source returns float32 HU for a list of slices and half-open row and column ranges, and reads
nothing else: DICOM slices are decoded whole (compressed data cannot be cropped first) and
cropped, in chunks and on a few threads; MetaImage and NRRD files stream just the region.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from nodule_edge._sitk import simpleitk
from nodule_edge.errors import StudyError
from nodule_edge.runtime.dicom import SliceHeader, decode_slices

__all__ = ["ArraySource", "DicomSource", "PixelSource", "VolumeSource"]


class PixelSource(Protocol):
    """Reads HU voxels of a study; each read opens its own files (safe from several threads)."""

    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """float32 HU ``[len(slices), rows, cols]`` for half-open row/column ranges."""
        ...


# Slices decoded per call: whole slices are decoded (compressed data cannot be cropped first), so
# this bounds the transient memory (32 × 512² float32 = 32 MiB) when many are needed.
_DECODE_CHUNK = 32
# Threads a decode is split across (the edge target has 2 cores; libjpeg-turbo and GDCM release the GIL).
_DECODE_THREADS = 2


def _decode_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(_DECODE_THREADS, cores))


@dataclass(frozen=True)
class DicomSource:
    """The slices of a DICOM series, decoded on demand (:func:`decode_slices`)."""

    slices: tuple[SliceHeader, ...]

    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        out = np.empty((len(slices), rows[1] - rows[0], cols[1] - cols[0]), dtype=np.float32)
        threads = _decode_threads()
        for i in range(0, len(slices), _DECODE_CHUNK):
            chunk = [self.slices[k] for k in slices[i : i + _DECODE_CHUNK]]
            out[i : i + len(chunk)] = decode_slices(chunk, rows, cols, threads=threads)
        return out


@dataclass(frozen=True)
class VolumeSource:
    """A volume file, read region by region with SimpleITK (imported here, not on the DICOM path)."""

    path: str

    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        k0, k1 = min(slices), max(slices)
        sitk = simpleitk()
        reader = sitk.ImageFileReader()
        reader.SetFileName(self.path)
        # MetaImage/NRRD stream just this region; compressed NIfTI is read whole, then cropped.
        reader.SetExtractIndex([cols[0], rows[0], k0])
        reader.SetExtractSize([cols[1] - cols[0], rows[1] - rows[0], k1 - k0 + 1])
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise StudyError(f"cannot read voxels of {self.path}: {exc}") from exc
        arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
        return arr[[k - k0 for k in slices]]


@dataclass(frozen=True)
class ArraySource:
    """An in-memory HU array (from :func:`~nodule_edge.runtime.study.study_from_image`)."""

    hu: np.ndarray  # [slice, row, col], read-only

    def read(self, slices: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        return np.array(self.hu[list(slices), rows[0] : rows[1], cols[0] : cols[1]], dtype=np.float32)

"""The three pixel decoders behind :func:`nodule_edge.runtime.dicom.decode.decode_slices`.

Each decoder is a :class:`SliceDecoder` (in the spirit of MONAI's ``ImageReader``): it says which
slices it decodes exactly as pydicom does (:meth:`SliceDecoder.can_decode`) and decodes a batch of
them to HU (:meth:`SliceDecoder.decode`). ``decode_slices`` offers the slices to them in this order,
each taking those it can decode of what is left:

* :class:`ImagecodecsDecoder`: lossless compressed monochrome slices through the ``imagecodecs``
  extra (JPEG Lossless through libjpeg-turbo 3, JPEG-LS through CharLS, JPEG 2000 Lossless through
  OpenJPEG, RLE Lossless through its own decoder), split across threads with the GIL released;
* :class:`GdcmDecoder`: lossless compressed MONOCHROME2 slices imagecodecs does not take (all of
  them without imagecodecs), through SimpleITK's GDCM reader in one call (or one per thread);
  value for value the same as pydicom;
* :class:`PydicomDecoder`: uncompressed slices, other syntaxes, and files both refuse, one at a
  time (the pylibjpeg / pyjpegls plugins for the compressed ones).

Each slice's own RescaleSlope/RescaleIntercept turn stored values into HU, in float64 rounded
once to float32 on every path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, ClassVar, TypeVar

import numpy as np

from nodule_edge.errors import StudyError
from nodule_edge.runtime.dicom.headers import SliceHeader

__all__ = [
    "Crop",
    "Decoded",
    "NotDecoded",
    "GdcmDecoder",
    "ImagecodecsDecoder",
    "PydicomDecoder",
    "SliceDecoder",
    "overflow_error",
]

logger = logging.getLogger(__name__)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


#: Syntaxes imagecodecs (the ``imagecodecs`` extra) decodes, with the codec of each and its short
#: name. JPEG Lossless (process 14) goes through libjpeg-turbo >= 3, about 2x faster than GDCM on
#: the real chest study (README, Performance); JPEG 2000 Lossless through OpenJPEG, JPEG-LS
#: through CharLS and RLE through imagecodecs' own DICOM RLE decoder, none slower than GDCM on the
#: real JPEG 2000 study or its slices re-encoded (README, Usage), and without loading SimpleITK.
#: Checked value for value against pydicom and GDCM in tests/runtime/test_study.py, on the real
#: JPEG Lossless and JPEG 2000 series included.
_IMAGECODECS_SYNTAXES: dict[str, tuple[str, str]] = {
    "1.2.840.10008.1.2.4.57": ("jpeg8", "JPEG Lossless"),  # process 14
    "1.2.840.10008.1.2.4.70": ("jpeg8", "JPEG Lossless"),  # process 14, selection value 1
    "1.2.840.10008.1.2.4.80": ("jpegls", "JPEG-LS Lossless"),
    "1.2.840.10008.1.2.4.90": ("jpeg2k", "JPEG 2000 Lossless"),
    "1.2.840.10008.1.2.5": ("dicomrle", "RLE Lossless"),
}
#: The ``imagecodecs`` attribute that says whether a codec was built in.
_IMAGECODECS_FLAGS = {"jpeg8": "JPEG8", "jpegls": "JPEGLS", "jpeg2k": "JPEG2K", "dicomrle": "DICOMRLE"}
# Explicit VR little endian PixelData (7FE0,0010) OB with undefined length: encapsulated pixel
# data as every JPEG (JPEG-LS, JPEG 2000) and the RLE transfer syntax store it.
_ENCAPSULATED_PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"

#: Compressed syntaxes GDCM decodes to the same values as pydicom, faster: lossless only (lossy
#: JPEG and JPEG 2000 decoders may round differently). With imagecodecs installed, GDCM only gets
#: what imagecodecs does not take or cannot decode. Checked value for value in
#: tests/runtime/test_study.py, on the real JPEG Lossless and JPEG 2000 series included.
#: Uncompressed data stays with pydicom: it is faster there, and GDCM fills pixel data shorter
#: than the matrix with garbage where pydicom refuses it.
_GDCM_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, process 14
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, process 14, selection value 1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    }
)


def _gdcm_decodes(header: SliceHeader) -> bool:
    # GDCM inverts MONOCHROME1 pixels, which would turn the HU scale upside down.
    return header.transfer_syntax_uid in _GDCM_SYNTAXES and header.photometric == "MONOCHROME2"


#: Row and column slices a decode keeps.
Crop = tuple[slice, slice]
_Part = TypeVar("_Part")
_Result = TypeVar("_Result")


def _on_threads(work: Callable[[_Part], _Result], parts: Sequence[_Part]) -> list[_Result]:
    """``work(part)`` for every part, in order: the first on the calling thread, each other on a worker.

    The calling thread takes a part itself: every extra thread allocates from its own glibc arena,
    whose memory the rest of the run cannot reuse (measured +10 MB peak RSS with all parts on
    workers).
    """
    if len(parts) == 1:
        return [work(parts[0])]
    with ThreadPoolExecutor(max_workers=len(parts) - 1, thread_name_prefix="nodule-edge-decode") as pool:
        futures = [pool.submit(work, part) for part in parts[1:]]
        first = work(parts[0])
        return [first, *(future.result() for future in futures)]


def _cropped_shape(headers: Sequence[SliceHeader], crop: Crop) -> tuple[int, int, int]:
    """``[n, rows, cols]`` of ``headers`` (one matrix) once cropped."""
    n_rows = len(range(*crop[0].indices(headers[0].rows)))
    n_cols = len(range(*crop[1].indices(headers[0].cols)))
    return len(headers), n_rows, n_cols


@dataclass
class Decoded:
    """What a decoder made of the slices it was given.

    Attributes:
        hu: float32 HU ``[n, rows, cols]`` (cropped), in the order given; the rows of files in
            ``failed`` are left unset.
        failed: Why a file was not decoded, by position in the slices given:
            :class:`NotDecoded` when the next decoders simply try it, :class:`StudyError` when
            the decoder refused it as damaged (the last decoder then reads it, with a warning).
        note: A warning to log once all slices are decoded ("" for none).
    """

    hu: np.ndarray
    failed: dict[int, Exception] = field(default_factory=dict)
    note: str = ""


class SliceDecoder(ABC):
    """One way to turn the pixel data of slices into HU.

    Attributes:
        name: The ``backend`` name of :func:`decode_slices` that chooses this decoder alone.
        missing: What to install when :meth:`load` finds the decoder's library missing.
    """

    name: ClassVar[str]
    missing: ClassVar[str] = ""

    @classmethod
    def load(cls) -> SliceDecoder | None:
        """The decoder, or None when the library it needs is not installed."""
        return cls()

    @abstractmethod
    def can_decode(self, header: SliceHeader) -> bool:
        """Whether ``backend="auto"`` gives this slice to this decoder (it decodes it as pydicom does)."""

    @abstractmethod
    def decode(self, headers: Sequence[SliceHeader], crop: Crop, *, threads: int, strict: bool) -> Decoded:
        """Decode slices of one matrix to float32 HU.

        Args:
            headers: The slices, all with the same matrix.
            crop: Row and column slices to keep.
            threads: Threads the work may be split across (the calling thread one of them).
            strict: The decoder was chosen by name: a file it cannot decode raises instead of
                landing in :attr:`Decoded.failed`.

        Returns:
            The decoded block, and the files left to other decoders.

        Raises:
            StudyError: A file cannot be decoded (always for pydicom; with ``strict`` for the others).
        """


# pydicom ----------------------------------------------------------------------------------------


def _pydicom_decode(header: SliceHeader, crop: Crop) -> np.ndarray:
    import pydicom
    from pydicom.uid import UID

    try:
        ds = pydicom.dcmread(header.path, force=header.forced)
        if "PixelData" not in ds:
            raise StudyError(f"{header.path} has no pixel data (truncated file?)")
        arr = ds.pixel_array
    except StudyError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    # Decoder plugins raise whatever their C library reports; name the file either way. Rust
    # plugins (pylibjpeg-rle) panic on some damaged frames with pyo3's PanicException, which
    # derives from BaseException, not Exception: a damaged file, not a reason to crash.
    except BaseException as exc:  # noqa: BLE001
        name = UID(header.transfer_syntax_uid).name
        raise StudyError(f"cannot decode pixel data of {header.path} ({name}): {exc}") from exc
    if arr.shape != (header.rows, header.cols):
        raise StudyError(f"pixel data of {header.path} has shape {arr.shape}, header says {header.rows}x{header.cols}")
    return _rescale_to_hu(arr[crop], header)


def _rescale_to_hu(stored: np.ndarray, header: SliceHeader) -> np.ndarray:
    """float32 HU from stored values with the slice's own RescaleSlope/RescaleIntercept.

    float64 then one rounding, as GDCM does: every decoder path agrees bit for bit for any slope.
    """
    hu = stored.astype(np.float64)
    if header.slope != 1.0:
        hu *= header.slope
    if header.intercept != 0.0:
        hu += header.intercept
    if not np.all(np.abs(hu) <= _FLOAT32_MAX):
        raise overflow_error(header)
    return hu.astype(np.float32)


def overflow_error(header: SliceHeader) -> StudyError:
    """The error for a slice whose RescaleSlope/RescaleIntercept give HU beyond float32."""
    return StudyError(
        f"{header.path}: RescaleSlope {header.slope:g} / RescaleIntercept {header.intercept:g} give HU beyond float32"
    )


class PydicomDecoder(SliceDecoder):
    """pydicom, one file at a time on the calling thread (bound by the GIL): decodes everything it has a plugin for."""

    name = "pydicom"

    def can_decode(self, header: SliceHeader) -> bool:
        return True

    def decode(self, headers: Sequence[SliceHeader], crop: Crop, *, threads: int, strict: bool) -> Decoded:
        out = np.empty(_cropped_shape(headers, crop), dtype=np.float32)
        for k, header in enumerate(headers):
            out[k] = _pydicom_decode(header, crop)
        return Decoded(out)


# GDCM -------------------------------------------------------------------------------------------


class _StderrDiversion:
    """File descriptor 2 diverted into a temporary file while any GDCM decode runs (reference-counted).

    GDCM, inside SimpleITK, prints libjpeg's messages about a damaged stream ("Corrupt JPEG data:
    premature end of data segment") straight to descriptor 2: no logger and no ITK setting reaches
    them, and a CLI run would show them above its one-line error. The descriptor belongs to the
    whole process, so what other threads write to stderr meanwhile is diverted too; it is logged
    with GDCM's text (see :func:`_gdcm_stderr_logged`), not lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: int | None = None
        self._sink: IO[bytes] | None = None

    def enter(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return
            with contextlib.suppress(AttributeError, OSError, ValueError):  # no or a closed sys.stderr
                sys.stderr.flush()
            try:
                sink = tempfile.TemporaryFile()  # noqa: SIM115 - open until exit() reads and closes it
            except OSError:  # no temporary space: GDCM's messages stay on stderr
                return
            try:
                saved = os.dup(2)
            except OSError:  # descriptor 2 is closed: nothing to divert
                sink.close()
                return
            os.dup2(sink.fileno(), 2)
            self._saved, self._sink = saved, sink

    def exit(self) -> str:
        """Leave; the last one out restores descriptor 2 and gets everything written meanwhile."""
        with self._lock:
            self._depth -= 1
            if self._depth or self._sink is None or self._saved is None:
                return ""
            os.dup2(self._saved, 2)
            os.close(self._saved)
            sink, self._saved, self._sink = self._sink, None, None
        with sink:
            sink.seek(0)
            return " ".join(sink.read().decode("utf-8", "replace").split())


_STDERR_DIVERSION = _StderrDiversion()


@contextlib.contextmanager
def _gdcm_stderr_logged(what: str) -> Iterator[list[str]]:
    """Run GDCM decodes with their stderr output diverted to the debug log.

    Yields a list that receives the text once the block is over, for the caller to judge.
    """
    captured: list[str] = []
    _STDERR_DIVERSION.enter()
    try:
        yield captured
    finally:
        text = _STDERR_DIVERSION.exit()
        if text:
            logger.debug("GDCM printed while decoding %s: %s", what, text)
            captured.append(text)


def _gdcm_read(headers: Sequence[SliceHeader], crop: Crop) -> np.ndarray:
    """float32 HU ``[n, rows, cols]`` (cropped) through SimpleITK's GDCM reader, one call for all files.

    SimpleITK is imported here, when a slice needs GDCM (see :mod:`nodule_edge._sitk`).
    """
    from nodule_edge._sitk import simpleitk

    sitk = simpleitk()

    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([h.path for h in headers])
    # Each file is rescaled with its own slope/intercept in double precision; float32 output
    # rounds once, whatever integer or real type the first file alone would have chosen.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    # load_series has checked the geometry; ITK would print its own spacing warning to stderr.
    reader.SetSpacingWarningRelThreshold(math.inf)
    what = headers[0].path if len(headers) == 1 else f"{len(headers)} slices from {headers[0].path} on"
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        reason = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unknown error")
        raise StudyError(f"GDCM cannot decode {what}: {reason}") from exc
    view = sitk.GetArrayViewFromImage(image)
    first = headers[0]
    if view.shape != (len(headers), first.rows, first.cols):
        raise StudyError(f"GDCM decoded shape {view.shape} from {what}; the headers say {first.rows}x{first.cols}")
    return np.array(view[(slice(None), *crop)], dtype=np.float32)  # copies the crop only


def _gdcm_read_split(headers: Sequence[SliceHeader], crop: Crop, threads: int) -> np.ndarray:
    """:func:`_gdcm_read` with the files split across threads (GDCM runs with the GIL released)."""
    parts = [p for p in np.array_split(np.arange(len(headers)), max(1, min(threads, len(headers)))) if p.size]
    if len(parts) == 1:
        return _gdcm_read(headers, crop)
    return np.concatenate(_on_threads(lambda part: _gdcm_read([headers[i] for i in part], crop), parts))


def _gdcm_one_by_one(
    headers: Sequence[SliceHeader], crop: Crop, batch_error: StudyError, *, strict: bool
) -> tuple[np.ndarray, dict[int, Exception]]:
    """After a failed GDCM batch, decode its files one at a time; return them and those GDCM refuses."""
    out = np.empty(_cropped_shape(headers, crop), dtype=np.float32)
    if len(headers) == 1:
        if strict:
            raise batch_error
        return out, {0: batch_error}
    logger.debug("%s; retrying those files one at a time", batch_error)
    refused: dict[int, Exception] = {}
    for k, header in enumerate(headers):
        try:
            out[k] = _gdcm_read([header], crop)[0]
        except StudyError as exc:
            if strict:
                raise
            refused[k] = exc
    return out, refused


class GdcmDecoder(SliceDecoder):
    """SimpleITK's GDCM reader, all files in one call per thread, for lossless compressed MONOCHROME2.

    When the batch fails, each file is retried alone; a file GDCM refuses is left to the last
    decoder (GDCM refusing a lossless stream usually means damaged data). What GDCM prints to
    stderr goes to the debug log, and to a warning when it decoded the slices all the same.
    """

    name = "gdcm"

    def can_decode(self, header: SliceHeader) -> bool:
        return _gdcm_decodes(header)

    def decode(self, headers: Sequence[SliceHeader], crop: Crop, *, threads: int, strict: bool) -> Decoded:
        what = headers[0].path if len(headers) == 1 else f"{len(headers)} slices from {headers[0].path} on"
        refused: dict[int, Exception] = {}
        with _gdcm_stderr_logged(what) as printed:
            try:
                out = _gdcm_read_split(headers, crop, threads)
            except StudyError as exc:
                out, refused = _gdcm_one_by_one(headers, crop, exc, strict=strict)
        note = ""
        if printed and not refused:
            # libjpeg warns and goes on for some damage (e.g. extraneous bytes before a marker).
            note = f"GDCM decoded {what} but reported: {printed[0]}; the slices may be damaged"
        return Decoded(out, refused, note)


# imagecodecs ------------------------------------------------------------------------------------


def _imagecodecs_module():
    """imagecodecs when installed (the ``imagecodecs`` extra) with a lossless-capable libjpeg-turbo."""
    try:
        import imagecodecs
    except ImportError:
        return None
    # libjpeg-turbo decodes lossless JPEG (SOF3) from version 3.0 on.
    version = imagecodecs.jpeg8_version()  # e.g. "libjpeg_turbo 3.1.3/8.0"
    name, _, rest = version.partition(" ")
    try:
        major = int(rest.split(".", 1)[0])
    except ValueError:
        return None
    return imagecodecs if name == "libjpeg_turbo" and major >= 3 else None


def _imagecodecs_decodes(header: SliceHeader) -> bool:
    # Two's complement is only unambiguous here at 16 stored bits (a plain reinterpretation);
    # narrower signed data needs a sign extension the other decoders already get right.
    return (
        header.transfer_syntax_uid in _IMAGECODECS_SYNTAXES
        and header.photometric in ("MONOCHROME1", "MONOCHROME2")
        and header.samples_per_pixel in (None, 1)
        and header.bits_allocated == 16
        and header.bits_stored is not None
        and 1 <= header.bits_stored <= 16
        and (header.pixel_representation == 0 or (header.pixel_representation == 1 and header.bits_stored == 16))
    )


class NotDecoded(Exception):
    """This decoder cannot decode the file; the next decoders get it."""


def _imagecodecs_stored(imagecodecs, codec: str, frame: bytes, header: SliceHeader) -> np.ndarray:
    """The stored values of one frame, ``[rows, cols]`` uint16 (int16 for a signed JPEG 2000 codestream).

    Raises:
        NotDecoded: The frame is not what this decoder takes (the codec's own errors pass through).
    """
    if codec == "jpeg8":
        # libjpeg-turbo pads a truncated stream and only warns; GDCM and pydicom refuse it. Real
        # encoders pad after the end-of-image marker (0x00, 0x0F seen), hence a search at the end.
        # (CharLS, OpenJPEG and the RLE decoder refuse a truncated stream themselves.)
        if b"\xff\xd9" not in frame[-16:]:
            raise NotDecoded("the JPEG stream has no end-of-image marker (truncated?)")
        return imagecodecs.jpeg8_decode(frame)
    if codec == "jpegls":
        return imagecodecs.jpegls_decode(frame)
    if codec == "jpeg2k":
        # One OpenJPEG thread: the slices are already split across the decode threads.
        return imagecodecs.jpeg2k_decode(frame, numthreads=1)
    # DICOM RLE: a 64-byte header whose first little-endian uint32 counts the byte segments, two
    # (high bytes, then low bytes) for one 16-bit sample; the decoder interleaves them.
    segments = int.from_bytes(frame[:4], "little")
    if segments != 2:
        raise NotDecoded(f"the RLE frame has {segments} segments, 16-bit monochrome needs 2")
    raw = imagecodecs.dicomrle_decode(frame, "<u2")
    if len(raw) != 2 * header.rows * header.cols:
        raise NotDecoded(f"the RLE frame decodes to {len(raw)} bytes, the header says {header.rows}x{header.cols}x2")
    return np.frombuffer(raw, dtype="<u2").reshape(header.rows, header.cols)


def _imagecodecs_decode(imagecodecs, header: SliceHeader, crop: Crop) -> np.ndarray:
    """float32 HU ``[rows, cols]`` (cropped) of one file through its codec in imagecodecs.

    The file is read once; its pixel data element is found by its byte signature (see
    :func:`_encapsulated_frame`), pydicom splits the encapsulated frame, and the codec and the
    file read run with the GIL released.
    """
    codec = _IMAGECODECS_SYNTAXES[header.transfer_syntax_uid][0]
    try:
        with open(header.path, "rb") as fh:
            data = fh.read()
        frame = _encapsulated_frame(data, header.forced)
        stored = _imagecodecs_stored(imagecodecs, codec, frame, header)
    except NotDecoded:
        raise
    # The file may be gone or damaged; the other decoders name the problem in their own words.
    except Exception as exc:  # noqa: BLE001
        raise NotDecoded(str(exc)) from exc
    # A JPEG 2000 codestream says itself whether its samples are signed; when that disagrees
    # with PixelRepresentation, GDCM and pydicom decide what the values are.
    expected = np.int16 if codec == "jpeg2k" and header.pixel_representation == 1 else np.uint16
    if stored.shape != (header.rows, header.cols) or stored.dtype != expected:
        raise NotDecoded(
            f"decoded {stored.dtype} {stored.shape}, the header says {np.dtype(expected)} {header.rows}x{header.cols}"
        )
    stored = stored[crop]
    if header.pixel_representation == 1:
        stored = stored.view(np.int16)
    elif int(stored.max(initial=0)) >> header.bits_stored:  # type: ignore[operator]  # set for every decodable slice
        raise NotDecoded(f"values beyond BitsStored {header.bits_stored}")
    return _rescale_to_hu(stored, header)


def _encapsulated_frame(data: bytes, forced: bool) -> bytes:
    """The single frame of a file's encapsulated pixel data.

    Pixel data is the last top-level element but for rare trailing padding or signatures, so
    its element header is searched from the end of the file (an icon image inside the header
    carries the same signature earlier): pydicom parsing the ~80 header elements of a CT slice
    to find it took a third of the decode time. When what follows does not parse as DICOM items,
    pydicom parses the header to find the element. The caller then checks that the frame
    decodes to the header's matrix (and that a JPEG Lossless frame ends in an end-of-image
    marker), and hands the file to another decoder otherwise.
    """
    import io

    from pydicom.encaps import get_frame

    buffer = io.BytesIO(data)
    start = data.rfind(_ENCAPSULATED_PIXEL_DATA)
    try:
        if start < 0:
            raise ValueError("no encapsulated pixel data signature")
        buffer.seek(start + len(_ENCAPSULATED_PIXEL_DATA))
        frame = get_frame(buffer, 0, number_of_frames=1)
    # Whatever pydicom's item parser raises (ValueError, struct.error) means "not found here".
    except Exception:  # noqa: BLE001
        import pydicom

        buffer.seek(0)
        pydicom.dcmread(buffer, stop_before_pixels=True, force=forced)
        start = buffer.tell()
        if data[start : start + len(_ENCAPSULATED_PIXEL_DATA)] != _ENCAPSULATED_PIXEL_DATA:
            raise NotDecoded("no encapsulated explicit VR pixel data after the header") from None
        buffer.seek(start + len(_ENCAPSULATED_PIXEL_DATA))
        frame = get_frame(buffer, 0, number_of_frames=1)
    return frame


def _imagecodecs_read(
    imagecodecs, headers: Sequence[SliceHeader], crop: Crop, threads: int
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode files imagecodecs takes across ``threads`` threads (the calling thread one of them).

    Returns:
        float32 HU ``[n, rows, cols]`` (cropped) and, by position, why a file was not decoded
        (its rows are left unset for another decoder).
    """
    out = np.empty(_cropped_shape(headers, crop), dtype=np.float32)
    failed: dict[int, str] = {}

    def decode_part(indices: Sequence[int]) -> None:
        for i in indices:
            try:
                out[i] = _imagecodecs_decode(imagecodecs, headers[i], crop)
            except NotDecoded as exc:
                failed[i] = str(exc)

    n_parts = max(1, min(threads, len(headers)))
    _on_threads(decode_part, [range(k, len(headers), n_parts) for k in range(n_parts)])
    return out, failed


class ImagecodecsDecoder(SliceDecoder):
    """imagecodecs (the ``imagecodecs`` extra) for lossless compressed monochrome slices.

    JPEG Lossless through libjpeg-turbo >= 3, JPEG-LS through CharLS, JPEG 2000 Lossless through
    OpenJPEG, RLE Lossless through imagecodecs' DICOM RLE decoder (each syntax where its codec
    was built in).

    A file it cannot decode is left to the next decoders, and said in a warning once they have
    read it (when they cannot either, the error alone speaks: bad input ends with one line,
    README "Usage").
    """

    name = "imagecodecs"
    missing = (
        "the imagecodecs decoder needs imagecodecs with libjpeg-turbo >= 3: pip install 'nodule-edge[imagecodecs]'"
    )

    def __init__(self, module) -> None:
        self._module = module
        self._syntaxes = frozenset(
            uid
            for uid, (codec, _) in _IMAGECODECS_SYNTAXES.items()
            if getattr(getattr(module, _IMAGECODECS_FLAGS[codec], None), "available", False)
        )

    @classmethod
    def load(cls) -> ImagecodecsDecoder | None:
        module = _imagecodecs_module()
        return None if module is None else cls(module)

    def can_decode(self, header: SliceHeader) -> bool:
        return header.transfer_syntax_uid in self._syntaxes and _imagecodecs_decodes(header)

    def decode(self, headers: Sequence[SliceHeader], crop: Crop, *, threads: int, strict: bool) -> Decoded:
        h = next((h for h in headers if not self.can_decode(h)), None) if strict else None
        if h is not None:
            names = ", ".join(dict.fromkeys(_IMAGECODECS_SYNTAXES[uid][1] for uid in sorted(self._syntaxes)))
            raise StudyError(
                f"the imagecodecs decoder takes monochrome {names} with 16 bits allocated, unsigned or "
                f"16 bits stored; not {h.path} ({h.transfer_syntax_uid}, {h.photometric}, BitsAllocated "
                f"{h.bits_allocated}, BitsStored {h.bits_stored}, PixelRepresentation {h.pixel_representation})"
            )
        out, failed = _imagecodecs_read(self._module, headers, crop, threads)
        if not failed:
            return Decoded(out)
        k, reason = min(failed.items())
        if strict:
            raise StudyError(f"imagecodecs cannot decode {headers[k].path}: {reason}")
        kinds = " / ".join(
            dict.fromkeys(_IMAGECODECS_SYNTAXES[headers[i].transfer_syntax_uid][1] for i in sorted(failed))
        )
        note = f"imagecodecs cannot decode {len(failed)} of {len(headers)} {kinds} files (first {headers[k].path}: {reason})"
        logger.debug("%s; trying GDCM or pydicom", note)
        return Decoded(out, {i: NotDecoded(why) for i, why in failed.items()}, f"{note}; GDCM or pydicom read them")

"""Read a CT series from a folder of DICOM files: headers, series choice, pixel decoding.

* :mod:`.headers`: scan the folder's headers (dicomsdl, or pydicom) into classified files;
* :mod:`.series`: choose the CT series and validate its slice stack;
* :mod:`.decoders`: the pixel decoders (pydicom, GDCM, imagecodecs) behind one interface;
* :mod:`.decode`: :func:`decode_slices`, which hands the slices to those decoders in order.
"""

from nodule_edge.runtime.dicom.decode import Backend, decode_slice, decode_slices
from nodule_edge.runtime.dicom.headers import VOLUME_SUFFIXES, SliceHeader
from nodule_edge.runtime.dicom.series import DicomSeries, SeriesSummary, list_series, load_series

__all__ = [
    "VOLUME_SUFFIXES",
    "Backend",
    "DicomSeries",
    "SeriesSummary",
    "SliceHeader",
    "decode_slice",
    "decode_slices",
    "list_series",
    "load_series",
]

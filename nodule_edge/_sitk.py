"""SimpleITK, imported only where it is needed, with the command line's ITK warning setting.

The default ``nodule-edge infer`` path (DICOM study → patch → engine → outputs) needs no
SimpleITK (:mod:`nodule_edge.volume` resamples, :mod:`nodule_edge.components` labels,
:mod:`nodule_edge.runtime.nifti` writes the NIfTI outputs): importing it maps about 90 MB of
shared libraries, a third of the run's peak memory (README, Performance), and one run in about 30
once hung at exit in a static destructor of its library (tests/robustness/test_exit.py). What
still needs it imports it through :func:`simpleitk`: volume files (NIfTI, MetaImage, NRRD) read
as studies or masks, GDCM decoding of lossless compressed slices that imagecodecs does not take,
cubic B-spline interpolation, and the training data.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["show_warnings", "simpleitk"]

#: Whether ITK prints its warnings to stderr; None leaves ITK's own default.
_show_warnings: bool | None = None


def show_warnings(shown: bool) -> None:
    """Whether ITK prints its warnings to stderr (it has no logger to filter).

    Applied at once when SimpleITK is loaded, else when :func:`simpleitk` first loads it.
    """
    global _show_warnings
    _show_warnings = shown
    sitk = sys.modules.get("SimpleITK")
    if sitk is not None:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def simpleitk() -> Any:
    """The SimpleITK module, imported now if need be, with the warning setting of :func:`show_warnings`."""
    import SimpleITK as sitk

    if _show_warnings is not None:
        sitk.ProcessObject.SetGlobalWarningDisplay(_show_warnings)
    return sitk

"""The package's own exceptions.

Every error a user can cause ends in one of these, raised at the boundary where the bad value is
first seen and naming it (file, tag, value). The CLI turns them into one line and a non-zero exit
code; embedding software can catch :class:`NoduleEdgeError` alone.
"""

from __future__ import annotations

__all__ = [
    "NoduleEdgeError",
    "StudyError",
    "SeriesSelectionError",
    "GeometryError",
    "CoordinateError",
    "BundleError",
    "EngineError",
    "IndexError_",
    "ConfigError",
    "DataError",
    "OutputError",
    "MissingDependencyError",
    "RowsFailedError",
    "OptionError",
]


class NoduleEdgeError(Exception):
    """Base class of every error nodule-edge raises on purpose."""

    exit_code: int = 1


class StudyError(NoduleEdgeError):
    """The study cannot be read: no DICOM, not CT, truncated or undecodable pixel data."""

    exit_code = 3


class SeriesSelectionError(StudyError):
    """More than one candidate series (or the requested one is absent); the message lists them."""


class GeometryError(StudyError):
    """Slice geometry makes the 32 mm cube wrong: gaps, tilt, mixed orientation, too few slices."""


class CoordinateError(NoduleEdgeError):
    """A nodule location is malformed or lies outside the volume."""

    exit_code = 2


class BundleError(NoduleEdgeError):
    """A model bundle is missing, incomplete, tampered with or of an unknown version."""

    exit_code = 4


class EngineError(NoduleEdgeError):
    """An inference engine cannot be created or run (backend unavailable, engine mismatch)."""

    exit_code = 5


class IndexError_(NoduleEdgeError):  # noqa: N801 - trailing underscore avoids the builtin
    """The similar-nodule index is corrupt, inconsistent or queried with bad vectors."""

    exit_code = 6


class ConfigError(NoduleEdgeError):
    """A training or export configuration is invalid (unknown key, bad value)."""

    exit_code = 2


class DataError(NoduleEdgeError):
    """A training or evaluation data set (manifest, volumes, masks) is malformed."""

    exit_code = 3


class OutputError(NoduleEdgeError):
    """Outputs cannot be written (unwritable directory, disk full); nothing partial is left."""

    exit_code = 7


class MissingDependencyError(NoduleEdgeError):
    """An optional dependency is needed for this feature; the message gives the install hint."""

    exit_code = 8


class OptionError(NoduleEdgeError, ValueError):
    """An option makes no sense (unknown explanation method, occlusion block larger than the cube)."""

    exit_code = 2


class RowsFailedError(NoduleEdgeError):
    """Some rows of a batch command failed; the others were done (details in ``errors.csv``).

    Attributes:
        failed: Rows that failed.
        total: Rows attempted.
    """

    exit_code = 9

    def __init__(self, message: str, failed: int, total: int) -> None:
        super().__init__(message)
        self.failed = failed
        self.total = total


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingDependencyError` with a hint.

    Args:
        module: Importable module name, e.g. ``"torch"``.
        extra: The pyproject extra that provides it, e.g. ``"train"``.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"'{module}' is needed for this feature but is not installed: pip install 'nodule-edge[{extra}]' ({exc})"
        ) from exc

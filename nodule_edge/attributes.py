"""The six radiologist attributes: names, scales and their [0, 1] encoding (one definition)."""

from __future__ import annotations

import numpy as np

__all__ = ["ATTRIBUTE_NAMES", "RATING_MIN", "RATING_MAX", "ratings_to_unit", "unit_to_ratings"]

#: Order of the attribute outputs everywhere: training targets, ONNX outputs, index vectors, reports.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "subtlety",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "malignancy",
)
RATING_MIN = 1.0
RATING_MAX = 5.0


def ratings_to_unit(ratings: np.ndarray) -> np.ndarray:
    """Map LIDC ratings on the 1–5 scale to the [0, 1] regression targets."""
    return (np.asarray(ratings, dtype=np.float32) - RATING_MIN) / (RATING_MAX - RATING_MIN)


def unit_to_ratings(unit: np.ndarray) -> np.ndarray:
    """Map model outputs in [0, 1] back to the 1–5 rating scale (clipped)."""
    unit = np.clip(np.asarray(unit, dtype=np.float32), 0.0, 1.0)
    return unit * (RATING_MAX - RATING_MIN) + RATING_MIN

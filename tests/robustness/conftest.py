"""Fixtures for the robustness suite: a real inferer, and one whose engine is a cheap stand-in."""

from __future__ import annotations

import numpy as np
import pytest

from nodule_edge.errors import EngineError


class FakeEngine:
    """Stands in for ONNX Runtime so that many malformed inputs can be pushed through the API fast.

    Outputs have the real shapes and are computed from the patch, so a NaN in the input would
    reach the outputs as it would with the real model.
    """

    def __init__(self, real) -> None:
        self.metadata = real.metadata
        self.backend = real.backend
        self.providers = real.providers
        self.calls = 0

    def run(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        patches = np.asarray(patches, dtype=np.float32)
        if patches.ndim != 5 or patches.shape[1:] != (2, 64, 64, 64):
            raise EngineError(f"fake engine got patches of shape {patches.shape}")
        self.calls += 1
        mean = patches.mean(axis=(1, 2, 3, 4))
        unit = np.clip(mean, 0, 1)  # NaN stays NaN
        return {
            "malignancy_probability": unit.astype(np.float32),
            "attributes": np.repeat((1 + 4 * unit)[:, None], 6, axis=1).astype(np.float32),
            "segmentation": patches[:, 1],
            "saliency": patches[:, 0],
            "nodule_attention": mean.astype(np.float32),
            "background_attention": (mean / 2).astype(np.float32),
            "embedding": np.repeat(mean[:, None], 8, axis=1).astype(np.float32),
        }

    def segment(self, patches: np.ndarray) -> np.ndarray:
        return self.run(patches)["segmentation"]


@pytest.fixture(scope="session")
def real_inferer(tiny_bundle):
    """The tiny bundle on the CPU backend, one ONNX Runtime thread per call."""
    from nodule_edge.runtime import NoduleInferer

    return NoduleInferer(tiny_bundle, backend="cpu", top_k=5, threads=1)


@pytest.fixture(scope="session")
def fake_inferer(tiny_bundle):
    """A real NoduleInferer (bundle, index, front end) whose engine is :class:`FakeEngine`."""
    from nodule_edge.runtime import NoduleInferer

    inferer = NoduleInferer(tiny_bundle, backend="cpu", top_k=5, threads=1)
    inferer.engine = FakeEngine(inferer.engine)
    return inferer

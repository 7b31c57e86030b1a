"""The runtime: DICOM study or volume → patch → engine → diagnosis, without torch.

Embed it with :class:`NoduleInferer` (load once, call from many threads).
"""

from nodule_edge.runtime.bundle import Bundle, load_bundle
from nodule_edge.runtime.inferer import NoduleInferer, NodulePrediction, NoduleResult, StudyResult
from nodule_edge.runtime.study import Study, open_study

__all__ = [
    "Bundle",
    "NoduleInferer",
    "NodulePrediction",
    "NoduleResult",
    "Study",
    "StudyResult",
    "load_bundle",
    "open_study",
]

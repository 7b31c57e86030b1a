"""nodule-edge: interpretable lung-nodule diagnosis from CT, fast on the edge.

The top-level package is light: importing it loads neither torch nor onnxruntime. Use
:mod:`nodule_edge.runtime` for inference and :mod:`nodule_edge.index` for retrieval.
"""

from nodule_edge.attributes import ATTRIBUTE_NAMES
from nodule_edge.errors import NoduleEdgeError
from nodule_edge.patch import DEFAULT_PATCH_SPEC, PatchSpec, build_patch

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ATTRIBUTE_NAMES",
    "DEFAULT_PATCH_SPEC",
    "NoduleEdgeError",
    "PatchSpec",
    "build_patch",
]

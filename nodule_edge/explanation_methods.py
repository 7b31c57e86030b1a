"""The names of the explanation methods, defined once for the runtime, the CLI and explain-compare.

A module of its own, without imports, so that the CLI can show them at start-up without loading
the explanation code (README, Explanations).
"""

__all__ = ["RUNTIME_METHODS", "TORCH_METHODS"]

#: Methods the runtime computes with the engine alone.
RUNTIME_METHODS: tuple[str, ...] = ("gradcam", "occlusion")
#: Methods that need the PyTorch model (``nodule-edge explain-compare``, extra ``explain``), in the
#: order explain-compare reports them.
TORCH_METHODS: tuple[str, ...] = (
    "saliency",
    "gradient_x_input",
    "integrated_gradients",
    "smoothgrad",
    "gradient_shap",
    "lime",
    "lrp",
)

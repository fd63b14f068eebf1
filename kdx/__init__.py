"""kdx: knowledge-distillation experiments for image classification and face recognition."""

__version__ = "0.1.0"

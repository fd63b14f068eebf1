"""Networks by name: `build_model("resnet20", num_classes=10)`; kdx nets, torchvision and timm."""
from kdx.models.features import capture_inputs, feature_stages, penultimate_features
from kdx.models.registry import (
    adapt_in_chans,
    build_model,
    find_head,
    list_models,
    load_weights,
    register_model,
    replace_head,
    resolve_source,
)
from kdx.models.iresnet import IResNet  # noqa: E402  (registers iresnet18/34/50/100)
from kdx.models.mobilefacenet import MobileFaceNet  # noqa: E402  (registers mobilefacenet)
from kdx.models.embedding import FACE_MODELS, build_embedding_model, is_face_model  # noqa: E402

__all__ = [
    "FACE_MODELS", "IResNet", "MobileFaceNet", "build_embedding_model", "is_face_model",
    "adapt_in_chans", "build_model", "capture_inputs", "feature_stages", "find_head", "list_models",
    "load_weights", "penultimate_features", "register_model", "replace_head", "resolve_source",
]

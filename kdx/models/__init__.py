"""Networks by name: `build_model("resnet20", num_classes=10)`; kdx nets, torchvision and timm, one registry
(kdx.models.registry) and one contract every built classifier meets (kdx.models.contract)."""
from kdx.models.contract import (
    ClassifierNet,
    capture_inputs,
    classifier_path,
    feature_stages,
    get_classifier,
    penultimate_features,
    reset_classifier,
)
from kdx.models.registry import (
    adapt_in_chans,
    build_model,
    builtin_source,
    is_embedding_model,
    list_models,
    register_model,
    registered_models,
    resolve_source,
)
from kdx.models.weights import load_weights, read_weights_file, strip_prefix

# kdx's own nets register themselves when their modules are imported
from kdx.models import cifar_resnet, small_cnn, wrn  # noqa: E402,F401
from kdx.models.iresnet import IResNet  # noqa: E402
from kdx.models.mobilefacenet import MobileFaceNet  # noqa: E402
from kdx.models.embedding import build_embedding_model, fit_input, model_input_size  # noqa: E402
from kdx.models.margin_heads import (MARGIN_PRESETS, CombinedMarginHead, arcface_head, build_margin_head,  # noqa: E402
                                     cosface_head, normsoftmax)

__all__ = [
    "ClassifierNet", "CombinedMarginHead", "IResNet", "MARGIN_PRESETS", "MobileFaceNet", "adapt_in_chans",
    "arcface_head", "build_margin_head", "cosface_head", "normsoftmax", "build_embedding_model", "build_model",
    "builtin_source",
    "capture_inputs", "classifier_path", "feature_stages", "fit_input", "get_classifier", "is_embedding_model",
    "list_models", "load_weights", "model_input_size", "penultimate_features", "read_weights_file",
    "register_model", "registered_models", "reset_classifier", "resolve_source", "strip_prefix",
]

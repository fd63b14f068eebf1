"""Face embedding networks: shapes, sizes, registry and the embedding wrapper."""
import pytest
import torch

from kdx.errors import ConfigError
from kdx.models import build_embedding_model, build_model


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_iresnet18_shapes():
    m = build_model("iresnet18", num_classes=10).eval()
    assert m.embedding_size == 512
    assert m(torch.randn(2, 3, 112, 112)).shape == (2, 512)
    m = build_embedding_model("iresnet18", 64, in_chans=1, input_size=(56, 46)).eval()
    assert m.fc.in_features == 512 * 4 * 3
    assert m(torch.randn(2, 1, 56, 46)).shape == (2, 64)


def test_mobilefacenet_shapes_and_size():
    m = build_embedding_model("mobilefacenet", 128).eval()
    assert m(torch.randn(2, 3, 112, 112)).shape == (2, 128)
    assert 0.95e6 < _params(m) < 1.1e6
    assert 1.1e6 < _params(build_model("mobilefacenet", 0)) < 1.3e6  # 512-d default
    m = build_embedding_model("mobilefacenet", 128, input_size=64).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 128)


def test_classifier_backbone_becomes_embedding_net():
    m = build_embedding_model("resnet20", 32).eval()
    assert m.embedding_size == 32 and m(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert isinstance(m.fc[1], torch.nn.BatchNorm1d)
    with pytest.raises(ConfigError, match="local"):
        build_embedding_model("iresnet18", 512, pretrained=True)

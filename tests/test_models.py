"""Model registry: kdx nets with their published sizes, torchvision/timm by name, helpful errors."""
import pytest
import torch

from kdx.errors import ModelNotFoundError
from kdx.models import adapt_in_chans, build_model, find_head, list_models, penultimate_features, replace_head


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,millions", [
    ("resnet20", 0.27), ("resnet56", 0.86), ("resnet8x4", 1.23), ("resnet32x4", 7.43), ("wrn_40_2", 2.25),
    ("wrn_16_2", 0.70),
])
def test_cifar_nets_have_published_parameter_counts(name, millions):
    model = build_model(name, num_classes=100)
    assert n_params(model) / 1e6 == pytest.approx(millions, abs=0.03)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_torchvision_and_timm_names_build_with_requested_classes_and_channels():
    for name in ("mobilenet_v3_small", "tv:shufflenet_v2_x0_5", "timm:resnet10t"):
        model = build_model(name, num_classes=7, in_chans=1)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ModelNotFoundError, match="resnet21.*close matches:.*resnet20"):
        build_model("resnet21", num_classes=10)
    assert "resnet8x4" in list_models("kdx")


def test_replace_head_and_penultimate_features():
    model = build_model("resnet8", num_classes=10)
    replace_head(model, 3)
    path, head = find_head(model)
    assert path == "fc" and head.out_features == 3
    feats, logits = penultimate_features(model, torch.randn(4, 3, 16, 16))
    assert feats.shape == (4, 64) and logits.shape == (4, 3)


def test_adapt_in_chans_keeps_grey_response_of_pretrained_filters():
    model = build_model("tv:resnet18", num_classes=5)
    conv = model.conv1
    grey = torch.rand(1, 1, 32, 32)
    expected = conv(grey.repeat(1, 3, 1, 1))  # an RGB image with equal channels
    adapt_in_chans(model, 1)
    assert torch.allclose(model.conv1(grey), expected, atol=1e-5)


def test_pretrained_local_weights_file(tmp_path):
    src = build_model("resnet8", num_classes=4)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = build_model("resnet8", num_classes=4, pretrained=str(tmp_path / "w.pt"))
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    other = build_model("resnet8", num_classes=9, pretrained=str(tmp_path / "w.pt"))  # new head for new classes
    assert torch.equal(other.conv1.weight, src.conv1.weight) and other.fc.out_features == 9

"""Model registry: kdx nets with their published sizes, torchvision/timm by name, the contract every network
meets (declared classifier, stage taps), helpful errors."""
import pytest
import torch

from kdx.errors import ConfigError, ModelNotFoundError
from kdx.models import (adapt_in_chans, build_embedding_model, build_model, classifier_path, feature_stages,
                        get_classifier, is_embedding_model, list_models, penultimate_features, reset_classifier)


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


def test_reset_classifier_and_penultimate_features():
    model = build_model("resnet8", num_classes=10)
    reset_classifier(model, 3)
    assert classifier_path(model) == "fc" and get_classifier(model).out_features == 3
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


@pytest.mark.parametrize("name,path", [
    ("resnet20", "fc"), ("wrn_16_1", "fc"), ("cnn_tiny", "fc"), ("tv:resnet18", "fc"),
    ("mobilenet_v3_small", "classifier.3"), ("tv:efficientnet_b0", "classifier.1"), ("tv:convnext_tiny", "classifier.2"),
    ("tv:vit_b_16", "heads.head"), ("tv:densenet121", "classifier"), ("timm:resnet10t", "fc"),
    ("timm:mobilenetv3_small_050", "classifier"),
])
def test_every_classifier_declares_its_classifier_and_stages(name, path):
    """The registry contract: a declared classifier (no guessing), which reset_classifier replaces and whose input
    penultimate_features returns; named stage taps wherever the network has stages."""
    model = build_model(name, num_classes=7).eval()
    assert classifier_path(model) == path and get_classifier(model).out_features == 7
    reset_classifier(model, 3)
    assert get_classifier(model).out_features == 3
    size = 224 if "vit" in name else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats, logits = penultimate_features(model, x)
        assert logits.shape == (2, 3)
        torch.testing.assert_close(get_classifier(model)(feats), logits)
    stages = feature_stages(model)
    assert all(isinstance(model.get_submodule(s), torch.nn.Module) for s in stages)
    if name in ("resnet20", "tv:resnet18", "mobilenet_v3_small", "timm:resnet10t"):
        assert len(stages) >= 3


def test_embedding_nets_are_registered_as_such_and_declare_stages():
    assert is_embedding_model("iresnet18") and is_embedding_model("kdx:mobilefacenet")
    assert not is_embedding_model("resnet20") and not is_embedding_model("tv:resnet18")
    for name in ("iresnet18", "mobilefacenet"):
        net = build_embedding_model(name, 32, input_size=56)
        stages = feature_stages(net)
        assert len(stages) == 4 and all(net.get_submodule(s) is not None for s in stages)
    with pytest.raises(ConfigError, match="declares no classifier layer"):
        classifier_path(build_embedding_model("iresnet18", 32, input_size=56))


class Headless(torch.nn.Module):
    def __init__(self, num_classes=3, in_chans=3):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(in_chans, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                        torch.nn.Flatten(), torch.nn.Linear(4, num_classes))


class Declared(Headless):
    classifier_path = "body.3"


def test_a_users_network_declares_its_classifier_or_names_it_by_convention():
    assert classifier_path(Declared()) == "body.3" and get_classifier(Declared()).out_features == 3
    with pytest.raises(ConfigError, match=r"Headless declares no classifier layer: give the class a `classifier_path`"):
        classifier_path(Headless())  # its last layer is a Linear, but nothing says it is the classifier
    by_name = torch.nn.Module()
    by_name.fc = torch.nn.Linear(2, 5)
    assert classifier_path(by_name) == "fc"

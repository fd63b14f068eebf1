"""Face embedding networks: shapes, sizes, registry, the embedding wrapper, and insightface compatibility.

The arcface_torch tables below were written from insightface's recognition/arcface_torch/backbones/
(mobilefacenet.py, iresnet.py, and get_model in __init__.py; deepinsight/insightface at 7fadd420):
`mbf` = MobileFaceNet(scale=2, blocks=(1, 4, 6, 2)), `mbf_large` = scale 4, blocks (2, 8, 12, 4);
`r18/r50/r100` = IResNet with stages (2, 2, 2, 2), (3, 4, 14, 3), (3, 13, 30, 3). They are data about
the reference's state dict, independent of kdx's code, so a kdx change that breaks loading
arcface_torch checkpoints fails here.
"""
import math

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


# ---- arcface_torch state-dict tables ------------------------------------------------------------------------------

def _bn(prefix, c):
    stats = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    return {**stats, f"{prefix}.num_batches_tracked": ()}


def _conv(prefix, cin, cout, k, groups=1, act=True):
    """arcface_torch ConvBlock (act) / LinearBlock: `layers` = conv (no bias), BatchNorm2d[, PReLU]."""
    table = {f"{prefix}.layers.0.weight": (cout, cin // groups, k, k), **_bn(f"{prefix}.layers.1", cout)}
    if act:
        table[f"{prefix}.layers.2.weight"] = (cout,)
    return table


def _inverted(prefix, cin, expanded, cout):
    """arcface_torch DepthWise: `layers` = ConvBlock 1x1, ConvBlock 3x3 depthwise, LinearBlock 1x1."""
    return {**_conv(f"{prefix}.layers.0", cin, expanded, 1),
            **_conv(f"{prefix}.layers.1", expanded, expanded, 3, groups=expanded),
            **_conv(f"{prefix}.layers.2", expanded, cout, 1, act=False)}


def _residual(prefix, c, n, expanded):
    """arcface_torch Residual: `layers` = n DepthWise blocks of width c."""
    return {k: v for i in range(n) for k, v in _inverted(f"{prefix}.layers.{i}", c, expanded, c).items()}


def _gdc(emb):
    return {**_conv("features.layers.0", 512, 512, 7, groups=512, act=False), "features.layers.2.weight": (emb, 512),
            **_bn("features.layers.3", emb)}


MBF_TABLE = {  # arcface_torch get_model("mbf"): scale 2, blocks (1, 4, 6, 2), num_features 512
    **_conv("layers.0", 3, 128, 3),
    **_conv("layers.1", 128, 128, 3, groups=64),  # 64 groups at every scale: weight 128 x 2 x 3 x 3
    **_inverted("layers.2", 128, 128, 128), **_residual("layers.3", 128, 4, 128),
    **_inverted("layers.4", 128, 256, 256), **_residual("layers.5", 256, 6, 256),
    **_inverted("layers.6", 256, 512, 256), **_residual("layers.7", 256, 2, 256),
    **_conv("conv_sep", 256, 512, 1), **_gdc(512),
}


def _iresnet_table(stages):
    table = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64), "prelu.weight": (64,)}
    cin = 64
    for s, (n, c) in enumerate(zip(stages, (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            table.update({**_bn(f"{p}.bn1", cin), f"{p}.conv1.weight": (c, cin, 3, 3), **_bn(f"{p}.bn2", c),
                          f"{p}.prelu.weight": (c,), f"{p}.conv2.weight": (c, c, 3, 3), **_bn(f"{p}.bn3", c)})
            if b == 0:  # every stage starts with stride 2, so with a conv1x1 + BN shortcut
                table.update({f"{p}.downsample.0.weight": (c, cin, 1, 1), **_bn(f"{p}.downsample.1", c)})
            cin = c
    table.update({**_bn("bn2", 512), "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,), **_bn("features", 512)})
    return table


R18_TABLE = _iresnet_table((2, 2, 2, 2))
R50_TABLE = _iresnet_table((3, 4, 14, 3))
R100_TABLE = _iresnet_table((3, 13, 30, 3))


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fake_state(table, seed=0):
    """Random tensors with the table's keys and shapes, scaled so a forward pass stays finite."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in table.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif len(shape) > 1:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean") or key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        else:  # BN scale, PReLU slope
            state[key] = 0.25 + 0.5 * torch.rand(shape, generator=g)
    return state


def _loads_and_runs(model, table, batch=2):
    model.load_state_dict(_fake_state(table), strict=True)
    with torch.no_grad():
        out = model.eval()(torch.randn(batch, 3, 112, 112))
    assert out.shape == (batch, 512) and torch.isfinite(out).all()


def test_mobilefacenet_matches_arcface_torch_mbf():
    assert len(MBF_TABLE) == 333
    m = build_embedding_model("mobilefacenet", 512, arch="mbf")
    assert _shapes(m) == MBF_TABLE
    _loads_and_runs(m, MBF_TABLE)
    assert _shapes(build_embedding_model("mobilefacenet", 512, scale=2)) == MBF_TABLE  # the same net spelled out
    emb128 = _shapes(build_embedding_model("mobilefacenet", 128, arch="mbf"))  # num_features=128
    assert emb128["features.layers.2.weight"] == (128, 512) and len(emb128) == 333


def test_mobilefacenet_other_arcface_torch_variants():
    large = _shapes(build_embedding_model("mobilefacenet", 512, arch="mbf_large"))
    assert len(large) == 606
    assert large["layers.0.layers.0.weight"] == (256, 3, 3, 3)
    assert large["layers.1.layers.1.layers.0.layers.0.weight"] == (128, 256, 1, 1)  # stem is 2 residual blocks
    assert large["layers.3.layers.7.layers.1.layers.0.weight"] == (128, 1, 3, 3)
    assert large["layers.7.layers.3.layers.2.layers.0.weight"] == (512, 256, 1, 1)
    assert large["conv_sep.layers.0.weight"] == (512, 512, 1, 1)
    small = _shapes(build_model("mobilefacenet", 0))  # kdx default: MobileFaceNet(scale=1), same key names
    assert set(small) == set(MBF_TABLE)
    assert small["layers.1.layers.0.weight"] == (64, 1, 3, 3) and small["conv_sep.layers.0.weight"] == (512, 128, 1, 1)
    with pytest.raises(ConfigError, match="arch"):
        build_embedding_model("mobilefacenet", 512, arch="mbf_huge")
    with pytest.raises(ConfigError, match="scale"):
        build_embedding_model("mobilefacenet", 512, arch="mbf", scale=1)


def test_arcface_torch_weights_file_loads_through_build_embedding_model(tmp_path):
    state = _fake_state(MBF_TABLE, seed=1)
    torch.save(state, tmp_path / "model.pt")  # what arcface_torch saves: backbone.state_dict()
    m = build_embedding_model("mobilefacenet", 512, pretrained=str(tmp_path / "model.pt"), arch="mbf")
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("name,table", [("iresnet18", R18_TABLE), ("iresnet50", R50_TABLE), ("iresnet100", R100_TABLE)])
def test_iresnet_matches_arcface_torch(name, table):
    """arcface_torch r18/r50/r100 state dicts (keys and shapes of the reference) load strictly and run."""
    assert len(table) == {"iresnet18": 187, "iresnet50": 475, "iresnet100": 925}[name]
    m = build_embedding_model(name, 512)
    assert _shapes(m) == table
    _loads_and_runs(m, table, batch=2 if name == "iresnet18" else 1)


def test_iresnet100_matches_arcface_torch_in_outline():
    shapes = _shapes(build_embedding_model("iresnet100", 512))
    # stem conv+BN+PReLU 7 keys, 49 blocks x 18 (3 BN, 2 conv, PReLU), 4 shortcuts x 6, head BN + FC + BN1d 12
    assert len(shapes) == 7 + 18 * (3 + 13 + 30 + 3) + 6 * 4 + 12 == 925
    assert shapes["layer2.12.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer3.29.prelu.weight"] == (256,)
    assert shapes["layer4.0.downsample.0.weight"] == (512, 256, 1, 1)
    assert shapes["fc.weight"] == (512, 25088) and shapes["features.running_var"] == (512,)
    assert "layer3.30.bn1.weight" not in shapes and "layer4.3.conv1.weight" not in shapes

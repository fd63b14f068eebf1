"""Margin heads and face distillation losses against hand-computed values."""
import math

import pytest
import torch

from kdx.errors import ConfigError
from kdx.losses import (
    EmbeddingProjector,
    check_embedding_dims,
    embedding_cosine_loss,
    embedding_mse_loss,
    make_projector,
    relational_kd_loss,
)
from kdx.models.margin_heads import CombinedMarginHead, arcface_head, cosface_head, normsoftmax


def _head(factory):
    head = factory(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))  # norms must not matter
    return head


def test_arcface_and_cosface_logits_by_hand():
    x = torch.tensor([[0.8 * 5, 0.6 * 5]])  # cos(theta_0) = 0.8, cos(theta_1) = 0.6
    y = torch.tensor([0])
    arc = _head(arcface_head)(x, y)
    # cos(theta + 0.5) = 0.8 cos 0.5 - 0.6 sin 0.5 = 0.41441072...
    assert arc[0, 0].item() == pytest.approx(64 * 0.4144107263, rel=1e-5)
    assert arc[0, 1].item() == pytest.approx(64 * 0.6, rel=1e-5)
    cos = _head(cosface_head)(x, y)
    assert cos[0].tolist() == pytest.approx([64 * 0.4, 64 * 0.6], rel=1e-5)
    plain = _head(normsoftmax)(x, y)
    assert plain[0].tolist() == pytest.approx([64 * 0.8, 64 * 0.6], rel=1e-5)
    assert _head(arcface_head)(x)[0].tolist() == pytest.approx([51.2, 38.4], rel=1e-5)  # eval: no margin
    head = _head(arcface_head)
    expected = math.log(math.exp(64 * 0.4144107263) + math.exp(64 * 0.6)) - 64 * 0.4144107263
    assert head.loss(x, y).item() == pytest.approx(expected, rel=1e-4)


def test_arcface_fallback_past_pi():
    # theta = acos(-0.95) = 2.824 > pi - 0.5: logit = s * (cos theta - 0.5 sin 0.5)
    x = torch.tensor([[-0.95, math.sqrt(1 - 0.95 ** 2)]])
    logits = _head(arcface_head)(x, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(64 * (-0.95 - 0.5 * math.sin(0.5)), rel=1e-5)


def test_general_combined_margin_and_gradients():
    head = CombinedMarginHead(2, 2, s=10.0, m1=1.5, m2=0.2, m3=0.1)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    theta = 0.6
    x = torch.tensor([[math.cos(theta), math.sin(theta)]], requires_grad=True)
    out = head(x, torch.tensor([0]))
    assert out[0, 0].item() == pytest.approx(10 * (math.cos(1.5 * theta + 0.2) - 0.1), rel=1e-5)
    # identical embedding and weight (cos = 1) keeps finite gradients
    x2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    arcface = arcface_head(2, 2)
    with torch.no_grad():
        arcface.weight.copy_(torch.eye(2))
    arcface.loss(x2, torch.tensor([0])).backward()
    assert torch.isfinite(x2.grad).all()
    with pytest.raises(ConfigError, match="outside"):
        arcface(x2, torch.tensor([5]))


def test_embedding_losses_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert embedding_mse_loss(s, t).item() == pytest.approx(0.75)
    assert embedding_mse_loss(s, t, normalize=True).item() == pytest.approx(0.5)  # ((1,1,0,0))/4*2
    assert embedding_cosine_loss(s, t).item() == pytest.approx(0.5)
    assert relational_kd_loss(s, t).item() == pytest.approx(0.5)


def test_relational_kd_zero_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 16, generator=g)
    assert relational_kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert relational_kd_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(6, 8, generator=g)  # different dims are fine for relational KD
    assert relational_kd_loss(s, t).item() == pytest.approx(relational_kd_loss(5 * s, 0.1 * t).item(), rel=1e-5)


def test_dimension_mismatch_and_projector():
    with pytest.raises(ConfigError, match="student 128 vs teacher 512; set distill.projection=true"):
        check_embedding_dims(128, 512, projection=False)
    with pytest.raises(ConfigError, match="student 128 vs teacher 512"):
        embedding_cosine_loss(torch.randn(2, 128), torch.randn(2, 512))
    proj = make_projector(128, 512, projection=True)
    assert isinstance(proj, EmbeddingProjector) and proj(torch.randn(3, 128)).shape == (3, 512)
    assert isinstance(make_projector(64, 64, projection=False), torch.nn.Identity)


def test_preset_helpers_pass_scale_and_margin_through():
    """arcface_head/cosface_head/normsoftmax: the given s and m land in their places; defaults are the papers'."""
    a = arcface_head(4, 3, s=30.0, m=0.3)
    assert (a.s, a.m1, a.m2, a.m3) == (30.0, 1.0, 0.3, 0.0)
    a = arcface_head(4, 3)
    assert (a.s, a.m1, a.m2, a.m3) == (64.0, 1.0, 0.5, 0.0)
    c = cosface_head(4, 3, s=16.0, m=0.25)
    assert (c.s, c.m1, c.m2, c.m3) == (16.0, 1.0, 0.0, 0.25)
    c = cosface_head(4, 3)
    assert (c.s, c.m1, c.m2, c.m3) == (64.0, 1.0, 0.0, 0.4)
    n = normsoftmax(4, 3, s=8.0)
    assert (n.s, n.m1, n.m2, n.m3) == (8.0, 1.0, 0.0, 0.0)


def test_projector_bias_option_and_embedding_shape_checks():
    assert EmbeddingProjector(3, 5).proj.bias is not None
    assert EmbeddingProjector(3, 5, bias=False).proj.bias is None
    for s, t in [(torch.randn(4), torch.randn(4, 3)), (torch.randn(4, 3), torch.randn(4)),
                 (torch.randn(4, 3), torch.randn(5, 3))]:
        with pytest.raises(ValueError, match="embeddings must be B x D with equal B"):
            embedding_mse_loss(s, t)
    with pytest.raises(ConfigError, match="projection"):
        embedding_cosine_loss(torch.randn(4, 3), torch.randn(4, 5))
    assert torch.isfinite(relational_kd_loss(torch.randn(4, 3), torch.randn(4, 5)))  # sizes may differ here


def test_margin_head_at_the_extremes_of_the_cosine():
    """An embedding opposite its class (cos = -1): finite gradients; one orthogonal to it (cos = 0) with
    easy_margin: no margin (the margin applies only for cos > 0)."""
    for easy in (False, True):
        head = CombinedMarginHead(2, 2, s=4.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=easy)
        with torch.no_grad():
            head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        x = torch.tensor([[-3.0, 0.0]], requires_grad=True)
        head.loss(x, torch.tensor([0])).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    ortho = head(torch.tensor([[0.0, 2.0]]), torch.tensor([0]))
    assert ortho[0].tolist() == pytest.approx([0.0, 4.0], abs=1e-5)


def test_margin_loss_ignores_rows_labelled_minus_one():
    from kdx.losses.margin import margin_loss
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, -1, 2])
    want = (-torch.log_softmax(logits[0], 0)[0] - torch.log_softmax(logits[2], 0)[2]) / 2
    assert margin_loss(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)


def test_margin_head_defaults_config_overrides_and_label_bounds():
    from kdx.models.margin_heads import build_margin_head
    h = CombinedMarginHead(4, 3)
    assert (h.s, h.m1, h.m2, h.m3, h.easy_margin) == (64.0, 1.0, 0.5, 0.0, False)  # ArcFace at s = 64
    b = build_margin_head(4, 3)
    assert (b.s, b.m1, b.m2, b.m3, b.easy_margin) == (64.0, 1.0, 0.5, 0.0, False)
    b = build_margin_head(4, 3, "cosface", s=30.0, m1=1.2, m2=0.1, m3=0.2, easy_margin=True)
    assert (b.s, b.m1, b.m2, b.m3, b.easy_margin) == (30.0, 1.2, 0.1, 0.2, True)
    with pytest.raises(ConfigError, match="label 3 is outside the margin head's 3 classes"):
        h(torch.randn(2, 4), torch.tensor([0, 3]))


def test_adadistill_margin_and_scale_bounds_name_the_key():
    from kdx.losses.adadistill import check_margin
    assert check_margin("cosface", 0, 1e-3) == ("cosface", 0.0, 1e-3)  # no margin is allowed
    for margin in (math.pi, -0.01, True, "0.3"):
        with pytest.raises(ConfigError, match=r"^distill.margin must be a number in \[0, pi\), got "):
            check_margin("arcface", margin, 64.0)
    for scale in (0, -1.0, True):
        with pytest.raises(ConfigError, match=r"^distill.scale must be a number > 0, got "):
            check_margin("arcface", 0.5, scale)


def test_margin_head_settings_at_their_bounds():
    torch.manual_seed(0)
    h = CombinedMarginHead(1, 1, s=1e-3, m1=1.0, m2=0.0, m3=0.0)  # the smallest head there is
    assert h.weight.shape == (1, 1)
    big = CombinedMarginHead(64, 100)
    assert abs(big.weight.std().item() - 0.01) < 0.001  # initialised N(0, 0.01^2)
    for kwargs in ({"s": 0}, {"m1": 0.9}, {"m2": -0.1}, {"m3": -0.1}, {"m2": math.pi}):
        with pytest.raises(ConfigError, match="margin"):
            CombinedMarginHead(4, 3, **kwargs)
    for sizes in ((4, 0), (0, 3)):
        with pytest.raises(ConfigError, match="num_classes >= 1 and embedding_size >= 1"):
            CombinedMarginHead(*sizes)
    sphere = CombinedMarginHead(4, 3, m1=2.0, m2=0.2)
    assert sphere.cos_limit == pytest.approx(math.cos((math.pi - 0.2) / 2.0), abs=1e-12)

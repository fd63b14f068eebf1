"""Margin heads and face distillation losses against hand-computed values."""
import math

import pytest
import torch

from kdx.errors import ConfigError
from kdx.losses import (
    CombinedMarginHead,
    EmbeddingProjector,
    arcface_head,
    check_embedding_dims,
    cosface_head,
    embedding_cosine_loss,
    embedding_mse_loss,
    make_projector,
    normsoftmax,
    relational_kd_loss,
)


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

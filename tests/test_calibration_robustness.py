"""Calibration and robustness measures against hand-computed values (kdx.eval.robustness)."""
import math

import pytest
import torch
from torch import nn

from kdx.errors import ConfigError
from kdx.eval.robustness import PixelSpace, calibration, fgsm, gaussian_blur, pgd, robustness


def test_ece_and_nll_by_hand():
    # confidences 0.75 (right), 0.9 (wrong), 0.8 (right), 0.5 (a tie, argmax takes class 0: wrong)
    logits = torch.tensor([[math.log(3), 0.0], [0.0, math.log(9)], [math.log(4), 0.0], [0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    out = calibration(logits, labels, bins=2)
    # bin (0, 0.5]: the tie, accuracy 0 vs confidence 0.5; bin (0.5, 1]: accuracy 2/3 vs confidence 0.81667
    assert out["ece"] == pytest.approx(0.25 * 0.5 + 0.75 * abs(2 / 3 - (0.75 + 0.9 + 0.8) / 3), abs=1e-12)
    assert out["nll"] == pytest.approx(-(math.log(0.75) + math.log(0.1) + math.log(0.8) + math.log(0.5)) / 4, abs=1e-12)
    assert [(b["bin"], b["count"]) for b in out["reliability"]] == [(0, 1), (1, 3)]
    assert calibration(torch.tensor([[50.0, -50.0]] * 3), torch.tensor([0, 0, 0]))["ece"] == pytest.approx(0, abs=1e-12)


def test_fgsm_on_a_linear_model_is_the_hand_derived_signed_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    space = PixelSpace([0.5, 0.4], [0.25, 0.2])
    pixels = torch.rand(5, 2, 3, 3).double()
    x = space.to_inputs(pixels.float())
    y = torch.tensor([0, 1, 2, 3, 1])
    out = fgsm(net, x, y, eps=0.03, space=space)
    # by hand: d CE / d x = W^T (softmax(Wx + b) - onehot(y)); d x / d pixel = 1 / std, so the sign is the same
    w, b = net[1].weight.double(), net[1].bias.double()
    p = (x.double().flatten(1) @ w.T + b).softmax(-1)
    grad = ((p - torch.eye(4, dtype=torch.float64)[y]) @ w).view_as(pixels)
    expected = (pixels + 0.03 * grad.sign()).clamp(0, 1)
    assert torch.allclose(space.to_pixels(out).double(), expected, atol=1e-5)


def test_pgd_stays_in_the_ball_and_beats_fgsm_on_a_linear_model():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    space = PixelSpace([0.5], [0.5])
    pixels = torch.rand(200, 1, 4, 4)
    x = space.to_inputs(pixels)
    with torch.no_grad():
        y = net(x).argmax(-1)  # clean accuracy 1 by construction
    eps = 0.05
    adv = pgd(net, x, y, eps, space, steps=10, generator=torch.Generator().manual_seed(0))
    moved = space.to_pixels(adv) - pixels
    assert moved.abs().max() <= eps + 1e-6 and space.to_pixels(adv).min() >= -1e-6 and space.to_pixels(adv).max() <= 1 + 1e-6
    with torch.no_grad():
        acc_pgd = (net(adv).argmax(-1) == y).float().mean().item()
        acc_fgsm = (net(fgsm(net, x, y, eps, space)).argmax(-1) == y).float().mean().item()
    assert acc_pgd <= acc_fgsm < 1.0


def test_blur_keeps_flat_images_and_spreads_a_dot_with_gaussian_weights():
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    dot = torch.zeros(1, 1, 9, 9)
    dot[0, 0, 4, 4] = 1.0
    out = gaussian_blur(dot, 1.0)
    k = torch.exp(-torch.arange(-2, 3).double() ** 2 / 2)
    k = k / k.sum()
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert out[0, 0, 4, 4].item() == pytest.approx((k[2] * k[2]).item(), abs=1e-6)
    assert out[0, 0, 4, 5].item() == pytest.approx((k[2] * k[3]).item(), abs=1e-6)


def test_robustness_is_seeded_and_refuses_an_unknown_corruption():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    space = PixelSpace([0.5], [0.5])
    batches = [(space.to_inputs(torch.rand(8, 1, 4, 4)), torch.randint(0, 3, (8,))) for _ in range(3)]
    a = robustness(net, batches, space, eps=0.05, max_images=20, seed=4)
    assert a == robustness(net, batches, space, eps=0.05, max_images=20, seed=4)
    assert set(a) == {"acc_fgsm", "acc_pgd", "acc_noise", "acc_blur"}
    assert all(p.requires_grad for p in net.parameters())  # the model is left as it was found
    with pytest.raises(ConfigError, match="corruptions has \\['snow'\\]"):
        robustness(net, batches, space, corruptions=["snow"])

"""Distillation losses against values computed by hand (plain Python math, not the code under test)."""
import math

import pytest
import torch

from kdx.errors import ConfigError
from kdx.losses import bce_soft_loss, dkd_loss, kd_loss, logit_mse_loss


def softmax(values, T):
    exps = [math.exp(v / T) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computed_kl_times_t_squared():
    s, t, T = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0
    p_t, p_s = softmax(t, T), softmax(s, T)
    expected = T * T * sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(1.28063, rel=1e-4)  # 4 * KL([.51,.31,.19] || [.19,.31,.51])


def test_kd_loss_is_batch_mean_and_scales_with_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    per_row = torch.stack([kd_loss(s[i:i + 1], t[i:i + 1], 3.0) for i in range(4)])
    assert kd_loss(s, t, 3.0).item() == pytest.approx(per_row.mean().item(), rel=1e-6)
    # identical logits -> zero; the T^2 factor: KL at T, times T^2
    assert kd_loss(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    kl_t1 = kd_loss(s, t, 1.0).item()
    assert kl_t1 == pytest.approx(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                                             reduction="batchmean").item(), rel=1e-6)


def test_mse_loss_is_mean_of_squared_logit_differences():
    s, t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    assert logit_mse_loss(s, t).item() == pytest.approx((1 + 4 + 1 + 9) / 4)


def test_bce_soft_loss_uses_sigmoid_of_tempered_teacher_logits_as_targets():
    s, t, T = [0.5, -1.0], [2.0, 0.0], 2.0
    expected = 0.0
    for si, ti in zip(s, t):
        q = 1 / (1 + math.exp(-ti / T))  # soft target
        p = 1 / (1 + math.exp(-si / T))
        expected += -(q * math.log(p) + (1 - q) * math.log(1 - p))
    got = bce_soft_loss(torch.tensor([s]), torch.tensor([t]), temperature=T)
    assert got.item() == pytest.approx(expected / 2, rel=1e-6)


def test_dkd_tckd_term_by_hand_and_zero_for_identical_logits():
    s, t, y, T = [1.0, 0.0, -1.0], [2.0, 1.0, 0.0], 0, 1.0
    p_s, p_t = softmax(s, T), softmax(t, T)
    b_s, b_t = [p_s[0], 1 - p_s[0]], [p_t[0], 1 - p_t[0]]
    tckd = sum(bt * math.log(bt / bs) for bt, bs in zip(b_t, b_s))
    got = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T, alpha=1.0, beta=0.0)
    assert got.item() == pytest.approx(tckd, rel=1e-5)
    x = torch.randn(3, 6)
    assert dkd_loss(x, x, torch.tensor([0, 1, 2]), 4.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, "4"])
def test_temperature_must_be_positive(bad):
    with pytest.raises(ConfigError, match="distill.temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=bad)

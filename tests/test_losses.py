"""Distillation losses against values computed by hand (plain Python math, not the code under test)."""
import math

import pytest
import torch

from kdx.errors import ConfigError
from kdx.losses import bce_soft_loss, dist_loss, dkd_loss, kd_loss, logit_mse_loss, logit_standardize


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


def _log_softmax(values):
    m = max(values)
    lse = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - lse for v in values]


def _logaddexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def dkd_by_hand(s, t, y, T, alpha, beta):
    """DKD of one sample from the paper's definition, in plain Python log-space arithmetic."""
    s, t = [v / T for v in s], [v / T for v in t]
    ls, lt = _log_softmax(s), _log_softmax(t)
    others = [i for i in range(len(s)) if i != y]
    # binary (target, rest) log-probabilities
    bs = [ls[y], _logaddexp([ls[i] for i in others])]
    bt = [lt[y], _logaddexp([lt[i] for i in others])]
    tckd = sum(math.exp(b_t) * (b_t - b_s) for b_t, b_s in zip(bt, bs))
    qs, qt = _log_softmax([s[i] for i in others]), _log_softmax([t[i] for i in others])
    nckd = sum(math.exp(q_t) * (q_t - q_s) for q_t, q_s in zip(qt, qs))
    return (alpha * tckd + beta * nckd) * T * T


def test_dkd_matches_the_papers_definition_on_random_logits_with_real_gaps():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 5 + 1
    y = torch.tensor([0, 6, 2, 2, 5, 1])
    T, alpha, beta = 3.0, 0.7, 5.0
    expected = sum(dkd_by_hand(s[i].tolist(), t[i].tolist(), int(y[i]), T, alpha, beta) for i in range(6)) / 6
    assert dkd_loss(s, t, y, T, alpha=alpha, beta=beta).item() == pytest.approx(expected, rel=1e-5)
    # each part alone: swapping alpha and beta, dropping T^2 or swapping the KL would all change these
    tckd = sum(dkd_by_hand(s[i].tolist(), t[i].tolist(), int(y[i]), T, 1.0, 0.0) for i in range(6)) / 6
    nckd = sum(dkd_by_hand(s[i].tolist(), t[i].tolist(), int(y[i]), T, 0.0, 1.0) for i in range(6)) / 6
    assert dkd_loss(s, t, y, T, alpha=1.0, beta=0.0).item() == pytest.approx(tckd, rel=1e-5)
    assert dkd_loss(s, t, y, T, alpha=0.0, beta=1.0).item() == pytest.approx(nckd, rel=1e-5)
    assert abs(tckd - nckd) > 0.05 and dkd_loss(t, s, y, T, alpha, beta).item() != pytest.approx(expected, rel=1e-3)


def test_dkd_stays_exact_with_a_huge_logit_gap():
    """A student whose target probability is far below 1e-12: TCKD and its gradient must stay exact."""
    s = torch.tensor([[-200.0, 0.0, 5.0, -3.0]], requires_grad=True)
    t = torch.tensor([[10.0, 1.0, 0.0, -2.0]])
    y = torch.tensor([0])
    T = 2.0
    loss = dkd_loss(s, t, y, T, alpha=1.0, beta=0.0)
    expected = dkd_by_hand(s[0].tolist(), t[0].tolist(), 0, T, 1.0, 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # ~ 400: a clamped log would stop near 27.6 * T^2
    loss.backward()
    assert s.grad[0, 0].item() < -1.0  # the target logit is pushed up, not frozen by a clamp


def test_dkd_ties_and_identical_logits_give_zero():
    x = torch.randn(3, 6)
    assert dkd_loss(x, x, torch.tensor([0, 1, 2]), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    tied = torch.zeros(2, 5)
    assert dkd_loss(tied, tied + 3.0, torch.tensor([1, 4]), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"one shape B x C.*\(2, 5\) and \(2, 4\)"):
        dkd_loss(torch.zeros(2, 5), torch.zeros(2, 4), torch.tensor([0, 1]))


def test_logit_standardize_is_the_z_score_with_bessel_correction():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 9, generator=g) * 7 + 3
    rows = z.tolist()
    for i, row in enumerate(rows):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        for j, v in enumerate(row):
            assert logit_standardize(z)[i, j].item() == pytest.approx((v - mean) / (1e-7 + std), rel=1e-5, abs=1e-6)
    # invariant to shifting and scaling a row: what makes it useful across teachers of different logit ranges
    assert torch.allclose(logit_standardize(z * 5 + 2), logit_standardize(z), atol=1e-5)


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))


def test_dist_loss_matches_pearson_relations_by_hand():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 6, generator=g) * 2, torch.randn(5, 6, generator=g) * 4
    T, beta, gamma = 3.0, 1.5, 0.5
    ps = [softmax(r, T) for r in s.tolist()]
    pt = [softmax(r, T) for r in t.tolist()]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt)) / 5
    cols_s = [[r[j] for r in ps] for j in range(6)]
    cols_t = [[r[j] for r in pt] for j in range(6)]
    intra = 1 - sum(_pearson(a, b) for a, b in zip(cols_s, cols_t)) / 6
    expected = T * T * (beta * inter + gamma * intra)
    assert dist_loss(s, t, beta=beta, gamma=gamma, temperature=T).item() == pytest.approx(expected, rel=1e-5)
    assert dist_loss(t, t, temperature=T).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("bad", [0, -1.0, "4", True, float("inf"), float("-inf"), float("nan")])
def test_temperature_must_be_positive(bad):
    with pytest.raises(ConfigError, match="distill.temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=bad)


def test_defaults_are_the_papers_settings():
    """Called without settings, each loss uses its paper's defaults (KD T=4; DKD T=4, alpha=1, beta=8; DIST 1,1,1)."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 6, generator=g) * 3, torch.randn(4, 6, generator=g) * 3
    y = torch.tensor([0, 3, 5, 1])
    assert kd_loss(s, t).item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-6)
    assert kd_loss(s, t).item() != pytest.approx(kd_loss(s, t, 5.0).item(), rel=1e-3)
    expected = sum(dkd_by_hand(s[i].tolist(), t[i].tolist(), int(y[i]), 4.0, 1.0, 8.0) for i in range(4)) / 4
    assert dkd_loss(s, t, y).item() == pytest.approx(expected, rel=1e-5)
    assert dist_loss(s, t).item() == pytest.approx(dist_loss(s, t, 1.0, 1.0, 1.0).item(), rel=1e-6)
    assert dist_loss(s, t).item() != pytest.approx(dist_loss(s, t, temperature=2.0).item(), rel=1e-3)
    assert bce_soft_loss(s, t).item() == pytest.approx(bce_soft_loss(s, t, 1.0).item(), rel=1e-6)
    assert bce_soft_loss(s, t).item() != pytest.approx(bce_soft_loss(s, t, 2.0).item(), rel=1e-3)


def test_dkd_with_two_classes_matches_the_definition():
    """Binary tasks are the smallest DKD allows: NCKD over the single other class is 0, TCKD carries it all."""
    s, t, y = torch.tensor([[2.0, -1.0], [0.5, 3.0]]), torch.tensor([[-1.0, 1.5], [2.0, 0.0]]), torch.tensor([0, 1])
    expected = sum(dkd_by_hand(s[i].tolist(), t[i].tolist(), int(y[i]), 2.0, 0.5, 3.0) for i in range(2)) / 2
    assert dkd_loss(s, t, y, 2.0, alpha=0.5, beta=3.0).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.1


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 1), (6,)])
def test_dkd_rejects_logits_that_are_not_batch_by_classes(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match="one shape B x C"):
        dkd_loss(x, x, torch.zeros(shape[0], dtype=torch.long))


def test_kd_loss_on_dense_predictions_averages_over_pixels_with_classes_on_dim_1():
    """B x C x H x W logits (segmentation): the KL is over dim 1, averaged over the batch and every pixel."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4, 3, 5, generator=g) * 2, torch.randn(2, 4, 3, 5, generator=g) * 2
    per_pixel = [kd_loss(s[b, :, i, j][None], t[b, :, i, j][None], 3.0).item()
                 for b in range(2) for i in range(3) for j in range(5)]
    assert kd_loss(s, t, 3.0).item() == pytest.approx(sum(per_pixel) / len(per_pixel), rel=1e-5)

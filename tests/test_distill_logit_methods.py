"""Each logit distiller, built by name as `distill.method=<name>` builds it, against its formula written out
with torch primitives (not kdx.losses): so a method that passes the wrong setting, swaps student and teacher,
or forgets logit standardisation fails here even if the shared loss function is right."""
import pytest
import torch

from kdx.distill import build_distiller

from test_losses import dkd_by_hand as dkd_one

g = torch.Generator().manual_seed(11)
S = torch.randn(6, 5, generator=g) * 3          # student logits: real gaps, no ties
T_ = torch.randn(6, 5, generator=g) * 4 + 1     # teacher logits on another scale
Y = torch.tensor([0, 4, 2, 2, 1, 3])


def batch(**extra):
    return {"student_logits": S.clone(), "teacher_logits": T_.clone(), "labels": Y, **extra}


def kl_rows(p_logits, q_logits, T):
    """T^2 * mean_i KL(softmax(p_i / T) || softmax(q_i / T)) — p the teacher, q the student."""
    p, lq, lp = (p_logits / T).softmax(1), (q_logits / T).log_softmax(1), (p_logits / T).log_softmax(1)
    return T * T * (p * (lp - lq)).sum(1).mean().item()


def zscore(z):
    return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, keepdim=True))


def pearson_mean(a, b):
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()


@pytest.mark.parametrize("standardize", [False, True])
def test_kd_method(standardize):
    d = build_distiller("kd", {"temperature": 3.0, "logit_standardization": standardize})
    s, t = (zscore(S), zscore(T_)) if standardize else (S, T_)
    assert d(batch())["kd"].item() == pytest.approx(kl_rows(t, s, 3.0), rel=1e-5)
    assert build_distiller("kd")(batch())["kd"].item() == pytest.approx(kl_rows(T_, S, 4.0), rel=1e-5)  # T=4


def test_face_logit_kd_method():
    d = build_distiller("logit_kd", {"temperature": 2.5})
    assert d(batch())["logit_kd"].item() == pytest.approx(kl_rows(T_, S, 2.5), rel=1e-5)
    assert build_distiller("logit_kd")(batch())["logit_kd"].item() == pytest.approx(kl_rows(T_, S, 4.0), rel=1e-5)


def test_mse_method_regresses_raw_logits():
    assert build_distiller("mse")(batch())["mse"].item() == pytest.approx(((S - T_) ** 2).mean().item(), rel=1e-6)


def test_bce_method():
    def by_hand(T):
        q = torch.sigmoid(T_ / T)
        z = S / T
        return (-(q * torch.nn.functional.logsigmoid(z) + (1 - q) * torch.nn.functional.logsigmoid(-z))).mean().item()
    assert build_distiller("bce", {"temperature": 3.0})(batch())["bce"].item() == pytest.approx(by_hand(3.0), rel=1e-5)
    assert build_distiller("bce")(batch())["bce"].item() == pytest.approx(by_hand(2.0), rel=1e-5)  # default T=2


@pytest.mark.parametrize("standardize", [False, True])
def test_dist_method(standardize):
    d = build_distiller("dist", {"temperature": 2.0, "beta": 1.5, "gamma": 0.25,
                                 "logit_standardization": standardize})
    s, t = (zscore(S), zscore(T_)) if standardize else (S, T_)
    ps, pt = (s / 2.0).softmax(1), (t / 2.0).softmax(1)
    expected = 4.0 * (1.5 * (1 - pearson_mean(ps, pt)) + 0.25 * (1 - pearson_mean(ps.t(), pt.t())))
    assert d(batch())["dist"].item() == pytest.approx(expected, rel=1e-5)
    ps, pt = S.softmax(1), T_.softmax(1)
    default = 2 - pearson_mean(ps, pt) - pearson_mean(ps.t(), pt.t())  # T = beta = gamma = 1
    assert build_distiller("dist")(batch())["dist"].item() == pytest.approx(default, rel=1e-5)


def dkd_by_hand(s, t, y, T, alpha, beta):
    """Batch mean of the per-sample DKD reference of test_losses (the paper's definition in plain Python)."""
    return sum(dkd_one(s[i].tolist(), t[i].tolist(), int(y[i]), T, alpha, beta) for i in range(len(y))) / len(y)


@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_method_passes_tckd_weight_and_beta_in_their_places(standardize):
    d = build_distiller("dkd", {"temperature": 3.0, "tckd_weight": 0.5, "beta": 2.0,
                                "logit_standardization": standardize})
    s, t = (zscore(S), zscore(T_)) if standardize else (S, T_)
    assert d(batch())["dkd"].item() == pytest.approx(dkd_by_hand(s, t, Y, 3.0, 0.5, 2.0), rel=1e-4)
    assert build_distiller("dkd")(batch())["dkd"].item() == pytest.approx(dkd_by_hand(S, T_, Y, 4.0, 1.0, 8.0),
                                                                          rel=1e-4)


def test_dkd_method_warmup_ramp():
    d = build_distiller("dkd", {"warmup_epochs": 4})
    full = dkd_by_hand(S, T_, Y, 4.0, 1.0, 8.0)
    for epoch, share in [(0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)]:
        assert d(batch(epoch=epoch))["dkd"].item() == pytest.approx(share * full, rel=1e-4)
    assert d(batch())["dkd"].item() == pytest.approx(full, rel=1e-4)  # no epoch given: no ramp

"""RKD, PKT, SP and CRD: each loss against a float64 re-derivation from its paper, edge cases, and real networks."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdx.distill import LayerTaps, build_distiller, build_distiller_set
from kdx.errors import ConfigError
from kdx.losses.contrastive import ContrastMemory, crd_loss, crd_nce_loss
from kdx.losses.relations import pkt_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss
from kdx.models import build_model

from conftest import compose_train


def huber(x: float) -> float:
    """Smooth L1 with threshold 1 (the Huber loss RKD uses)."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


@pytest.fixture
def embeddings():
    """Student 7 x 5 and teacher 7 x 9 embeddings of different scales, one teacher point far out (big gaps)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 5, generator=g) * 2.5 + 0.3
    t = torch.randn(7, 9, generator=g) * 0.7 - 1.1
    t[4] *= 12.0
    return s, t


# ---------------------------------------------------------------- RKD

def ref_rkd(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """(RKD-D, RKD-A) by loops from Park et al. 2019, Eqs. 2-5, as the authors' code averages them."""
    n = len(s)

    def dist(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) if i != j else 0.0 for j in range(n)] for i in range(n)])
        mu = sum(d[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return d / mu

    def unit(v):
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v * 0

    def angles(x):
        return [float(unit(x[j] - x[i]) @ unit(x[k] - x[i])) for i, j, k in itertools.product(range(n), repeat=3)]

    ds, dt = dist(s), dist(t)
    loss_d = sum(huber(ds[i, j] - dt[i, j]) for i in range(n) for j in range(n)) / n ** 2
    loss_a = sum(huber(a - b) for a, b in zip(angles(s), angles(t))) / n ** 3
    return loss_d, loss_a


def test_rkd_matches_the_paper(embeddings):
    s, t = embeddings
    ref_d, ref_a = ref_rkd(s.double().numpy(), t.double().numpy())
    assert rkd_distance_loss(s.double(), t.double()).item() == pytest.approx(ref_d, abs=1e-5, rel=1e-6)
    assert rkd_angle_loss(s.double(), t.double()).item() == pytest.approx(ref_a, abs=1e-5, rel=1e-6)
    weighted = rkd_loss(s, t, distance_weight=3.0, angle_weight=7.0).item()
    assert weighted == pytest.approx(3 * ref_d + 7 * ref_a, rel=1e-5)
    assert rkd_loss(s, t).item() == pytest.approx(25 * ref_d + 50 * ref_a, rel=1e-5)
    # the huge teacher gap puts some distance differences past the Huber threshold: both regimes are exercised
    assert ref_d > 0 and ref_a > 0


def test_rkd_is_scale_invariant_and_does_not_differentiate_the_teacher(embeddings):
    s, t = embeddings
    assert rkd_loss(s * 40, t).item() == pytest.approx(rkd_loss(s, t).item(), rel=1e-5)
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    rkd_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_rkd_handles_ties_and_rejects_bad_batches():
    s = torch.randn(5, 4)
    s[1] = s[0]  # a tie: zero distance between two samples
    s.requires_grad_()
    loss = rkd_loss(s, torch.randn(5, 6))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    with pytest.raises(ConfigError, match=r"rkd: student \(4, 3\) and teacher \(5, 3\) must be batches of the same"):
        rkd_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ConfigError, match="needs at least 2 of them, got a batch of 1"):
        rkd_loss(torch.randn(1, 3), torch.randn(1, 3))


# ---------------------------------------------------------------- PKT

def ref_pkt(s: np.ndarray, t: np.ndarray, eps: float) -> float:
    """PKT by loops: cosine kernel (cos + 1) / 2, rows normalised to P(j | i), mean of q log((q + eps) / (p + eps))."""
    n = len(s)

    def conditionals(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = np.array([[(x[i] @ x[j] + 1) / 2 for j in range(n)] for i in range(n)])
        return k / k.sum(1, keepdims=True)

    p, q = conditionals(s), conditionals(t)
    return sum(q[i, j] * math.log((q[i, j] + eps) / (p[i, j] + eps)) for i in range(n) for j in range(n)) / n ** 2


def test_pkt_matches_the_reference_formula(embeddings):
    s, t = embeddings
    for eps in (1e-7, 1e-2):
        ref = ref_pkt(s.double().numpy(), t.double().numpy(), eps)
        assert pkt_loss(s.double(), t.double(), eps=eps).item() == pytest.approx(ref, abs=1e-8, rel=1e-6)
        assert pkt_loss(s, t, eps=eps).item() == pytest.approx(ref, abs=1e-6, rel=1e-4)
    assert pkt_loss(t[:, :5] * 3, t[:, :5]).item() == pytest.approx(0.0, abs=1e-6)  # same directions: no loss


def test_pkt_extremes_stay_finite():
    s = torch.randn(6, 4) * 1e6
    s[2] = 0  # a zero embedding
    s.requires_grad_()
    loss = pkt_loss(s, torch.randn(6, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    with pytest.raises(ConfigError, match="pkt: student .* and teacher .* must be batches of the same size"):
        pkt_loss(torch.randn(6, 4), torch.randn(5, 4))


# ---------------------------------------------------------------- SP

def ref_sp(s: np.ndarray, t: np.ndarray) -> float:
    """SP by loops: Gram matrices of the flattened features, rows L2-normalised, squared Frobenius gap / b^2."""
    b = len(s)
    s, t = s.reshape(b, -1), t.reshape(b, -1)

    def gram(x):
        g = np.array([[float(x[i] @ x[j]) for j in range(b)] for i in range(b)])
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return float(((gram(t) - gram(s)) ** 2).sum()) / b ** 2


def test_sp_matches_the_paper_on_feature_maps_of_different_sizes():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 4, 3, 3, generator=g) * 3 + 0.5
    t = torch.randn(6, 7, 2, 2, generator=g).relu() * 0.2
    ref = ref_sp(s.double().numpy(), t.double().numpy())
    assert sp_loss(s.double(), t.double()).item() == pytest.approx(ref, abs=1e-10, rel=1e-7)
    assert sp_loss(s, t).item() == pytest.approx(ref, abs=1e-6, rel=1e-5)
    assert sp_loss(s, s * 7).item() == pytest.approx(0.0, abs=1e-7)  # rescaling a map keeps its similarities
    with pytest.raises(ConfigError, match=r"sp: student \(6, 4, 3, 3\) and teacher \(5, 7, 2, 2\)"):
        sp_loss(s, t[:5])


def test_relation_losses_ignore_autocast(embeddings):
    s, t = embeddings
    fmap_s, fmap_t = torch.randn(7, 3, 4, 4), torch.randn(7, 5, 2, 2)
    full = [rkd_distance_loss(s, t), rkd_angle_loss(s, t), pkt_loss(s, t), sp_loss(fmap_s, fmap_t)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [rkd_distance_loss(s, t), rkd_angle_loss(s, t), pkt_loss(s, t), sp_loss(fmap_s, fmap_t)]
    for a, b in zip(full, low):
        assert b.dtype == torch.float32 and b.item() == pytest.approx(a.item(), rel=1e-6)


# ---------------------------------------------------------------- CRD

def test_crd_nce_loss_by_hand():
    scores = torch.tensor([[0.5, 0.01, 0.002], [0.03, 0.2, 0.001]], dtype=torch.float64)
    n, eps = 10, 1e-7
    m_pn = 2 / n  # K = 2 negatives, Pn = 1 / 10
    by_hand = -(math.log(0.5 / (0.5 + m_pn + eps)) + math.log(0.03 / (0.03 + m_pn + eps))
                + math.log(m_pn / (0.01 + m_pn + eps)) + math.log(m_pn / (0.002 + m_pn + eps))
                + math.log(m_pn / (0.2 + m_pn + eps)) + math.log(m_pn / (0.001 + m_pn + eps))) / 2
    assert crd_nce_loss(scores, n).item() == pytest.approx(by_hand, rel=1e-12)
    other = torch.rand(2, 3, dtype=torch.float64) * 1e-3
    assert crd_loss(scores, other, n).item() == pytest.approx(by_hand + crd_nce_loss(other, n).item(), rel=1e-12)
    with pytest.raises(ConfigError, match="B x \\(K\\+1\\) scores with K >= 1"):
        crd_nce_loss(torch.rand(4, 1), 10)


def test_contrast_memory_scores_normaliser_and_update_follow_the_formulas():
    torch.manual_seed(0)
    n, k, d, b, temp, mom = 30, 6, 5, 4, 0.2, 0.3
    mem = ContrastMemory(d, n, k, temperature=temp, momentum=mom).double()
    bound = 1 / math.sqrt(d / 3)
    assert mem.memory_student.abs().max() <= bound and mem.memory_teacher.abs().max() <= bound
    assert mem.memory_student.shape == (n, d) and mem.z_student.item() < 0
    z = None
    for step in range(2):
        v_s = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
        v_t = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
        idx = torch.tensor([3, 17, 8, 29]) if step == 0 else torch.tensor([17, 0, 5, 11])
        contrast = torch.randint(0, n, (b, k + 1))
        contrast[:, 0] = idx
        old_s, old_t = mem.memory_student.clone().numpy(), mem.memory_teacher.clone().numpy()
        out_s, out_t = mem(v_s, v_t, idx, contrast)
        raw_s = np.array([[math.exp(old_t[contrast[i, j]] @ v_s[i].numpy() / temp) for j in range(k + 1)]
                          for i in range(b)])
        raw_t = np.array([[math.exp(old_s[contrast[i, j]] @ v_t[i].numpy() / temp) for j in range(k + 1)]
                          for i in range(b)])
        if z is None:  # Z is fixed on the first batch: mean exp-score times the number of samples
            z = (raw_s.mean() * n, raw_t.mean() * n)
        assert mem.z_student.item() == pytest.approx(z[0], rel=1e-6)
        assert mem.z_teacher.item() == pytest.approx(z[1], rel=1e-6)
        np.testing.assert_allclose(out_s.numpy(), raw_s / z[0], rtol=1e-6)
        np.testing.assert_allclose(out_t.numpy(), raw_t / z[1], rtol=1e-6)
        for bank, old, v in ((mem.memory_student, old_s, v_s), (mem.memory_teacher, old_t, v_t)):
            for i, row in enumerate(idx.tolist()):
                want = mom * old[row] + (1 - mom) * v[i].numpy()
                np.testing.assert_allclose(bank[row].numpy(), want / np.linalg.norm(want), rtol=1e-7)
            untouched = [r for r in range(n) if r not in idx.tolist()]
            np.testing.assert_array_equal(bank[untouched].numpy(), old[untouched])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_contrast_memory_scores_the_whole_bank_once_when_negatives_outnumber_it(dtype, tol):
    """B (K+1) >= num_samples (here 4 x 13 draws over a 10-row bank): the scores come from one product with the
    whole bank, then the drawn columns; they are the per-row dot products of the formula (as the gather path)."""
    torch.manual_seed(1)
    n, k, d, b = 10, 12, 6, 4
    mem = ContrastMemory(d, n, k).to(dtype)
    v_s, v_t = F.normalize(torch.randn(b, d, dtype=dtype), dim=1), F.normalize(torch.randn(b, d, dtype=dtype), dim=1)
    contrast = torch.randint(0, n, (b, k + 1))
    dots_s, dots_t = mem.bank_dots(v_s, v_t, contrast)
    bank_t, bank_s = mem.memory_teacher.double().numpy(), mem.memory_student.double().numpy()
    want_s = np.array([[bank_t[contrast[i, j]] @ v_s[i].double().numpy() for j in range(k + 1)] for i in range(b)])
    want_t = np.array([[bank_s[contrast[i, j]] @ v_t[i].double().numpy() for j in range(k + 1)] for i in range(b)])
    np.testing.assert_allclose(dots_s.double().numpy(), want_s, rtol=tol, atol=tol)
    np.testing.assert_allclose(dots_t.double().numpy(), want_t, rtol=tol, atol=tol)
    few = mem.bank_dots(v_s[:1], v_t[:1], contrast[:1, :5])  # 5 rows < 10: the gather path, same numbers
    np.testing.assert_allclose(few[0].double().numpy(), want_s[:1, :5], rtol=tol, atol=tol)
    # gradients reach the embeddings through the bank as it was before forward()'s momentum update
    v = v_s.clone().requires_grad_(True)
    before = bank_t.copy()
    out_s, _ = mem(v, v_t, contrast[:, 0], contrast)
    (out_s * mem.z_student).log().sum().backward()  # d/dv of sum of dots / T: the drawn rows' sum / T
    want_grad = np.stack([before[contrast[i]].sum(0) for i in range(b)]) / mem.temperature
    np.testing.assert_allclose(v.grad.double().numpy(), want_grad, rtol=tol * 10, atol=tol * 10)


def test_contrast_memory_ignores_autocast():
    mem = ContrastMemory(8, 20, 5)
    low_mem = ContrastMemory(8, 20, 5)
    low_mem.load_state_dict(mem.state_dict())
    v_s, v_t = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    idx, contrast = torch.tensor([1, 2, 3]), torch.randint(0, 20, (3, 6))
    full = mem(v_s, v_t, idx, contrast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = low_mem(v_s, v_t, idx, contrast)
    for a, b in zip(full, low):
        assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6)


def test_contrast_memory_samples_uniformly_with_a_seeded_generator():
    mem = ContrastMemory(4, 50, 20, generator=torch.Generator().manual_seed(7))
    idx = torch.tensor([4, 9, 49])
    first = mem.sample(idx)
    mem.generator = torch.Generator().manual_seed(7)
    assert torch.equal(first, mem.sample(idx))
    assert first.shape == (3, 21) and torch.equal(first[:, 0], idx)
    draws = torch.cat([mem.sample(torch.zeros(200, dtype=torch.long))[:, 1:].flatten() for _ in range(5)])
    counts = torch.bincount(draws, minlength=50).double()
    assert draws.min() >= 0 and draws.max() < 50 and counts.min() > 0
    assert counts.std() / counts.mean() < 0.15  # 20000 draws over 50 bins: close to flat


def test_crd_needs_the_training_set_size_and_clips_nce_k():
    d = build_distiller("crd", {"nce_k": 16384, "feat_dim": 8})
    probe = {"student_embedding": torch.randn(2, 12), "teacher_embedding": torch.randn(2, 20)}
    with pytest.raises(ConfigError, match="method crd needs the training set size and sample indices; "):
        d.setup(probe, num_samples=None)
    d.setup(probe, num_samples=40)
    assert d.memory.nce_k == 39 and d.embed_student.linear.in_features == 12
    assert d.embed_teacher.linear.in_features == 20 and d.memory.memory_teacher.shape == (40, 8)
    out = d({"student_embedding": torch.randn(3, 12), "teacher_embedding": torch.randn(3, 20),
             "indices": torch.tensor([0, 5, 39])})
    assert torch.isfinite(out["crd"])
    assert {k for k in d.state_dict() if k.startswith("memory.")} == {
        "memory.memory_student", "memory.memory_teacher", "memory.z_student", "memory.z_teacher"}
    again = build_distiller("crd", {"nce_k": 16384, "feat_dim": 8})
    again.setup(probe, num_samples=40)
    again.load_state_dict(d.state_dict())  # a resumed run keeps its banks and its Z
    again({"student_embedding": torch.randn(3, 12) * 5, "teacher_embedding": torch.randn(3, 20),
           "indices": torch.tensor([1, 2, 3])})
    assert again.memory.z_student == d.memory.z_student and again.memory.z_teacher == d.memory.z_teacher
    with pytest.raises(ConfigError, match="distill.nce_t must be a temperature > 0"):
        build_distiller("crd", {"nce_t": 0})
    with pytest.raises(ConfigError, match="distill.nce_momentum must be a number in"):
        build_distiller("crd", {"nce_momentum": 1.5})
    bad = build_distiller("crd", {"feat_dim": 8})
    bad.setup(probe, num_samples=10)
    with pytest.raises(ConfigError, match="method crd got sample indices .* for a training set of 10"):
        bad({"student_embedding": torch.randn(2, 12), "teacher_embedding": torch.randn(2, 20),
             "indices": torch.tensor([3, 10])})


# ---------------------------------------------------------------- through the registry, on real networks

def distill_run(name: str, params: dict, steps: int = 4, num_samples: int | None = None,
                seed: int = 0) -> tuple[list[float], dict]:
    """Build `name` through the registry, bind/setup it on resnet20 -> cnn_small as the host does, and take
    `steps` SGD steps on one fixed batch; (total losses per step, the terms of the first step)."""
    torch.manual_seed(seed)
    teacher = build_model("resnet20", 10, in_chans=1).eval()
    student = build_model("cnn_small", 10, in_chans=1)
    d = build_distiller(name, params)
    d.bind(student, teacher)
    s_taps = LayerTaps(student, d.student_layers(), input_paths=["fc"], role="student")
    t_taps = LayerTaps(teacher, d.teacher_layers(), input_paths=["fc"], role="teacher")
    x = torch.randn(12, 1, 28, 28)
    indices = torch.arange(12) * 2 + 1

    def batch(images):
        out = {"indices": indices, "labels": torch.arange(12) % 10}
        with torch.no_grad(), t_taps.recording():
            out["teacher_logits"] = teacher(images)
        feats, inputs = t_taps.take()
        out.update(teacher_features=feats, teacher_embedding=inputs["fc"].flatten(1))
        with s_taps.recording():
            out["student_logits"] = student(images)
        feats, inputs = s_taps.take()
        out.update(student_features=feats, student_embedding=inputs["fc"].flatten(1))
        return out

    student.eval()
    with torch.no_grad():
        d.setup(batch(x[:2]), num_samples=num_samples)
    student.train()
    params_d = [p for p in d.parameters() if p.requires_grad]
    opt = torch.optim.SGD(list(student.parameters()) + params_d, lr={"pkt": 2.0, "rkd": 0.01}.get(name, 0.05))
    losses, first = [], None
    for step in range(steps):
        opt.zero_grad()
        terms = d(batch(x))
        total = sum(terms.values())
        total.backward()
        if first is None:
            first = {k: v.detach() for k, v in terms.items()}
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params_d)
            grads = [p.grad.abs().sum() for p in student.parameters() if p.grad is not None]
            assert grads and sum(grads) > 0, f"{name}: no gradient reached the student"
        losses.append(total.item())
        opt.step()
    return losses, first


@pytest.mark.parametrize("name,params,terms", [
    ("rkd", {"distance_weight": 25.0, "angle_weight": 50.0}, {"rkd_distance", "rkd_angle"}),
    ("pkt", {}, {"pkt"}),
    ("sp", {}, {"sp"}),
])
def test_relation_methods_train_real_networks(name, params, terms):
    losses, first = distill_run(name, params, steps=5)
    assert set(first) == terms and all(torch.isfinite(v) and v.ndim == 0 for v in first.values())
    assert losses[-1] < losses[0], f"{name}: {losses}"


def test_sp_defaults_to_the_deepest_stages_and_takes_given_layers():
    teacher, student = build_model("resnet20", 10, in_chans=1), build_model("cnn_small", 10, in_chans=1)
    d = build_distiller("sp", {})
    d.bind(student, teacher)
    assert d.student_layers() == ["features.5"] and d.teacher_layers() == ["layer3"]
    d = build_distiller("sp", {"teacher_layer": "layer2"})
    d.bind(student, teacher)
    assert d.student_layers() == ["features.5"] and d.teacher_layers() == ["layer2"]
    with pytest.raises(ConfigError, match="teacher has no inspectable layers"):
        build_distiller("sp", {}).bind(student, None)


def test_crd_trains_real_networks_and_its_heads():
    losses, first = distill_run("crd", {"feat_dim": 16, "nce_k": 8, "nce_t": 0.1}, steps=12, num_samples=30)
    assert set(first) == {"crd"}
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # random negatives make single steps noisy


def test_presets_compose_with_the_reference_weights():
    want = {"rkd": 1.0, "pkt": 30000.0, "sp": 3000.0, "crd": 0.8}
    for name, weight in want.items():
        section = OmegaConf.to_container(compose_train([f"distill={name}"]).distill, resolve=True)
        assert section["weight"] == weight and section["alpha"] == 0.5
        section = {k: v for k, v in section.items() if k not in ("alpha", "save_teacher", "cache_teacher")}
        assert set(build_distiller_set(section).methods) == {name}
    crd = build_distiller_set({"method": "crd"}).methods["crd"]
    assert (crd.feat_dim, crd.nce_k, crd.nce_t, crd.nce_momentum) == (128, 16384, 0.07, 0.5)
    rkd = build_distiller_set({"method": "rkd"}, task="face").methods["rkd"]
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    with pytest.raises(ConfigError, match="'sp' is for classification tasks, not face"):
        build_distiller_set({"method": "sp"}, task="face")
    with pytest.raises(ConfigError, match="distill.angle_weight must be a finite number >= 0"):
        build_distiller("rkd", {"angle_weight": -1})


def test_relation_methods_return_their_weighted_paper_losses(embeddings):
    """rkd/pkt/sp built by name: each term equals the loop reference times its configured weight."""
    s, t = embeddings
    ref_d, ref_a = ref_rkd(s.double().numpy(), t.double().numpy())
    out = build_distiller("rkd", {"distance_weight": 3.0, "angle_weight": 7.0})(
        {"student_embedding": s, "teacher_embedding": t})
    assert out["rkd_distance"].item() == pytest.approx(3.0 * ref_d, rel=1e-5)
    assert out["rkd_angle"].item() == pytest.approx(7.0 * ref_a, rel=1e-5)
    out = build_distiller("pkt")({"student_embedding": s, "teacher_embedding": t})
    assert out["pkt"].item() == pytest.approx(ref_pkt(s.double().numpy(), t.double().numpy(), 1e-7), rel=1e-4)
    g = torch.Generator().manual_seed(8)
    fs, ft = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 6, 2, 2, generator=g) * 3
    d = build_distiller("sp", {"student_layer": "a", "teacher_layer": "b"})
    d.bind(torch.nn.Identity(), torch.nn.Identity())
    out = d({"student_features": {"a": fs, "b": ft * 0}, "teacher_features": {"a": fs * 0, "b": ft}})
    assert out["sp"].item() == pytest.approx(ref_sp(fs.double().numpy(), ft.double().numpy()), rel=1e-5)


def test_rkd_matches_the_paper_on_embeddings_closer_than_one(embeddings):
    """Distances under 1 (tiny embeddings): a clamp or a 'positive distance' cut at 1 instead of 0 would show."""
    s, t = (e.double() * 0.01 for e in embeddings)
    ref_d, ref_a = ref_rkd(s.numpy(), t.numpy())
    assert rkd_distance_loss(s, t).item() == pytest.approx(ref_d, abs=1e-7, rel=1e-6)
    assert rkd_angle_loss(s, t).item() == pytest.approx(ref_a, abs=1e-7, rel=1e-6)


def test_pkt_with_eps_zero_treats_a_zero_row_as_orthogonal_to_all(embeddings):
    s, t = embeddings
    s = s.clone()
    s[2] = 0.0
    assert pkt_loss(s, t, eps=0.0).item() == pytest.approx(pkt_loss(s, t, eps=1e-30).item(), rel=1e-6)


def test_crd_nce_loss_with_one_negative_and_a_one_sample_noise_set():
    scores = torch.tensor([[0.6, 0.3], [0.05, 0.9]], dtype=torch.float64)
    eps = 1e-7
    for n in (1, 7):
        m_pn = 1 / n
        by_hand = -sum(math.log(p / (p + m_pn + eps)) + math.log(m_pn / (q + m_pn + eps)) for p, q in scores.tolist()) / 2
        assert crd_nce_loss(scores, n).item() == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(ConfigError, match="num_samples >= 1"):
        crd_nce_loss(scores, 0)
    with pytest.raises(ConfigError, match="B x \\(K\\+1\\) scores"):
        crd_nce_loss(scores[0], 7)


def test_crd_embed_head_is_a_unit_l2_projection_of_128_by_default():
    from kdx.losses.contrastive import EmbedHead
    head = EmbedHead(6)
    assert head.linear.out_features == 128
    x = torch.randn(4, 2, 3) * 5
    y = head.linear(x.reshape(4, 6))
    out = head(x)
    assert torch.allclose(out, y / y.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-6)


def test_crd_setup_passes_its_settings_to_the_memory_and_accepts_two_samples():
    probe = {"student_embedding": torch.randn(2, 5), "teacher_embedding": torch.randn(2, 3)}
    g = torch.Generator().manual_seed(1)
    d = build_distiller("crd", {"feat_dim": 4, "nce_k": 8, "nce_t": 0.3, "nce_momentum": 0.8})
    d.setup(probe, num_samples=2, generator=g)
    m = d.memory
    assert (m.nce_k, m.temperature, m.momentum, m.num_samples, m.generator) == (1, 0.3, 0.8, 2, g)
    with pytest.raises(ConfigError, match="at least 2 samples, got num_samples=1"):
        d.setup(probe, num_samples=1)


@pytest.mark.parametrize("indices", [[[0, 1]], [0, 1, 2], [-1, 1], [0, 10]])
def test_crd_refuses_indices_that_are_not_one_per_image_inside_the_training_set(indices):
    d = build_distiller("crd", {"feat_dim": 4, "nce_k": 3})
    d.setup({"student_embedding": torch.randn(2, 5), "teacher_embedding": torch.randn(2, 3)}, num_samples=10)
    with pytest.raises(ConfigError, match="the datamodule must yield each image's index in its train set"):
        d({"student_embedding": torch.randn(2, 5), "teacher_embedding": torch.randn(2, 3),
           "indices": torch.tensor(indices)})


def test_contrast_memory_in_double_precision_scores_float32_embeddings_in_double():
    mem = ContrastMemory(4, 12, 3).double()
    v = F.normalize(torch.randn(2, 4), dim=1)
    out_s, out_t = mem(v, v * -1, torch.tensor([1, 5]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert out_s.dtype == out_t.dtype == torch.float64 and mem.memory_student.dtype == torch.float64


def test_contrast_memory_defaults_bounds_and_smallest_training_set():
    torch.manual_seed(0)
    mem = ContrastMemory(300, 2, 1)  # two samples: the smallest set with a negative
    assert (mem.temperature, mem.momentum) == (0.07, 0.5)  # the reference's defaults
    bound = 1 / math.sqrt(300 / 3)
    for bank in (mem.memory_student, mem.memory_teacher):
        assert bound * 0.97 < bank.abs().max().item() <= bound  # uniform in [-bound, bound]


def test_contrast_memory_in_half_precision_scores_in_float32():
    mem = ContrastMemory(4, 12, 3).half()
    v = F.normalize(torch.randn(2, 4), dim=1)
    out_s, out_t = mem(v, v.flip(1), torch.tensor([1, 5]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert out_s.dtype == out_t.dtype == torch.float32 and torch.isfinite(out_s).all() and torch.isfinite(out_t).all()


def test_a_loaded_normaliser_below_one_is_kept():
    """Z is recomputed only while unset (negative); a small loaded Z (a tiny training set) stays as it was."""
    mem = ContrastMemory(4, 12, 3)
    state = mem.state_dict()
    state["z_student"], state["z_teacher"] = torch.tensor(0.25), torch.tensor(0.5)
    mem.load_state_dict(state)
    v = F.normalize(torch.randn(2, 4), dim=1)
    mem(v, v, torch.tensor([1, 5]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert (mem.z_student.item(), mem.z_teacher.item()) == (0.25, 0.5)


def test_relation_losses_compute_in_the_wider_of_the_two_dtypes(embeddings):
    """float32 student + float64 teacher: computed in float64 (to 1e-12 of the loops); float16 in float32."""
    s, t = embeddings
    ref_d, ref_a = ref_rkd(s.double().numpy(), t.double().numpy())
    assert rkd_distance_loss(s.float(), t.double()).item() == pytest.approx(ref_d, rel=1e-12)
    assert rkd_distance_loss(s.double(), t.float()).item() == pytest.approx(
        ref_rkd(s.double().numpy(), t.float().double().numpy())[0], rel=1e-12)
    # float64 stays float64: offset embeddings whose distances float32 would blur
    far = s.double() + 1e4
    assert rkd_distance_loss(far, t.double()).item() == pytest.approx(ref_rkd(far.numpy(), t.double().numpy())[0],
                                                                      rel=1e-9)
    half = rkd_loss(s.half(), t.half())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(rkd_loss(s.half().float(), t.half().float()).item(), rel=1e-6)


def test_relation_losses_batch_rules():
    x, y = torch.randn(1, 4), torch.randn(1, 6)
    assert pkt_loss(x, y).item() == pytest.approx(0.0, abs=1e-7)  # one sample: P(j | i) = 1 on both sides
    assert torch.isfinite(sp_loss(x, y))
    two = rkd_loss(torch.randn(2, 3), torch.randn(2, 5))  # the smallest batch with a pair
    assert torch.isfinite(two)
    with pytest.raises(ConfigError, match="must be batches of the same size"):
        pkt_loss(torch.randn(3), torch.randn(3, 2))
    with pytest.raises(ConfigError, match="must be batches of the same size"):
        pkt_loss(torch.randn(3, 2), torch.randn(3))

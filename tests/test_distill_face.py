"""Face distillers (emb_mse, emb_cos, relational, logit_kd, adadistill) against independent float64 re-derivations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdx.distill import LayerTaps, available_distillers, build_distiller, build_distiller_set
from kdx.errors import ConfigError
from kdx.losses.face import EmbeddingProjector
from kdx.losses.adadistill import (adadistill_loss, adadistill_update, adadistill_weights, centre_margin_logits,
                                   centre_margin_loss)
from kdx.models.margin_heads import normsoftmax
from kdx.models.embedding import build_embedding_model

FACE_METHODS = ("emb_mse", "emb_cos", "relational", "logit_kd", "adadistill")


def _embeddings(seed: int, b: int = 7, ds: int = 6, dt: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Student (b x ds) and teacher (b x dt) embeddings with unequal, non-unit row norms and offsets."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, ds, generator=g) * torch.linspace(0.3, 4.0, b).unsqueeze(1) + 0.2
    t = torch.randn(b, dt, generator=g) * torch.linspace(5.0, 0.5, b).unsqueeze(1) - 0.3
    return s, t


def _probe(s: torch.Tensor, t: torch.Tensor, **extra) -> dict:
    return {"student_embedding": s[:2], "teacher_embedding": t[:2], "labels": torch.zeros(2, dtype=torch.long), **extra}


def _projected(d, s: torch.Tensor) -> np.ndarray:
    """The distiller's projection re-applied by hand in float64: s W^T + b."""
    w = d.projector.proj.weight.detach().double().numpy()
    bias = d.projector.proj.bias.detach().double().numpy()
    return s.double().numpy() @ w.T + bias


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------------- embedding terms
def test_registry_lists_the_face_methods_for_face_only():
    assert set(FACE_METHODS) <= set(available_distillers("face"))
    assert not set(FACE_METHODS) & set(available_distillers("classification"))
    with pytest.raises(ConfigError, match="'emb_cos' is for face tasks, not classification"):
        build_distiller_set({"method": "emb_cos"}, task="classification")


@pytest.mark.parametrize("normalize", [False, True])
def test_emb_mse_with_projection_matches_the_formula(normalize):
    s, t = _embeddings(0)
    d = build_distiller("emb_mse", {"normalize": normalize})
    d.setup(_probe(s, t))
    p, tt = _projected(d, s), t.double().numpy()
    if normalize:
        p, tt = _unit(p), _unit(tt)
    expected = sum((p[i, k] - tt[i, k]) ** 2 for i in range(p.shape[0]) for k in range(p.shape[1])) / p.size
    assert d({"student_embedding": s, "teacher_embedding": t})["emb_mse"].item() == pytest.approx(expected, rel=1e-5)


def test_emb_cos_with_projection_matches_the_formula():
    s, t = _embeddings(1)
    d = build_distiller("emb_cos", {})
    d.setup(_probe(s, t))
    p, tt = _projected(d, s), t.double().numpy()
    cos = [p[i] @ tt[i] / (np.linalg.norm(p[i]) * np.linalg.norm(tt[i])) for i in range(len(p))]
    expected = float(np.mean([1.0 - c for c in cos]))
    assert d({"student_embedding": s, "teacher_embedding": t})["emb_cos"].item() == pytest.approx(expected, rel=1e-5)


def test_equal_sizes_use_no_projection_and_the_raw_embeddings():
    s, t = _embeddings(2, ds=9)
    for name in ("emb_mse", "emb_cos"):
        d = build_distiller(name, {"projection": True})
        d.setup(_probe(s, t))
        assert isinstance(d.projector, nn.Identity) and not list(d.parameters())
    d = build_distiller("emb_cos", {})
    d.setup(_probe(s, t))
    ss, tt = s.double().numpy(), t.double().numpy()
    expected = np.mean([1 - ss[i] @ tt[i] / (np.linalg.norm(ss[i]) * np.linalg.norm(tt[i])) for i in range(len(ss))])
    assert d({"student_embedding": s, "teacher_embedding": t})["emb_cos"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["emb_mse", "emb_cos", "adadistill"])
def test_size_mismatch_without_projection_names_both_sizes_and_the_fix(name):
    s, t = _embeddings(3)
    d = build_distiller(name, {"projection": False})
    with pytest.raises(ConfigError, match=r"student 6 vs teacher 9; set distill.projection=true"):
        d.setup(_probe(s, t, num_classes=4))


def test_projection_is_trained_with_the_student():
    s, t = _embeddings(4)
    s.requires_grad_(True)
    d = build_distiller("emb_cos", {})
    d.setup(_probe(s.detach(), t))
    assert isinstance(d.projector, EmbeddingProjector) and d.projector.proj.weight.shape == (9, 6)
    d({"student_embedding": s, "teacher_embedding": t})["emb_cos"].backward()
    assert s.grad.abs().sum() > 0 and d.projector.proj.weight.grad.abs().sum() > 0


def test_relational_matches_the_formula_with_unequal_sizes():
    s, t = _embeddings(5)
    d = build_distiller("relational", {})
    d.setup(_probe(s, t))  # no projection: similarity matrices are B x B whatever the sizes
    ss, tt = s.double().numpy(), t.double().numpy()
    b = len(ss)

    def cos(x, i, j):
        return x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))

    expected = sum((cos(ss, i, j) - cos(tt, i, j)) ** 2 for i in range(b) for j in range(b)) / b ** 2
    assert d({"student_embedding": s, "teacher_embedding": t})["relational"].item() == pytest.approx(expected, rel=1e-5)


def _kd_by_hand(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    total = 0.0
    for zs, zt in zip(s, t):
        ls = zs / temp - np.log(np.exp(zs / temp - (zs / temp).max()).sum()) - (zs / temp).max()
        lt = zt / temp - np.log(np.exp(zt / temp - (zt / temp).max()).sum()) - (zt / temp).max()
        total += sum(math.exp(lt[k]) * (lt[k] - ls[k]) for k in range(len(zs)))
    return temp * temp * total / len(s)


def test_logit_kd_matches_hinton_kd_and_stays_finite_on_extreme_logits():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(5, 8, generator=g) * 20.0  # scaled cosines (s = 64 heads give logits of tens)
    t = torch.randn(5, 8, generator=g) * 30.0 + torch.arange(8.0)
    d = build_distiller("logit_kd", {"temperature": 2.5})
    assert d.needs == {"embedding", "logits"}
    out = d({"student_logits": s, "teacher_logits": t})["logit_kd"]
    assert out.item() == pytest.approx(_kd_by_hand(s.double().numpy(), t.double().numpy(), 2.5), rel=1e-5)
    huge = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]])  # a huge gap and a tie
    value = d({"student_logits": huge.flip(1), "teacher_logits": huge})["logit_kd"]
    assert torch.isfinite(value) and value.item() == pytest.approx(_kd_by_hand(huge.flip(1).double().numpy(),
                                                                                huge.double().numpy(), 2.5), rel=1e-5)
    assert d({"student_logits": t, "teacher_logits": t})["logit_kd"].item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ConfigError, match=r"distill.temperature must be a .*> 0, got 0"):
        build_distiller("logit_kd", {"temperature": 0})


# ---------------------------------------------------------------------- AdaDistill
def _update_by_hand(c: np.ndarray, s: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The authors' EMA, sample by sample from the old centres; a later sample of one identity overwrites."""
    new, weights = c.copy(), []
    for i in range(len(y)):
        if y[i] < 0:
            continue
        su, tu, cy = s[i] / np.linalg.norm(s[i]), t[i] / np.linalg.norm(t[i]), c[y[i]]
        agreement = min(max(su @ tu, -1.0), 1.0)
        hardness = min(max(cy @ tu / np.linalg.norm(cy), 1e-6), 1.0)
        a = min(max(agreement * hardness, 1e-6), 1.0)
        weights.append(a)
        new[y[i]] = a * cy + (1 - a) * tu
    return new, weights


def _margin_loss_by_hand(s: np.ndarray, c: np.ndarray, y: np.ndarray, m: float, scale: float, kind: str) -> float:
    losses = []
    for i in range(len(y)):
        if y[i] < 0:
            continue
        logits = []
        for j in range(len(c)):
            cos = s[i] @ c[j] / (np.linalg.norm(s[i]) * np.linalg.norm(c[j]))
            if j == y[i]:
                cos = math.cos(math.acos(cos) + m) if kind == "arcface" else cos - m
            logits.append(scale * cos)
        top = max(logits)
        losses.append(top + math.log(sum(math.exp(v - top) for v in logits)) - logits[y[i]])
    return sum(losses) / len(losses)


def _ada_inputs(seed: int, b: int = 9, k: int = 5, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(b, d, generator=g) * torch.linspace(0.5, 3.0, b).unsqueeze(1)  # non-unit teacher rows
    s = 0.8 * t + torch.randn(b, d, generator=g) * 1.5  # some agree with the teacher, some do not
    c = torch.randn(k, d, generator=g) * 0.7
    c[1] = 2.0 * t[2] / t[2].norm() + 0.3 * torch.randn(d, generator=g)  # a centre close to its sample
    y = torch.tensor([3, 0, 1, 3, 4, -1, 1, 0, 3])[:b]  # repeated identities, an ignored row, identity 2 absent
    return s, t, c, y


def test_adadistill_update_matches_the_authors_ema():
    s, t, c, y = _ada_inputs(7)
    expected, weights = _update_by_hand(c.double().numpy(), s.double().numpy(), t.double().numpy(), y.numpy())
    assert any(w == 1e-6 for w in weights) and any(1e-6 < w < 1 for w in weights)  # both clamp regimes covered
    new = adadistill_update(c, s, t, y)
    assert np.allclose(new.double().numpy(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(new[2], c[2])  # an identity not in the batch keeps its centre
    assert not torch.equal(new, c) and torch.equal(c, _ada_inputs(7)[2])  # pure: the input is untouched


def test_adadistill_update_of_one_sample_by_hand():
    c = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    s = torch.tensor([[3.0, 4.0]])  # cos(s, t) = 0.8
    t = torch.tensor([[0.0, 5.0]])  # unit t = (0, 1); cos(c_0, t) = 1
    new = adadistill_update(c, s, t, torch.tensor([0]))
    assert new[0].tolist() == pytest.approx([0.0, 0.8 * 2.0 + 0.2 * 1.0]) and new[1].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("cos_st, cos_ct, weight", [
    (-0.8, -0.72, 1e-6),  # both negative (common early on): the product 0.576 must not become the weight
    (0.8, -0.72, 1e-6),   # a centre pointing away: the hardness floor, not a negative weight
    (-0.8, 0.72, 1e-6),   # a student pointing away
    (0.8, 0.72, 0.576),   # the plain product
])
def test_adadistill_weight_clamps_the_hardness_before_the_product(cos_st, cos_ct, weight):
    """a = clamp(cos(s, t) * clamp(cos(c_y, t), 1e-6, 1), 1e-6, 1): with both cosines negative, clamping only the
    product would give 0.576 and pull the centre towards its old self instead of the teacher."""
    t = torch.tensor([[2.0, 0.0]])
    s = torch.tensor([[cos_st, math.sqrt(1 - cos_st ** 2)]]) * 3.0
    c = torch.tensor([[cos_ct, -math.sqrt(1 - cos_ct ** 2)]])
    assert adadistill_weights(s, t, c).item() == pytest.approx(weight, rel=1e-5, abs=1e-9)
    new = adadistill_update(c, s, t, torch.tensor([0]))
    assert new[0].tolist() == pytest.approx((weight * c[0] + (1 - weight) * torch.tensor([1.0, 0.0])).tolist(),
                                            abs=1e-6)


@pytest.mark.parametrize("kind,margin", [("arcface", 0.45), ("cosface", 0.35)])
def test_centre_margin_loss_matches_the_formula(kind, margin):
    s, t, c, y = _ada_inputs(8)
    expected = _margin_loss_by_hand(s.double().numpy(), c.double().numpy(), y.numpy(), margin, 30.0, kind)
    assert centre_margin_loss(s, c, y, margin, 30.0, kind).item() == pytest.approx(expected, rel=1e-5)
    updated, _ = _update_by_hand(c.double().numpy(), s.double().numpy(), t.double().numpy(), y.numpy())
    full = _margin_loss_by_hand(s.double().numpy(), updated, y.numpy(), margin, 30.0, kind)
    assert adadistill_loss(s, t, y, c, margin, 30.0, kind).item() == pytest.approx(full, rel=1e-5)
    if kind == "arcface":  # the paper's defaults: ArcFace, margin 0.45, scale 64
        full = _margin_loss_by_hand(s.double().numpy(), updated, y.numpy(), 0.45, 64.0, "arcface")
        assert adadistill_loss(s, t, y, c).item() == pytest.approx(full, rel=1e-5)


def test_centre_margin_logits_by_hand_and_finite_gradients_at_the_centre():
    c = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    s = torch.tensor([[0.8 * 2, 0.6 * 2]], requires_grad=True)  # cos to centres 0.8 and 0.6
    logits = centre_margin_logits(s, c, torch.tensor([0]), margin=0.5, scale=10.0)
    assert logits[0].tolist() == pytest.approx([10 * (0.8 * math.cos(0.5) - 0.6 * math.sin(0.5)), 6.0], rel=1e-5)
    on_centre = torch.tensor([[5.0, 0.0]], requires_grad=True)
    centre_margin_loss(on_centre, c, torch.tensor([0])).backward()
    assert torch.isfinite(on_centre.grad).all()
    # cos exactly +1 and -1 with a scale small enough that the target's gradient is far from 0
    for x in ([[5.0, 0.0]], [[-5.0, 0.0]]):
        x = torch.tensor(x, requires_grad=True)
        centre_margin_loss(x, c, torch.tensor([0]), margin=0.5, scale=1.0).backward()
        assert torch.isfinite(x.grad).all()
    # the paper's defaults: ArcFace, margin 0.45, scale 64
    ref = centre_margin_logits(s, c, torch.tensor([0]), 0.45, 64.0, "arcface")
    assert torch.equal(centre_margin_logits(s, c, torch.tensor([0])), ref)
    assert centre_margin_loss(s, c, torch.tensor([0])).item() == \
        torch.nn.functional.cross_entropy(ref, torch.tensor([0])).item()


def test_adadistill_distiller_updates_buffer_centres_in_training_only():
    s, t, c, y = _ada_inputs(9)
    d = build_distiller("adadistill", {"margin": 0.3, "scale": 16.0})
    d.setup(_probe(s, t, num_classes=5))
    assert d.centres.shape == (5, 6) and "centres" in d.state_dict() and not list(d.parameters())
    d.centres.copy_(c)
    s = s.clone().requires_grad_(True)
    batch = {"student_embedding": s, "teacher_embedding": t, "labels": y}
    d.eval()
    assert d(batch)["adadistill"].item() == pytest.approx(centre_margin_loss(s, c, y, 0.3, 16.0).item(), rel=1e-6)
    assert torch.equal(d.centres, c)  # evaluation does not move the centres
    d.train()
    loss = d(batch)["adadistill"]
    assert loss.item() == pytest.approx(adadistill_loss(s, t, y, c, 0.3, 16.0).item(), rel=1e-6)
    assert torch.allclose(d.centres, adadistill_update(c, s, t, y))
    loss.backward()
    assert s.grad.abs().sum() > 0 and d.centres.grad is None
    twin = build_distiller("adadistill", {"margin": 0.3, "scale": 16.0})
    twin.setup(_probe(s.detach(), t, num_classes=5))
    twin.load_state_dict(d.state_dict())  # checkpointed with the student
    assert torch.equal(twin.centres, d.centres)


def test_adadistill_errors_name_the_key():
    s, t, _, _ = _ada_inputs(10)
    with pytest.raises(ConfigError, match="needs the number of training identities"):
        build_distiller("adadistill", {}).setup(_probe(s, t))
    with pytest.raises(ConfigError, match="distill.margin_type must be one of arcface, cosface"):
        build_distiller("adadistill", {"margin_type": "sphereface"})
    with pytest.raises(ConfigError, match=r"distill.margin must be a number in \[0, pi\)"):
        build_distiller("adadistill", {"margin": -0.1})
    d = build_distiller("adadistill", {})
    d.setup(_probe(s, t, num_classes=3))
    with pytest.raises(ConfigError, match="label 4 is outside the 3 class centres"):
        d({"student_embedding": s, "teacher_embedding": t, "labels": torch.tensor([0, 1, 2, 4, 0, 1, 2, 0, 1])})


def test_adadistill_trains_a_linear_student_towards_the_teacher_centres():
    torch.manual_seed(0)
    k, n, dim_in = 6, 60, 10
    y = torch.arange(n) % k
    x = torch.randn(n, dim_in) + 2.0 * torch.randn(k, dim_in)[y]
    teacher = torch.randn(k, 8)[y] * 3.0 + 0.5 * torch.randn(n, 8)  # identity structure, non-unit rows
    student = nn.Linear(dim_in, 5)  # a smaller embedding: the projection maps it to the teacher's 8
    d = build_distiller("adadistill", {"scale": 16.0, "margin": 0.3})
    d.setup({"student_embedding": student(x[:2]).detach(), "teacher_embedding": teacher[:2], "num_classes": k})
    opt = torch.optim.SGD([*student.parameters(), *d.parameters()], lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = d({"student_embedding": student(x), "teacher_embedding": teacher, "labels": y})["adadistill"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    # the centres now lie near each identity's mean teacher direction
    means = torch.stack([nn.functional.normalize(teacher[y == i], dim=1).mean(0) for i in range(k)])
    assert (nn.functional.cosine_similarity(d.centres, means, dim=1) > 0.9).all()


# ---------------------------------------------------------------------- through the registry on real networks
def test_face_distillers_on_kdx_networks_train_the_student_and_their_parts():
    torch.manual_seed(0)
    teacher = build_embedding_model("resnet20", 24, in_chans=1, input_size=28).eval()
    student = build_embedding_model("cnn_small", 16, in_chans=1, input_size=28)
    t_head, s_head = normsoftmax(24, 4, s=16.0), normsoftmax(16, 4, s=16.0)
    distillers = build_distiller_set({"method": "emb_cos", "mix": {
        "emb_mse": {"weight": 0.5, "normalize": True}, "relational": 1.0, "logit_kd": {"weight": 0.5},
        "adadistill": {"weight": 0.2, "scale": 16.0}}}, task="face")
    distillers.bind(student, teacher)
    taps = LayerTaps(student, distillers.student_layers())  # embeddings only: no layers to tap
    assert distillers.needs == {"embedding", "labels", "logits"} and not distillers.teacher_layers()
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 4

    def batch(images, labels):
        with torch.no_grad():
            t_emb = teacher(images)
        with taps.recording():
            s_emb = student(images)
        taps.take()
        return {"images": images, "labels": labels, "student_embedding": s_emb, "teacher_embedding": t_emb,
                "student_logits": s_head(s_emb), "teacher_logits": t_head(t_emb).detach()}

    student.eval()
    with torch.no_grad():
        probe = batch(x[:2], torch.zeros(2, dtype=torch.long))
    distillers.setup({**probe, "num_classes": 4}, num_samples=8)
    student.train()
    own = [p for name in ("emb_cos", "emb_mse", "adadistill") for p in distillers.methods[name].parameters()]
    assert len(own) == 6  # the three 16 -> 24 projections (weight, bias)
    opt = torch.optim.Adam([*student.parameters(), *s_head.parameters(), *distillers.parameters()], lr=3e-3)
    totals = []
    for step in range(12):
        terms = distillers(batch(x, y))
        assert set(terms) == set(FACE_METHODS)
        total = sum(terms.values())
        opt.zero_grad()
        total.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
            assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
        opt.step()
        totals.append(total.item())
    assert totals[-1] < 0.7 * totals[0], totals


def test_adadistill_cosface_reaches_the_loss_and_setup_comes_first():
    s, t, c, y = _ada_inputs(9)
    d = build_distiller("adadistill", {"margin_type": "cosface", "margin": 0.35, "scale": 16.0})
    with pytest.raises(RuntimeError, match=r"AdaDistill.setup\(\) has not been called"):
        d({"student_embedding": s, "teacher_embedding": t, "labels": y})
    d.setup(_probe(s, t, num_classes=5))
    d.centres.copy_(c)
    d.eval()
    got = d({"student_embedding": s, "teacher_embedding": t, "labels": y})["adadistill"].item()
    assert got == pytest.approx(centre_margin_loss(s, c, y, 0.35, 16.0, "cosface").item(), rel=1e-6)
    assert got != pytest.approx(centre_margin_loss(s, c, y, 0.35, 16.0, "arcface").item(), rel=1e-3)


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    """One DDP rank: gather a rank-sized block (rank r holds 3 - r rows of value 10 r + row) and save it."""
    import torch.distributed as dist

    from kdx.distill.methods.adadistill import _gather
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x = (10.0 * rank + torch.arange(3 - rank, dtype=torch.float32))[:, None].repeat(1, 2).requires_grad_(True)
        torch.save(_gather(x * 1.0), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_adadistill_gathers_every_ranks_samples_in_rank_order_with_gloo(tmp_path, world):
    """Real gloo process groups (one and two ranks) with uneven per-rank batches."""
    import torch.multiprocessing as mp

    from kdx.distill.methods.adadistill import _gather
    alone = torch.ones(2, 3, requires_grad=True)
    assert torch.equal(_gather(alone), alone) and not _gather(alone).requires_grad  # outside DDP: itself, detached
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_gather_worker, args=(world, init, str(tmp_path / "out")), nprocs=world, join=True)
    want = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0])[: 3 if world == 1 else 5][:, None].repeat(1, 2)
    for rank in range(world):
        got = torch.load(tmp_path / f"out.{rank}")
        assert torch.equal(got, want) and not got.requires_grad


def test_adadistill_update_checks_each_input_and_handles_more_identities_than_dimensions():
    g = torch.Generator().manual_seed(4)
    c = torch.randn(9, 3, generator=g)  # 9 identities of a 3-d embedding
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([8, 2, 8, -1])
    new = adadistill_update(c, s, t, y)
    assert torch.equal(new[[0, 1, 3, 4, 5, 6, 7]], c[[0, 1, 3, 4, 5, 6, 7]]) and not torch.equal(new[8], c[8])
    one = adadistill_update(c, s[2:3], t[2:3], y[2:3])  # identity 8 seen twice: the last sample's update wins
    assert torch.equal(new[8], one[8])
    with pytest.raises(ConfigError, match=r"centres' size 3, got \(4, 3\) and \(4, 2\)"):
        adadistill_update(c, s, t[:, :2], y)
    with pytest.raises(ConfigError, match=r"centres' size 3, got \(4, 2\)"):
        adadistill_update(c, s[:, :2], t[:, :2], y)
    with pytest.raises(ConfigError, match=r"centres' size 3, got \(4, 3, 1\)"):
        adadistill_update(c, s[..., None], t[..., None], y)
    with pytest.raises(ConfigError, match="label 9 is outside the 9 class centres"):
        adadistill_update(c, s, t, torch.tensor([9, 0, 0, 0]))


def test_adadistill_setup_sizes_and_initialises_the_centres():
    s, t, _, _ = _ada_inputs(3)
    torch.manual_seed(0)
    d = build_distiller("adadistill", {})
    d.setup(_probe(s, t, num_classes=1))  # a single identity is allowed
    assert d.centres.shape == (1, t.shape[1])
    y = torch.zeros(9, dtype=torch.long)
    d.eval()
    assert d({"student_embedding": s, "teacher_embedding": t, "labels": y})["adadistill"].item() == pytest.approx(
        centre_margin_loss(s, d.centres, y, 0.45, 64.0, "arcface").item(), rel=1e-6)  # the paper's defaults
    d.setup(_probe(s, torch.randn(9, 400), num_classes=50))
    assert abs(d.centres.std().item() - 0.01) < 0.001 and abs(d.centres.mean().item()) < 0.001  # N(0, 0.01^2)
    for bad in (0, True, 2.0, None):
        with pytest.raises(ConfigError, match="needs the number of training identities"):
            build_distiller("adadistill", {}).setup(_probe(s, t, num_classes=bad))


def test_emb_mse_defaults_to_raw_embeddings_and_works_without_setup_on_equal_sizes():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g)
    d = build_distiller("emb_mse")  # no setup: equal sizes need no projection
    assert d({"student_embedding": s, "teacher_embedding": t})["emb_mse"].item() == \
        pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def test_adadistill_a_student_opposing_its_teacher_gets_the_smallest_weight():
    """cos(s, t) = -1: the weight is clamped up to 1e-6, so the centre jumps (almost) to the teacher's direction
    instead of moving away from it (a negative weight)."""
    c = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    new = adadistill_update(c, -t, t, torch.tensor([0]))
    assert new[0].tolist() == pytest.approx([1e-6 * 0.6, 1e-6 * 0.8 + (1 - 1e-6) * 1.0], abs=1e-7)


def test_emb_cos_works_without_setup_on_equal_sizes():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g) * 2
    want = (1 - torch.nn.functional.cosine_similarity(s, t, dim=1)).mean().item()
    assert build_distiller("emb_cos")({"student_embedding": s, "teacher_embedding": t})["emb_cos"].item() == \
        pytest.approx(want, rel=1e-6)

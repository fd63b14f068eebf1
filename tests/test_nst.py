"""NST (Huang & Wang 2017): kdx.losses.nst_loss against the paper's formula written out here with torch primitives
in float64 (every kernel value summed pair by pair), mismatched spatial sizes, extreme inputs, and the registered
method `nst` on real networks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdx.distill import LayerTaps, available_distillers, build_distiller, build_distiller_set
from kdx.errors import ConfigError
from kdx.losses import nst_loss
from kdx.models import build_model

from conftest import compose_train


def rand(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def ref_unit_maps(f: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per sample, per channel: the activation map as a vector over positions, divided by its L2 norm (a map of
    zeros stays zero)."""
    out = []
    for sample in f.double():
        rows = []
        for channel in sample:
            v = channel.reshape(-1)
            norm = torch.sqrt((v * v).sum())
            rows.append(v / norm if norm > 0 else v)
        out.append(rows)
    return out


def ref_nst(s: torch.Tensor, t: torch.Tensor) -> float:
    """The paper's squared MMD with k(x, y) = (x . y)^2, channels as samples, averaged over the batch:
    1/Ct^2 sum k(t_i, t_j) + 1/Cs^2 sum k(s_i, s_j) - 2/(Cs Ct) sum k(s_i, t_j). When the heights differ the
    larger map is average-pooled to the smaller one's (H, H), as mdistiller does."""
    if s.shape[2] > t.shape[2]:
        s = F.adaptive_avg_pool2d(s.double(), (t.shape[2], t.shape[2]))
    elif s.shape[2] < t.shape[2]:
        t = F.adaptive_avg_pool2d(t.double(), (s.shape[2], s.shape[2]))
    k = lambda x, y: float((x * y).sum()) ** 2  # noqa: E731
    total = 0.0
    for ss, tt in zip(ref_unit_maps(s), ref_unit_maps(t)):
        cs, ct = len(ss), len(tt)
        total += (sum(k(a, b) for a in tt for b in tt) / ct ** 2 + sum(k(a, b) for a in ss for b in ss) / cs ** 2
                  - 2 * sum(k(a, b) for a in ss for b in tt) / (cs * ct))
    return total / s.shape[0]


@pytest.mark.parametrize("s_shape, t_shape", [
    ((3, 4, 5, 5), (3, 6, 5, 5)),   # equal sizes, different channel counts
    ((2, 5, 8, 8), (2, 3, 4, 4)),   # the student map larger: pooled down to the teacher's
    ((2, 3, 3, 3), (2, 7, 6, 6)),   # the teacher map larger
    ((2, 4, 7, 7), (2, 4, 3, 3)),   # sizes that do not divide (overlapping pooling windows)
])
def test_nst_loss_equals_the_formula(s_shape, t_shape):
    s, t = rand(*s_shape, seed=1), rand(*t_shape, seed=2, scale=2.0, shift=0.3)
    assert nst_loss(s, t).item() == pytest.approx(ref_nst(s, t), abs=1e-5)
    assert nst_loss(s.float(), t.float()).item() == pytest.approx(ref_nst(s, t), abs=1e-5)
    relu_s, relu_t = s.relu(), t.relu()  # post-ReLU maps, as the stages hand them over
    assert nst_loss(relu_s, relu_t).item() == pytest.approx(ref_nst(relu_s, relu_t), abs=1e-5)


def test_non_square_maps_are_pooled_per_dimension():
    """8 x 6 against 4 x 3: the student map is averaged over 2 x 2 blocks (the reference's pooling where it
    applies: it assumes square maps)."""
    s, t = rand(2, 3, 8, 6, seed=3), rand(2, 5, 4, 3, seed=4)
    blocks = s.reshape(2, 3, 4, 2, 3, 2).mean(dim=(3, 5))
    assert nst_loss(s, t).item() == pytest.approx(ref_nst(blocks, t), abs=1e-5)


def test_extreme_inputs():
    s, t = rand(2, 3, 4, 4, seed=5), rand(2, 5, 4, 4, seed=6).relu()
    want = ref_nst(s, t)
    for scale_s, scale_t in ((1e30, 1e-30), (1e-30, 1e30), (1e20, 1e20), (1e-20, 1e-20)):
        got = nst_loss((s * scale_s).float(), (t * scale_t).float())
        assert torch.isfinite(got) and got.item() == pytest.approx(want, abs=1e-5), (scale_s, scale_t)
    # maps with silent (all-zero) channels: those channels contribute k = 0
    s0, t0 = s.clone(), t.clone()
    s0[:, 1], t0[0, 2] = 0.0, 0.0
    assert nst_loss(s0.float(), t0.float()).item() == pytest.approx(ref_nst(s0, t0), abs=1e-5)
    zero = torch.zeros(2, 3, 4, 4)
    assert nst_loss(zero, zero).item() == 0.0
    # one position: every unit map is +-1, so k = 1 for every pair and the MMD vanishes
    assert nst_loss(rand(2, 3, 1, 1, seed=7), rand(2, 4, 1, 1, seed=8)).item() == pytest.approx(0.0, abs=1e-12)
    # half precision is computed in float32
    half = nst_loss(s.half(), t.half())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(want, abs=2e-3)


def test_nst_is_zero_for_identical_maps_non_negative_and_differentiable_in_the_student():
    t = rand(4, 6, 5, 5, seed=9).float()
    assert nst_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: each map is normalised
    s = (1e25 * rand(4, 3, 10, 10, seed=10)).float().requires_grad_()
    loss = nst_loss(s, t)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="feature maps must be B x C x H x W"):
        nst_loss(torch.randn(2, 8), torch.randn(2, 8))


# ---------------------------------------------------------------- the registered method

def test_nst_method_sums_the_formula_over_the_declared_stages():
    torch.manual_seed(0)
    teacher, student = build_model("resnet20", 10, in_chans=1).eval(), build_model("resnet8", 10, in_chans=1)
    assert "nst" in available_distillers("classification") and "nst" not in available_distillers("face")
    d = build_distiller("nst")
    with pytest.raises(RuntimeError, match=r"NST.bind\(\) has not been called"):
        d({"student_features": {}, "teacher_features": {}})
    d.bind(student, teacher)
    pairs = list(zip(d.student_layers(), d.teacher_layers()))
    assert pairs == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert not list(d.parameters())
    s_taps = LayerTaps(student, d.student_layers(), role="student")
    t_taps = LayerTaps(teacher, d.teacher_layers(), role="teacher")
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), t_taps.recording():
        teacher(x)
    with s_taps.recording():
        student(x)
    batch = {"student_features": s_taps.take()[0], "teacher_features": t_taps.take()[0]}
    got = d(batch)["nst"]
    want = sum(ref_nst(batch["student_features"][sp].detach(), batch["teacher_features"][tp]) for sp, tp in pairs)
    assert got.item() == pytest.approx(want, abs=1e-5)
    got.backward()
    assert all(p.grad is not None for p in student.layer1.parameters())
    given = build_distiller("nst", {"student_layers": ["layer3"], "teacher_layers": ["layer2"]})
    given.bind(student, teacher)
    assert (given.student_layers(), given.teacher_layers()) == (["layer3"], ["layer2"])
    with pytest.raises(ConfigError, match="distill.method=nst reads teacher feature maps"):
        build_distiller("nst").bind(student, None)


def test_nst_preset_has_the_reference_weight():
    """mdistiller's CIFAR-100 setting: CE weight 1, NST weight 50; with alpha 0.5 the ratio is 1 : weight."""
    section = OmegaConf.to_container(compose_train(["distill=nst"]).distill, resolve=True)
    assert (section["method"], section["weight"], section["alpha"]) == ("nst", 50.0, 0.5)
    methods = {k: v for k, v in section.items() if k not in ("alpha", "save_teacher", "teacher_cache")}
    assert set(build_distiller_set(methods).methods) == {"nst"}
    with pytest.raises(ConfigError, match="for classification tasks, not face"):
        build_distiller_set({"method": "nst"}, task="face")

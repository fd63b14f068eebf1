"""FitNet, AT, VID and ReviewKD: each loss against a float64 re-derivation from its paper / reference code, edge
cases, the connectors, and the feature methods (NST too, whose formula test_nst.py checks) trained through the
registry on real networks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdx.distill import LayerTaps, build_distiller, build_distiller_set
from kdx.distill.connectors import build_connector
from kdx.distill.methods.reviewkd import ABF
from kdx.errors import ConfigError
from kdx.losses.features import (attention_map, attention_transfer_loss, fitnet_loss, hcl_loss, pool_to_smaller,
                                 vid_loss)
from kdx.models import build_model

from conftest import compose_train


def rand(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Float64 normal noise, scaled and shifted (no symmetry between student and teacher)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


# ---------------------------------------------------------------- independent references (numpy, loops)

def ref_adaptive_pool(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Adaptive average pooling by its definition: output cell i averages rows floor(iH/o) .. ceil((i+1)H/o) - 1."""
    b, c, h, w = x.shape
    y = np.zeros((b, c, *out))
    for i in range(out[0]):
        r0, r1 = (i * h) // out[0], -((-(i + 1) * h) // out[0])
        for j in range(out[1]):
            c0, c1 = (j * w) // out[1], -((-(j + 1) * w) // out[1])
            y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return y


def ref_attention(f: np.ndarray, p: float) -> np.ndarray:
    """Zagoruyko & Komodakis 2017, Eq. F_mean^p: (1/C) sum_c |A_c|^p, vectorised per sample and L2-normalised."""
    b, c, h, w = f.shape
    out = np.zeros((b, h * w))
    for n in range(b):
        q = np.array([[sum(abs(f[n, k, i, j]) ** p for k in range(c)) / c for j in range(w)] for i in range(h)])
        q = q.reshape(-1)
        out[n] = q / max(np.sqrt((q ** 2).sum()), 1e-12)
    return out


def ref_at(s: np.ndarray, t: np.ndarray, p: float) -> float:
    """One stage: pool the larger map to the smaller, then the mean squared difference of the attention maps."""
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    s = s if s.shape[2:] == size else ref_adaptive_pool(s, size)
    t = t if t.shape[2:] == size else ref_adaptive_pool(t, size)
    return float(((ref_attention(s, p) - ref_attention(t, p)) ** 2).mean())


def ref_vid(mu: np.ndarray, var: np.ndarray, t: np.ndarray) -> float:
    """Ahn et al. 2019, Eq. 5 without its constant: -log N(t | mu, var_c), averaged over every element."""
    b, c, h, w = t.shape
    total = 0.0
    for n in range(b):
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    total += 0.5 * ((mu[n, k, i, j] - t[n, k, i, j]) ** 2 / var[k] + math.log(var[k]))
    return total / t.size


def ref_hcl(fs: list[np.ndarray], ft: list[np.ndarray]) -> float:
    """ReviewKD's HCL: per pair (MSE + sum_l 2^-k MSE(pool_l)) / (1 + sum_l 2^-k) over levels 4, 2, 1 below H."""
    total = 0.0
    for s, t in zip(fs, ft):
        terms, weights, k = [((s - t) ** 2).mean()], [1.0], 0
        for level in (4, 2, 1):
            if level < s.shape[2]:
                k += 1
                d = ref_adaptive_pool(s, (level, level)) - ref_adaptive_pool(t, (level, level))
                terms.append(2.0 ** -k * (d ** 2).mean())
                weights.append(2.0 ** -k)
        total += sum(terms) / sum(weights)
    return total


# ---------------------------------------------------------------- FitNet

def test_fitnet_loss_is_the_mean_squared_error():
    s, t = rand(3, 5, 4, 6, seed=1, scale=2.0, shift=0.4), rand(3, 5, 4, 6, seed=2, scale=0.5)
    want = ((s.numpy() - t.numpy()) ** 2).sum() / s.numel()
    assert fitnet_loss(s, t).item() == pytest.approx(want, abs=1e-5, rel=1e-7)
    assert fitnet_loss(s.half(), t.half()).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"\(3, 5, 4, 6\).*\(3, 5, 2, 3\).*spatial=pool"):
        fitnet_loss(s, t[:, :, ::2, ::2])


# ---------------------------------------------------------------- AT

@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_map_matches_the_paper(p):
    f = rand(2, 4, 3, 5, seed=3, scale=1.7, shift=-0.3)  # negative entries: |f|^p, not f^p
    assert np.allclose(attention_map(f, p).numpy(), ref_attention(f.numpy(), p), atol=1e-7)
    a = attention_map(f, p)
    assert a.shape == (2, 15) and torch.allclose(a.norm(dim=1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("s_hw,t_hw", [((6, 6), (6, 6)), ((8, 8), (4, 4)), ((3, 3), (7, 7)), ((7, 5), (3, 4))])
def test_attention_transfer_pools_the_larger_map(s_hw, t_hw):
    s = rand(3, 5, *s_hw, seed=4, scale=2.0, shift=0.5)
    t = rand(3, 9, *t_hw, seed=5, scale=0.6, shift=-0.2)
    for p in (2.0, 3.0):
        assert attention_transfer_loss(s, t, p).item() == pytest.approx(ref_at(s.numpy(), t.numpy(), p), abs=1e-9)
    if s_hw != t_hw and s_hw != (8, 8):  # resizing the student bilinearly (kdx's old way) differs from pooling
        resized = F.interpolate(s, size=t_hw, mode="bilinear", align_corners=False)
        bilinear = (attention_map(resized) - attention_map(t)).pow(2).mean().item()
        assert abs(bilinear - attention_transfer_loss(s, t).item()) > 1e-6


def test_attention_transfer_extremes():
    s, t = rand(2, 3, 4, 4, seed=6), rand(2, 6, 4, 4, seed=7)
    zero = torch.zeros_like(s)  # an all-zero map has a zero attention vector, not NaN
    assert torch.isfinite(attention_transfer_loss(zero, t)) and attention_map(zero).abs().sum() == 0
    huge = attention_transfer_loss((s * 1e4).float(), t.float())  # scale does not matter after normalising
    assert huge.item() == pytest.approx(attention_transfer_loss(s, t).item(), rel=1e-4)
    assert attention_transfer_loss(t, t).item() == 0.0
    with pytest.raises(ConfigError, match="B x C x H x W"):
        attention_transfer_loss(s.flatten(2), t)
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    attention_transfer_loss(s, t.detach()).backward()
    assert s.grad.abs().sum() > 0


# ---------------------------------------------------------------- VID

def test_vid_loss_matches_the_gaussian_nll():
    mu, t = rand(2, 3, 4, 5, seed=8, scale=1.5), rand(2, 3, 4, 5, seed=9, scale=0.8, shift=0.3)
    var = torch.tensor([0.3, 2.5, 7.0], dtype=torch.float64)
    assert vid_loss(mu, var, t).item() == pytest.approx(ref_vid(mu.numpy(), var.numpy(), t.numpy()), abs=1e-9)
    full = var.view(1, 3, 1, 1).expand_as(t)  # a full variance tensor gives the same
    assert vid_loss(mu, full, t).item() == pytest.approx(vid_loss(mu, var, t).item(), abs=1e-12)
    tiny = vid_loss(mu * 100, torch.full((3,), 1e-5, dtype=torch.float64), t)  # huge gap, variance at eps
    assert torch.isfinite(tiny) and tiny.item() > 1e8
    with pytest.raises(ConfigError, match="4 variances for teacher features with 3 channels"):
        vid_loss(mu, torch.ones(4), t)
    with pytest.raises(ConfigError, match=r"^vid: student features of shape \(2, 3, 4, 5\) and teacher features of "
                                          r"shape \(2, 3, 2, 5\) differ; regress and pool the student to the teacher's "
                                          r"shape first$"):
        vid_loss(mu, var, t[:, :, :2])
    # B x C features (pooled) and even flat ones: one variance per channel / per element
    mu2, t2 = mu.mean((2, 3)), t.mean((2, 3))
    assert vid_loss(mu2, var, t2).item() == pytest.approx(
        ref_vid(mu2[..., None, None].numpy(), var.numpy(), t2[..., None, None].numpy()), abs=1e-9)
    flat_var = torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64)
    want = (0.5 * ((mu2[0] - t2[0]) ** 2 / flat_var + flat_var.log())).mean().item()
    assert vid_loss(mu2[0], flat_var, t2[0]).item() == pytest.approx(want, abs=1e-12)


def test_vid_method_refuses_to_run_before_setup():
    with pytest.raises(RuntimeError, match=r"VID.setup\(\) has not been called"):
        build_distiller("vid")({})
    teacher, student = nets()
    d = build_distiller("vid")
    d.bind(student, teacher)
    with pytest.raises(RuntimeError, match=r"VID.setup\(\) has not been called"):
        d({})


def test_attention_uses_the_papers_p_2_by_default():
    f, g = rand(2, 3, 4, 4, seed=1, shift=-0.5), rand(2, 5, 4, 4, seed=2)
    assert torch.equal(attention_map(f), attention_map(f, 2))
    assert not torch.allclose(attention_map(f), attention_map(f, 3))
    assert attention_transfer_loss(f, g).item() == attention_transfer_loss(f, g, 2).item()
    assert attention_transfer_loss(f, g).item() != pytest.approx(attention_transfer_loss(f, g, 3).item(), rel=1e-4)


# ---------------------------------------------------------------- ReviewKD's HCL

def test_hcl_loss_matches_the_reference():
    shapes = [(2, 3, 8, 8), (2, 4, 7, 7), (2, 5, 4, 4), (2, 6, 2, 2), (2, 7, 1, 1)]  # all level branches
    fs = [rand(*s, seed=10 + i, scale=1.3, shift=0.2) for i, s in enumerate(shapes)]
    ft = [rand(*s, seed=20 + i, scale=0.7) for i, s in enumerate(shapes)]
    want = ref_hcl([f.numpy() for f in fs], [f.numpy() for f in ft])
    assert hcl_loss(fs, ft).item() == pytest.approx(want, abs=1e-9)
    # a 1 x 1 level is a plain MSE; an 8 x 8 one averages 4 terms with weights 1, 1/2, 1/4, 1/8
    assert hcl_loss(fs[-1:], ft[-1:]).item() == pytest.approx(((fs[-1] - ft[-1]) ** 2).mean().item(), abs=1e-12)
    assert hcl_loss(ft, ft).item() == 0.0
    with pytest.raises(ConfigError, match=r"\(2, 3, 8, 8\).*\(2, 4, 8, 8\)"):
        hcl_loss([fs[0]], [rand(2, 4, 8, 8, seed=1)])
    with pytest.raises(ConfigError, match="2 student and 1 teacher"):
        hcl_loss(fs[:2], ft[:1])


def test_abf_fuses_as_the_reference():
    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).double()
    for bn in (abf.conv1[1], abf.conv2[1]):  # non-trivial eval-mode statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.3, 0.3)
    abf.eval()
    x, res = rand(2, 3, 4, 4, seed=30, scale=1.2), rand(2, 4, 2, 2, seed=31, shift=0.3)
    out, residual = abf(x, res, (8, 8))

    def bn(y, m):
        return (y - m.running_mean.view(1, -1, 1, 1)) / torch.sqrt(m.running_var.view(1, -1, 1, 1) + m.eps) \
            * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)

    with torch.no_grad():
        y = bn(torch.einsum("oc,bchw->bohw", abf.conv1[0].weight[:, :, 0, 0], x), abf.conv1[1])
        r = res.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2x upsampling
        a = abf.att_conv[0]
        z = torch.sigmoid(torch.einsum("oc,bchw->bohw", a.weight[:, :, 0, 0], torch.cat([y, r], 1))
                          + a.bias.view(1, 2, 1, 1))
        fused = y * z[:, :1] + r * z[:, 1:]
        fused = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # to the teacher's 8 x 8
        want = bn(F.conv2d(fused, abf.conv2[0].weight, padding=1), abf.conv2[1])
    assert out.shape == (2, 5, 8, 8) and residual.shape == (2, 4, 8, 8)
    assert torch.allclose(residual, fused, atol=1e-10) and torch.allclose(out, want, atol=1e-10)


# ---------------------------------------------------------------- connectors

def test_connectors_map_shapes_and_explain_mismatches():
    s, t = (2, 16, 14, 14), (2, 32, 14, 14)
    x = torch.randn(*s)
    conv = build_connector("conv1x1", s, t)
    assert conv(x).shape == t and not any(m.bias is not None for m in conv.modules() if isinstance(m, torch.nn.Conv2d))
    assert build_connector("none", s, (2, 16, 7, 7))(x) is x
    with pytest.raises(ConfigError, match=r"\(2, 16, 14, 14\).*\(2, 32, 14, 14\).*set distill.connector=conv1x1"):
        build_connector("none", s, t)
    with pytest.raises(ConfigError, match=r"distill.mix.fitnet.connector='conv9'"):
        build_connector("conv9", s, t, key="distill.mix.fitnet")
    for t2 in [(2, 32, 7, 7), (2, 32, 28, 28), (2, 32, 11, 11), (2, 32, 14, 14)]:  # the reference ConvReg cases
        out = build_connector("convreg", s, t2)(x)
        assert out.shape == t2 and out.min() >= 0  # ends in a ReLU
    with pytest.raises(ConfigError, match=r"\(2, 16, 14, 14\).*\(2, 32, 20, 20\).*spatial=pool"):
        build_connector("convreg", s, (2, 32, 20, 20))


def test_pool_to_smaller_leaves_equal_sizes_alone():
    s, t = rand(2, 3, 5, 5, seed=40), rand(2, 4, 5, 5, seed=41)
    ps, pt = pool_to_smaller(s, t)
    assert ps is s and pt is t


# ---------------------------------------------------------------- through the registry, on real networks

def nets():
    torch.manual_seed(0)
    return build_model("resnet20", 10, in_chans=1).eval(), build_model("cnn_small", 10, in_chans=1)


def make_batch(student, teacher, d):
    """A host-like batch function for distiller `d` (features by hooks, embeddings at the classifier input)."""
    s_taps = LayerTaps(student, d.student_layers(), input_paths=["fc"], role="student")
    t_taps = LayerTaps(teacher, d.teacher_layers(), input_paths=["fc"], role="teacher")

    def batch(images, epoch: int = 0):
        out = {"labels": torch.arange(len(images)) % 10, "epoch": epoch, "max_epochs": 10}
        with torch.no_grad(), t_taps.recording():
            out["teacher_logits"] = teacher(images)
        feats, inputs = t_taps.take()
        out.update(teacher_features=feats, teacher_embedding=inputs["fc"].flatten(1))
        with s_taps.recording():
            out["student_logits"] = student(images)
        feats, inputs = s_taps.take()
        out.update(student_features=feats, student_embedding=inputs["fc"].flatten(1))
        return out

    return batch


def distill_run(name: str, params: dict, steps: int = 5, lr: float = 0.05):
    """Build, bind and set up `name` on resnet20 -> cnn_small as the host does, then take SGD steps on one batch."""
    teacher, student = nets()
    d = build_distiller(name, params)
    d.bind(student, teacher)
    batch = make_batch(student, teacher, d)
    x = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    student.eval()
    with torch.no_grad():
        d.setup(batch(x[:2]))
    student.train()
    own = [p for p in d.parameters() if p.requires_grad]
    opt = torch.optim.SGD(list(student.parameters()) + own, lr=lr)
    losses, first = [], None
    for _ in range(steps):
        opt.zero_grad()
        terms = d(batch(x, epoch=5))
        total = sum(terms.values())
        total.backward()
        if first is None:
            first = {k: v.detach() for k, v in terms.items()}
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own), name
            assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0, name
        losses.append(total.item())
        opt.step()
    return d, losses, first


@pytest.mark.parametrize("name,params,lr,n_own", [
    ("fitnet", {}, 0.05, 3),
    ("fitnet", {"student_layer": "features.2", "teacher_layer": "layer3", "spatial": "pool",
                "connector": "convreg"}, 0.05, 4),
    ("at", {"p": 2}, 10.0, 0),
    ("nst", {}, 10.0, 0),
    ("vid", {"init_pred_var": 2.0}, 0.02, 8),
    ("reviewkd", {"warmup_epochs": 2}, 0.05, 22),
])
def test_feature_methods_train_real_networks(name, params, lr, n_own):
    d, losses, first = distill_run(name, params, lr=lr)
    assert set(first) == {name} and torch.isfinite(first[name]) and first[name].ndim == 0
    assert len([p for p in d.parameters() if p.requires_grad]) == n_own
    assert losses[-1] < losses[0], f"{name}: {losses}"


def test_fitnet_picks_the_middle_pair_and_explains_spatial_mismatches():
    teacher, student = nets()
    d = build_distiller("fitnet", {})
    d.bind(student, teacher)  # pairs (features.2, layer2), (features.5, layer3): index (2 - 1) // 2 = 0
    assert (d.student_layers(), d.teacher_layers()) == (["features.2"], ["layer2"])
    d = build_distiller("fitnet", {})
    d.bind(build_model("resnet8", 10, in_chans=1), teacher)  # three pairs: the middle stage, the reference's hint 2
    assert (d.student_layers(), d.teacher_layers()) == (["layer2"], ["layer2"])
    d = build_distiller("fitnet", {"student_layer": "features.2", "teacher_layer": "layer3"})
    d.bind(student, teacher)
    batch = make_batch(student, teacher, d)
    with pytest.raises(ConfigError, match=r"\(2, 16, 14, 14\).*\(2, 64, 7, 7\).*set distill.spatial=pool"):
        d.setup(batch(torch.randn(2, 1, 28, 28)))
    d = build_distiller("fitnet", {"connector": "none"})
    d.bind(student, teacher)
    with pytest.raises(ConfigError, match=r"\(2, 16, 14, 14\).*\(2, 32, 14, 14\).*set distill.connector=conv1x1"):
        d.setup(make_batch(student, teacher, d)(torch.randn(2, 1, 28, 28)))
    with pytest.raises(ConfigError, match="distill.spatial='resize'"):
        build_distiller("fitnet", {"spatial": "resize"})
    with pytest.raises(ConfigError, match="no inspectable layers"):
        build_distiller("fitnet", {}).bind(student, None)


def test_fitnet_and_at_distillers_compute_the_reference_losses():
    teacher, student = nets()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    at = build_distiller("at", {"p": 3})
    at.bind(student, teacher)
    assert list(zip(at.student_layers(), at.teacher_layers())) == [("features.2", "layer2"), ("features.5", "layer3")]
    b = make_batch(student, teacher, at)(x)
    want = sum(ref_at(b["student_features"][s].detach().double().numpy(), b["teacher_features"][t].double().numpy(), 3)
               for s, t in zip(at.student_layers(), at.teacher_layers()))
    assert at(b)["at"].item() == pytest.approx(want, abs=1e-6)
    fit = build_distiller("fitnet", {})
    fit.bind(student, teacher)
    batch = make_batch(student, teacher, fit)
    fit.setup(batch(x[:2]))
    b = batch(x)
    s = fit.connector(b["student_features"]["features.2"]).detach().double().numpy()
    t = b["teacher_features"]["layer2"].double().numpy()
    assert fit(b)["fitnet"].item() == pytest.approx(((s - t) ** 2).mean(), abs=1e-6, rel=1e-5)


def test_vid_starts_at_the_initial_variance_and_matches_the_nll():
    teacher, student = nets()
    d = build_distiller("vid", {"init_pred_var": 3.0, "eps": 1e-4, "mid_ratio": 0.5})
    d.bind(student, teacher)
    batch = make_batch(student, teacher, d)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    d.setup(batch(x[:2]))
    for scale in d.log_scales:
        assert torch.allclose(F.softplus(scale) + 1e-4, torch.full_like(scale, 3.0), atol=1e-6)
    assert [r[0].out_channels for r in d.regressors] == [16, 32]  # half of the teacher's 32 and 64 channels
    # the reference's regressor: 1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, no biases
    assert [type(m).__name__ for m in d.regressors[0]] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]
    assert all(m.bias is None for r in d.regressors for m in r if isinstance(m, torch.nn.Conv2d))
    tiny = build_distiller("vid", {"mid_ratio": 0.01})
    tiny.bind(student, teacher)
    tiny.setup(batch(x[:2]))
    assert [r[0].out_channels for r in tiny.regressors] == [1, 1]  # at least one channel
    b = batch(x)
    want = 0.0
    for (sp, tp), reg in zip(zip(d.student_layers(), d.teacher_layers()), d.regressors):
        mu = reg(b["student_features"][sp]).detach().double().numpy()
        t = b["teacher_features"][tp].double().numpy()
        want += ref_vid(mu, np.full(t.shape[1], 3.0), t)
    assert d(b)["vid"].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ConfigError, match="distill.init_pred_var must be a variance > distill.eps"):
        build_distiller("vid", {"init_pred_var": 1e-6})


def test_reviewkd_levels_warmup_and_widths():
    teacher, student = nets()
    d = build_distiller("reviewkd", {"warmup_epochs": 4})
    d.bind(student, teacher)
    batch = make_batch(student, teacher, d)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    d.setup(batch(x[:2]))
    # two paired stages plus the pooled embedding; mid width = min(512, student embedding width 32)
    assert [(a.conv1[0].in_channels, a.conv1[0].out_channels, a.conv2[0].out_channels, a.att_conv is not None)
            for a in d.abfs] == [(16, 32, 32, True), (32, 32, 64, True), (32, 32, 64, False)]
    d.eval()
    full = d(batch(x, epoch=10))["reviewkd"].item()
    assert d(batch(x, epoch=0))["reviewkd"].item() == pytest.approx(full / 4, rel=1e-6)
    assert d(batch(x, epoch=2))["reviewkd"].item() == pytest.approx(full * 3 / 4, rel=1e-6)
    narrow = build_distiller("reviewkd", {"mid_channels": 8})
    narrow.bind(student, teacher)
    narrow.setup(make_batch(student, teacher, narrow)(x[:2]))
    assert {a.conv1[0].out_channels for a in narrow.abfs} == {8}
    no_emb = batch(x[:2])
    del no_emb["student_embedding"]
    with pytest.raises(ConfigError, match="student embedding"):
        build_distiller("reviewkd", {}).setup(no_emb)


def test_presets_compose_with_the_reference_weights():
    want = {"fitnet": 100.0, "at": 1000.0, "nst": 50.0, "vid": 1.0, "reviewkd": 5.0}
    for name, weight in want.items():
        section = OmegaConf.to_container(compose_train([f"distill={name}"]).distill, resolve=True)
        assert section["weight"] == weight and section["alpha"] == 0.5
        section = {k: v for k, v in section.items() if k not in ("alpha", "save_teacher", "cache_teacher")}
        assert set(build_distiller_set(section).methods) == {name}
    vid = build_distiller_set({"method": "vid"}).methods["vid"]
    assert (vid.init_pred_var, vid.eps, vid.mid_ratio) == (5.0, 1e-5, 1.0)
    for name in want:
        with pytest.raises(ConfigError, match="for classification tasks, not face"):
            build_distiller_set({"method": name}, task="face")


STAGE_METHODS = [("fitnet", "distill.student_layer", "distill.teacher_layer", False),
                 ("sp", "distill.student_layer", "distill.teacher_layer", False),
                 ("at", "distill.student_layers", "distill.teacher_layers", True),
                 ("nst", "distill.student_layers", "distill.teacher_layers", True),
                 ("vid", "distill.student_layers", "distill.teacher_layers", True),
                 ("reviewkd", "distill.student_layers", "distill.teacher_layers", True)]


@pytest.mark.parametrize("name, s_key, t_key, plural", STAGE_METHODS)
def test_a_network_without_stages_names_the_key_and_the_side_to_set(name, s_key, t_key, plural):
    staged = build_model("resnet8", 10, in_chans=1)
    bare = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    with pytest.raises(ConfigError, match=rf"Sequential declares no feature stages; set {s_key}=\[PATH, ...\] "
                                          rf"to the student layers"):
        build_distiller(name).bind(bare, staged)
    with pytest.raises(ConfigError, match=rf"Sequential declares no feature stages; set {t_key}=\[PATH, ...\] "
                                          rf"to the teacher layers"):
        build_distiller(name).bind(staged, bare)
    with pytest.raises(ConfigError, match=rf"^distill.method={name} reads (a )?teacher feature maps?, but this teacher has "
                                          rf"no inspectable layers"):
        build_distiller(name).bind(staged, None)
    unbound = build_distiller(name)
    assert unbound.student_layers() == [] and unbound.teacher_layers() == []


@pytest.mark.parametrize("name, s_key, t_key, plural", STAGE_METHODS)
def test_given_layers_replace_the_declared_stages(name, s_key, t_key, plural):
    student, teacher = build_model("resnet8", 10, in_chans=1), build_model("resnet20", 10, in_chans=1)
    given = (["layer1", "layer2"], ["layer2", "layer3"]) if plural else ("layer1", "layer2")
    d = build_distiller(name, dict(zip([s_key.split(".")[1], t_key.split(".")[1]], given)))
    d.bind(student, teacher)
    assert d.student_layers() == (given[0] if plural else [given[0]])
    assert d.teacher_layers() == (given[1] if plural else [given[1]])
    d = build_distiller(name)
    d.bind(student, teacher)  # default: from the declared stages (FitNet: the middle one, as its reference)
    assert set(d.student_layers() + d.teacher_layers()) <= {"layer1", "layer2", "layer3"}
    assert d.student_layers() != (given[0] if plural else [given[0]])


def test_reviewkd_on_a_hand_made_batch_of_three_levels():
    """Levels of distinct widths, a student embedding wider than 512: mid = 512 (the reference's cap), read from
    the embedding; the loss equals HCL of the ABF chain run by hand, deepest level first."""
    g = torch.Generator().manual_seed(6)
    s_feats = {"a": torch.randn(2, 8, 8, 8, generator=g), "b": torch.randn(2, 24, 4, 4, generator=g)}
    t_feats = {"A": torch.randn(2, 6, 8, 8, generator=g), "B": torch.randn(2, 10, 2, 2, generator=g)}
    batch = {"student_features": s_feats, "teacher_features": t_feats,
             "student_embedding": torch.randn(2, 600, generator=g), "teacher_embedding": torch.randn(2, 12, generator=g)}
    d = build_distiller("reviewkd", {"student_layers": ["a", "b"], "teacher_layers": ["A", "B"]})
    d.bind(torch.nn.Identity(), torch.nn.Identity())
    with pytest.raises(RuntimeError, match=r"ReviewKD.setup\(\) has not been called"):
        d(batch)
    d.setup(batch)
    assert [(a.conv1[0].in_channels, a.conv1[0].out_channels, a.conv2[0].out_channels) for a in d.abfs] == \
        [(8, 512, 6), (24, 512, 10), (600, 512, 12)]
    d.eval()
    s_maps = [s_feats["a"], s_feats["b"], batch["student_embedding"][:, :, None, None]]
    t_maps = [t_feats["A"], t_feats["B"], batch["teacher_embedding"][:, :, None, None]]
    outs, residual = [None] * 3, None
    for i in (2, 1, 0):
        outs[i], residual = d.abfs[i](s_maps[i], residual, tuple(t_maps[i].shape[2:]))
    assert [tuple(o.shape) for o in outs] == [(2, 6, 8, 8), (2, 10, 2, 2), (2, 12, 1, 1)]
    assert d(batch)["reviewkd"].item() == pytest.approx(hcl_loss(outs, t_maps).item(), rel=1e-6)


def test_hcl_levels_follow_the_height_of_non_square_maps_and_shapes_must_match():
    s = [rand(2, 3, 3, 8, seed=12), rand(2, 4, 6, 2, seed=13, scale=2.0)]
    t = [rand(2, 3, 3, 8, seed=14, shift=0.5), rand(2, 4, 6, 2, seed=15)]
    assert hcl_loss(s, t).item() == pytest.approx(ref_hcl([x.numpy() for x in s], [x.numpy() for x in t]), rel=1e-9)
    with pytest.raises(ConfigError, match=r"^reviewkd: student features of shape \(2, 3, 3, 8\) and teacher features "
                                          r"of shape \(2, 3, 8, 3\) differ; the fusion modules must produce the "
                                          r"teacher's shape$"):
        hcl_loss([s[0]], [t[0].transpose(2, 3)])


def test_abf_convolutions_start_as_the_reference_initialises_them():
    """kaiming_uniform with a = 1, as the ReviewKD code: weights uniform in +-sqrt(3 / fan_in), no conv biases."""
    torch.manual_seed(0)
    abf = ABF(64, 32, 16, fuse=True)
    for conv, fan_in in ((abf.conv1[0], 64), (abf.conv2[0], 32 * 9)):
        bound = math.sqrt(3.0 / fan_in)
        assert conv.bias is None
        assert bound * 0.97 < conv.weight.abs().max().item() <= bound


def test_fitnet_spatial_pool_pools_the_larger_map():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    batch = {"student_features": {"s": s}, "teacher_features": {"t": t}}
    d = build_distiller("fitnet", {"student_layer": "s", "teacher_layer": "t", "spatial": "pool"})
    d.bind(torch.nn.Identity(), torch.nn.Identity())
    d.setup(batch)
    want = F.mse_loss(d.connector(F.adaptive_avg_pool2d(s, 4)), t)
    assert d(batch)["fitnet"].item() == pytest.approx(want.item(), rel=1e-6)
    strict = build_distiller("fitnet", {"student_layer": "s", "teacher_layer": "t"})
    strict.bind(torch.nn.Identity(), torch.nn.Identity())
    with pytest.raises(ConfigError, match="set distill.spatial=pool"):
        strict.setup(batch)


@pytest.mark.parametrize("name", ["fitnet", "vid", "reviewkd"])
def test_trainable_parts_are_built_on_the_probe_device(name):
    """Connectors, regressors and variances are made where the probe's features are (here the meta device, which
    stands in for a GPU: a part left on the CPU would show)."""
    meta = torch.device("meta")
    s_feats = {"a": torch.empty(2, 4, 8, 8, device=meta), "b": torch.empty(2, 8, 4, 4, device=meta)}
    t_feats = {"A": torch.empty(2, 6, 8, 8, device=meta), "B": torch.empty(2, 10, 4, 4, device=meta)}
    probe = {"student_features": s_feats, "teacher_features": t_feats,
             "student_embedding": torch.empty(2, 8, device=meta), "teacher_embedding": torch.empty(2, 10, device=meta)}
    params = {"fitnet": {"student_layer": "b", "teacher_layer": "B"}}.get(
        name, {"student_layers": ["a", "b"], "teacher_layers": ["A", "B"]})
    d = build_distiller(name, params)
    d.bind(torch.nn.Identity(), torch.nn.Identity())
    d.setup(probe)
    tensors = list(d.parameters()) + list(d.buffers())
    assert tensors and all(t.device == meta for t in tensors)


def test_pool_to_smaller_takes_each_dimension_separately_and_fitnet_names_a_shape_gap():
    s, t = rand(2, 3, 8, 4, seed=20), rand(2, 5, 6, 6, seed=21)
    ps, pt = pool_to_smaller(s, t)
    assert ps.shape == (2, 3, 6, 4) and pt.shape == (2, 5, 6, 4)
    np.testing.assert_allclose(ps.numpy(), ref_adaptive_pool(s.numpy(), (6, 4)), rtol=1e-12)
    np.testing.assert_allclose(pt.numpy(), ref_adaptive_pool(t.numpy(), (6, 4)), rtol=1e-12)
    with pytest.raises(ConfigError, match=r"^fitnet: student features of shape \(2, 3, 8, 4\) and teacher features "
                                          r"of shape \(2, 5, 6, 6\) differ; regress the student to the teacher's shape"):
        fitnet_loss(s, t)

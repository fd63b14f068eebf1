"""LightningModules in real Trainer runs on the synthetic data: learning, distillation mechanics, transfer, probe."""
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from kdx.distill import weigh_losses
from kdx.data import SyntheticDataModule
from kdx.lit import ClassifierModule, DistillationModule, LinearProbeModule
from kdx.losses import kd_loss
from kdx.models import build_model, penultimate_features

OPTIM = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
         "schedule": "constant"}


def fit(module, dm, epochs=1, **kw):
    trainer = pl.Trainer(max_epochs=100 if "max_steps" in kw else epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)
    trainer.fit(module, datamodule=dm)
    return trainer, trainer.test(module, datamodule=dm, verbose=False)[0]


@pytest.fixture(scope="module")
def data():
    dm = SyntheticDataModule(num_classes=4, image_size=16, train_size=256, batch_size=32)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def teacher(data):
    pl.seed_everything(0, verbose=False)
    net = build_model("resnet8", 4)
    fit(ClassifierModule(net, 4, optim=OPTIM), data, epochs=2)
    return net


def test_student_learns_above_chance_in_a_few_steps(data):
    pl.seed_everything(0, verbose=False)
    _, metrics = fit(ClassifierModule(build_model("cnn_tiny", 4, in_chans=3), 4, optim=OPTIM), data, max_steps=24)
    assert metrics["test/acc1"] > 0.6  # chance is 0.25


def test_distillation_keeps_the_teacher_frozen_in_eval_mode_and_out_of_checkpoints(data, teacher, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("cnn_tiny", 4, in_chans=3)
    module = DistillationModule(student, teacher, 4, distill={"method": "kd", "temperature": 4.0}, alpha=0.9,
                                optim=OPTIM)
    trainer, metrics = fit(module, data, epochs=2)
    assert metrics["test/acc1"] > 0.6
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN stats included
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher") for k in module.state_dict())
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    ckpt = torch.load(tmp_path / "s.ckpt", weights_only=False)
    assert "teacher_state_dict" not in ckpt and ckpt["kdx"]["num_classes"] == 4


def test_save_teacher_puts_its_weights_in_the_checkpoint(data, teacher, tmp_path):
    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher, 4, save_teacher=True, optim=OPTIM)
    trainer, _ = fit(module, data, max_steps=1)
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    assert "teacher_state_dict" in torch.load(tmp_path / "s.ckpt", weights_only=False)


def _dkd_by_hand(s, t, y, T, a, b):
    """DKD from its definition in float64: binary target/rest KL and non-target KL, times T^2."""
    s, t = s.double() / T, t.double() / T
    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = torch.softmax(s[i], 0), torch.softmax(t[i], 0)
        bs, bt = torch.stack([ps[y[i]], 1 - ps[y[i]]]), torch.stack([pt[y[i]], 1 - pt[y[i]]])
        keep = torch.arange(s.shape[1]) != y[i]
        qs, qt = torch.softmax(s[i][keep], 0), torch.softmax(t[i][keep], 0)
        total += a * (bt * (bt / bs).log()).sum() + b * (qt * (qt / qs).log()).sum()
    return total / s.shape[0] * T * T


def test_training_step_returns_the_formula_of_student_and_teacher_outputs(data, teacher):
    """The host's own training_step, on a real batch, against the loss computed by hand from both outputs."""
    torch.manual_seed(0)
    student = build_model("cnn_tiny", 4, in_chans=3)
    distill = {"method": "dkd", "temperature": 3.0, "tckd_weight": 0.7, "beta": 5.0,
               "mix": {"kd": {"weight": 0.25, "temperature": 2.0}}}
    module = DistillationModule(student, teacher, 4, distill=distill, alpha=0.6, optim=OPTIM, label_smoothing=0.1)
    module.eval()  # no BN update between the step and the hand computation
    module.log = lambda *a, **k: None
    _b = next(iter(data.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    loss = module.training_step((x, y), 0)
    s, t = student(x).detach(), teacher(x)
    p_t = torch.softmax(t.double() / 2.0, 1)
    kd = 4.0 * (p_t * (p_t.log() - torch.log_softmax(s.double() / 2.0, 1))).sum(1).mean()
    ce = F.cross_entropy(s.double(), y, label_smoothing=0.1)
    expected = 0.4 * ce + 0.6 * (_dkd_by_hand(s, t, y, 3.0, 0.7, 5.0) + 0.25 * kd)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.requires_grad
    # swapping student and teacher (reverse KL) gives another value: the direction is checked
    swapped = 0.4 * ce + 0.6 * (_dkd_by_hand(t, s, y, 3.0, 0.7, 5.0) + 0.25 * kd)
    assert abs(swapped.item() - expected.item()) > 1e-3


def test_alpha_one_drops_the_hard_label_term(data, teacher):
    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher, 4, alpha=1.0)
    x, y = next(iter(data.val_dataloader()))
    s = module.net(x)
    terms = weigh_losses(module.supervised_losses(s, y), {"kd": s.sum() * 0}, {"kd": 1.0}, module.distill_alpha)
    assert set(terms) == {"kd"}


def test_l2sp_is_not_scaled_by_alpha_in_distillation(data, teacher):
    """L2-SP is a regulariser: it keeps its own weight whatever share alpha gives the labels."""
    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher, 4, alpha=0.75, l2sp_weight=0.5)
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.01)
    x, y = next(iter(data.val_dataloader()))
    terms = weigh_losses(module.supervised_losses(module.net(x), y), {}, {}, module.distill_alpha)
    assert terms["l2sp"].item() == pytest.approx(0.5 * module.regularisation().item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.25 * F.cross_entropy(module.net(x), y).item(), rel=1e-5)


def test_transfer_frozen_backbone_trains_only_the_head(data):
    net = build_model("resnet8", 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit(ClassifierModule(net, 4, optim=OPTIM, freeze_backbone=True), data, max_steps=3)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k]) and "running" not in k
               and "num_batches" not in k}
    assert changed == {"fc.weight", "fc.bias"}


def test_transfer_backbone_lr_scale_and_l2sp(data):
    module = ClassifierModule(build_model("resnet8", 4), 4, optim={**OPTIM, "lr": 0.1}, backbone_lr_scale=0.1,
                              l2sp_weight=0.01)
    assert module.regularisation().item() == 0.0  # at the pretrained weights
    trainer, _ = fit(module, data, max_steps=3)
    lrs = sorted(g["lr"] for g in trainer.optimizers[0].param_groups)
    assert lrs == pytest.approx([0.01, 0.1])
    assert module.regularisation().item() > 0.0


def test_logistic_probe_on_teacher_features_learns(data, teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for loss in ("bce", "ce"):
        probe = LinearProbeModule(teacher, 4, num_features=64, loss=loss, optim={**OPTIM, "lr": 0.2})
        _, metrics = fit(probe, data, epochs=2)
        assert metrics["test/acc1"] > 0.6, loss
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_distill_batch_holds_what_the_distillers_read(data, teacher):
    """Teacher outputs without a graph, student outputs with one, indices kept, the epoch from the Trainer, and
    unlabeled images (label -1) labelled with the teacher's prediction for methods that read labels."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher, 4,
                                distill={"method": "dkd", "mix": {"crd": {"feat_dim": 8, "nce_k": 4}}},
                                optim=OPTIM, num_samples=20)
    _b = next(iter(data.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    x, y = x[:6], y[:6].clone()
    y[[1, 4]] = -1
    idx = torch.arange(6)
    b = module.distill_batch({"images": x, "labels": y, "index": idx}, module._student_outputs)
    assert (b["epoch"], b["max_epochs"]) == (0, 0) and b["images"] is x and torch.equal(b["indices"], idx)
    assert not b["teacher_logits"].requires_grad and b["student_logits"].requires_grad
    assert b["teacher_embedding"].shape[0] == 6 and b["student_embedding"].requires_grad
    want = torch.where(y < 0, teacher(x).argmax(1), y)
    assert torch.equal(b["labels"], want) and not torch.equal(want, y)
    # the teacher's embedding is read at its classifier's input, by the source's tap
    torch.testing.assert_close(b["teacher_embedding"], penultimate_features(teacher, x)[0].flatten(1))
    labelled = y.clamp(min=0)
    assert torch.equal(module.distill_batch({"images": x, "labels": labelled, "index": None},
                                            module._student_outputs)["labels"], labelled)
    module._trainer = SimpleNamespace(current_epoch=3, max_epochs=7)
    b = module.distill_batch({"images": x, "labels": labelled, "index": None}, module._student_outputs)
    assert (b["epoch"], b["max_epochs"]) == (3, 7) and "indices" not in b
    # labels 0 are a class, not "unlabeled"; no labels at all is allowed; the label dtype is kept
    zeros = torch.zeros(6, dtype=torch.int32)
    b = module.distill_batch({"images": x, "labels": zeros, "index": None}, module._student_outputs)
    assert torch.equal(b["labels"], zeros) and b["labels"].dtype == torch.int32
    b = module.distill_batch({"images": x, "labels": y.int(), "index": None}, module._student_outputs)
    assert b["labels"].dtype == torch.int32 and torch.equal(b["labels"], want.int())
    assert "labels" not in module.distill_batch({"images": x, "labels": None, "index": None}, module._student_outputs)
    # an embedding the network returns itself is kept, not replaced by the tapped classifier input
    marker = torch.full((6, 3), 7.0)
    outputs, _ = module._run_student(x, lambda xs: {"logits": module.net(xs), "embedding": marker})
    assert outputs["embedding"] is marker


def test_teacher_outputs_come_from_the_cache_only_with_indices_and_views(data, teacher):
    """One teacher source, built before the module with its cache: the host asks it for every answer."""
    from kdx.distill import CachePlan, build_distiller_set, classifier_source

    student = build_model("cnn_tiny", 4, in_chans=3)
    _b = next(iter(data.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    plan = CachePlan({"mode": "memory"}, {"data": {"name": "synthetic"}}, seed=0, num_samples=len(data.train_set),
                     max_epochs=3)
    source = classifier_source(teacher, build_distiller_set({"method": "kd"}), student, example=x[:2], cache=plan)
    assert source.cache.outputs == {"logits": 4} and source.cache.num_views == 3  # widths probed by the source
    module = DistillationModule(student, source, 4, optim=OPTIM)
    assert module.teacher_source is source and module.teacher is teacher and module.distillers is source.distillers
    module.log = lambda *a, **k: None
    idx, views = torch.arange(len(y)), torch.zeros(len(y), dtype=torch.long)
    module.training_step((x, y, idx, views), 0)
    module.training_step((x, y, idx, views), 0)
    assert (source.cache.hits, source.cache.misses) == (len(y), len(y))  # the second step was served
    module.training_step((x, y, idx), 0)
    module.training_step((x, y), 0)
    assert (source.cache.hits, source.cache.misses) == (len(y), len(y))  # no views or no indices: the teacher runs
    served, features = source(x, idx, views)
    assert features == {}
    torch.testing.assert_close(served["logits"], teacher(x), rtol=1e-3, atol=1e-3)  # float16 rows
    with pytest.raises(ValueError, match="distill is decided when the teacher source is built"):
        DistillationModule(student, source, 4, distill={"method": "dkd"}, optim=OPTIM)


def test_a_cache_of_a_source_that_taps_teacher_layers_is_refused(data, teacher):
    from kdx.distill import CachePlan, build_distiller_set, classifier_source
    from kdx.errors import ConfigError

    plan = CachePlan({"mode": "memory"}, {}, seed=0, num_samples=8, max_epochs=1)
    with pytest.raises(ConfigError, match=r"teacher_cache stores outputs only, but the methods read teacher layers"):
        classifier_source(teacher, build_distiller_set({"method": "at"}), build_model("cnn_tiny", 4, in_chans=3),
                          example=torch.zeros(2, 3, 16, 16), cache=plan)
    with pytest.raises(ConfigError, match="a new view every epoch needs trainer.max_epochs"):
        classifier_source(teacher, build_distiller_set({"method": "kd"}), build_model("cnn_tiny", 4, in_chans=3),
                          example=torch.zeros(2, 3, 16, 16), cache=CachePlan({"mode": "memory"}, {}, 0, 8, None))


def test_the_teacher_source_is_moved_with_the_module_but_is_not_its_child(teacher):
    import copy

    net = copy.deepcopy(teacher)
    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), net, 4, distill={"method": "fitnet"},
                                optim=OPTIM)
    assert not any(m is net for m in module.modules()) and not module.teacher.training
    assert module.teacher_source.layers  # fitnet reads a teacher stage: the source taps it
    module.double()
    assert all(p.dtype == torch.float64 for p in net.parameters()) and not net.training
    _, features = module.teacher_source(torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    assert set(features) == set(module.teacher_source.layers)
    assert all(not v.requires_grad for v in features.values())


def test_training_step_logs_with_the_batch_size_and_refuses_clashing_terms(data, teacher):
    from kdx.errors import ConfigError

    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher, 4, optim=OPTIM)
    sizes = []
    module.log = lambda *a, **k: sizes.append(k.get("batch_size"))
    _b = next(iter(data.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    module.training_step((x[:5], y[:5]), 0)
    assert sizes and set(sizes) == {5}
    with pytest.raises(ConfigError, match=r"distillation terms \['ce'\] clash"):
        weigh_losses({"ce": torch.tensor(1.0)}, {"ce": torch.tensor(2.0)}, {"ce": 1.0}, 0.5)


@pytest.mark.parametrize("alpha, ok", [(0, True), (0.0, True), (1, True), (0.35, True), (1.5, False), (-0.1, False),
                                       (True, False), ("0.5", False), (float("nan"), False)])
def test_alpha_must_be_a_number_in_the_unit_interval(alpha, ok):
    from kdx.errors import ConfigError
    from kdx.lit.distill import check_alpha
    if ok:
        assert check_alpha(alpha) == float(alpha) and isinstance(check_alpha(alpha), float)
    else:
        with pytest.raises(ConfigError, match=r"distill.alpha must be a number in \[0, 1\]"):
            check_alpha(alpha)

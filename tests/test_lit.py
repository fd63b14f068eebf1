"""LightningModules in real Trainer runs on the synthetic data: learning, distillation mechanics, transfer, probe."""
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from kdx.data import SyntheticDataModule
from kdx.lit import ClassifierModule, DistillationModule, LinearProbeModule
from kdx.losses import kd_loss
from kdx.models import build_model

OPTIM = {"name": "sgd", "lr": 0.05, "schedule": "constant"}


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
    module = DistillationModule(student, teacher, 4, temperature=4.0, alpha=0.9, optim=OPTIM)
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


def test_total_loss_is_alpha_kd_plus_one_minus_alpha_ce(data, teacher):
    torch.manual_seed(0)
    student = build_model("cnn_tiny", 4, in_chans=3).eval()
    module = DistillationModule(student, teacher, 4, temperature=3.0, alpha=0.7, terms={"kd": 1.0, "mse": 0.5})
    x, y = next(iter(data.val_dataloader()))
    s, t = student(x), teacher.eval()(x)
    terms = module.mix_losses(module.supervised_losses(s, y), module.distillation_losses({"logits": s}, {"logits": t}, y))
    assert set(terms) == {"ce", "kd", "mse"}
    expected = 0.7 * (kd_loss(s, t, 3.0) + 0.5 * F.mse_loss(s, t)) + 0.3 * F.cross_entropy(s, y)
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_one_drops_the_hard_label_term(data, teacher):
    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher, 4, alpha=1.0)
    x, y = next(iter(data.val_dataloader()))
    s = module.net(x)
    terms = module.mix_losses(module.supervised_losses(s, y), {"kd": s.sum() * 0})
    assert set(terms) == {"kd"}


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

"""Unlabeled transfer sets: few labels plus unlabeled images, distilled on the teacher's targets."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

from kdx.data import FashionMNISTDataModule, SyntheticDataModule
from kdx.data.unlabeled import UNLABELED
from kdx.errors import ConfigError, DataError
from kdx.lit import ClassifierModule, DistillationModule
from kdx.models import build_model

from conftest import compose_train

OPTIM = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
         "schedule": "constant"}


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


@pytest.fixture
def fmnist_root(tmp_path):
    images = torch.randint(0, 255, (60, 28, 28), dtype=torch.uint8)
    labels = torch.arange(60, dtype=torch.uint8) % 10
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_labeled_fraction_keeps_a_share_of_the_labels(fmnist_root):
    kw = dict(root=str(fmnist_root), val_size=10, download=False, batch_size=8, labeled_fraction=0.1)
    labeled = FashionMNISTDataModule(**kw)
    labeled.setup()
    assert len(labeled.train_set) == 5 and bool((labeled.train_set.labels >= 0).all())
    mixed = FashionMNISTDataModule(**kw, use_unlabeled=True)
    mixed.setup()
    y = mixed.train_set.labels
    assert len(y) == 50 and int((y >= 0).sum()) == 5 and bool((y[5:] == UNLABELED).all())
    assert torch.equal(mixed.train_set.images[:5], labeled.train_set.images)  # the same labelled images
    with pytest.raises(DataError, match=r"data.labeled_fraction must be a number in \(0, 1\], got 1.5"):
        FashionMNISTDataModule(**{**kw, "labeled_fraction": 1.5}).setup()


def test_an_unlabeled_folder_is_added_with_label_minus_one(fmnist_root, tmp_path):
    folder = tmp_path / "extra"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((10, 10), 7, np.uint8)).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    dm = FashionMNISTDataModule(root=str(fmnist_root), val_size=10, download=False, unlabeled=str(folder))
    dm.setup()
    assert len(dm.train_set) == 52 and dm.train_set.labels[-2:].tolist() == [UNLABELED, UNLABELED]
    assert dm.train_set.images.shape[1:] == (1, 28, 28) and int(dm.train_set.images[-2].float().mean()) == 200
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"data.unlabeled=.*empty holds no image files"):
        FashionMNISTDataModule(root=str(fmnist_root), val_size=10, download=False, unlabeled=str(empty)).setup()
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot read .*broken.png.*remove it from the unlabeled folder"):
        FashionMNISTDataModule(root=str(fmnist_root), val_size=10, download=False, unlabeled=str(folder)).setup()


def test_cross_entropy_ignores_unlabeled_rows():
    module = ClassifierModule(build_model("cnn_tiny", 4, in_chans=3), 4)
    logits = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([2, -1, 0, -1, 3])
    ce = module.supervised_losses(logits, y)["ce"]
    assert ce.item() == pytest.approx(F.cross_entropy(logits[[0, 2, 4]], y[[0, 2, 4]]).item(), rel=1e-6)
    none = module.supervised_losses(logits, torch.full((5,), -1))["ce"]
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_unlabeled_rows_get_the_teachers_prediction_for_label_methods():
    teacher = build_model("cnn_tiny", 4, in_chans=3).eval()
    module = DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher, 4, distill={"method": "dkd"},
                                example_input=torch.randn(2, 3, 16, 16))
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([1, -1, 2, -1, -1, 0])
    batch = module.distill_batch({"images": x, "labels": y, "index": None}, module._student_outputs)
    predicted = teacher(x).argmax(1)
    assert batch["labels"].tolist() == [1, *predicted[[1]].tolist(), 2, *predicted[[3, 4]].tolist(), 0]


def _fit(module, dm, epochs):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc1"]


@pytest.mark.slow
def test_distilling_on_unlabeled_images_beats_the_few_labels_alone():
    """8 labelled images of 4 classes: the student alone stays weak; the teacher's targets on the other 504 teach it.

    Measured: teacher 1.00, student alone 0.68, distilled 0.99 (test accuracy, chance 0.25).
    """
    kw = dict(num_classes=4, image_size=16, train_size=512, batch_size=32, noise=0.5)
    full = SyntheticDataModule(**kw)
    full.setup()
    pl.seed_everything(0, verbose=False)
    teacher = build_model("resnet8", 4)
    assert _fit(ClassifierModule(teacher, 4, optim=OPTIM), full, epochs=4) > 0.9
    keep = torch.cat([torch.nonzero(full.train_set.labels == c)[:2, 0] for c in range(4)])
    few = SyntheticDataModule(**kw)
    few.setup()
    few.train_set.images, few.train_set.labels = few.train_set.images[keep], few.train_set.labels[keep]
    few.batch_size = 8
    mixed = SyntheticDataModule(**kw)
    mixed.setup()
    labels = torch.full_like(mixed.train_set.labels, UNLABELED)
    labels[keep] = mixed.train_set.labels[keep]
    mixed.train_set.labels = labels
    pl.seed_everything(0, verbose=False)
    alone = _fit(ClassifierModule(build_model("cnn_tiny", 4, in_chans=3), 4, optim=OPTIM), few, epochs=32)
    pl.seed_everything(0, verbose=False)
    distilled = _fit(DistillationModule(build_model("cnn_tiny", 4, in_chans=3), teacher.eval(), 4, alpha=0.9,
                                        optim=OPTIM), mixed, epochs=3)
    assert distilled > alone + 0.15, (alone, distilled)


def test_unlabeled_images_in_a_supervised_run_are_refused(fmnist_root, tmp_path):
    from kdx.train import run_training

    cfg = compose_train(["experiment=fmnist/student", "trainer.max_epochs=1", "trainer.progress_bar=none",
                         f"data.root={fmnist_root}", "data.val_size=10", "data.download=false",
                         "data.num_workers=0", "data.use_unlabeled=true", "data.labeled_fraction=0.5"])
    with pytest.raises(ConfigError, match="data.use_unlabeled / data.unlabeled add images without labels"):
        run_training(cfg, tmp_path / "run")


def test_the_fewlabels_pipeline_composes_into_labelled_and_unlabelled_stages():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=["experiment=fmnist_fewlabels", "data.labeled_fraction=0.1"])
    assert cfg.run_name == "fmnist_fewlabels_0.1"
    stages = {name: compose_train([*overrides, "data.labeled_fraction=0.1"]) for name, overrides in cfg.pipeline.stages.items()}
    assert stages["teacher"].task.name == "supervised" and not stages["teacher"].data.use_unlabeled
    assert stages["student"].task.network == "student" and stages["student"].data.labeled_fraction == 0.1
    assert stages["kd"].task.name == "distill" and stages["kd"].data.use_unlabeled

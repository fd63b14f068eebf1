"""teacher.head=centroids: a face teacher without a head on this run's identities (an ONNX model such as SFace)
answers with logits over them, from its identity centroids, so logit_kd can distil it."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from conftest import compose_train, run_cli
from kdx.distill.teachers import FaceTeacher, centroid_head, with_centroid_head
from kdx.errors import ConfigError


class _Embedder(torch.nn.Module):
    """A fixed linear embedding of flattened images (the teacher stand-in: its outputs are known by hand)."""

    def __init__(self, in_features: int, size: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(in_features, size)
        self.embedding_size = size

    def forward(self, x):
        return self.proj(x.flatten(1))


def _teacher_and_data(n_ids=4, per_id=3):
    torch.manual_seed(1)
    images = torch.randn(n_ids * per_id, 1, 4, 4)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    return FaceTeacher(_Embedder(16), input_size=(4, 4)), TensorDataset(images, labels)


def test_the_centroid_head_holds_each_identitys_mean_unit_embedding_and_answers_scaled_cosines():
    teacher, data = _teacher_and_data()
    head = centroid_head(teacher, data, num_classes=4, scale=30.0, batch_size=5)  # batches cut across identities
    images, labels = data.tensors
    with torch.no_grad():
        unit = F.normalize(teacher.net(images).double(), dim=1)
    centroids = torch.stack([F.normalize(unit[labels == k].mean(0), dim=0) for k in range(4)])
    torch.testing.assert_close(head.weight.double(), centroids, atol=1e-6, rtol=0)
    with torch.no_grad():
        logits = head(teacher.net(images))
    torch.testing.assert_close(logits.double(), 30.0 * unit @ centroids.T, atol=1e-4, rtol=1e-6)
    assert not any(p.requires_grad for p in head.parameters()) and not head.training


def test_a_teacher_with_a_centroid_head_answers_logits_over_the_runs_identities():
    teacher, data = _teacher_and_data()
    headed = with_centroid_head(teacher, "centroids", data, ["a", "b", "c", "d"], scale=64.0)
    out = headed(data.tensors[0])
    assert set(out) == {"embedding", "logits"} and out["logits"].shape == (12, 4)
    assert headed.class_names == ["a", "b", "c", "d"] and headed.net is teacher.net
    # the stand-in's identities are random images: their centroids still classify most of their own images
    assert (out["logits"].argmax(1) == data.tensors[1]).float().mean() > 0.5


def test_centroid_head_errors_name_the_key_and_the_fix():
    teacher, data = _teacher_and_data()
    with pytest.raises(ConfigError, match=r"teacher.head=centroid is not a head kdx builds; use teacher.head=centroids"):
        with_centroid_head(teacher, "centroid", data, ["a", "b", "c", "d"], scale=64.0)
    with pytest.raises(ConfigError, match=r"every identity, but 2 of 6 have none \(labels \[4, 5\]\)"):
        centroid_head(teacher, data, num_classes=6, scale=64.0)
    with pytest.raises(ConfigError, match="label 3 outside the 3 identities"):
        centroid_head(teacher, data, num_classes=3, scale=64.0)


def test_teacher_head_is_refused_where_it_has_no_meaning(synthetic_teacher):
    from kdx.tasks import validate_config

    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "+teacher.head=centroids"])
    with pytest.raises(ConfigError, match="classifier teacher has its own logits, so drop teacher.head"):
        validate_config(cfg)
    cfg = compose_train(["experiment=orl/face_logit_kd", "teacher.head=centre"])
    with pytest.raises(ConfigError, match="teacher.head=centre is not a head kdx builds; use teacher.head=centroids"):
        validate_config(cfg)
    cfg = compose_train(["experiment=orl/face_kd", "distill=face_logit", "distill.alpha=1", "data.labels=false",
                         "+teacher.head=centroids"])
    with pytest.raises(ConfigError, match="data.labels=false hides the identities; drop teacher.head"):
        validate_config(cfg)


def test_the_face_logit_kd_experiment_is_face_kd_with_the_logit_preset_and_the_centroid_head():
    from omegaconf import OmegaConf

    named = OmegaConf.to_container(compose_train(["experiment=orl/face_logit_kd"]))
    spelt = OmegaConf.to_container(compose_train(["experiment=orl/face_kd", "distill=face_logit",
                                                  "+teacher.head=centroids"]))
    assert named.pop("run_name") == "orl_face_logit_kd" and spelt.pop("run_name") == "orl_face_kd"
    assert named == spelt and named["teacher"]["head"] == "centroids" and named["distill"]["method"] == "logit_kd"


def test_sface_centroids_recognise_orls_training_identities_and_logit_kd_reads_them():
    """On real ORL images the SFace ONNX teacher's centroid logits name the right identity for nearly every training
    image, and the face_logit preset builds with them (it was refused before: SFace has no head)."""
    from kdx.configs import build_datamodule
    from kdx.tasks import task_for

    cfg = compose_train(["experiment=orl/face_kd", "distill=face_logit", "data.num_val_pairs=20",
                         "data.num_test_pairs=20", "+teacher.head=centroids"])
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    module = task_for(cfg).create(dm).module
    images, labels = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in dm.train_set.without_augmentation()]))
    with torch.no_grad():
        logits = module.teacher_source.network(images)["logits"]
    assert logits.shape == (len(dm.train_set), dm.num_classes)
    assert logits.abs().max() <= cfg.task.margin.s + 1e-3  # scaled cosines
    assert (logits.argmax(1) == labels).float().mean() >= 0.95


@pytest.mark.slow
def test_logit_kd_from_sface_trains_from_the_command_line(tmp_path):
    """experiment=orl/face_logit_kd (teacher.head=centroids + distill=face_logit) is a whole kdx-train run."""
    proc = run_cli("kdx-train", "experiment=orl/face_logit_kd", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
                   "+trainer.limit_train_batches=2", "data.val_identities=2",
                   "data.test_identities=2", "data.num_val_pairs=20", "data.num_test_pairs=20",
                   "student.kwargs.input_size=[32,32]", "trainer.progress_bar=none", "hydra.run.dir=run",
                   cwd=tmp_path, timeout=240, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and 0.0 <= results["metrics"]["test/verif_acc"] <= 1.0
    logged = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_logit_kd", "train/loss_emb_cos", "train/loss_margin"} <= set(logged), logged

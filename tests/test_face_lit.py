"""Face LightningModules: margin training + verification logging, distillation terms, teachers and their errors."""
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from kdx.data.face import FaceFolderDataModule
from kdx.errors import ConfigError
from kdx.checkpoints import load_embedding_model
from kdx.distill.teachers import FaceTeacher, build_face_teacher
from kdx.lit import FaceDistillationModule, FaceModule
from kdx.models.margin_heads import build_margin_head
from kdx.schemas import ModelSpec
from kdx.tasks import probe_teacher
from kdx.models.embedding import build_embedding_model

OPTIM = {"_target_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.0, "schedule": "constant"}


def _identity_folder(root, n_ids=20, per_id=6, size=24, seed=0):
    """Synthetic identities: a random prototype face each, images = prototype + noise + brightness jitter."""
    rng = np.random.default_rng(seed)
    for i in range(n_ids):
        proto = rng.uniform(0, 255, (size, size, 3))
        d = root / f"id{i:02d}"
        d.mkdir(parents=True)
        for j in range(per_id):
            img = np.clip(proto + rng.normal(0, 25, proto.shape) + rng.normal(0, 10), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def face_dm(tmp_path_factory):
    root = _identity_folder(tmp_path_factory.mktemp("ids"))
    dm = FaceFolderDataModule(root, val_identities=4, num_val_pairs=40, batch_size=16, image_size=24, seed=0)
    dm.setup("fit")
    return dm


def _trainer(tmp_path, epochs=3, **kwargs):
    return pl.Trainer(default_root_dir=str(tmp_path), max_epochs=epochs, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      enable_checkpointing=False, **kwargs)


def _student(embedding_size=16, size=24):
    torch.manual_seed(0)
    return build_embedding_model("cnn_tiny", embedding_size, input_size=size)


def _meta(embedding_size=16, size=24, dm=None):
    return {"name": "cnn_tiny", "embedding_size": embedding_size, "in_chans": 3, "input_size": [size, size],
            "kwargs": {}, "class_names": list(dm.class_names) if dm is not None else []}


def test_margin_presets():
    arc, cos, norm = (build_margin_head(8, 4, kind) for kind in ("arcface", "cosface", "normsoftmax"))
    assert (arc.m1, arc.m2, arc.m3) == (1.0, 0.5, 0.0)
    assert (cos.m1, cos.m2, cos.m3) == (1.0, 0.0, 0.4)
    assert (norm.m1, norm.m2, norm.m3) == (1.0, 0.0, 0.0)
    assert build_margin_head(8, 4, "arcface", s=30, m2=0.3).m2 == 0.3
    with pytest.raises(ConfigError, match="task.margin.kind"):
        build_margin_head(8, 4, "sphereface")


def test_face_module_learns_logs_and_checkpoints(face_dm, tmp_path):
    module = FaceModule(_student(), face_dm.num_classes, margin={"kind": "cosface", "s": 16.0}, optim=OPTIM,
                        model_meta=_meta(dm=face_dm), bn_recalibration_batches=4)
    trainer = _trainer(tmp_path, epochs=6)
    before = trainer.validate(module, datamodule=face_dm, verbose=False)[0]
    trainer.fit(module, datamodule=face_dm)
    after = trainer.callback_metrics
    for key in ("val/verif_acc", "val/verif_acc_std", "val/auc", "val/threshold", "val/tar@far=1e-1"):
        assert key in after, key
    assert float(after["val/verif_acc"]) > 0.75 and float(after["val/auc"]) > 0.8
    assert float(after["val/auc"]) >= before["val/auc"] - 0.05
    test = trainer.test(module, datamodule=face_dm, verbose=False)[0]
    assert set(k for k in test if k.startswith("test/")) >= {"test/verif_acc", "test/auc"}
    # the checkpoint rebuilds the embedding network for kdx-eval / the pipeline
    path = tmp_path / "face.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["kdx"]["task"] == "face" and ckpt["kdx"]["embedding_model"]["name"] == "cnn_tiny"
    assert ckpt["kdx"]["class_names"] == list(face_dm.class_names)
    net = load_embedding_model(path)
    x = torch.randn(3, 3, 24, 24)
    module.eval()
    torch.testing.assert_close(net(x), module(x))


def test_face_module_resizes_to_the_student_input(face_dm):
    module = FaceModule(_student(size=16), face_dm.num_classes, optim=OPTIM, model_meta=_meta(size=16))
    assert module.input_size == (16, 16)
    assert module.embed(torch.randn(2, 3, 24, 24)).shape == (2, 16)


def _torch_teacher(embedding_size=24, head=None, class_names=None):
    torch.manual_seed(1)
    net = build_embedding_model("cnn_tiny", embedding_size, input_size=24).eval()
    return FaceTeacher(net, head, class_names, source="tiny torch teacher")


def test_distillation_reduces_embedding_loss_and_keeps_teacher_frozen(face_dm, tmp_path):
    teacher = _torch_teacher(24)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill = {"method": "emb_cos", "projection": True, "mix": {"relational": {"weight": 1.0}}}
    module = FaceDistillationModule(_student(16), teacher, face_dm.num_classes, distill=distill, alpha=0.9,
                                    optim=OPTIM, model_meta=_meta(dm=face_dm))
    projector_params = list(module.distillers.methods["emb_cos"].parameters())
    assert projector_params and projector_params[0].shape == (24, 16)  # 16 -> 24 learned map
    opt_params = {id(p) for g in module.parameter_groups() for p in g["params"]}
    assert all(id(p) in opt_params for p in projector_params)
    assert not any(id(p) in opt_params for p in teacher.parameters())
    assert not any(k.startswith(("teacher", "_kdx_teacher")) for k in module.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())

    _b = next(iter(face_dm.train_dataloader()))

    x, y = _b["images"], _b["labels"]

    def emb_cos():
        module.eval()
        with torch.no_grad():
            db = module.distill_batch({"images": x, "labels": y, "index": None}, module._student_outputs)
            return float(module.distillers(db)["emb_cos"])

    start = emb_cos()
    module.train()
    trainer = _trainer(tmp_path, epochs=3, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=face_dm)
    assert emb_cos() < start * 0.7
    assert {"train/loss_emb_cos", "train/loss_relational", "train/loss_margin"} <= set(trainer.logged_metrics)
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, frozen[k])


def test_face_training_step_returns_the_formula_of_student_and_teacher_outputs(face_dm):
    """The face host's training_step on a real batch, against the loss computed by hand from both embeddings."""
    import torch.nn.functional as F

    teacher = _torch_teacher(16)
    distill = {"method": "emb_mse", "normalize": False, "mix": {"relational": {"weight": 0.3}}}
    module = FaceDistillationModule(_student(16), teacher, face_dm.num_classes, distill=distill, alpha=0.7,
                                    optim=OPTIM, model_meta=_meta(dm=face_dm))
    module.eval()
    sizes = []
    module.log = lambda *a, **k: sizes.append(k.get("batch_size"))
    _b = next(iter(face_dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    loss = module.training_step((x, y), 0)
    assert sizes and set(sizes) == {len(y)}
    with torch.no_grad():
        s, t = module.embed(x).double(), teacher(x)["embedding"].double()
        margin = F.cross_entropy(module.head(s.float(), y).double(), y)
        zs, zt = F.normalize(s, dim=1), F.normalize(t, dim=1)
        relational = ((zs @ zs.T - zt @ zt.T) ** 2).mean()
        expected = 0.3 * margin + 0.7 * (((s - t) ** 2).mean() + 0.3 * relational)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dimension_mismatch_without_projection_is_an_error(face_dm):
    with pytest.raises(ConfigError, match="distill.projection=true"):
        FaceDistillationModule(_student(16), _torch_teacher(24), face_dm.num_classes,
                               distill={"method": "emb_cos", "projection": False}, optim=OPTIM, model_meta=_meta())
    # relational KD compares similarity matrices: no projection needed, nothing trainable
    module = FaceDistillationModule(_student(16), _torch_teacher(24), face_dm.num_classes,
                                    distill={"method": "relational"}, optim=OPTIM, model_meta=_meta())
    assert not list(module.distillers.parameters())


def test_logit_kd_needs_a_teacher_with_the_same_identities(face_dm):
    with pytest.raises(ConfigError, match="'logit_kd' needs logits, but the teacher has no margin head"):
        FaceDistillationModule(_student(16), _torch_teacher(16), face_dm.num_classes, distill={"method": "logit_kd"},
                               optim=OPTIM, model_meta=_meta())
    head = build_margin_head(16, face_dm.num_classes)
    with pytest.raises(ConfigError, match="identities differ"):
        FaceDistillationModule(_student(16), _torch_teacher(16, head), face_dm.num_classes,
                               distill={"method": "logit_kd"}, shared_identities=False, optim=OPTIM, model_meta=_meta())
    module = FaceDistillationModule(_student(16), _torch_teacher(16, head, face_dm.class_names), face_dm.num_classes,
                                    distill={"method": "logit_kd", "temperature": 2.0, "mix": {"emb_cos": {}}},
                                    shared_identities=True, optim=OPTIM, model_meta=_meta())
    _b = next(iter(face_dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    module.eval()  # the same BatchNorm statistics in the step and in the hand computation below
    terms = {}
    module.log_terms = lambda t, batch_size, raw=None: terms.update(t) or sum(t.values())
    loss = module.training_step((x, y), 0)
    assert set(terms) == {"margin", "logit_kd", "emb_cos"}
    with torch.no_grad():  # each term by hand from both networks' outputs (alpha 0.5 on both sides)
        s, t = module.embed(x), module.teacher(x)
        log_p_s = torch.log_softmax(module.head(s).double() / 2.0, dim=1)  # student head logits: scaled cosines
        log_p_t = torch.log_softmax(t["logits"].double() / 2.0, dim=1)
        logit_kd = 4.0 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
        emb_cos = (1 - torch.nn.functional.cosine_similarity(s.double(), t["embedding"].double(), dim=1)).mean()
        margin = torch.nn.functional.cross_entropy(module.head(s, y).double(), y)
    assert terms["logit_kd"].item() == pytest.approx(0.5 * logit_kd.item(), rel=1e-4)
    assert terms["emb_cos"].item() == pytest.approx(0.5 * emb_cos.item(), rel=1e-4)
    assert terms["margin"].item() == pytest.approx(0.5 * margin.item(), rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * (logit_kd + emb_cos + margin).item(), rel=1e-4)
    with pytest.raises(ConfigError, match="'dkd' is for classification tasks, not face"):
        FaceDistillationModule(_student(16), _torch_teacher(16), face_dm.num_classes, distill={"method": "dkd"},
                               optim=OPTIM, model_meta=_meta())


def test_face_teacher_outputs_come_from_the_cache_when_views_repeat(face_dm, tmp_path):
    """Two views per image, decided when the datamodule is built: from the third epoch on, every teacher
    embedding is served by the cache of the teacher source, which was built (cache included) before the module."""
    from kdx.distill import build_distiller_set, face_source, plan_teacher_cache

    with pytest.raises(ConfigError, match="needs seeded views, but this FaceFolderDataModule was built without them"):
        plan_teacher_cache({"mode": "memory"}, face_dm, {"name": "ids"}, max_epochs=4)
    dm = FaceFolderDataModule(face_dm.root, val_identities=4, num_val_pairs=40, batch_size=16, image_size=24, seed=0,
                              seeded_views=True, views=2, view_seed=3)
    dm.setup("fit")
    plan = plan_teacher_cache({"mode": "memory", "views": 2}, dm, {"name": "ids"}, max_epochs=4)
    assert plan.seed == 3 and plan.num_samples == len(dm.train_set) and plan.identity["sizes"] == dm.describe()
    teacher, student = _torch_teacher(24), _student(16)
    source = face_source(teacher, build_distiller_set({"method": "emb_cos"}, task="face"), student,
                         example=probe_teacher(teacher, dm, ModelSpec()), cache=plan)
    assert source.cache.outputs == {"embedding": 24} and source.cache.num_views == 2
    module = FaceDistillationModule(student, source, dm.num_classes, optim=OPTIM, model_meta=_meta(dm=dm))
    rates = []

    class Rate(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            rates.append(pl_module.teacher_source.cache.stats()["hit_rate"])  # callbacks run before the module resets it

    _trainer(tmp_path, epochs=4, limit_val_batches=0, callbacks=[Rate()]).fit(module, datamodule=dm)
    assert rates == [0.0, 0.0, 1.0, 1.0]


def _export(model, path, shape, dynamic_hw=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"img": {0: "n", 2: "h", 3: "w"}} if dynamic_hw else {"img": {0: "n"}}
        torch.onnx.export(model.eval(), (torch.rand(*shape),), str(path), dynamo=False, input_names=["img"],
                          output_names=["emb"], dynamic_axes=axes)


def test_onnx_teacher_whose_input_the_data_cannot_meet(face_dm, tmp_path):
    four_channels = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    _export(four_channels, tmp_path / "rgba.onnx", (1, 4, 16, 16))
    teacher = build_face_teacher({"onnx": str(tmp_path / "rgba.onnx")})
    with pytest.raises(ConfigError, match="cannot take this data.*4-channel input"):
        probe_teacher(teacher, face_dm, ModelSpec(onnx="rgba.onnx"))
    # a fixed-size linear layer behind dynamic H x W axes: the data's 24x24 images break it inside onnxruntime
    fixed_fc = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 8))
    _export(fixed_fc, tmp_path / "fc.onnx", (1, 3, 16, 16), dynamic_hw=True)
    teacher = build_face_teacher({"onnx": str(tmp_path / "fc.onnx")})
    # (onnxruntime's error arrives as kdx's one sentence naming the model and the input shape)
    with pytest.raises(ConfigError, match=r"fc\.onnx cannot run on input of shape \(2, 3, 24, 24\).*preprocess\.input_size"):
        probe_teacher(teacher, face_dm, ModelSpec(onnx="fc.onnx"))
    fixed = build_face_teacher({"onnx": str(tmp_path / "fc.onnx"), "preprocess": {"input_size": [16, 16]}})
    probe_teacher(fixed, face_dm, ModelSpec(onnx="fc.onnx"))  # with its export size set, it runs
    with pytest.raises(ConfigError, match="teacher.preprocess has unknown keys"):
        build_face_teacher({"onnx": str(tmp_path / "fc.onnx"), "preprocess": {"size": 16}})
    with pytest.raises(ConfigError, match="both set"):
        build_face_teacher({"onnx": "sface", "ckpt": "x.ckpt"})


def test_face_host_hands_the_labels_to_methods_that_read_them(face_dm):
    """AdaDistill through the face host: the step's loss is the margin loss against the centres it just moved."""
    from kdx.losses.adadistill import adadistill_update, centre_margin_loss

    teacher = _torch_teacher(16)
    module = FaceDistillationModule(_student(16), teacher, face_dm.num_classes, alpha=1.0, optim=OPTIM,
                                    distill={"method": "adadistill", "scale": 16.0}, model_meta=_meta(dm=face_dm))
    module.eval()
    module.log = lambda *a, **k: None
    _b = next(iter(face_dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    ada = module.distillers.methods["adadistill"]
    ada.train()
    before = ada.centres.clone()
    loss = module.training_step((x, y), 0)
    with torch.no_grad():
        s, t = module.embed(x), teacher(x)["embedding"]
        moved = adadistill_update(before, s, t, y)
    assert torch.allclose(ada.centres, moved)
    assert loss.item() == pytest.approx(centre_margin_loss(s, moved, y, 0.45, 16.0).item(), rel=1e-5)


def test_face_module_logs_its_margin_loss_with_the_batch_size(face_dm):
    module = FaceModule(_student(16), face_dm.num_classes, optim=OPTIM, model_meta=_meta(dm=face_dm))
    sizes = []
    module.log = lambda *a, **k: sizes.append(k.get("batch_size"))
    _b = next(iter(face_dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    module.training_step((x[:7], y[:7]), 0)
    assert sizes and set(sizes) == {7}


def test_face_host_computes_logits_only_for_methods_that_read_them(face_dm):
    """With tens of thousands of identities a head's logits are a large matmul: the host skips them unless a method
    reads logits (logit_kd), and then takes both the student's and the teacher's."""
    _b = next(iter(face_dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    head = build_margin_head(16, face_dm.num_classes)
    for method, wants in (("emb_mse", False), ("logit_kd", True)):
        module = FaceDistillationModule(_student(16), _torch_teacher(16, head, face_dm.class_names),
                                        face_dm.num_classes, distill={"method": method}, shared_identities=True,
                                        optim=OPTIM, model_meta=_meta(dm=face_dm))
        db = module.distill_batch({"images": x, "labels": y, "index": None}, module._student_outputs)
        assert ("student_logits" in db, "teacher_logits" in db) == (wants, wants), method
        assert "student_embedding" in db and "teacher_embedding" in db

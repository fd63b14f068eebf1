"""Contract tests driven by the registries: what kdx finds by name is checked without listing it here.

- every registered classification distiller is bound, set up, stepped through DistillationModule.training_step,
  backpropagated, and its state saved and restored (a checkpoint that loads with weights_only);
- every registered face distiller likewise through FaceDistillationModule;
- every registered model meets kdx.models.contract (classifier or embedding, stage taps);
- every conf/distill/*.yaml preset is built with real networks the way kdx-train builds a run, so a wrong
  layer name in a preset fails;
- the registries work the way the docs show them used (`@register_model` bare or with a name).

A new method, model or preset is checked by adding its file; nothing here needs editing.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from conftest import CONF, compose_train
from kdx.configs import build_datamodule
from kdx.distill import Distiller, available_distillers, distiller_class, distiller_parameters, register_distiller
from kdx.distill.teachers import FaceTeacher
from kdx.errors import ConfigError
from kdx.lit import DistillationModule, FaceDistillationModule
from kdx.models.margin_heads import build_margin_head
from kdx.models import (build_embedding_model, build_model, classifier_path, feature_stages, get_classifier,
                        is_embedding_model, list_models, penultimate_features, register_model, registered_models,
                        reset_classifier)
from kdx.models import registry as model_registry
from kdx.tasks import validate_config

OPTIM = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "schedule": "constant"}
CLASSES, SIZE, BATCH = 4, 16, 8


def batch(seed: int, n: int = BATCH, size: int = SIZE, classes: int = CLASSES) -> dict[str, torch.Tensor]:
    """A training record (kdx.data.batch) with indices, as kdx loaders give it."""
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, size, size, generator=g), "labels": torch.arange(n) % classes,
            "index": torch.randperm(32, generator=g)[:n]}


def quiet(module):
    module.log = lambda *a, **k: None  # outside a Trainer: nothing to log to
    return module


def round_trip(module) -> dict:
    """The module's checkpoint as a run writes it (state dict + kdx's hook), through bytes, loaded weights_only."""
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def step_backprop_restore(make, data_seed: int) -> None:
    """Step `make()`'s module once, backpropagate, save; a second module restored from that checkpoint must give
    the same loss and the same distiller state on the next batch."""
    module = quiet(make())
    module.train()
    torch.manual_seed(0)
    loss = module.training_step(batch(data_seed), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.net.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the student"
    trainable = [p for p in module.distillers.parameters() if p.requires_grad]
    assert all(id(p) in {id(q) for g in module.parameter_groups() for q in g["params"]} for p in trainable)
    checkpoint = round_trip(module)
    restored = quiet(make())
    restored.load_state_dict(checkpoint["state_dict"], strict=True)
    for k, v in module.distillers.state_dict().items():
        assert torch.equal(restored.distillers.state_dict()[k], v), k
    restored.train()
    torch.manual_seed(1)
    after = module.training_step(batch(data_seed + 1), 1)
    torch.manual_seed(1)
    again = restored.training_step(batch(data_seed + 1), 1)
    torch.testing.assert_close(again, after)


# ------------------------------------------------------------------------------------------- distillers
@pytest.mark.parametrize("name", available_distillers("classification"))
def test_every_classification_distiller_steps_backpropagates_and_restores(name):
    def make():
        torch.manual_seed(0)
        teacher, student = build_model("resnet8", CLASSES).eval(), build_model("cnn_tiny", CLASSES, in_chans=3)
        return DistillationModule(student, teacher, CLASSES, distill={"method": name}, alpha=0.5,
                                  example_input=torch.randn(2, 3, SIZE, SIZE), num_samples=32, optim=OPTIM,
                                  model_meta={"name": "cnn_tiny", "in_chans": 3})

    step_backprop_restore(make, data_seed=3)


def face_teacher(embedding_size: int = 24) -> FaceTeacher:
    """A tiny torch teacher with a margin head on the run's identities, so every face method gets what it reads."""
    torch.manual_seed(1)
    net = build_embedding_model("cnn_tiny", embedding_size, input_size=SIZE).eval()
    names = [f"id{i}" for i in range(CLASSES)]
    return FaceTeacher(net, build_margin_head(embedding_size, CLASSES), names, source="tiny torch teacher")


@pytest.mark.parametrize("name", available_distillers("face"))
def test_every_face_distiller_steps_backpropagates_and_restores(name):
    def make():
        torch.manual_seed(0)
        student = build_embedding_model("cnn_tiny", 16, input_size=SIZE)
        meta = {"name": "cnn_tiny", "embedding_size": 16, "in_chans": 3, "input_size": [SIZE, SIZE], "kwargs": {},
                "class_names": [f"id{i}" for i in range(CLASSES)]}
        return FaceDistillationModule(student, face_teacher(), CLASSES, distill={"method": name}, alpha=0.5,
                                      shared_identities=True, example_input=torch.randn(2, 3, SIZE, SIZE),
                                      num_samples=32, optim=OPTIM, model_meta=meta)

    step_backprop_restore(make, data_seed=5)


# ------------------------------------------------------------------------------------------- models
def _parameter_count(name: str) -> int:
    """Parameters of a registered net, counted on the meta device (nothing allocated, nothing initialised)."""
    with torch.device("meta"):
        net = registered_models()[name](num_classes=10, in_chans=3)
    return sum(p.numel() for p in net.parameters())


def _model_cases():
    """Every registered kdx net; the big ones (over 5M parameters) are marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if _parameter_count(n) > 5_000_000 else n
            for n in list_models("kdx")]


@pytest.mark.parametrize("name", _model_cases())
def test_every_registered_model_meets_the_contract(name):
    torch.manual_seed(0)
    if is_embedding_model(name):
        net = build_embedding_model(name, 32, input_size=SIZE * 2).eval()
        with pytest.raises(ConfigError, match="declares no classifier layer"):
            classifier_path(net)
        x = torch.randn(2, 3, SIZE * 2, SIZE * 2)
        with torch.no_grad():
            assert net(x).shape == (2, 32)
    else:
        net = build_model(name, num_classes=7, in_chans=3).eval()
        assert get_classifier(net).out_features == 7
        assert net.get_submodule(classifier_path(net)) is get_classifier(net)
        reset_classifier(net, 3)
        assert get_classifier(net).out_features == 3
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            feats, logits = penultimate_features(net, x)
        assert logits.shape == (2, 3)
        torch.testing.assert_close(get_classifier(net)(feats), logits)
    stages = feature_stages(net)
    assert stages, f"{name} declares no feature stages: feature methods would have nothing to tap"
    outputs = []
    hooks = [net.get_submodule(s).register_forward_hook(lambda m, i, o: outputs.append(o)) for s in stages]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert len(outputs) == len(stages) and all(o.ndim == 4 for o in outputs)  # B x C x H x W maps, shallow to deep


# ------------------------------------------------------------------------------------------- presets
PRESETS = sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if not p.stem.startswith("_"))  # _base: no method


def preset_methods(preset: str) -> dict:
    """The methods of a preset (its `method` and `mix`) as kdx-train composes it."""
    section = OmegaConf.to_container(compose_train([f"distill={preset}"]).distill, resolve=True)
    return {section["method"]: section, **dict(section.get("mix") or {})}


def preset_task(preset: str) -> str:
    """distill when every method of the preset works on classification, else face_distill."""
    classification = all("classification" in distiller_class(m).tasks for m in preset_methods(preset))
    return "distill" if classification else "face_distill"


def _write_checkpoint(module, path: Path) -> Path:
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def _built(overrides: list[str]):
    cfg = compose_train(overrides)
    task = validate_config(cfg)
    dm = build_datamodule(cfg.data, task.data_options())
    dm.setup("fit")
    return task.create(dm), dm


CLASSIFICATION = ["data=synthetic", "data.train_size=32", "data.val_size=8", "data.test_size=8", "data.batch_size=8",
                  "pair=synthetic_tiny"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, list[str]]:
    """Overrides of a classification and a face run with a teacher checkpoint each, written by the teacher task's
    own module as a finished run would (the face teacher's margin head is on the run's identities)."""
    root = tmp_path_factory.mktemp("presets")
    built, _ = _built([*CLASSIFICATION, "task=supervised", "task.network=teacher"])
    classification = [*CLASSIFICATION, f"teacher.ckpt={_write_checkpoint(built.module, root / 'teacher.ckpt')}"]
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "faces" / f"id{i}").mkdir(parents=True)
        for j in range(4):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "faces" / f"id{i}" / f"{j}.png")
    nets = [f"{role}.{key}" for role in ("teacher", "student") for key in
            ("name=cnn_tiny", "kwargs.embedding_size=16", f"kwargs.input_size=[{SIZE},{SIZE}]")]
    face = ["data=face_folder", f"data.root={root / 'faces'}", f"data.image_size={SIZE}", "data.val_identities=2",
            "data.num_val_pairs=8", "data.num_workers=0", "data.batch_size=8", "pair=iresnet18_mobilefacenet",
            *nets, "checkpoint.monitor=val/verif_acc"]
    built, _ = _built([*face, "task=face", "task.network=teacher"])
    face = [*face, f"teacher.ckpt={_write_checkpoint(built.module, root / 'face_teacher.ckpt')}"]
    return {"distill": classification, "face_distill": face}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_distill_preset_builds_with_real_networks_and_steps(preset, teachers):
    task = preset_task(preset)
    built, dm = _built([*teachers[task], f"task={task}", f"distill={preset}"])
    module = quiet(built.module)
    module.train()
    loss = module.training_step(next(iter(dm.train_dataloader())), 0)
    assert torch.isfinite(loss)
    loss.backward()


LAYER_KEYS = ("student_layer", "student_layers", "teacher_layer", "teacher_layers")


@pytest.mark.parametrize("preset", [p for p in PRESETS if any(
    set(LAYER_KEYS) & set(distiller_parameters(distiller_class(m))) for m in preset_methods(p))])
def test_a_wrong_layer_name_in_a_preset_fails_when_the_run_is_built(preset, teachers):
    method = next(m for m in preset_methods(preset) if set(LAYER_KEYS) & set(distiller_parameters(distiller_class(m))))
    key = next(k for k in LAYER_KEYS if k in distiller_parameters(distiller_class(method)))
    prefix = "distill" if method == preset_methods(preset)[method].get("method") else f"distill.mix.{method}"
    value = "[no_such_layer]" if key.endswith("s") else "no_such_layer"
    task = preset_task(preset)
    with pytest.raises(ConfigError, match=r"layer 'no_such_layer' is not a module of"):
        _built([*teachers[task], f"task={task}", f"distill={preset}", f"{prefix}.{key}={value}"])


# ------------------------------------------------------------------------------------------- registries as documented
@pytest.fixture
def scratch_models(monkeypatch):
    """The model registry, restored after the test."""
    monkeypatch.setattr(model_registry, "_MODELS", dict(model_registry._MODELS))


class _Tiny(nn.Module):
    classifier_path = "fc"

    def __init__(self, num_classes: int = 3, in_chans: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(in_chans, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_register_model_works_bare_and_with_a_name(scratch_models):
    @register_model
    def contract_tiny(num_classes, in_chans=3, **_):
        return _Tiny(num_classes, in_chans)

    assert callable(contract_tiny) and contract_tiny.__name__ == "contract_tiny"  # the factory, not a decorator
    assert registered_models()["contract_tiny"] is contract_tiny
    assert build_model("contract_tiny", num_classes=5)(torch.randn(2, 3, 8, 8)).shape == (2, 5)

    @register_model("contract_named", embedding=True)
    def other(num_classes, in_chans=3, **_):
        return _Tiny(num_classes, in_chans)

    assert registered_models()["contract_named"] is other and "other" not in registered_models()
    assert is_embedding_model("contract_named") and not is_embedding_model("contract_tiny")

    @register_model()
    def contract_empty_call(num_classes, in_chans=3, **_):
        return _Tiny(num_classes, in_chans)

    assert registered_models()["contract_empty_call"] is contract_empty_call
    register_model(_Tiny)  # a class, bare
    assert registered_models()["_Tiny"] is _Tiny
    with pytest.raises(ValueError, match="'contract_tiny' is already registered"):
        register_model("contract_tiny")(other)
    with pytest.raises(TypeError, match="a model name"):
        register_model(3)


def test_register_distiller_is_used_bare_and_says_so_otherwise():
    with pytest.raises(TypeError, match="@register_distiller takes no arguments"):
        register_distiller("my_method")
    with pytest.raises(TypeError, match="@register_distiller takes no arguments"):
        register_distiller()
    assert issubclass(distiller_class("nst"), Distiller)

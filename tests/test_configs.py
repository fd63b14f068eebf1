"""Every experiment config builds: its datamodule, its task's LightningModule and its optimizer, without training.

Each conf/experiment/**/*.yaml is composed as kdx-train (or, for a pipeline, each of its stages as kdx-pipeline
composes them), checked by kdx.tasks.validate_config, and instantiated: the datamodule set up, the module built
by the task, the optimizer built over the module's parameter groups. Data that would come from elsewhere is made
small and local (tiny Fashion-MNIST IDX files, a tiny class folder), a hub-pretrained teacher reads a local
weights file, and a teacher checkpoint is written by the teacher's own module, as a finished run would.
Also here: the learning-rate schedule (lr_factor) against its formula.
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF, compose_train
from kdx.configs import build_datamodule, to_dict
from kdx.data.face_formats import write_verification_bin
from kdx.data.pack import pack_identity_folder
from kdx.errors import ConfigError
from kdx.lit import ClassifierModule
from kdx.lit.optim import build_optimizer, lr_factor
from kdx.models import build_model
from kdx.tasks import Built, available_tasks, build_network, model_spec, task_class, validate_config

EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml"))


def is_pipeline(name: str) -> bool:
    return "pipeline:" in (CONF / "experiment" / f"{name}.yaml").read_text()


# --------------------------------------------------------------------------- small local stand-ins for real data
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict[str, Path]:
    """Tiny Fashion-MNIST IDX files, a tiny class folder, and a local copy of resnet18-shaped weights."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    fmnist = root / "fmnist"
    fmnist.mkdir()
    for split, n in (("train", 60), ("t10k", 20)):
        _write_idx(fmnist / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(fmnist / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    folder = root / "folder"
    for c in ("cat", "dog", "owl"):
        (folder / c).mkdir(parents=True)
        for j in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / c / f"{j}.png")
    faces = root / "faces"
    for i in range(8):
        (faces / f"id{i}").mkdir(parents=True)
        for j in range(4):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(faces / f"id{i}" / f"{j}.png")
    pack_identity_folder(faces, root / "rec")
    write_verification_bin(root / "rec" / "val.bin", rng.integers(0, 255, (8, 3, 24, 24), dtype=np.uint8),
                           [True, False, True, False])
    weights = root / "resnet18.pt"
    torch.save(build_model("tv:resnet18", num_classes=1000).state_dict(), weights)
    return {"fmnist": fmnist, "folder": folder, "faces": faces, "rec": root / "rec", "weights": weights}


def local_overrides(cfg, data: dict[str, Path]) -> list[str]:
    """Overrides that point a composed config at the local stand-ins."""
    out = []
    target = str(cfg.data.get("_target_", ""))
    if target.endswith("FashionMNISTDataModule"):
        out += [f"data.root={data['fmnist']}", "data.download=false", "data.val_size=10"]
    if target.endswith("ImageFolderDataModule"):
        out += [f"data.root={data['folder']}", "data.image_size=32", "data.num_workers=0"]
    if target.endswith(".FaceFolderDataModule"):
        out += [f"data.root={data['faces']}", "data.val_identities=2", "data.num_val_pairs=8", "data.num_workers=0"]
    if target.endswith("FaceRecordDataModule"):
        out += [f"data.rec_dir={data['rec']}", f"data.val_bin={data['rec'] / 'val.bin'}", "data.num_workers=0"]
    if cfg.teacher.get("pretrained") is True:
        out.append(f"teacher.pretrained={data['weights']}")
    return out


def write_teacher_checkpoint(cfg, dm, path: Path) -> Path:
    """A kdx checkpoint of the config's classification teacher, written by its ClassifierModule's own hook."""
    net, meta = build_network(model_spec(cfg, "teacher"), dm.num_classes, dm.in_chans)
    module = ClassifierModule(net, dm.num_classes, model_meta={**meta, "class_names": list(dm.class_names)})
    return save_module(module, path)


def save_module(module, path: Path) -> Path:
    """What a finished run's best.ckpt holds: the state dict and the module's kdx metadata."""
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def instantiate(overrides: list[str], data: dict[str, Path], tmp_path: Path, teacher_ckpt: Path | None = None) -> Built:
    """Compose kdx-train with `overrides`, check it, and build datamodule, module and optimizer."""
    cfg = compose_train(overrides)
    cfg = compose_train([*overrides, *local_overrides(cfg, data)])
    task = task_class(cfg.task.name)
    needs_teacher = task.distills or cfg.task.name == "probe"
    if needs_teacher and not (cfg.teacher.get("ckpt") or cfg.teacher.get("onnx") or cfg.teacher.get("pretrained")):
        if teacher_ckpt is None:
            dm = build_datamodule(cfg.data)
            dm.setup("fit")
            teacher_ckpt = write_teacher_checkpoint(cfg, dm, tmp_path / "teacher.ckpt")
        cfg = compose_train([*overrides, *local_overrides(cfg, data), f"teacher.ckpt={teacher_ckpt}"])
    task = validate_config(cfg)
    dm = build_datamodule(cfg.data, task.data_options())  # as kdx-train builds it: the run's view settings
    dm.setup("fit")
    built = task.create(dm)
    assert built.params["network"] > 0 and all(n > 0 for n in built.params.values())
    optimizer = build_optimizer(built.module.parameter_groups(), to_dict(cfg.optim))
    assert type(optimizer).__name__ == cfg.optim._target_.rsplit(".", 1)[-1]
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained and trained <= {id(p) for p in built.module.parameters()}
    return built


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_instantiates(name, local_data, tmp_path):
    if not is_pipeline(name):
        built = instantiate([f"experiment={name}"], local_data, tmp_path)
        assert built.module.__class__.__name__.endswith("Module")
        return
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=[f"experiment={name}"])
    pipe = cfg.pipeline
    teacher_stage = pipe.get("teacher_stage", "teacher")  # null: the distill stages bring their own teacher
    assert pipe.stages and (teacher_stage is None or teacher_stage in pipe.stages)
    teacher_ckpt = None
    for stage, stage_overrides in pipe.stages.items():  # in order, as kdx-pipeline runs them
        built = instantiate(list(stage_overrides), local_data, tmp_path, teacher_ckpt)
        if stage == teacher_stage:
            teacher_ckpt = save_module(built.module, tmp_path / f"{stage}.ckpt")


@pytest.mark.parametrize("overrides", [
    ["experiment=orl/face_kd", "distill=face_mse"],
    ["experiment=orl/face_kd", "distill=face_adadistill"],
    ["task=face", "data=orl", "pair=iresnet18_mobilefacenet", "task.margin.kind=cosface"],
    ["task=face", "data=face_folder", "pair=iresnet18_mobilefacenet"],
    ["task=face", "data=face_rec", "pair=sface_mobilefacenet"],
    ["experiment=synthetic/teacher", "optim=adamw_cosine"],
    ["experiment=synthetic/teacher", "optim=sgd_step", "task=transfer", "task.network=teacher"],
])
def test_config_groups_instantiate(overrides, local_data, tmp_path):
    built = instantiate(overrides, local_data, tmp_path)
    if "task.margin.kind=cosface" in overrides:
        assert built.module.head.m3 == 0.4 and built.module.head.m2 == 0.0


def test_every_task_has_a_config_and_a_schema():
    files = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    assert files == available_tasks()
    for name in files:
        cfg = OmegaConf.to_container(compose_train([f"task={name}"]).task)
        options = task_class(name).Options(**cfg)  # every key of the YAML is a field of the task's schema
        assert options.name == name


def test_unknown_task_and_unknown_task_key_are_one_sentence():
    with pytest.raises(ConfigError, match=r"task.name must be one of distill, face, .*got 'distil' \(did you mean distill"):
        validate_config(compose_train(["task.name=distil"]))
    with pytest.raises(ConfigError, match=r"task.label_smothing is not a key of task=supervised; did you mean "
                                          r"task.label_smoothing"):
        validate_config(compose_train(["+task.label_smothing=0.1"]))
    with pytest.raises(ConfigError, match=r"data.batch_szie is not a parameter of the datamodule "
                                          r"kdx.data.SyntheticDataModule; did you mean data.batch_size"):
        validate_config(compose_train(["+data.batch_szie=8"]))
    with pytest.raises(ConfigError, match=r"optim.momentum is not a parameter of torch.optim.AdamW"):
        validate_config(compose_train(["optim=adamw_cosine", "+optim.momentum=0.9"]))


def test_optimizer_comes_from_its_target_with_per_group_lr_scales():
    net = torch.nn.Linear(3, 2)
    opt = build_optimizer([{"params": [net.weight]}, {"params": [net.bias], "lr_scale": 0.1}],
                          {"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9, "schedule": "cosine",
                           "warmup_epochs": 1.0})
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.05)]
    with pytest.raises(ConfigError, match=r"optim._target_='torch.optim.Nope' is not an importable class"):
        build_optimizer([{"params": [net.weight]}], {"_target_": "torch.optim.Nope", "lr": 0.1})
    with pytest.raises(ConfigError, match=r"optim._target_='torch.nn.Linear' is not a torch.optim.Optimizer"):
        build_optimizer([{"params": [net.weight]}], {"_target_": "torch.nn.Linear", "lr": 0.1})


# --------------------------------------------------------------------------- the learning-rate schedule
def test_lr_factor_warmup_then_cosine_to_its_floor():
    total, warm = 110, 10
    assert [lr_factor(s, total, warm) for s in (0, 4, 9)] == [pytest.approx(0.1), pytest.approx(0.5), 1.0]
    assert lr_factor(10, total, warm) == 1.0  # the first step after warmup starts the cosine at its top
    assert lr_factor(60, total, warm) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(85, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(110, total, warm, min_lr_ratio=0.1) == pytest.approx(0.1)  # the floor at the end
    assert lr_factor(500, total, warm, min_lr_ratio=0.1) == pytest.approx(0.1)  # and after it
    assert lr_factor(60, total, warm, min_lr_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_lr_factor_step_and_constant():
    kw = dict(total_steps=100, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(s, **kw) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(3, 100, warmup_steps=4, schedule="step") == 1.0  # the last warmup step reaches the base lr
    assert lr_factor(37, 100, schedule="constant") == 1.0
    assert lr_factor(1, 100, warmup_steps=4, schedule="constant") == 0.5
    with pytest.raises(ConfigError, match="optim.schedule must be cosine, step or constant, got 'linear'"):
        lr_factor(10, 100, schedule="linear")

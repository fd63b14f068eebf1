"""The distiller machinery: registry, config sections, layer taps on kdx/torchvision/timm nets, errors, hosts."""
from __future__ import annotations

import re
import textwrap

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from kdx.data import SyntheticDataModule
from kdx.distill import (LayerTaps, available_distillers, build_distiller, build_distiller_set, resolve_layer,
                         split_distill_config)
from kdx.errors import ConfigError
from kdx.lit import DistillationModule
from kdx.models import build_model
from kdx.models import feature_stages

from conftest import compose_train

OPTIM = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
         "schedule": "constant"}


def test_registry_lists_the_methods_of_each_task():
    classification = available_distillers("classification")
    assert {"kd", "dkd", "dist", "mse", "bce"} <= set(classification)
    assert "dkd" not in available_distillers("face")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"distill.method='dkdd'.*did you mean dkd.*known methods: .*bce.*kd"):
        build_distiller_set({"method": "dkdd"})


def test_unknown_parameter_is_named_with_its_nearest_spelling():
    with pytest.raises(ConfigError, match=r"distill.temprature is not a parameter of .*'kd'.*did you mean temperature"):
        build_distiller_set({"method": "kd", "temprature": 4})
    with pytest.raises(ConfigError, match=r"distill.mix.dkd.betta .*did you mean beta"):
        build_distiller_set({"method": "kd", "mix": {"dkd": {"weight": 1, "betta": 2}}})


def test_a_method_of_another_task_is_refused():
    with pytest.raises(ConfigError, match="'dkd' is for classification tasks, not face"):
        build_distiller_set({"method": "dkd"}, task="face")


def test_config_section_splits_into_primary_method_and_mix():
    entries = split_distill_config({"method": "dkd", "weight": 2.0, "alpha": 0.5, "beta": 6.0, "save_teacher": False,
                                    "mix": {"kd": {"weight": 0.5, "temperature": 2.0}, "mse": 0.1}})
    assert entries == [("dkd", 2.0, {"beta": 6.0}, "distill"), ("kd", 0.5, {"temperature": 2.0}, "distill.mix.kd"),
                       ("mse", 0.1, {}, "distill.mix.mse")]
    with pytest.raises(ConfigError, match="distill.weight must be a finite number"):
        split_distill_config({"method": "kd", "weight": float("nan")})


def test_every_preset_composes_and_builds_its_methods():
    import pathlib

    presets = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "conf" / "distill").glob("[!_]*.yaml"))
    assert len(presets) >= 5
    for name in presets:
        cfg = compose_train([f"distill={name}"])
        section = OmegaConf.to_container(cfg.distill, resolve=True)
        assert section.pop("teacher_cache")["mode"] == "off", name
        task = "face" if name.startswith("face") else "classification"
        for key in ("alpha", "save_teacher"):
            section.pop(key, None)
        distillers = build_distiller_set(section, task=task)
        assert len(distillers.methods) >= 1, name


def test_dkd_preset_exposes_beta_at_the_top_of_the_section():
    cfg = compose_train(["distill=dkd", "distill.beta=2"])
    distillers = build_distiller_set({k: v for k, v in dict(cfg.distill).items() if k not in ("alpha", "save_teacher")})
    assert distillers.methods["dkd"].beta == 2.0


@pytest.mark.parametrize("name,layers", [
    ("resnet20", ["layer1", "layer2", "layer3"]),
    ("cnn_small", ["features.2", "features.5"]),
    ("tv:resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    ("timm:resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"]),
])
def test_stages_and_taps_work_on_kdx_torchvision_and_timm_networks(name, layers):
    net = build_model(name, 10, in_chans=1 if name == "cnn_small" else 3).eval()
    assert feature_stages(net) == layers
    taps = LayerTaps(net, layers[-2:], input_paths=["fc"])
    x = torch.randn(2, net.fc.in_features and (1 if name == "cnn_small" else 3), 28, 28)
    with torch.no_grad(), taps.recording():
        logits = net(x)
    outputs, inputs = taps.take()
    assert list(outputs) == layers[-2:] and all(v.ndim == 4 and v.shape[0] == 2 for v in outputs.values())
    assert torch.allclose(net.fc(inputs["fc"]), logits, atol=1e-5)
    with torch.no_grad():
        net(x)
    assert not taps.outputs  # hooks record only while asked to
    taps.remove()


def test_timm_transformer_blocks_can_be_tapped():
    net = build_model("timm:vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=2).eval()
    taps = LayerTaps(net, ["blocks.1"])
    with torch.no_grad(), taps.recording():
        net(torch.randn(2, 3, 32, 32))
    assert taps.take()[0]["blocks.1"].shape == (2, 17, 192)


def test_a_layer_path_not_in_the_model_lists_the_nearest_names():
    net = build_model("resnet20", 10)
    with pytest.raises(ConfigError, match=r"student layer 'layer4' is not a module of CifarResNet; nearest names: layer3, layer2, layer1"):
        resolve_layer(net, "layer4")
    with pytest.raises(ConfigError, match=r"teacher layer 'layer2.9' .*nearest names: layer2.2, layer2.1, layer2.0"):
        resolve_layer(net, "layer2.9", role="teacher")


def test_a_tapped_output_changed_in_place_is_an_error():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(inplace=True))
    taps = LayerTaps(net, ["0"])
    with taps.recording():
        net(torch.randn(1, 1, 5, 5))
    with pytest.raises(ConfigError, match="layer '0' was modified in place.*tap the next module"):
        taps.take()


def test_dkd_warmup_ramps_the_loss_linearly():
    d = build_distiller("dkd", {"warmup_epochs": 4})
    torch.manual_seed(0)
    batch = {"student_logits": torch.randn(3, 5), "teacher_logits": torch.randn(3, 5) * 3, "labels": torch.tensor([0, 3, 1])}
    full = d({**batch, "epoch": 10})["dkd"]
    assert d({**batch, "epoch": 0})["dkd"].item() == pytest.approx(full.item() / 4, rel=1e-6)
    assert d({**batch, "epoch": 2})["dkd"].item() == pytest.approx(full.item() * 3 / 4, rel=1e-6)


MY_METHOD = '''
import torch
from kdx.distill import Distiller, register_distiller


@register_distiller
class CosineLogits(Distiller):
    """1 - cosine similarity of student and teacher logits (a method written outside kdx)."""

    name = "cosine_logits"
    needs = frozenset({"logits"})

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, batch):
        cos = torch.nn.functional.cosine_similarity(batch["student_logits"], batch["teacher_logits"], dim=1)
        return {"cosine_logits": self.scale * (1 - cos).mean()}
'''


def test_a_new_logit_method_is_one_file_plus_one_yaml(tmp_path, monkeypatch, synthetic_teacher):
    """A user's own method: a Python file on the path and a preset YAML in a config folder of their own."""
    from kdx.train import run_training

    (tmp_path / "my_methods.py").write_text(textwrap.dedent(MY_METHOD))
    (tmp_path / "conf" / "distill").mkdir(parents=True)
    (tmp_path / "conf" / "distill" / "cosine.yaml").write_text(
        "method: my_methods.CosineLogits\nweight: 1.0\nalpha: 0.5\nscale: 3.0\nsave_teacher: false\nmix: {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "distill=cosine",
                         f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "trainer.max_epochs=1",
                         "trainer.progress_bar=none", "trainer.log_every_n_steps=1"])
    results = run_training(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["hparams"]["method"] == "my_methods.CosineLogits"
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss_cosine_logits" in header


@pytest.fixture(scope="module")
def data():
    dm = SyntheticDataModule(num_classes=4, image_size=16, train_size=128, batch_size=32)
    dm.setup()
    return dm


def test_distillers_parts_are_optimised_checkpointed_and_left_out_of_the_student(data, tmp_path):
    """A method with trainable parts (FitNet's regressor, here via mix): optimizer, checkpoint, load_network."""
    if "fitnet" not in available_distillers():
        pytest.skip("fitnet not registered")
    from kdx.checkpoints import load_network

    teacher = build_model("resnet8", 4).eval()
    student = build_model("cnn_tiny", 4, in_chans=3)
    module = DistillationModule(student, teacher, 4, distill={"method": "kd", "mix": {"fitnet": {"weight": 10.0}}},
                                example_input=torch.randn(2, 3, 16, 16), optim=OPTIM,
                                model_meta={"model_name": "cnn_tiny", "in_chans": 3})
    extra = list(module.distillers.parameters())
    assert extra, "fitnet builds a regressor"
    optimised = {id(p) for g in module.parameter_groups() for p in g["params"]}
    assert all(id(p) in optimised for p in extra)
    assert not optimised & {id(p) for p in teacher.parameters()}
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    state = torch.load(tmp_path / "s.ckpt", weights_only=False)["state_dict"]
    keys = [k for k in state if k.startswith("distillers.methods.fitnet.")]
    assert keys and all(torch.equal(state[k], module.state_dict()[k]) for k in keys)
    net, meta = load_network(tmp_path / "s.ckpt")
    assert set(net.state_dict()) == set(student.state_dict())


def test_method_needing_sample_indices_on_a_datamodule_without_them_says_so():
    from kdx.distill import require_sample_indices

    class Plain:
        pass

    class NeedsIndices:
        needs = {"indices"}

    class Set:
        needs = {"indices", "embedding"}
        methods = {"crd": NeedsIndices()}

    with pytest.raises(ConfigError, match="method 'crd' needs sample indices, but Plain gives none"):
        require_sample_indices(Plain(), Set())
    dm = SyntheticDataModule(num_classes=4, image_size=8, train_size=16, batch_size=8)
    dm.setup()
    require_sample_indices(dm, Set())
    _b = next(iter(dm.train_dataloader()))
    x, y, idx = _b["images"], _b["labels"], _b["index"]
    assert idx.shape == y.shape and len(set(idx.tolist())) == len(idx)
    assert torch.equal(dm.train_set[int(idx[0])][0], x[0])


def test_a_host_missing_an_output_is_named_with_the_reason():
    from kdx.distill import build_distiller_set
    methods = build_distiller_set({"method": "kd", "mix": {"crd": {}}})
    with pytest.raises(ConfigError, match=r"^distillation method 'crd' needs embedding, indices, but my host gives no "
                                          r"embedding; my host gives no indices$"):
        methods.check_support({"logits"}, "my host")
    with pytest.raises(ConfigError, match=r"needs embedding, indices, but the teacher has no head; my host gives no "
                                          r"indices$"):
        methods.check_support({"logits"}, "my host", why={"embedding": "the teacher has no head"})
    methods.check_support({"logits", "embedding", "indices"}, "my host")


INF = float("inf")
# method, parameter, values accepted (parameter value -> attribute value), values refused, the message's start
BOUNDS = [
    ("at", "p", {0.5: 0.5, 2: 2.0}, [0, -1.0, True, INF, "2"], "distill.p must be a power > 0"),
    ("crd", "feat_dim", {1: 1, 64: 64}, [0, True, 1.5], "distill.feat_dim must be a whole number >= 1"),
    ("crd", "nce_k", {1: 1}, [0, False, 2.0], "distill.nce_k must be a whole number >= 1"),
    ("crd", "nce_t", {0.01: 0.01}, [0, True, INF, -0.1], "distill.nce_t must be a temperature > 0"),
    ("crd", "nce_momentum", {0: 0.0, 1: 1.0, 0.5: 0.5}, [True, -0.1, 1.01], "distill.nce_momentum must be a number"),
    ("reviewkd", "mid_channels", {1: 1, None: None}, [0, True, 1.5], "distill.mid_channels must be a whole number"),
    ("reviewkd", "warmup_epochs", {0: 0.0, 2.5: 2.5}, [-1, True, INF], "distill.warmup_epochs must be a number >= 0"),
    ("rkd", "distance_weight", {0: 0.0, 0.5: 0.5}, [-1.0, True, INF, "1"], "distill.distance_weight must be a finite"),
    ("rkd", "angle_weight", {0: 0.0, 0.25: 0.25}, [-0.5, False, INF], "distill.angle_weight must be a finite"),
    ("vid", "eps", {1e-9: 1e-9}, [0, True, -1e-5, INF], "distill.eps must be a number > 0"),
    ("vid", "mid_ratio", {0.25: 0.25}, [0, True, INF], "distill.mid_ratio must be a number > 0 (the reference uses 1)"),
]


@pytest.mark.parametrize("method, key, good, bad, message", BOUNDS, ids=[f"{m}.{k}" for m, k, *_ in BOUNDS])
def test_method_settings_at_their_bounds(method, key, good, bad, message):
    for value, stored in good.items():
        assert getattr(build_distiller(method, {key: value}), key) == stored
    for value in bad:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            build_distiller(method, {key: value})


def test_method_defaults_are_the_papers():
    assert build_distiller("at").p == 2.0
    assert build_distiller("reviewkd").warmup_epochs == 0.0
    d = build_distiller("adadistill")
    assert (d.margin_type, d.margin, d.scale) == ("arcface", 0.45, 64.0)


@pytest.mark.parametrize("name", ["fitnet", "crd", "vid", "reviewkd"])
def test_a_method_with_trainable_parts_refuses_to_run_before_setup(name):
    with pytest.raises(RuntimeError, match=r"\.setup\(\) has not been called"):
        build_distiller(name)({})


def test_a_zero_weight_entry_is_left_out_and_the_rest_is_built():
    from kdx.distill import build_distiller_set
    built = build_distiller_set({"method": "kd", "weight": 0, "mix": {"dkd": 1.0, "mse": 0.5}})
    assert list(built.methods) == ["dkd", "mse"] and built.weights == {"dkd": 1.0, "mse": 0.5}


def test_distill_section_errors_name_the_key():
    from kdx.distill import build_distiller_set
    with pytest.raises(ConfigError, match=r"^distill.temperature is set but distill.method is empty"):
        build_distiller_set({"method": None, "temperature": 4.0, "alpha": 0.5})
    build_distiller_set({"method": None, "alpha": 0.5, "mix": {"kd": 1.0}})  # host keys alone are fine
    with pytest.raises(ConfigError, match=r"^distill.mix.nosuch='nosuch' is not a known distillation method"):
        build_distiller_set({"method": "kd", "mix": {"nosuch": 1.0}})
    for weight in (True, "1", float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=r"^distill.mix.dkd.weight must be a finite number"):
            build_distiller_set({"method": "kd", "mix": {"dkd": {"weight": weight}}})
    with pytest.raises(ConfigError, match=r"^distill.weight must be a finite number"):
        build_distiller_set({"method": "kd", "weight": True})


def test_raw_and_weighted_terms_are_logged_under_names_that_say_which():
    """One place weighs: train/loss_<term> = alpha x weight x train/raw_<term>; the hard term takes 1 - alpha."""
    from kdx.lit import DistillationModule
    from kdx.models import build_model

    torch.manual_seed(0)
    teacher, student = build_model("cnn_tiny", 4, in_chans=3), build_model("cnn_tiny", 4, in_chans=3)
    module = DistillationModule(student, teacher, 4, distill={"method": "kd", "weight": 0.5, "mix": {"mse": {"weight": 2.0}}},
                                alpha=0.8)
    logged = {}
    module.log = lambda name, value, **k: logged.__setitem__(name, float(value))
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    total = module.training_step({"images": x, "labels": y, "index": torch.arange(6)}, 0)
    assert logged["train/loss_kd"] == pytest.approx(0.8 * 0.5 * logged["train/raw_kd"], rel=1e-6)
    assert logged["train/loss_mse"] == pytest.approx(0.8 * 2.0 * logged["train/raw_mse"], rel=1e-6)
    assert logged["train/loss_ce"] == pytest.approx(0.2 * logged["train/raw_ce"], rel=1e-6)
    assert float(total) == pytest.approx(logged["train/loss_kd"] + logged["train/loss_mse"] + logged["train/loss_ce"],
                                         rel=1e-6)

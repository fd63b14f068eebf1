"""The `distill` section's host keys (kdx/distill/settings.py), the presets' shared base (conf/distill/_base.yaml)
and the trainer configs' shared base (conf/trainer/_base.yaml).

- the schema: one default per key (alpha's per task kind), the split of a section into (checked host settings, the
  methods' section), and one ConfigError naming the key for each bad value;
- conf/distill/_base.yaml writes out the schema's defaults, every preset inherits it and repeats none of them;
- every preset, every distilling experiment (and pipeline stage) and every trainer config composes to exactly the
  section it composed to before the bases existed: tests/distill_settings_composed.json, recorded from the configs
  as they were (a deliberate change to a preset's values updates that file);
- a user's preset of two lines gets every host key and takes `distill.teacher_cache.mode=memory`, from a folder on
  hydra.searchpath and from a file under conf/distill, through Hydra and through kdx-train.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, compose_train, run_cli
from kdx.distill.cache import check_cache_config
from kdx.distill.settings import (ALPHA_DEFAULTS, HOST_KEYS, NOT_PARAMETERS, DistillSettings, TeacherCacheSettings,
                                  alpha_default, base_section, check_settings, split_distill_section)
from kdx.errors import ConfigError

RECORDED = json.loads((Path(__file__).parent / "distill_settings_composed.json").read_text())
PRESETS = sorted(p.stem for p in (CONF / "distill").glob("*.yaml") if not p.stem.startswith("_"))
TWO_LINES = "method: kd\ntemperature: 2\n"


def kind_of(task: str) -> str:
    return "face" if task.startswith("face") else "classification"


# ------------------------------------------------------------------------------------------------ the schema
def test_each_host_key_has_one_default():
    assert HOST_KEYS == ("alpha", "save_teacher", "teacher_cache")
    assert NOT_PARAMETERS == {"method", "weight", "mix", "alpha", "save_teacher", "teacher_cache"}
    assert dataclasses.asdict(DistillSettings()) == {
        "alpha": None, "save_teacher": False,
        "teacher_cache": {"mode": "off", "dir": None, "views": None, "topk": None}}
    assert ALPHA_DEFAULTS == {"classification": 0.9, "face": 0.5}
    assert alpha_default("classification") == 0.9 and alpha_default("face") == 0.5
    with pytest.raises(ValueError, match="task kind must be one of classification, face, got 'faces'"):
        alpha_default("faces")
    assert base_section() == {"weight": 1.0, "alpha": None, "save_teacher": False, "mix": {},
                              "teacher_cache": {"mode": "off", "dir": None, "views": None, "topk": None}}


def test_a_section_splits_into_checked_host_settings_and_the_methods_section():
    section = {"method": "dkd", "weight": 2.0, "beta": 6.0, "warmup_epochs": 3, "mix": {"kd": {"weight": 0.5}},
               "alpha": 0.5, "save_teacher": True, "teacher_cache": {"mode": "disk", "dir": "/tmp/c", "views": 2}}
    host, methods = split_distill_section(section)
    assert host == DistillSettings(alpha=0.5, save_teacher=True,
                                   teacher_cache=TeacherCacheSettings(mode="disk", dir="/tmp/c", views=2))
    assert methods == {"method": "dkd", "weight": 2.0, "beta": 6.0, "warmup_epochs": 3, "mix": {"kd": {"weight": 0.5}}}
    assert section["alpha"] == 0.5  # the caller's mapping is left as it was
    assert host.teacher_cache.as_dict() == {"mode": "disk", "dir": "/tmp/c", "views": 2, "topk": None}
    # what the cache reads: the same settings, nothing added or changed
    assert check_cache_config(host.teacher_cache.as_dict()) == host.teacher_cache.as_dict()


@pytest.mark.parametrize("kind", ["classification", "face"])
def test_a_missing_or_null_alpha_is_the_task_kinds_default(kind):
    for section in ({"method": "kd"}, {"method": "kd", "alpha": None}):
        host, methods = split_distill_section(section, kind)
        assert host.alpha == ALPHA_DEFAULTS[kind] and isinstance(host.alpha, float)
        assert methods == {"method": "kd"}
    host, _ = split_distill_section({"method": "kd", "alpha": 1}, kind)
    assert host.alpha == 1.0 and isinstance(host.alpha, float)


def test_an_omegaconf_node_and_the_teacher_caches_short_forms_are_read():
    host, methods = split_distill_section(OmegaConf.create({"method": "kd", "teacher_cache": {"mode": "MEMORY"}}))
    assert host.teacher_cache.mode == "memory" and methods == {"method": "kd"}
    for given, mode in ((None, "off"), (False, "off"), (True, "memory"), ("disk", "disk"), ({"mode": None}, "off"),
                        ({"mode": False}, "off"), ({}, "off")):
        assert check_settings({"teacher_cache": given}).teacher_cache.mode == mode, given
    assert split_distill_section(None) == (DistillSettings(alpha=0.9), {})


@pytest.mark.parametrize("host,message", [
    ({"alpha": 1.5}, r"^distill\.alpha must be a number in \[0, 1\], got 1\.5$"),
    ({"alpha": -0.1}, r"^distill\.alpha must be a number in \[0, 1\], got -0\.1$"),
    ({"alpha": "high"}, r"^distill\.alpha must be a number, got 'high'$"),
    ({"alpha": True}, r"^distill\.alpha must be a number, got True$"),
    ({"save_teacher": "yes"}, r"^distill\.save_teacher must be true or false, got 'yes'$"),
    ({"teacher_cache": {"mode": "mem"}}, r"^distill\.teacher_cache\.mode must be one of off, memory, disk, got 'mem'$"),
    ({"teacher_cache": {"views": 0}}, r"^distill\.teacher_cache\.views must be a whole number >= 1, got 0$"),
    ({"teacher_cache": {"topk": 2.5}}, r"^distill\.teacher_cache\.topk must be a whole number >= 1, got 2\.5$"),
    ({"teacher_cache": {"dir": [1]}}, r"^distill\.teacher_cache\.dir must be a text or null, got \[1\]$"),
    ({"teacher_cache": {"moed": "disk"}}, r"^distill\.teacher_cache\.moed is not a key of distill\.teacher_cache; "
                                          r"did you mean distill\.teacher_cache\.mode\?$"),
    ({"teacher_cache": [1, 2]}, r"^distill\.teacher_cache must be a mapping of mode, dir, views and topk, got \[1, 2\]"),
    ({"alpah": 0.5}, r"^distill\.alpah is not a key of the distill host settings .*did you mean distill\.alpha\?$"),
])
def test_a_bad_host_value_is_one_sentence_naming_its_key(host, message):
    with pytest.raises(ConfigError, match=message):
        split_distill_section({"method": "kd", **host}) if "alpah" not in host else check_settings(host)


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"^the distill section must be a mapping of keys, got \['kd'\]"):
        split_distill_section(["kd"])
    with pytest.raises(ValueError, match="task kind must be one of"):
        split_distill_section({"method": "kd", "alpha": 5}, "detection")  # the caller's mistake, told first


# ----------------------------------------------------------------------------------------- the YAML bases
def test_the_base_preset_writes_out_the_schemas_defaults():
    base = OmegaConf.to_container(OmegaConf.load(CONF / "distill" / "_base.yaml"))
    assert base == base_section()
    # kept for presets of one's own written before _base.yaml (defaults: [teacher_cache: default, _self_])
    old = OmegaConf.to_container(OmegaConf.load(CONF / "distill" / "teacher_cache" / "default.yaml"))
    assert old == dataclasses.asdict(TeacherCacheSettings())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_inherits_the_base_and_states_only_what_differs(preset):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "distill" / f"{preset}.yaml"))
    assert raw.pop("defaults") == ["_base", "_self_"], preset
    assert raw.get("method"), preset
    base = base_section()
    for key in ("save_teacher", "mix", "teacher_cache"):  # a copy of a base value would hide which values differ
        assert key not in raw or raw[key] != base[key], f"{preset} repeats {key}: {raw[key]!r} of _base.yaml"
    assert raw.get("alpha") is not None, f"{preset} should state its alpha (the base leaves it to the task kind)"


def test_every_preset_is_recorded():
    assert sorted(RECORDED["presets"]) == PRESETS


@pytest.mark.parametrize("preset", sorted(RECORDED["presets"]))
def test_every_preset_composes_to_the_section_it_composed_to_before(preset):
    recorded = RECORDED["presets"][preset]
    section = OmegaConf.to_container(compose_train([f"task={recorded['task']}", f"distill={preset}"]).distill,
                                     resolve=True)
    assert section == recorded["distill"]
    host, methods = split_distill_section(section, kind_of(recorded["task"]))
    assert host.alpha == recorded["distill"]["alpha"] and set(methods) >= {"method", "weight", "mix"}


@pytest.mark.parametrize("name", sorted(RECORDED["experiments"]))
def test_every_distilling_experiment_composes_to_the_section_it_composed_to_before(name):
    recorded = RECORDED["experiments"][name]
    section = OmegaConf.to_container(compose_train(recorded["overrides"]).distill, resolve=True)
    assert section == recorded["distill"]


@pytest.mark.parametrize("name", sorted(RECORDED["trainers"]))
def test_every_trainer_config_composes_to_the_section_it_composed_to_before(name):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / f"{name}.yaml"))
    assert raw["defaults"] == ["_base", "_self_"]
    base = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "_base.yaml"))
    assert not {k for k, v in raw.items() if base.get(k, object()) == v}, f"trainer/{name} repeats _base.yaml"
    assert OmegaConf.to_container(compose_train([f"trainer={name}"]).trainer) == RECORDED["trainers"][name]


# ------------------------------------------------------------------------------ a preset of one's own
def _own_conf(tmp_path: Path, where: str) -> tuple[Path, list[str]]:
    """A config folder whose distill/mine.yaml is two lines: on hydra.searchpath, or in a copy of kdx's conf/."""
    if where == "searchpath":
        (tmp_path / "conf" / "distill").mkdir(parents=True)
        (tmp_path / "conf" / "distill" / "mine.yaml").write_text(TWO_LINES)
        return CONF, [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    conf = tmp_path / "kdx_conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("__pycache__"))
    (conf / "distill" / "mine.yaml").write_text(TWO_LINES)
    return conf, []


@pytest.mark.parametrize("where", ["searchpath", "conf/distill"])
@pytest.mark.parametrize("task", ["distill", "face_distill"])
def test_a_two_line_preset_gets_every_host_key_and_takes_teacher_cache_overrides(tmp_path, where, task):
    import kdx.runs  # noqa: F401  registers ${kdx.run_dir:...}

    conf, extra = _own_conf(tmp_path, where)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"task={task}", "distill=mine", *extra,
                                                      "distill.teacher_cache.mode=memory",
                                                      "distill.teacher_cache.views=2"])
    section = OmegaConf.to_container(cfg.distill, resolve=True)
    expected = base_section()
    expected["teacher_cache"].update(mode="memory", views=2)
    assert section == {**expected, "method": "kd", "temperature": 2}
    host, methods = split_distill_section(section, kind_of(task))
    assert host.alpha == ALPHA_DEFAULTS[kind_of(task)]
    assert host.teacher_cache == TeacherCacheSettings(mode="memory", views=2)
    assert methods == {"method": "kd", "temperature": 2, "weight": 1.0, "mix": {}}


def test_a_preset_written_before_the_base_still_composes(tmp_path):
    """Presets of one's own in the old form, every key written out and the teacher_cache group named, compose as
    they did (the base adds nothing they lack, and names no config group they could clash with)."""
    (tmp_path / "conf" / "distill").mkdir(parents=True)
    (tmp_path / "conf" / "distill" / "old.yaml").write_text(
        "defaults:\n  - teacher_cache: default\n  - _self_\nmethod: kd\nweight: 2.0\nalpha: 0.7\ntemperature: 3.0\n"
        "save_teacher: true\nmix: {}\n")
    cfg = compose_train(["distill=old", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                         "distill.teacher_cache.mode=disk"])
    section = OmegaConf.to_container(cfg.distill, resolve=True)
    assert section == {"weight": 2.0, "alpha": 0.7, "save_teacher": True, "mix": {}, "method": "kd",
                       "temperature": 3.0, "teacher_cache": {"mode": "disk", "dir": None, "views": None, "topk": None}}


def test_kdx_train_composes_a_two_line_preset_with_a_teacher_cache_override(tmp_path):
    """As a user types it: the override of a key the preset does not write is accepted, and --cfg job shows it."""
    _, extra = _own_conf(tmp_path, "searchpath")
    done = run_cli("kdx-train", "--cfg", "job", "task=distill", "distill=mine", *extra,
                   "distill.teacher_cache.mode=memory", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    distill = OmegaConf.create(done.stdout).distill
    assert distill.method == "kd" and distill.temperature == 2 and distill.teacher_cache.mode == "memory"
    assert set(base_section()) <= set(distill)


def test_a_two_line_preset_trains_with_the_task_kinds_alpha_and_records_it(tmp_path, synthetic_teacher):
    """The module built from a preset that states no alpha uses the task kind's default (0.9 for classification),
    from the one place it is written, and results.json records that value."""
    from kdx.configs import build_datamodule
    from kdx.tasks import validate_config
    from kdx.train import run_training

    _, extra = _own_conf(tmp_path, "searchpath")
    cfg = compose_train(["experiment=synthetic/kd", "distill=mine", *extra, f"teacher.ckpt={synthetic_teacher}",
                         "trainer.max_epochs=1", "trainer.progress_bar=none", "distill.teacher_cache.mode=memory"])
    task = validate_config(cfg)
    dm = build_datamodule(cfg.data, task.data_options())
    dm.setup("fit")
    module = task.create(dm).module
    assert module.distill_alpha == ALPHA_DEFAULTS["classification"]
    results = run_training(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["hparams"]["alpha"] == ALPHA_DEFAULTS["classification"]

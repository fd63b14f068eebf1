"""The host keys of a `distill` section: their schema, the one default of each, and the split of a composed
section into (checked host settings, the methods' section).

A `distill` section holds two kinds of keys:
- the host's (`HOST_KEYS`, the fields of `DistillSettings`): `alpha`, `save_teacher` and
  `teacher_cache.{mode,dir,views,topk}`, read by the task that builds a distillation module and by the module;
- the methods' (everything else): `method`, its `weight`, `mix`, and the method's own parameters (`temperature`,
  `beta`, `warmup_epochs`, ...), read by kdx.distill.mix and checked against each Distiller's constructor.
  `warmup_epochs` is such a parameter (of dkd and reviewkd), not a host key.

Each key's default is written here once. conf/distill/_base.yaml writes the same values out (`base_section()`),
so every composed `distill` section has every key, and each preset inherits it and states only what differs;
tests/test_distill_settings.py checks the two agree.

alpha, the share of the teacher terms in the total ((1 - alpha) * hard loss + alpha * sum of weighted method
losses), has one default per kind of task, `ALPHA_DEFAULTS`: 0.9 for classification (Hinton KD's usual 0.1 share
of cross-entropy) and 0.5 for face (the student's margin loss and the teacher terms weigh the same). The YAML
base leaves it `null` ("the task's default"); `split_distill_section(section, kind)` fills it in. The shipped
presets each state their own alpha.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from kdx.configs import to_dict
from kdx.errors import ConfigError
from kdx.schemas import check_section, choice, number

ALPHA_DEFAULTS = {"classification": 0.9, "face": 0.5}  # distill.alpha when a section leaves it null, per task kind
TASK_KINDS = tuple(ALPHA_DEFAULTS)                     # what Distiller.tasks and build_distiller_set(task=) name
CACHE_MODES = ("off", "memory", "disk")
DEFAULT_WEIGHT = 1.0                                   # distill.weight, and a distill.mix.<name> without a weight


@dataclass
class TeacherCacheSettings:
    """`distill.teacher_cache`: reuse a frozen teacher's outputs per (image, view) (kdx.distill.cache)."""

    mode: str = choice("off", *CACHE_MODES)  # off | memory (within this run) | disk (shared, under dir)
    dir: Optional[str] = None                # folder of disk stores; null: $KDX_CACHE_DIR, else ~/.cache/kdx/teacher
    views: Optional[int] = number(None, 1)   # null: a new view of each image every epoch; K: K fixed views, cycled
    topk: Optional[int] = number(None, 1)    # keep only the k largest teacher probabilities per entry

    def as_dict(self) -> dict[str, Any]:
        """The settings as the plain mapping kdx.distill.cache reads."""
        return dataclasses.asdict(self)


@dataclass
class DistillSettings:
    """The host's keys of a `distill` section. After `split_distill_section`, `alpha` is never None."""

    alpha: Optional[float] = number(None, 0, 1)  # share of the teacher terms; null: ALPHA_DEFAULTS of the task kind
    save_teacher: bool = False                   # also store the teacher's weights in every student checkpoint
    teacher_cache: TeacherCacheSettings = dataclasses.field(default_factory=TeacherCacheSettings)


HOST_KEYS = tuple(f.name for f in dataclasses.fields(DistillSettings))  # ("alpha", "save_teacher", "teacher_cache")
METHOD_KEYS = ("method", "weight", "mix")  # the methods' keys that are no method's parameter
NOT_PARAMETERS = frozenset(HOST_KEYS + METHOD_KEYS)  # every key of a section that is not a parameter of its method


def alpha_default(kind: str) -> float:
    """The alpha of a section that leaves it null, for a task kind (classification or face)."""
    if kind not in ALPHA_DEFAULTS:
        raise ValueError(f"task kind must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    return ALPHA_DEFAULTS[kind]


def base_section() -> dict[str, Any]:
    """Every key a preset inherits, with its default, as conf/distill/_base.yaml writes them out."""
    return {"weight": DEFAULT_WEIGHT, **dataclasses.asdict(DistillSettings()), "mix": {}}


def _cache_values(value: Any) -> Any:
    """`distill.teacher_cache` in its mapping form: null or false is off, true memory, a text the mode; a mode of
    null or false is off and modes are case-insensitive (as kdx.distill.cache reads them)."""
    if value is None or value is False:
        return {"mode": "off"}
    if value is True:
        return {"mode": "memory"}
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"distill.teacher_cache must be a mapping of mode, dir, views and topk, got {value!r}; "
                          "set distill.teacher_cache.mode=off|memory|disk")
    values = dict(value)
    if "mode" in values:
        mode = values["mode"]
        values["mode"] = "off" if mode is None or mode is False else mode.lower() if isinstance(mode, str) else mode
    return values


def check_settings(host: Mapping[str, Any] | None, kind: str = "classification") -> DistillSettings:
    """The host's keys of a `distill` section checked against DistillSettings, defaults filled in (alpha: the task
    kind's default when missing or null); a bad key or value is one ConfigError naming it (distill.alpha, ...)."""
    default_alpha = alpha_default(kind)
    values = dict(host or {})
    if "teacher_cache" in values:
        values["teacher_cache"] = _cache_values(values["teacher_cache"])
    settings = check_section(values, DistillSettings, "distill", what="the distill host settings (alpha, "
                             "save_teacher, teacher_cache)")
    alpha = default_alpha if settings.alpha is None else float(settings.alpha)
    return dataclasses.replace(settings, alpha=alpha)


def split_distill_section(section: Any, kind: str = "classification") -> tuple[DistillSettings, dict[str, Any]]:
    """(the host's settings, checked and with every default filled in; the methods' section: `method`, `weight`,
    `mix` and the method's parameters, as kdx.distill.build_distiller_set reads it) of a composed `distill` section
    (a plain mapping or an OmegaConf node). `kind` is the task kind, classification or face (alpha's default)."""
    alpha_default(kind)  # an unknown kind is the caller's mistake: say so before looking at the user's values
    section = to_dict(section)
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"the distill section must be a mapping of keys, got {section!r}; choose a preset "
                          "(distill=kd)")
    methods = dict(section)
    host = {key: methods.pop(key) for key in HOST_KEYS if key in methods}
    return check_settings(host, kind), methods

"""The task registry: each kind of training run is one Task class, registered by name (`task=<name>`), with a
dataclass of its `task.*` keys.

A Task checks what its run needs beyond the config's types (a teacher to distil from, data it can use), and
builds the LightningModule from the composed config and the datamodule. Adding a task is one file here
(a `Task` subclass with `@register_task`) plus one `conf/task/<name>.yaml`; a task of one's own can live
outside kdx and be named by import path (`task.name=my_pkg.tasks:MyTask`).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from kdx.configs import to_dict
from kdx.data.base import KdxDataModule
from kdx.data.mixing import check_mix
from kdx.distill.settings import DistillSettings, TeacherCacheSettings, split_distill_section
from kdx.errors import ConfigError
from kdx.schemas import check_section


@dataclass
class Built:
    """What a task builds: the LightningModule, and the parameter counts of its networks (results.json)."""

    module: pl.LightningModule
    params: dict[str, int]


class Task:
    """One kind of training run. Subclasses set `name` and `Options` (the dataclass of `task.*`) and implement
    `build`; `distills` says whether the run reads the `distill` section (and so a teacher)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type]
    distills: ClassVar[bool] = False
    learns_from_unlabeled: ClassVar[bool] = False  # may the data add images without labels (data.use_unlabeled)
    kind: ClassVar[str] = "classification"  # or "face": what the datamodule yields and the comparison scores
    learns_from_mixed: ClassVar[bool] = False  # can its loss read mixed images (data.mix: partner labels and lam)

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.options = check_section(to_dict(cfg.task), self.Options, "task", what=f"task={self.name}")

    def check(self) -> None:
        """Refuse, in one sentence naming the key, a config this task cannot run (before any work)."""
        data = self.cfg.data
        if not self.learns_from_unlabeled and (data.get("use_unlabeled") or data.get("unlabeled")):
            raise ConfigError(f"data.use_unlabeled / data.unlabeled add images without labels, which only distillation "
                              f"can learn from; drop them for task={self.name}, or use task=distill")
        mix = check_mix(data.get("mix"))
        if mix.active and not self.learns_from_mixed:
            raise ConfigError(f"data.mix.mode={mix.mode} mixes images, which task={self.name} cannot learn from; "
                              "set data.mix.mode=off (mixing is for task=supervised, distill, and face_distill with "
                              "distill.alpha=1)")
        if data.get("teacher_view", "consistent") != "consistent" and not self.distills:
            raise ConfigError(f"data.teacher_view={data.get('teacher_view')} chooses what a teacher sees, and "
                              f"task={self.name} has no teacher; set data.teacher_view=consistent")

    def create(self, dm: Any) -> Built:
        """Check the run and the datamodule's views, and build the module."""
        self.check()
        self.check_views(dm)
        built = self.build(dm)
        # kdx's own trainer options, honoured by every task's module (kdx.lit.layout.LayoutMixin)
        built.module.channels_last = bool(self.cfg.trainer.get("channels_last", False))
        built.module.compile_networks = bool(self.cfg.trainer.get("compile", False))
        return built

    def distill_section(self) -> tuple[DistillSettings, dict[str, Any]]:
        """(the host's settings: alpha, save_teacher, teacher_cache, checked, with alpha's default for this task's
        kind; the methods' section) of the run's `distill` section (kdx.distill.settings)."""
        return split_distill_section(self.cfg.get("distill"), self.kind)

    def cache_settings(self) -> dict[str, Any]:
        """`distill.teacher_cache` checked, with its defaults; mode off for a task without a teacher."""
        if not self.distills:
            return TeacherCacheSettings().as_dict()
        return self.distill_section()[0].teacher_cache.as_dict()

    def data_options(self) -> dict[str, Any]:
        """The datamodule arguments this run decides, given to its constructor (kdx.train passes them to
        kdx.configs.build_datamodule): `view_seed`, the run's seed (seeded views and the balanced sampler follow
        it), and with the teacher cache on `seeded_views=True` and `views` (distill.teacher_cache.views: each
        image's views cycle through that many). Empty for a datamodule that is not a KdxDataModule; with the cache
        on, that is a ConfigError."""
        cache = self.cache_settings()
        target = self.cfg.data.get("_target_")
        try:
            cls = get_class(str(target))
        except Exception:  # named by validate_config / build_datamodule, in their words
            return {}
        if not (isinstance(cls, type) and issubclass(cls, KdxDataModule)):
            if cache["mode"] != "off":
                raise ConfigError(f"distill.teacher_cache needs seeded views, which {cls.__name__} does not give; "
                                  "use a kdx datamodule or set distill.teacher_cache.mode=off")
            return {}
        options: dict[str, Any] = {"view_seed": int(self.cfg.seed)}
        if cache["mode"] != "off":
            options.update(seeded_views=True, views=cache["views"])
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            missing = [k for k in options if k not in params]
            if missing:
                raise ConfigError(f"{target}.__init__ does not take {', '.join(missing)}, which every kdx datamodule "
                                  f"takes (the run's view settings); add {'them' if len(missing) > 1 else 'it'} to "
                                  "its arguments and pass them on to KdxDataModule.__init__")
        return options

    def check_views(self, dm: Any) -> None:
        """A ConfigError when a KdxDataModule was built without the view settings this run gives it
        (`data_options`): a teacher cache would store outputs of views the run does not train on."""
        if not isinstance(dm, KdxDataModule):
            return
        cache = self.cache_settings()["mode"] != "off"
        wanted: dict[str, Any] = {}
        if cache or dm.seeded_views or dm.sampler:  # the seed is read only by seeded views and the balanced sampler
            wanted["view_seed"] = int(self.cfg.seed)
        if cache:
            wanted.update(seeded_views=True, views=self.cache_settings()["views"])
        has = {"view_seed": dm.view_seed, "seeded_views": dm.seeded_views, "views": dm.view_count}
        wrong = [k for k, v in wanted.items() if has[k] != v]
        if wrong:
            raise ConfigError(f"the datamodule was built with {', '.join(f'{k}={has[k]!r}' for k in wrong)}, but this "
                              f"run needs {', '.join(f'{k}={wanted[k]!r}' for k in wrong)}; build it with the run's "
                              "view settings, kdx.configs.build_datamodule(cfg.data, task.data_options()), as "
                              "kdx-train does")

    def build(self, dm: Any) -> Built:  # pragma: no cover - abstract
        """The LightningModule of this run, built from the config and the (set-up) datamodule."""
        raise NotImplementedError

    def unread_sections(self) -> tuple[str, ...]:
        """Config sections this task does not read: they are left out of the run's identity (kdx.train)."""
        other = "student" if self.options.network == "teacher" else "teacher"
        return ("distill", other)


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task] | None = None) -> type[Task]:
    """Class decorator, used bare (`@register_task` on a Task subclass): make `cls` the task of `task=<cls.name>`."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"@register_task takes no arguments and decorates a kdx.tasks.Task subclass (got {cls!r}); "
                        "write @register_task on the class, with its name in the class attribute `name`")
    if not isinstance(cls.name, str) or not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`: add the class attribute name = \"my_task\", the value of "
                        "task.name (task=<name>) that selects it")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise TypeError(f"{cls.__name__}.Options must be a @dataclass of its task.* keys (subclass an existing one, "
                        f"e.g. kdx.tasks.supervised.ClassifierOptions, with name: str = {cls.name!r}); got {options!r}")
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {_TASKS[cls.name].__name__}; give "
                         f"{cls.__name__} another name")
    _TASKS[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    """The Task registered as `name`, or one named by import path (`my_pkg.tasks:MyTask`); else a ConfigError."""
    if name in _TASKS:
        return _TASKS[name]
    if isinstance(name, str) and (":" in name or "." in name):
        module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attr, None)
        except ImportError as e:
            raise ConfigError(f"task.name={name!r}: module {module_name!r} cannot be imported ({e})") from None
        if isinstance(found, type) and issubclass(found, Task):
            return found
        raise ConfigError(f"task.name={name!r}: {module_name} has no Task subclass named {attr!r}")
    close = difflib.get_close_matches(str(name), list(_TASKS), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"task.name must be one of {', '.join(available_tasks())}, got {name!r}{hint}")


def task_for(cfg: DictConfig) -> Task:
    """The Task of a composed config (its `task.*` keys checked)."""
    return task_class(cfg.task.name)(cfg)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def example_images(dm: Any, n: int = 2) -> torch.Tensor:
    """The first `n` training images, stacked (a probe batch for sizing distillers' connectors)."""
    return torch.stack([dm.train_set[i][0] for i in range(min(n, len(dm.train_set)))])

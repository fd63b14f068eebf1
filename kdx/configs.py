"""Config helpers every layer may use: plain containers from OmegaConf nodes, the datamodule of a data config,
and image sizes given as one number or as [height, width]."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdx.errors import ConfigError


def to_dict(node: Any) -> Any:
    """A plain Python container from an OmegaConf node (resolved), or the value itself."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_datamodule(data_cfg: DictConfig, options: Mapping[str, Any] | None = None):
    """Instantiate the datamodule of `data._target_`; unknown keys are reported by name.

    `options` are arguments the run decides (kdx.tasks.Task.data_options: the seed of the views, seeded views for
    the teacher cache); a data key given with another value is a ConfigError naming both.
    """
    missing = [k for k in data_cfg if OmegaConf.is_missing(data_cfg, k)] if OmegaConf.is_config(data_cfg) else []
    if missing:  # `root: ???` in the YAML: a value only the user can give
        what = {"root": "the folder that holds the data"}
        shown = ", ".join(f"data.{k}=..." + (f" ({what[k]})" if k in what else "") for k in missing)
        raise ConfigError(f"{', '.join('data.' + k for k in missing)} must be set for this data config "
                          f"({data_cfg.get('_target_')}): add {shown} to the command line")
    kwargs = {k: v for k, v in to_dict(data_cfg).items() if k not in ("name",)}
    for key, value in dict(options or {}).items():
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"data.{key}={kwargs[key]!r} disagrees with {key}={value!r}, which this run sets from "
                              f"seed and distill.teacher_cache; drop data.{key}, or change those")
        kwargs[key] = value
    try:
        return instantiate(kwargs, _convert_="all")
    except Exception as e:  # hydra wraps TypeError for unknown arguments
        raise ConfigError(f"the data config cannot build {kwargs.get('_target_')}: {e.__cause__ or e}") from e


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an image size given as one number (square) or as [height, width]."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)

"""Composing trial configs with Hydra's compose API: in kdx-tune's own process (inside its @hydra.main, as
kdx-pipeline composes its stages) and in each worker process of `tune.jobs` (which starts Hydra on the same
config folder itself)."""
from __future__ import annotations

from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from kdx.errors import ConfigError
from kdx.runs import register_resolvers


def ensure_hydra(config_dir: str) -> None:
    """Start Hydra on `config_dir` unless this process already runs it (kdx-tune's own process does)."""
    register_resolvers()
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name="kdx_tune")


def distill_presets() -> list[str]:
    """The names `distill=` accepts: conf/distill/*.yaml and those of the user's config folders."""
    return sorted(GlobalHydra.instance().config_loader().get_group_options("distill"))


def compose_trial(overrides: Sequence[str], search_path: Sequence[str], what: str) -> DictConfig:
    """The kdx-train config of `overrides` (the user's `hydra.searchpath` first); `what` names it in an error."""
    try:
        return compose(config_name="train", overrides=[*search_path, *overrides])
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the kdx-train config of {what} does not compose: {first}") from None

"""What a run is, for reports and for reuse: the settings reports group by, and the part of the config that decides
the result (hashed to tell whether a finished run already holds what is asked for)."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from kdx.configs import to_dict
from kdx.io import config_hash
from kdx.runs import RESUME_KEYS
from kdx.tasks import task_for


def hparams_summary(cfg: DictConfig) -> dict[str, Any]:
    """The few settings reports group by: pair, architectures, temperature, alpha, seed, data."""
    summary = {"task": cfg.task.name, "network": cfg.task.network, "pair": cfg.get("pair", {}).get("name"),
               "teacher": cfg.teacher.get("name"), "student": cfg.student.get("name"), "seed": cfg.seed,
               "data": cfg.data.get("name")}
    task = task_for(cfg)
    if task.distills:
        distill = to_dict(cfg.distill)
        summary.update(method=distill.get("method"), alpha=task.distill_section()[0].alpha,
                       mix=sorted(distill.get("mix") or {}))
        for key in ("temperature", "beta"):  # the hyper-parameters sweeps vary most, as report columns
            if distill.get(key) is not None:
                summary[key] = float(distill[key])
    return summary


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of a config that decides a run's result (what the config hash covers when reusing runs).

    Logging, progress display and resume/force are left out, and so are the sections the task does not read
    (kdx.tasks.Task.unread_sections): a teacher run's identity does not change when only the temperature does.
    """
    data = to_dict(cfg)
    for key in ("logger", "hydra", *RESUME_KEYS):
        data.pop(key, None)
    for key in ("progress_bar", "progress_every"):  # what is printed, not what is trained
        (data.get("trainer") or {}).pop(key, None)
    for key in task_for(cfg).unread_sections():
        data.pop(key, None)
    return data


def run_config_hash(cfg: DictConfig) -> str:
    """config_hash of the run's identity (see run_identity): equal hashes mean the same run was asked for."""
    return config_hash(run_identity(cfg))

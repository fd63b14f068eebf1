"""Weights & Biases: the run's logger, offline mode when no API key is configured (never a prompt), one W&B
run per kdx run folder (a resumed run continues it), and the comparison table of a pipeline.

Offline runs land in `<run folder>/wandb/offline-run-*`; upload them later with `wandb sync <that folder>`.
"""
from __future__ import annotations

import math
import netrc
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from kdx.io import atomic_write_text, read_results
from kdx.ranks import is_global_zero_process

RUN_ID_FILE = "wandb-run-id"  # in the run folder: the W&B run id this folder logs to
LOGGER_KEYS = ("project", "entity", "group", "tags", "name", "notes", "job_type", "mode", "log_model")


def has_api_key() -> bool:
    """True when an API key is configured (WANDB_API_KEY, or an entry for the W&B host in the netrc file that
    `wandb login` writes); never prompts, never goes online."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # no file, or one netrc cannot read: no key
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str | None = None) -> str:
    """online | offline | disabled: `mode` if given, else WANDB_MODE, else offline when no API key is configured."""
    if mode:
        return str(mode)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_api_key() else "offline"


def prepare_environment(mode: str | None = None) -> str:
    """Set W&B's environment so that it never prompts or waits on a terminal; return the mode in use."""
    mode = resolve_mode(mode)
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    return mode


def flatten(config: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'distill.temperature': 4.0, ...} from a nested config (lists kept as values)."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        return {prefix: config} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def run_id_for(run_dir: Path) -> str:
    """The W&B run id of `run_dir`: the stored one (results.json or wandb-run-id), else a new one, stored."""
    stored = (read_results(run_dir) or {}).get("wandb") or {}
    if stored.get("id"):
        return str(stored["id"])
    path = run_dir / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))

    if is_global_zero_process():
        atomic_write_text(path, run_id + "\n")
    return run_id


def build_wandb_logger(options: dict[str, Any], run_dir: Path, cfg: DictConfig):
    """A Lightning WandbLogger from the `logger.wandb` options, writing under `run_dir/wandb`."""
    opts = dict(options or {})
    mode = prepare_environment(opts.pop("mode", None))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tags = opts.pop("tags", None) or []
    if isinstance(tags, str):
        tags = [tags]
    run_name = cfg.get("run_name")
    kwargs = dict(
        project=opts.pop("project", None) or "kdx", entity=opts.pop("entity", None),
        group=opts.pop("group", None) or run_name, name=opts.pop("name", None) or run_name,
        tags=[str(t) for t in tags], notes=opts.pop("notes", None), job_type=opts.pop("job_type", None) or "train",
        log_model=opts.pop("log_model", False), id=run_id_for(run_dir), resume="allow", save_dir=str(run_dir),
        config=flatten(cfg), mode=mode,
    )
    kwargs.update(opts)  # anything else goes to wandb.init
    return WandbLogger(**{k: v for k, v in kwargs.items() if v is not None})


def _wandb_logger(trainer) -> Any:
    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, WandbLogger):
            return logger
    return None


def wandb_info(trainer, run_dir: Path) -> dict[str, Any] | None:
    """{'id', 'project', 'mode'} of the trainer's W&B logger, None without one."""
    logger = _wandb_logger(trainer)
    if logger is None:
        return None
    init = getattr(logger, "_wandb_init", {}) or {}
    return {"id": init.get("id") or run_id_for(Path(run_dir)), "project": init.get("project"),
            "group": init.get("group"), "mode": os.environ.get("WANDB_MODE")}


def finish_wandb(trainer, results: dict[str, Any], failed: bool = False) -> None:
    """Add the run's results to the W&B summary, note the local run folder in `results`, and close the run."""
    logger = _wandb_logger(trainer)
    if logger is None or not getattr(trainer, "is_global_zero", True):
        return
    import wandb

    run = wandb.run
    if run is None:
        return
    summary = {f"results/{k}": v for k, v in flatten({"params": results.get("params") or {},
                                                         "time": results.get("time") or {}}).items()}
    summary["results/status"] = results.get("status")
    for key, value in (results.get("metrics") or {}).items():
        summary[f"final/{key}"] = value
    try:
        run.summary.update(summary)
        info = results.setdefault("wandb", {})
        info["dir"] = str(Path(run.dir).parent)
        if info.get("mode") == "offline":
            info["sync"] = f"wandb sync {Path(run.dir).parent}"
    finally:
        wandb.finish(exit_code=1 if failed else 0)
    if (results.get("wandb") or {}).get("sync"):  # after W&B's own closing lines, so it is the last word
        print(f"[kdx] W&B ran offline; upload this run with: {results['wandb']['sync']}", flush=True)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return str(value)


def log_table(rows: Iterable[Mapping[str, Any]], key: str, cfg: DictConfig, run_dir: Path, name: str,
              job_type: str) -> dict[str, Any] | None:
    """Log `rows` as a W&B table `key` in a run of its own (same project/group as the training runs)."""
    rows = [dict(r) for r in rows]
    options = OmegaConf.to_container(cfg.logger, resolve=True).get("wandb") if cfg.get("logger") else None
    if options is None or not rows:
        return None
    import wandb

    opts = dict(options or {})
    mode = prepare_environment(opts.get("mode"))
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    table = wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tags = opts.get("tags") or []
    run = wandb.init(project=opts.get("project") or "kdx", entity=opts.get("entity"),
                     group=opts.get("group") or cfg.get("run_name"), name=name, job_type=job_type,
                     tags=[str(t) for t in ([tags] if isinstance(tags, str) else tags)], dir=str(run_dir),
                     config=flatten(cfg), mode=mode, reinit="finish_previous")
    try:
        run.log({key: table})
        info = {"id": run.id, "mode": mode, "dir": str(Path(run.dir).parent)}
    finally:
        run.finish()
    return info


def log_comparison_to_wandb(rows: list[dict[str, Any]], cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Log a pipeline's teacher-vs-student comparison as the W&B table `comparison` (when logger has wandb)."""
    info = log_table(rows, "comparison", cfg, run_dir, name=f"{cfg.get('run_name')}-comparison",
                     job_type="comparison")
    if info:
        print(f"[kdx] comparison logged to W&B ({info['mode']}): {info['dir']}", file=sys.stderr, flush=True)
    return info

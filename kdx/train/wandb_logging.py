"""Weights & Biases: the run's logger, offline mode when no API key is configured (never a prompt), one W&B
run per kdx run folder (a resumed run continues it), and the comparison table of a pipeline.

How a team finds its runs: every job of a sweep shares a W&B `group` (a Hydra multirun: `<run_name>-<sweep
folder>`, set by kdx.cli; a W&B sweep agent: `<run_name>-sweep-<sweep id>`), the stage is the `job_type`
(teacher, student, distill, probe, transfer, face, face_distill), the config is logged flat with plain values
(`distill.temperature: 4.0`; the module's own arguments as `module.*`), and the best checkpoint of a student
run is a `model` artifact (`model-<run id>`, alias `best`); a pipeline's comparison run logs the ONNX export
of the distilled student with its checkpoint.

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

from kdx.errors import ConfigError
from kdx.io import atomic_write_text, read_results, sidecar_path
from kdx.ranks import is_global_zero_process

RUN_ID_FILE = "wandb-run-id"  # in the run folder: the W&B run id this folder logs to
LOGGER_KEYS = ("project", "entity", "group", "tags", "name", "notes", "job_type", "mode", "log_model", "log_best")
LOG_BEST = ("student", "all", "none")  # logger.wandb.log_best: whose best checkpoint becomes an artifact


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
    # a W&B sweep agent names the run it started (WANDB_RUN_ID): the run must log under that id to count in the sweep
    run_id = os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                       for _ in range(8))
    if is_global_zero_process():
        atomic_write_text(path, run_id + "\n")
    return run_id


def plain(value: Any) -> Any:
    """A value W&B stores and shows as itself: None, bool, int, float, str, or a list of those; anything else
    (a path, a tensor, an object) as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
        return value.item()
    return str(value)


def plain_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """flatten(config) with plain values only: one key per setting, no nested dicts, no `${...}` left."""
    return {key: plain(value) for key, value in flatten(config, prefix).items()}


def stage_of(cfg: DictConfig) -> str:
    """What a run is, for W&B's job_type: teacher or student for supervised training, else the task's name
    (distill, probe, transfer, face, face_distill)."""
    task = cfg.get("task") or {}
    name = str(task.get("name") or "train")
    return str(task.get("network") or name) if name == "supervised" else name


def sweep_group(run_name: Any) -> str | None:
    """`<run_name>-sweep-<id>` when a W&B sweep agent started this run (WANDB_SWEEP_ID), else None."""
    sweep_id = os.environ.get("WANDB_SWEEP_ID")
    return f"{run_name}-sweep-{sweep_id}" if sweep_id else None


class KdxWandbLogger(WandbLogger):
    """Lightning's WandbLogger, except that the module's hyper-parameters (which Lightning logs at the start of
    fit) go into the W&B config flat and plain, as `module.<name>`, instead of as nested dicts next to kdx's
    flat keys; and it remembers whose best checkpoint to log as an artifact (`log_best`)."""

    def __init__(self, *args: Any, log_best: str = "student", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kdx_log_best = log_best

    def log_hyperparams(self, params: Any) -> None:
        if not isinstance(params, Mapping):
            params = vars(params) if hasattr(params, "__dict__") else {}
        if is_global_zero_process():
            self.experiment.config.update(plain_config(dict(params), "module"), allow_val_change=True)


def build_wandb_logger(options: dict[str, Any], run_dir: Path, cfg: DictConfig):
    """A Lightning WandbLogger from the `logger.wandb` options, writing under `run_dir/wandb`."""
    opts = dict(options or {})
    mode = prepare_environment(opts.pop("mode", None))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tags = opts.pop("tags", None) or []
    if isinstance(tags, str):
        tags = [tags]
    log_best = str(opts.pop("log_best", "student") or "none").lower()
    if log_best not in LOG_BEST:
        raise ConfigError(f"logger.wandb.log_best must be one of {', '.join(LOG_BEST)}, got {log_best!r}")
    run_name = cfg.get("run_name")
    project, entity = opts.pop("project", None), opts.pop("entity", None)
    if os.environ.get("WANDB_SWEEP_ID"):  # a sweep agent's run lives in the sweep's project, whatever the config says
        project, entity = os.environ.get("WANDB_PROJECT") or project, os.environ.get("WANDB_ENTITY") or entity
    kwargs = dict(
        project=project or "kdx", entity=entity,
        group=opts.pop("group", None) or sweep_group(run_name) or run_name, name=opts.pop("name", None) or run_name,
        tags=[str(t) for t in tags], notes=opts.pop("notes", None),
        job_type=opts.pop("job_type", None) or stage_of(cfg),
        log_model=opts.pop("log_model", False), id=run_id_for(run_dir), resume="allow", save_dir=str(run_dir),
        config=plain_config(cfg), mode=mode,
    )
    kwargs.update(opts)  # anything else goes to wandb.init
    return KdxWandbLogger(log_best=log_best, **{k: v for k, v in kwargs.items() if v is not None})


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
        if not failed:
            artifact = log_best_checkpoint(run, results, getattr(logger, "kdx_log_best", "student"))
            if artifact:
                info["artifact"] = artifact
    finally:
        wandb.finish(exit_code=1 if failed else 0)
    if (results.get("wandb") or {}).get("sync"):  # after W&B's own closing lines, so it is the last word
        print(f"[kdx] W&B ran offline; upload this run with: {results['wandb']['sync']}", flush=True)


def _artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.' only."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def log_model_artifact(run: Any, name: str, files: Iterable[str | Path], metadata: Mapping[str, Any],
                       aliases: Iterable[str] = ("best",)) -> str | None:
    """Log the existing ones of `files` as the `model` artifact `name` of `run`; its name, None with no file."""
    import wandb

    paths = [Path(f) for f in files if f and Path(f).is_file()]
    if not paths:
        return None
    artifact = wandb.Artifact(_artifact_name(name), type="model", metadata={k: plain(v) for k, v in metadata.items()})
    for path in paths:
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact, aliases=list(aliases))
    return artifact.name


def log_best_checkpoint(run: Any, results: dict[str, Any], log_best: str = "student") -> str | None:
    """The best checkpoint of a finished run as the `model` artifact `model-<run id>` (alias best), with an
    ONNX export of it (and its description) when the run folder holds one; for student runs only unless
    `log_best` is 'all' ('none': nothing). The artifact's name, or None."""
    network = (results.get("hparams") or {}).get("network")
    if log_best == "none" or (log_best == "student" and network != "student"):
        return None
    best = (results.get("checkpoints") or {}).get("best")
    if results.get("status") != "completed" or not best:
        return None
    run_dir = Path(results.get("run_dir") or Path(best).parent.parent)
    exports = sorted(run_dir.glob("*.onnx"))
    files = [best, *exports, *[sidecar_path(p) for p in exports]]
    monitor = results.get("monitor") or {}
    metadata = {"run_dir": str(run_dir), "stage": network, "task": results.get("task"),
                "config_hash": results.get("config_hash"), "monitor": monitor.get("metric"),
                "best": monitor.get("best"), "epochs": results.get("epochs"),
                **{f"metrics/{k}": v for k, v in (results.get("metrics") or {}).items()}}
    return log_model_artifact(run, f"model-{run.id}", files, metadata)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return str(value)


def log_table(rows: Iterable[Mapping[str, Any]], key: str, cfg: DictConfig, run_dir: Path, name: str,
              job_type: str, artifact: tuple[str, list, dict] | None = None) -> dict[str, Any] | None:
    """Log `rows` as a W&B table `key` in a run of its own (same project/group as the training runs), and
    `artifact` (name, files, metadata) as a `model` artifact of that run when given."""
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
                     config=plain_config(cfg), mode=mode, reinit="finish_previous")
    try:
        run.log({key: table})
        info = {"id": run.id, "mode": mode, "dir": str(Path(run.dir).parent)}
        if artifact is not None:
            info["artifact"] = log_model_artifact(run, *artifact)
    finally:
        run.finish()
    return info


def log_comparison_to_wandb(rows: list[dict[str, Any]], cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Log a pipeline's teacher-vs-student comparison as the W&B table `comparison` (when logger has wandb), and
    the distilled student's ONNX export (with its description) as the `model` artifact `<run_name>-student-onnx`."""
    exported = next((r for r in rows if r.get("onnx_file") and Path(str(r["onnx_file"])).is_file()), None)
    artifact = None
    if exported is not None:
        onnx = Path(str(exported["onnx_file"]))
        artifact = (f"{cfg.get('run_name')}-student-onnx", [onnx, sidecar_path(onnx)],
                    {k: v for k, v in exported.items() if isinstance(v, (int, float, str)) or v is None})
    info = log_table(rows, "comparison", cfg, run_dir, name=f"{cfg.get('run_name')}-comparison",
                     job_type="comparison", artifact=artifact)
    if info:
        print(f"[kdx] comparison logged to W&B ({info['mode']}): {info['dir']}", file=sys.stderr, flush=True)
    return info

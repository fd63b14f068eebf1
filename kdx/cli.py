"""Console entry points. Thin: compose the config with Hydra, then call into the package."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kdx.errors import KdxError
from kdx.sweep import register_resolvers

register_resolvers()  # ${kdx.run_dir:...} in hydra.run.dir / hydra.sweep.dir (resume=)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _fail(error: KdxError) -> None:
    print(f"kdx: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _check_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Text given where the defaults hold a number or boolean (distill.temperature=abc) is a ConfigError."""
    from hydra import compose

    from kdx.sweep import check_override_types

    dotted = [o for o in overrides if "=" in o and "." in o.split("=", 1)[0] and not o.startswith("hydra.")]
    if not dotted:
        return
    groups = [o for o in overrides if o not in dotted]
    check_override_types(cfg, compose(config_name="train", overrides=groups), dotted)


def _name_sweep_job(cfg: DictConfig) -> None:
    """In a multirun, tie W&B runs of one sweep together (group = run_name-sweep folder) and name each job."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    wandb_cfg = cfg.get("logger", {}).get("wandb") if cfg.get("logger") else None
    if wandb_cfg is None:
        return
    hc = HydraConfig.get()
    with open_dict(cfg):
        if not wandb_cfg.get("group"):
            cfg.logger.wandb.group = f"{cfg.run_name}-{Path(hc.sweep.dir).name}"
        if not wandb_cfg.get("name"):
            cfg.logger.wandb.name = f"{cfg.run_name}-{hc.job.num}" + (f" {hc.job.override_dirname}"
                                                                     if hc.job.override_dirname else "")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    """One kdx-train job. A single run exits 2 with one sentence on a KdxError; in a multirun a failed job is
    recorded (results.json status=failed), reported in one line, and the sweep goes on (NaN to the sweeper)."""
    from kdx.sweep import job_return_value
    from kdx.train import _is_global_zero_process, print_results, run_training

    multirun = _is_multirun()
    run_dir = _run_dir()
    try:
        _check_overrides(cfg, _task_overrides())
        if multirun:
            _name_sweep_job(cfg)
        results = run_training(cfg, run_dir, _task_overrides(), multirun=multirun)
    except Exception as e:
        if not multirun:
            if isinstance(e, KdxError):
                _fail(e)
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "" if isinstance(e, KdxError) else f"{type(e).__name__}: "
        print(f"kdx: job {run_dir} failed: {kind}{message}", file=sys.stderr, flush=True)
        _record_failure(run_dir, e)
        return float("nan")
    if not _is_global_zero_process():
        return None
    print_results(results)
    return job_return_value(results, cfg.get("optimized_metric"))


def _record_failure(run_dir: Path, error: BaseException) -> None:
    """Write results.json status=failed for a job that failed before run_training could (bad config)."""
    from kdx.io import RESULTS_FILE, read_results, write_json

    previous = read_results(run_dir)
    if previous and previous.get("status") in ("failed", "completed"):
        return  # run_training recorded it, or the job is a finished run left untouched
    write_json(run_dir / RESULTS_FILE, {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                        "run_dir": str(run_dir), "overrides": _task_overrides()})


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="pipeline")
def _pipeline(cfg: DictConfig) -> None:
    from hydra import compose

    from kdx.pipeline import compare_stages, run_pipeline

    overrides = _task_overrides()
    uses_wandb = bool(cfg.get("logger")) and "wandb" in cfg.logger
    extra = []
    if uses_wandb and not cfg.logger.wandb.get("group"):  # one W&B group for every stage of the pipeline
        extra = [f"logger.wandb.group={cfg.run_name}"]
    try:
        summary = run_pipeline(cfg, _run_dir(), overrides,
                               compose=lambda o: compose(config_name="train", overrides=[*o, *extra]),
                               compare=compare_stages)
        if uses_wandb and (summary.get("comparison") or {}).get("rows"):
            from omegaconf import open_dict

            from kdx.logging_wandb import log_comparison_to_wandb

            if extra:
                with open_dict(cfg):
                    cfg.logger.wandb.group = cfg.run_name
            log_comparison_to_wandb(summary["comparison"]["rows"], cfg, _run_dir())
    except KdxError as e:
        _fail(e)


def train_main() -> None:
    """kdx-train: one training run (teacher, student, distillation, transfer or probe)."""
    _train()


def pipeline_main() -> None:
    """kdx-pipeline: teacher -> student alone -> student distilled -> comparison."""
    _pipeline()

"""Console entry points. Thin: compose the config with Hydra, then call into the package.

The training stack (torch, Lightning, kdx.train, kdx.pipeline) is imported when a job starts, not when this
module loads, so `--help`, `--cfg job` and a misspelled override answer within a second.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

import kdx.conf as conf_package
from kdx.errors import KdxError, RunInterrupted
from kdx.io import RESULTS_FILE, disk_full_cause, disk_full_error, read_results, write_json
from kdx.overrides import check_added_keys, explain_composition_error
from kdx.ranks import is_global_zero_process
from kdx.runs import current_sweep_dir, job_return_value, record_refusal, register_resolvers

register_resolvers()  # ${kdx.run_dir:...} in hydra.run.dir / hydra.sweep.dir (resume=)
CONFIG_PACKAGE = "pkg://kdx.conf"  # the configs ship inside the package: a checkout and a wheel find them alike
CONFIG_DIR = str(Path(conf_package.__file__).parent)  # the same folder on disk, for re-composing in-process


def _fail(error: KdxError) -> None:
    print(f"kdx: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def _hydra_file() -> Path | None:
    """The .hydra/ file of the job Hydra was setting up when a write failed: in the folder given on the command
    line (hydra.run.dir= / hydra.sweep.dir=), where there is one (Hydra has forgotten its config by then)."""
    for arg in reversed(sys.argv[1:]):
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value:
            return Path(value).expanduser().resolve() / ".hydra"
    return None


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _search_path_overrides() -> list[str]:
    """The user's `hydra.searchpath=[...]` (their own config folders), for composing the stages of a pipeline."""
    return [o for o in HydraConfig.get().overrides.hydra if o.lstrip("+").startswith("hydra.searchpath")]


def _name_sweep_job(cfg: DictConfig) -> None:
    """In a multirun, tie W&B runs of one sweep together (group = run_name-sweep folder) and name each job."""
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


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    """One kdx-train job. A single run exits 2 with one sentence on a KdxError; in a multirun a failed job is
    recorded (results.json status=failed), reported in one line, and the sweep goes on (NaN to the sweeper)."""
    try:
        return _train_job(cfg)
    except BaseException as e:
        e._kdx_after_composition = True  # not a composition error: _run_hydra_main leaves it as it is
        raise


def _train_job(cfg: DictConfig) -> float | None:
    from kdx.train import print_results, run_training  # the training stack, once a job starts (module docstring)

    multirun = _is_multirun()
    run_dir = _run_dir()
    try:
        check_added_keys(cfg, _task_overrides(), CONFIG_DIR)  # a `+key` nothing reads; the values: kdx.tasks
        if multirun:
            _name_sweep_job(cfg)
        results = run_training(cfg, run_dir, _task_overrides(), multirun=multirun,
                               resume_command=_sweep_resume_command() if multirun else None)
    except RunInterrupted as e:
        print(f"kdx: {e}", file=sys.stderr, flush=True)
        if multirun:
            raise KeyboardInterrupt from None  # Ctrl-C stops the whole sweep (train_main says how to resume it)
        sys.exit(130)
    except Exception as e:
        if not multirun:
            if isinstance(e, KdxError):
                _fail(e)
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "" if isinstance(e, KdxError) else f"{type(e).__name__}: "
        print(f"kdx: job {run_dir} failed: {kind}{message}", file=sys.stderr, flush=True)
        if is_global_zero_process():  # the other ranks of a torchrun/srun job share rank 0's folder
            _record_failure(run_dir, e)
        return float("nan")
    if not is_global_zero_process():
        return None
    print_results(results)
    return job_return_value(results, cfg.get("optimized_metric"))


def _sweep_resume_command() -> str:
    """The command that re-runs this sweep, skipping finished jobs and resuming interrupted ones."""
    sweep_dir = Path(HydraConfig.get().sweep.dir).resolve()
    kept = [a for a in sys.argv[1:] if not a.startswith(("resume=", "force="))]
    return " ".join(["kdx-train", *map(shlex.quote, kept), shlex.quote(f"resume={sweep_dir}")])


def _record_failure(run_dir: Path, error: BaseException) -> None:
    """Write results.json status=failed for a job that failed before run_training could (bad config)."""
    previous = read_results(run_dir)
    if previous and previous.get("status") == "completed":  # a finished run refused: left untouched, counted failed
        record_refusal(Path(HydraConfig.get().sweep.dir), run_dir, error)
        return
    if previous and previous.get("status") in ("failed", "interrupted"):
        return  # run_training recorded it
    write_json(run_dir / RESULTS_FILE, {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                        "run_dir": str(run_dir), "overrides": _task_overrides()})


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="pipeline")
def _pipeline(cfg: DictConfig) -> None:
    """kdx-pipeline's task: every stage, then the comparison (see kdx.pipeline)."""
    try:
        _pipeline_job(cfg)
    except BaseException as e:
        e._kdx_after_composition = True
        raise


def _pipeline_job(cfg: DictConfig) -> None:
    from kdx.pipeline import compare_stages, run_pipeline  # the training stack, once a job starts (module docstring)
    from kdx.train.wandb_logging import log_comparison_to_wandb

    overrides = _task_overrides()
    uses_wandb = bool(cfg.get("logger")) and "wandb" in cfg.logger
    extra = []
    if uses_wandb and not cfg.logger.wandb.get("group"):  # one W&B group for every stage of the pipeline
        extra = [f"logger.wandb.group={cfg.run_name}"]
    try:
        check_added_keys(cfg, overrides, CONFIG_DIR)
        summary = run_pipeline(cfg, _run_dir(), overrides,
                               compose=lambda o: compose(config_name="train", overrides=[*_search_path_overrides(), *o, *extra]),
                               compare=compare_stages)
        if uses_wandb and (summary.get("comparison") or {}).get("rows"):
            if extra:
                with open_dict(cfg):
                    cfg.logger.wandb.group = cfg.run_name
            log_comparison_to_wandb(summary["comparison"]["rows"], cfg, _run_dir())
    except RunInterrupted as e:
        what = str(e).split("; resume it with:", 1)[0]
        print(f"kdx: {what}; re-run the same kdx-pipeline command to continue: finished stages are reused and "
              f"the interrupted one resumes", file=sys.stderr, flush=True)
        sys.exit(130)
    except KdxError as e:
        _fail(e)


def _run_hydra_main(main, config_name: str) -> None:
    """Run a @hydra.main function; a composition error (misspelled key, unknown option, bad override syntax)
    becomes one sentence with close matches and exit code 2; Ctrl-C of a sweep says how to resume it.

    HYDRA_FULL_ERROR=1 makes Hydra raise such errors instead of printing its multi-line report, so they can
    be explained here; errors raised after composition are left as they are.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except KeyboardInterrupt:
        sweep = current_sweep_dir()
        hint = f"; re-run it with the same command plus resume={sweep} (finished jobs are skipped)" if sweep else ""
        print(f"kdx: interrupted{hint}", file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:  # `kdx-train --help | head`: the reader left; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        sys.exit(0)
    except Exception as e:
        full = disk_full_cause(e)
        if full is not None:  # a full disk anywhere (Hydra's own .hydra/ files included): one sentence, not a traceback
            _fail(full if isinstance(full, KdxError) else disk_full_error(full, full.filename or _hydra_file()))
        if getattr(e, "_kdx_after_composition", False) or not isinstance(e, (HydraException, OmegaConfBaseException)):
            raise
        _fail(explain_composition_error(e, sys.argv[1:], CONFIG_DIR, config_name))


def train_main() -> None:
    """kdx-train: one training run (teacher, student, distillation, transfer or probe)."""
    _run_hydra_main(_train, "train")


def pipeline_main() -> None:
    """kdx-pipeline: teacher -> student alone -> student distilled -> comparison."""
    _run_hydra_main(_pipeline, "pipeline")


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="tune")
def _tune(cfg: DictConfig) -> None:
    """kdx-tune's task: the study of conf/tune.yaml's `tune` section (see kdx.tune)."""
    try:
        _tune_job(cfg)
    except BaseException as e:
        e._kdx_after_composition = True
        raise


def _tune_job(cfg: DictConfig) -> None:
    from kdx.configs import to_dict
    from kdx.tune.compose import distill_presets
    from kdx.tune.settings import base_overrides, check_storage, parse_settings, storage_url

    overrides = _task_overrides()
    try:
        if _is_multirun():
            raise KdxError("kdx-tune runs its own search; drop -m/--multirun (and sweep=)")
        check_added_keys(cfg, overrides, CONFIG_DIR)
        settings = parse_settings(to_dict(cfg.get("tune")) or {}, to_dict(cfg.get("checkpoint")), distill_presets())
        base_overrides(overrides)  # the refusals, and the storage, before the training stack is imported
        check_storage(storage_url(settings, _run_dir().resolve()))
        from kdx.tune.study import run_study  # Optuna and the training stack, once the settings are sound

        run_study(cfg, _run_dir(), overrides, settings, search_path=_search_path_overrides(), config_dir=CONFIG_DIR)
    except RunInterrupted as e:
        print(f"kdx-tune: {e}", file=sys.stderr, flush=True)
        sys.exit(130)
    except KdxError as e:
        _fail(e)


def tune_main() -> None:
    """kdx-tune: search distillation methods and their settings within a budget of trials (Optuna)."""
    _run_hydra_main(_tune, "tune")

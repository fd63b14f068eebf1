#!/usr/bin/env python
"""Every distillation method on one pair, over several seeds: a table and a bar chart.

The pair is resnet20 -> cnn_small on Fashion-MNIST (classification), or SFace -> MobileFaceNet-56 on ORL (faces):

    python scripts/compare_methods.py                                  # quick: all methods, seeds 0 1 2, 3 epochs
    python scripts/compare_methods.py --preset converged --publish docs/results     # the converged benchmark
    python scripts/compare_methods.py --preset faces --publish docs/results         # the face methods on ORL
    python scripts/compare_methods.py --methods kd dkd --seeds 0 1 --epochs 5 --train-subset 20000
    python scripts/compare_methods.py --teacher-ckpt runs/fmnist/teacher/checkpoints/best.ckpt
    python scripts/compare_methods.py --methods kd -- trainer.max_steps=5 data.num_workers=0   # Hydra overrides
    python scripts/compare_methods.py --preset converged --finished-only   # the table so far, nothing trained

Stages, each a kdx-train run in its own folder under --out:
  teacher/seed0       the teacher (experiment fmnist/teacher), trained once, unless --teacher-ckpt is given;
  student/seed<k>     the student alone, CE only, same recipe (experiment fmnist/student);
  <method>/seed<k>    experiment=fmnist/kd distill=<method> teacher.ckpt=<the teacher>; two rows are not
                      registry methods: `lskd` (distill=lskd, KD on standardised logits) and `consistent`
                      (experiment=fmnist/consistent: function matching on mixed images, the teacher seeing the
                      student's very image).
A folder that already holds the finished run of the same config is reused, never retrained or overwritten
(an interrupted one resumes from its last checkpoint), so an interrupted benchmark continues where it stopped;
a finished run made with another config is left as it is and its method is reported as failed (choose another
--out). A method that fails is recorded with its error and the script goes on.
Where --out has no finished run of a cell, a published CSV's completed row of that cell with the same config hash
is reused (--resume-from CSV; default --publish DIR/<name>.csv): a benchmark resumes from its committed results
on a fresh machine. The teacher is trained again when cells remain to train (they need its checkpoint); on the
same code it is the same teacher, and a different test metric is warned about. Every CSV row records the kdx
commit that trained it (column kdx_commit; the run folder's kdx_commit.txt).

--preset converged (the benchmark whose results go to docs/results/):
  * teacher: resnet20 on all 55,000 non-validation training images (the other 5,000 are the validation split
    every run selects its checkpoint on), 18 epochs; target >= 92.5% test top-1;
  * students: cnn_small on the first 10,000 images of the same fixed split (data.seed=0 for every run: the
    student's labelled images are a subset of the teacher's, the realistic case of a teacher that knows more),
    16 epochs, seeds 0 1 2, every method plus lskd and consistent;
  * every run: seeded views (data.seeded_views=true: each method of a seed trains on exactly the same augmented
    images in the same order), trainer.deterministic=true, data.num_workers=0; the checkpoint with the best
    val/acc1 is the one tested, once (kdx-train's rule); test images are never used for a choice;
  * the papers' recipes (--recipes, on with this preset): DKD's and ReviewKD's linear warm-up scaled from 20 of
    240 epochs to warmup_epochs = epochs / 12; presets whose papers add the method's loss to an unweighted CE
    (kdx: (1 - alpha) CE + alpha w L with alpha = 0.5, half the paper's objective) are trained with
    optim.lr / (1 - alpha) and optim.weight_decay * (1 - alpha), which makes every SGD step exactly the paper's
    (CE + w' L at the base learning rate and decay); KD and lskd already are the papers' 0.1 CE + 0.9 KD;
  * the teacher cache (distill.teacher_cache.mode=disk under OUT/teacher_cache) for every row whose teacher
    outputs are all it reads (logits or the embedding): the first such run of a seed stores them, the others of
    that seed read them; the metrics are the same with or without it (tested in tests/test_teacher_cache.py);
  * --jobs 2: two runs at a time, one torch thread each (the teacher alone first, with every thread).
  Measured on the 2-core CPU (2026-12-03, the published table): 2 h 58 min in all; the teacher 39 min 48 s
  (18 epochs, 93.94% test top-1); per 1-thread student run, s / epoch: student alone 10, logit rows (kd, dkd,
  dist, mse, lskd, pkt, rkd) 11-13, layer-reading rows (fitnet, nst, sp, vid, at, reviewkd) 21-27, consistent
  30, bce 35 (the first row of a seed fills the teacher cache), crd 36. --methods without the layer-reading
  rows, or --epochs 12, bring it under 2 hours.

--preset faces (--data orl; the face table in docs/results/):
  * the pair sface_mobilefacenet56: the SFace ONNX model (given, never trained) teaches MobileFaceNet-56 on ORL's
    training identities; data.seed = seed, so each seed has its own split into training, validation and test
    identities, and the teacher is scored on each seed's test pairs (OUT/teacher/seed<k>/results.json);
  * per seed: the student alone (its margin loss) and each face row (--methods: emb_mse, emb_cos,
    emb_cos+relational (the shipped face_emb), relational, rkd, pkt, adadistill, logit_kd) from its preset with
    the other methods of the preset removed, 20 epochs, the checkpoint of the best val/verif_acc tested once;
    logit_kd reads SFace's logits over the training identities from its identity-centroid head
    (experiment=orl/face_logit_kd, teacher.head=centroids), as SFace has no head trained on them;
  * the table ranks by test verification accuracy and adds AUC and TAR@FAR (1e-1, 1e-2); the CSV has one row
    per run with test_verif_acc, test_auc, test_tar@far=1e-1, test_tar@far=1e-2, val_verif_acc;
  * every row reads the teacher's outputs only (its embedding; logit_kd its centroid logits too), so the teacher
    cache (disk) serves them: the embedding rows of a seed share one store, logit_kd keeps its own.
  Measured on the 2-core CPU (2026-12-04, the published face table): 1 h 26 min for 3 seeds x 9 rows; cached rows
  13-16 s / epoch, the student alone 19, the first row of a seed (fills the cache) 36, logit_kd 33.

Writes OUT/<name>.md (table: test top-1 mean +- std over seeds, the per-seed difference to the student alone,
seconds per epoch, the rows' recipe overrides), OUT/<name>.csv (one row per run: method, seed, test_acc1 as a
fraction, config_hash, and `command`, the kdx-train command that reproduces that one cell into a fresh folder),
OUT/<name>.json, OUT/<name>.png and OUT/<name>_versions.json (torch, Lightning, kdx, Python, threads); <name> is
`methods` (quick), `methods_converged` or `methods_faces`. --publish DIR copies those files (not the json) into DIR.
Reproducing one cell: run its `command` from the repository root (the teacher's row first if its checkpoint is
not there); on the same versions and thread count the metrics are the same to the last digit
(tests/test_compare_methods.py checks it on a small version).
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# the metrics of a kind of data: CSV column -> results.json key; the first is the one the table ranks by
CLASSIFICATION_METRICS = {"test_acc1": "test/acc1", "val_acc1": "val/acc1"}
FACE_METRICS = {"test_verif_acc": "test/verif_acc", "test_auc": "test/auc", "test_tar@far=1e-1": "test/tar@far=1e-1",
                "test_tar@far=1e-2": "test/tar@far=1e-2", "val_verif_acc": "val/verif_acc"}
FACE_FARS = (1e-1, 1e-2, 1e-3)  # the TAR@FAR targets every face run logs (kdx.lit.face.DEFAULT_FARS)

# data name -> experiment folder (conf/experiment/<name>/), pair, key that caps the training images, default cap,
# kind (classification: a teacher is trained; face: the pair's ONNX teacher is given and scored per seed)
DATASETS: dict[str, dict[str, Any]] = {
    "fmnist": {"experiment": "fmnist", "pair": "resnet20_cnn_small", "subset_key": "data.train_subset",
               "default_subset": 10000, "kind": "classification", "metrics": CLASSIFICATION_METRICS,
               "metric_label": "test top-1 (%)"},
    "synthetic": {"experiment": "synthetic", "pair": "synthetic_tiny", "subset_key": "data.train_size",
                  "default_subset": None, "kind": "classification", "metrics": CLASSIFICATION_METRICS,
                  "metric_label": "test top-1 (%)"},
    "orl": {"experiment": "orl", "pair": "sface_mobilefacenet56", "subset_key": None, "default_subset": None,
            "kind": "face", "metrics": FACE_METRICS, "metric_label": "test verification accuracy (%)"},
}
TEACHER, STUDENT = "teacher", "student alone"   # the baselines' method names (rows, CSV)
FOLDERS = {TEACHER: "teacher", STUDENT: "student"}
_DEFAULT = object()  # an option left at its default (argparse would pass a string default through `type`)
BASELINE_LABELS = {TEACHER: "teacher", STUDENT: "student alone, CE"}
FACE_BASELINE_LABELS = {TEACHER: "teacher", STUDENT: "student alone, margin loss"}

# rows that are not registry methods: the experiment (conf/experiment/<data>/<name>) and preset they run
ROWS: dict[str, dict[str, Any]] = {
    "lskd": {"experiment": "kd", "distill": "lskd", "method": "kd",
             "paper": "Sun et al. 2024, CVPR, arXiv:2403.01427"},
    "consistent": {"experiment": "consistent", "distill": None, "method": "kd",
                   "paper": "Beyer et al. 2022, CVPR, arXiv:2106.05237"},
}
# the face rows (--data orl): each method alone on the face student's margin loss, from its shipped preset
# (alpha as the preset says), and the shipped default face_emb (emb_cos + relational). A preset's keys that the
# row's method does not take are removed (`~distill.projection`), and face_emb's mixed-in relational term is
# emptied with `distill.mix=null` (Hydra merges `distill.mix={}` into the preset's mix, which keeps it).
# logit_kd reads teacher logits over the run's identities, which an ONNX teacher such as SFace has no head for: its
# row gives SFace the identity-centroid head (experiment face_logit_kd: teacher.head=centroids). It comes last, so
# the teacher each seed is scored with (the first row's data and teacher sections) is the plain SFace.
_ALONE = ["distill.mix=null"]
_ON_EMB_COS = ["~distill.projection", *_ALONE]
FACE_ROWS: dict[str, dict[str, Any]] = {
    "emb_mse": {"experiment": "face_kd", "distill": "face_mse", "method": "emb_mse", "overrides": []},
    "emb_cos": {"experiment": "face_kd", "distill": "face_emb", "method": "emb_cos", "overrides": _ALONE},
    "emb_cos+relational": {"experiment": "face_kd", "distill": "face_emb", "method": "emb_cos", "overrides": [],
                           "paper": "kdx's default face preset (distill=face_emb)"},
    "relational": {"experiment": "face_kd", "distill": "face_emb", "method": "relational",
                   "overrides": ["distill.method=relational", *_ON_EMB_COS]},
    "rkd": {"experiment": "face_kd", "distill": "face_emb", "method": "rkd",
            "overrides": ["distill.method=rkd", *_ON_EMB_COS]},
    "pkt": {"experiment": "face_kd", "distill": "face_emb", "method": "pkt",
            "overrides": ["distill.method=pkt", *_ON_EMB_COS]},
    "adadistill": {"experiment": "face_kd", "distill": "face_adadistill", "method": "adadistill", "overrides": []},
    "logit_kd": {"experiment": "face_logit_kd", "distill": "face_logit", "method": "logit_kd", "overrides": _ALONE,
                 "paper": "Hinton et al. 2015 on the margin heads' scaled cosines; SFace's logits from its identity "
                          "centroids (teacher.head=centroids)"},
}
# the papers add these methods' losses to an unweighted CE (CE + w L); their presets use alpha 0.5
PAPER_CE_PLUS_LOSS = frozenset({"dkd", "dist", "fitnet", "at", "nst", "vid", "reviewkd", "sp", "rkd", "pkt", "crd"})
WARMUP_SHARE = {"dkd": 20 / 240, "reviewkd": 20 / 240}  # linear warm-up: 20 of the papers' 240 epochs

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"name": "methods", "seeds": [0, 1, 2], "epochs": 3, "teacher_epochs": 10, "jobs": 1,
              "recipes": False, "cache": False, "extra_rows": [], "out": Path("outputs/compare_methods"),
              "overrides": []},
    "converged": {"name": "methods_converged", "seeds": [0, 1, 2], "epochs": 16, "teacher_epochs": 18,
                  "train_subset": 10000, "teacher_train_subset": None, "jobs": 2, "recipes": True, "cache": True,
                  "extra_rows": ["lskd", "consistent"], "out": Path("outputs/compare_methods_converged"),
                  "overrides": ["data.seed=0", "+data.seeded_views=true", "trainer.deterministic=true",
                                "data.num_workers=0"]},
    "faces": {"name": "methods_faces", "seeds": [0, 1, 2], "epochs": 20, "teacher_epochs": 1, "jobs": 2,
              "recipes": False, "cache": True, "extra_rows": [], "out": Path("outputs/compare_methods_faces"),
              "data": "orl", "overrides": ["trainer.deterministic=true", "data.num_workers=0"]},
}


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
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="quick (default: 3 epochs) | converged (the docs/results benchmark); options given win")
    p.add_argument("--methods", nargs="*", default=None,
                   help="distillation methods (default: every registered classification method; converged adds "
                        "lskd and consistent; --data orl: the face rows); none: the teacher and the student alone")
    p.add_argument("--seeds", nargs="+", type=int, default=_DEFAULT, help="seeds of the student runs (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=_DEFAULT, help="epochs of every student run (quick 3, converged 16)")
    p.add_argument("--train-subset", type=subset_value, default=_DEFAULT,
                   help="training images used (default 10000 on fmnist, the config's size on synthetic; 'all')")
    p.add_argument("--teacher-ckpt", type=Path, default=None, help="a trained teacher checkpoint (else one is trained)")
    p.add_argument("--teacher-epochs", type=int, default=_DEFAULT,
                   help="epochs of the teacher run (quick 10, converged 18)")
    p.add_argument("--teacher-train-subset", type=subset_value, default=_DEFAULT,
                   help="training images of the teacher run (default: as --train-subset)")
    p.add_argument("--data", choices=sorted(DATASETS), default=None,
                   help="fmnist (default) | orl (face methods, SFace teacher; --preset faces) | synthetic (tests)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (quick: outputs/compare_methods, converged: outputs/compare_methods_converged)")
    p.add_argument("--jobs", type=int, default=_DEFAULT,
                   help="runs at a time after the teacher, each with cores / jobs torch threads (quick 1, converged 2)")
    p.add_argument("--recipes", action=argparse.BooleanOptionalAction, default=None,
                   help="the papers' recipes scaled to the schedule (warm-ups, CE + w L); on with --preset converged")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="teacher cache on disk for rows that read teacher outputs only; on with --preset converged")
    p.add_argument("--publish", type=Path, default=None,
                   help="copy the table, CSV, chart and versions into this folder (e.g. docs/results)")
    p.add_argument("--resume-from", type=Path, default=_DEFAULT,
                   help="a published CSV (default: --publish DIR/<name>.csv when it exists) whose completed runs "
                        "are reused where --out has no finished run of the same config hash: a benchmark resumes "
                        "from its committed results on a fresh machine; 'none' reuses only --out")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: tabulate (and --publish) the runs already finished, the others counted as "
                        "'not run yet' in the table's note (a benchmark still under way, or stopped)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.data is None:
        args.data = preset.get("data", "fmnist")
    spec = DATASETS[args.data]
    args.name = preset["name"]
    args.overrides = [*preset["overrides"], *extra]
    for key in ("seeds", "epochs", "teacher_epochs", "jobs"):
        if getattr(args, key) is _DEFAULT:
            setattr(args, key, preset[key])
    for key in ("recipes", "cache"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.out is None:
        args.out = preset["out"] if args.data == preset.get("data", "fmnist") else \
            preset["out"].with_name(preset["out"].name + "_" + args.data)
    if args.train_subset is _DEFAULT:
        args.train_subset = preset.get("train_subset", spec["default_subset"]) if args.data == "fmnist" \
            else spec["default_subset"]
    if args.teacher_train_subset is _DEFAULT:
        args.teacher_train_subset = preset.get("teacher_train_subset", args.train_subset) \
            if args.data == "fmnist" and "teacher_train_subset" in preset else args.train_subset
    if args.epochs < 1 or args.teacher_epochs < 1:
        p.error("--epochs and --teacher-epochs must be at least 1")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.teacher_ckpt is not None and not args.teacher_ckpt.is_file():
        p.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    if spec["kind"] == "face":
        if args.teacher_ckpt is not None:
            p.error(f"--teacher-ckpt is for classification; --data {args.data} distils from its pair's given "
                    "teacher (set it with -- teacher.onnx=PATH)")
        unknown = [m for m in args.methods or [] if m not in FACE_ROWS]
        if unknown:
            p.error(f"--data {args.data} has the face rows {', '.join(FACE_ROWS)}; unknown: {', '.join(unknown)}")
    if args.methods is None and spec["kind"] == "face":
        args.methods = list(FACE_ROWS)
    elif args.methods is None:
        from kdx.distill import available_distillers

        args.methods = [*available_distillers("classification"), *preset["extra_rows"]]
    args.methods = list(dict.fromkeys(args.methods))
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.resume_from is _DEFAULT:
        default = args.publish / f"{args.name}.csv" if args.publish is not None else None
        args.resume_from = default if default is not None and default.is_file() else None
    elif str(args.resume_from).lower() == "none":
        args.resume_from = None
    elif not args.resume_from.is_file():
        p.error(f"--resume-from {args.resume_from} does not exist; give the CSV a benchmark published "
                f"(docs/results/{args.name}.csv) or 'none'")
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
              error: str | None = None, command: str | None = None,
              metrics: dict[str, str] = CLASSIFICATION_METRICS, pending: bool = False) -> dict[str, Any]:
    """One run's row: its metrics (CSV column -> results.json key), time and status (failed with `error` when it
    did not finish; pending when --finished-only found it not run yet)."""
    results = results or {}
    ok = results.get("status") == "completed" and error is None
    values, times = results.get("metrics") or {}, results.get("time") or {}
    fit_s, epochs = times.get("fit_s"), results.get("epochs")
    # a resumed run's fit_s covers the epochs trained since the resume only (fit_epochs; runs recorded before that
    # key: one train_epoch_s entry per epoch of the fit)
    fit_epochs = times.get("fit_epochs") or len(times.get("train_epoch_s") or []) or epochs
    per_epoch = fit_s / max(int(fit_epochs), 1) if ok and fit_s is not None and fit_epochs is not None else None
    status = "completed" if ok else "pending" if pending else "failed"
    return {"method": method, "kind": kind, "seed": seed, "status": status,
            "reused": bool(reused and ok), **{col: values.get(key) if ok else None for col, key in metrics.items()},
            "fit_s": fit_s if ok else None,
            "epochs": epochs if ok else None, "s_per_epoch": per_epoch, "run_dir": shown_path(run_dir),
            "checkpoint": shown_path(results["checkpoints"]["best"])
            if ok and (results.get("checkpoints") or {}).get("best") else None,
            "network": (results.get("hparams") or {}).get("student" if kind != "teacher" else "teacher"),
            "config_hash": results.get("config_hash"), "command": command,
            "error": None if ok or pending else (error or results.get("error") or f"status {results.get('status')}")}


COMMIT_FILE = "kdx_commit.txt"  # in a run folder: the kdx commit that trained it (see kdx_commit)


def read_published(path: Path, metrics: dict[str, str]) -> dict[tuple[str, int], dict[str, Any]]:
    """The completed runs of a published CSV (write_csv's columns) by (method, seed), as run records."""
    numbers = {**{col: float for col in metrics}, "fit_s": float, "s_per_epoch": float, "epochs": int}
    published = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("status") != "completed" or not row.get("config_hash"):
                continue
            rec: dict[str, Any] = {k: (numbers[k](v) if k in numbers else v) if v != "" else None
                                   for k, v in row.items()}
            rec.update(seed=int(row["seed"]), reused=True, published=shown_path(path))
            published[(rec["method"], rec["seed"])] = rec
    return published


def shown_path(path: Path | str) -> str:
    """`path` relative to the working directory when it lies under it (commands that work from the repository
    root on any machine), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cell_command(overrides: list[str], rerun_dir: Path, threads: int | None) -> str:
    """The shell command that trains this one cell again, into a fresh folder."""
    words = ["kdx-train", *overrides, f"hydra.run.dir={shown_path(rerun_dir)}"]
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + " ".join(shlex.quote(w) for w in words)


def run_one(method: str, kind: str, seed: int, overrides: list[str], run_dir: Path,
            rerun_dir: Path | None = None, threads: int | None = None,
            metrics: dict[str, str] = CLASSIFICATION_METRICS, train: bool = True,
            published: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compose and train one run in `run_dir`, reusing it when it already holds this finished run, or else the
    `published` record of this cell (a row of a committed CSV) when its config hash is this config's. With
    `threads`, torch uses that many threads (the number the recorded command pins). With `train` false
    (--finished-only) a run that is not finished is left as it is and reported as pending. A teacher is
    trained again even when published (the students need its checkpoint; on the same code and versions it is
    the same teacher, which the comparison of its test metric with the published one shows)."""
    from kdx.io import RESULTS_FILE, read_results, write_json
    from kdx.train import run_config_hash, run_training

    import torch

    if threads:
        torch.set_num_threads(int(threads))
    command = cell_command(overrides, rerun_dir or run_dir.parent / "rerun" / run_dir.name,
                           threads or torch.get_num_threads())
    label = f"{method} seed {seed}"
    try:
        cfg = compose(overrides)
        previous = read_results(run_dir)
        identity = run_config_hash(cfg)
        reused = bool(previous and previous.get("status") == "completed" and previous.get("config_hash") == identity)
        published = published if published is not None and published.get("config_hash") == identity else None
        if not reused and published is not None and (kind != "teacher" or not train):
            print(f"[compare] {label}: reusing the published run (config {identity}) from {published['published']}",
                  flush=True)
            return {**published, "command": command}
        if not reused and not train:
            print(f"[compare] {label}: not finished in {run_dir} (--finished-only: left as it is)", flush=True)
            return record_of(method, kind, seed, run_dir, None, command=command, metrics=metrics, pending=True)
        print(f"[compare] {label}: {'reusing the finished run in' if reused else 'training in'} {run_dir}", flush=True)
        # multirun=True: a finished run of the same config is skipped, an interrupted one resumed, a finished one
        # of another config raises RunExistsError (never overwritten), anything else starts fresh
        results = run_training(cfg, run_dir, overrides, multirun=True)
        rec = record_of(method, kind, seed, run_dir, results, reused=reused, command=command, metrics=metrics)
        rec["kdx_commit"] = trained_by(run_dir, reused)
        first = next(iter(metrics))
        if published is not None and rec[first] != published[first]:
            print(f"[compare] warning: {label} gives {first} {rec[first]!r} here and {published[first]!r} in "
                  f"{published['published']} (kdx commit {published.get('kdx_commit')}); the published runs of "
                  "other cells were made with that one", file=sys.stderr, flush=True)
        return rec
    except Exception as e:  # noqa: BLE001 - a failed method is reported in the table, the others go on
        error = first_line(e)
        print(f"[compare] {label} failed: {error}", file=sys.stderr, flush=True)
        if read_results(run_dir) is None:  # a failure before training started: say so in the folder too
            write_json(run_dir / RESULTS_FILE, {"status": "failed", "error": error, "run_dir": str(run_dir.resolve()),
                                                "overrides": overrides})
        return record_of(method, kind, seed, run_dir, read_results(run_dir), error=error, command=command,
                         metrics=metrics)


def score_face_teacher(seed: int, overrides: list[str], run_dir: Path, command: str,
                       metrics: dict[str, str] = FACE_METRICS) -> dict[str, Any]:
    """The given face teacher (teacher.onnx of the face rows' config) scored on the test pairs of seed `seed`'s
    identity split, by the protocol the face runs log (flip, 10 folds, the same FAR targets); the scores go to
    `run_dir`/results.json and are reused while the data and teacher settings are the same."""
    from kdx.configs import build_datamodule, to_dict
    from kdx.distill.teachers import build_face_teacher
    from kdx.eval.compare_face import score_model
    from kdx.io import config_hash, read_results, write_json

    label = f"{TEACHER} seed {seed}"
    try:
        cfg = compose(overrides)
        identity = config_hash({"data": to_dict(cfg.data), "teacher": to_dict(cfg.teacher), "fars": list(FACE_FARS)})
        previous = read_results(run_dir)
        if previous and previous.get("status") == "completed" and previous.get("config_hash") == identity:
            print(f"[compare] {label}: reusing the scores in {run_dir}", flush=True)
            return record_of(TEACHER, "teacher", seed, run_dir, previous, reused=True, command=command, metrics=metrics)
        print(f"[compare] {label}: scoring the given teacher on the test pairs", flush=True)
        dm = build_datamodule(cfg.data)
        dm.setup("test")
        teacher = build_face_teacher(to_dict(cfg.teacher), data_mean=cfg.data.get("mean", 0.5),
                                     data_std=cfg.data.get("std", 0.5))
        started = time.time()
        row = score_model(TEACHER, Path(teacher.source).stem, teacher.net, dm.test_set, {"flip": True}, FACE_FARS)
        values = {f"test/{k}": float(v) for k, v in row.items()
                  if k in ("verif_acc", "verif_acc_std", "auc", "threshold") or k.startswith("tar@far=")}
        results = {"status": "completed", "config_hash": identity, "metrics": values, "seed": seed,
                   "hparams": {"teacher": Path(teacher.source).name}, "time": {"test_s": round(time.time() - started, 2)},
                   "overrides": overrides}
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "results.json", results)
        return record_of(TEACHER, "teacher", seed, run_dir, results, command=command, metrics=metrics)
    except Exception as e:  # noqa: BLE001 - reported in the table like any failed run
        error = first_line(e)
        print(f"[compare] {label} failed: {error}", file=sys.stderr, flush=True)
        return record_of(TEACHER, "teacher", seed, run_dir, None, error=error, command=command, metrics=metrics)


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


def summarize(runs: list[dict[str, Any]], methods: list[str],
              metrics: dict[str, str] = CLASSIFICATION_METRICS) -> list[dict[str, Any]]:
    """One row per method (teacher and student alone first), methods sorted by the mean of the first metric
    (test top-1, or test verification accuracy); the other test metrics as `extra` mean ± std."""
    from kdx.distill import distiller_class

    key = next(iter(metrics))
    student_acc = {r["seed"]: r[key] for r in runs if r["kind"] == "student" and r[key] is not None}
    s_mean = mean_std(list(student_acc.values()))[0]
    rows = []
    for name in [TEACHER, STUDENT, *methods]:
        group = [r for r in runs if r["method"] == name]
        if not group:
            continue
        done = [r for r in group if r["status"] == "completed"]
        accs = [r[key] for r in done if r[key] is not None]
        mean, std = mean_std(accs)
        paired = [r[key] - student_acc[r["seed"]] for r in done if r[key] is not None and r["seed"] in student_acc]
        if name == STUDENT:
            diffs: list[float] = [0.0] * len(accs)
        elif name == TEACHER and len(accs) == 1:  # one teacher: to the student's mean
            diffs = [a - s_mean for a in accs] if s_mean is not None else []
        else:  # per-seed paired differences to the student alone of the same seed
            diffs = paired
        d_mean, d_std = mean_std(diffs)
        extra = {col: mean_std([r[col] for r in done if r.get(col) is not None])
                 for col in list(metrics)[1:] if col.startswith("test_")}
        paper = ""
        if name in ROWS:
            paper = ROWS[name]["paper"]
        elif name in FACE_ROWS and "paper" in FACE_ROWS[name]:
            paper = FACE_ROWS[name]["paper"]
        elif name in FACE_ROWS:
            paper = distiller_class(FACE_ROWS[name]["method"]).paper
        elif name not in (TEACHER, STUDENT):
            try:
                paper = distiller_class(name).paper
            except Exception:  # noqa: BLE001 - not registered (yet): its runs say why
                paper = ""
        per_epoch = [r["s_per_epoch"] for r in done if r["s_per_epoch"] is not None]
        errors = list(dict.fromkeys(r["error"] for r in group if r["status"] == "failed"))
        labels = FACE_BASELINE_LABELS if metrics is FACE_METRICS else BASELINE_LABELS
        label = labels.get(name, name)
        network = next((r["network"] for r in group if r.get("network")), None)
        if name in labels and network:
            label = f"{label} ({network})"
        rows.append({"method": name, "label": label,
                     "kind": group[0]["kind"], "paper": paper, "n": len(accs), "runs": len(group),
                     "failed": sum(r["status"] == "failed" for r in group),
                     "pending": sum(r["status"] == "pending" for r in group), "mean": mean, "std": std,
                     "diff_mean": d_mean, "diff_std": d_std, "extra": extra,
                     "s_per_epoch": statistics.fmean(per_epoch) if per_epoch else None,
                     "seeds": [r["seed"] for r in done], "errors": errors,
                     "recipe": next((r.get("recipe") for r in group if r.get("recipe")), "")})
    base = [r for r in rows if r["kind"] in ("teacher", "student")]
    methods_rows = [r for r in rows if r["kind"] == "distill"]
    methods_rows.sort(key=lambda r: (r["mean"] is None, -(r["mean"] or 0.0), r["method"]))
    return base + methods_rows


def pct(value: float | None, std: float | None = None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"
    return text if std is None else f"{text} ± {100 * std:.2f}"


def table_rows(rows: list[dict[str, Any]], spec: dict[str, Any] = DATASETS["fmnist"]) -> tuple[list[str], list[list[Any]]]:
    """Headers and cells of the method table: the ranking metric, Δ, the other test metrics (faces), time."""
    extra = [c for c in list(spec["metrics"])[1:] if c.startswith("test_")]
    shown = [c[len("test_"):].replace("auc", "AUC").replace("tar@far", "TAR@FAR") + " (%)" for c in extra]
    headers = ["method", "paper", spec["metric_label"], "Δ vs student (%)", *shown, "s / epoch", "n seeds",
               "recipe", "note"]
    out = []
    for r in rows:
        note = f"not run yet: {r['pending']}/{r['runs']}" if r.get("pending") else ""
        if r["failed"]:
            note = (f"{note}; " if note else "") + f"FAILED {r['failed']}/{r['runs']}: " + "; ".join(
                e or "" for e in r["errors"])
        elif r["kind"] == "teacher":
            note = "given checkpoint" if r.get("given") else ""
        diff = "-" if r["kind"] == "student" or r["diff_mean"] is None else pct(
            r["diff_mean"], None if r["kind"] == "teacher" else r["diff_std"], signed=True)
        out.append([r["label"], r["paper"] or "-", pct(r["mean"], r["std"]), diff,
                    *(pct(*r["extra"].get(c, (None, None))) for c in extra),
                    "-" if r["s_per_epoch"] is None else f"{r['s_per_epoch']:.1f}", r["n"],
                    r.get("recipe") or "-", note])
    return headers, out


def render_markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    from kdx.report.render import markdown_table

    s = settings
    spec = DATASETS[s["data"]]
    subset = "all" if s["train_subset"] is None else s["train_subset"]
    v = s.get("versions") or {}
    if spec["kind"] == "face":
        what = (f"{s['epochs']} epoch(s) per student run on the training identities of each seed's identity split "
                f"(data.seed = seed: training, validation and test identities differ by seed), seeds {s['seeds']}; "
                f"teacher: {s['teacher_ckpt']} (given, not trained; scored on each seed's test pairs). Verification "
                "on the test identities' pairs, once, with the checkpoint of the best val/verif_acc (insightface "
                "protocol: image + flipped image, 10-fold accuracy; AUC and TAR@FAR over all test pairs); mean ± "
                "sample std over seeds. Δ: the per-seed difference to the student alone trained with the same seed "
                "(mean ± std). s / epoch: mean fit time / epochs trained by that fit (validation included; a "
                "resumed run: since its resume).")
    else:
        what = (f"{s['epochs']} epoch(s) per student run on {subset} training images, seeds {s['seeds']}; "
                f"teacher: {s['teacher_ckpt']}. Top-1 on the test set, once, with the checkpoint of the best val/acc1; "
                "mean ± sample std over seeds (0 for one seed). Δ: the per-seed difference to the student alone "
                "trained with the same seed (mean ± std; the teacher's is to the student's mean). s / epoch: mean "
                "fit time / epochs trained by that fit (validation included; a resumed run: since its resume). "
                "recipe: the row's settings beyond its preset (scripts/compare_methods.py --recipes).")
    pending = sum(r.get("pending", 0) for r in rows)
    if pending:  # a table of a benchmark still under way (--finished-only) says so before the numbers
        what += (f" **Under way: {pending} run(s) not finished yet** (counted in the note column; the rows show the "
                 f"seeds finished so far, `n seeds`).")
    lines = [f"# Distillation methods: {s['pair']} on {s['data']} ({s['preset']})", "", what, "",
             markdown_table(*table_rows(rows, spec)), "", f"![methods]({s['name']}.png)", "",
             f"Made by `{s['command']}`" + (f" in {s['wall_s']:.0f} s" if s.get("wall_s") else "")
             + f"; torch {v.get('torch')}, Lightning {v.get('lightning')}, kdx {v.get('kdx')}"
             + (f" (tabulated at commit {v['kdx_commit']})" if v.get("kdx_commit") else "")
             + f", Python {v.get('python')}. "
             + (f"The runs were trained by kdx commit(s) {', '.join(v['runs_kdx_commits'])}. "
                if v.get("runs_kdx_commits") else "")
             + f"Each run's command: {s['name']}.csv, column `command`, run on the commit of its column `kdx_commit` "
               "(the code that trained it)."
             + (f" {s['published_reused']} run(s) were taken from the published {s['resumed_from']} (the same config "
                "hash), not trained by this invocation." if s.get("published_reused") else ""), ""]
    return "\n".join(lines)


RUN_COLUMNS = ["kind", "status", "reused", "fit_s", "epochs", "s_per_epoch", "network", "config_hash", "command",
               "run_dir", "checkpoint", "kdx_commit", "error"]


def write_csv(path: Path, runs: list[dict[str, Any]], metrics: dict[str, str] = CLASSIFICATION_METRICS) -> None:
    """One row per run: method, seed, the metrics (fractions), then how it ran and the command that re-runs it."""
    columns = ["method", "seed", *metrics, *RUN_COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            writer.writerow({k: "" if run.get(k) is None else run[k] for k in columns})


def write_png(path: Path, rows: list[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """Horizontal bars of the mean ranking metric with std error bars, a dashed line at the student alone."""
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
    ax.set_xlabel(f"{DATASETS[settings['data']]['metric_label']}, mean ± std over seeds")
    ax.set_title(f"{settings['pair']} on {settings['data']}, {settings['epochs']} epoch(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def versions() -> dict[str, Any]:
    """The versions the numbers were made with (a cell reproduces to the digit on the same ones)."""
    import platform

    import pytorch_lightning as lightning
    import torch

    import kdx

    return {"torch": torch.__version__, "lightning": lightning.__version__, "kdx": kdx.__version__,
            "kdx_commit": kdx_commit(), "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def trained_by(run_dir: Path, reused: bool) -> str | None:
    """The kdx commit that trained the run in `run_dir`: recorded there when it finished here, so a reused run
    keeps the commit it was made with (None for a run finished before kdx_commit.txt was written)."""
    path = run_dir / COMMIT_FILE
    if reused:  # made by an earlier invocation: its record, or unknown (never this checkout's commit)
        return (path.read_text(encoding="utf-8").strip() or None) if path.is_file() else None
    commit = kdx_commit()
    if (run_dir / "results.json").is_file():
        path.write_text(f"{commit or ''}\n", encoding="utf-8")
    return commit


def kdx_commit() -> str | None:
    """The git commit of the kdx checkout that ran (with `+changes` when its tracked files differ from it): the
    code a cell's command must run on to give the same digits. None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def write_outputs(out: Path, runs: list[dict[str, Any]], methods: list[str], settings: dict[str, Any],
                  png: bool = True) -> tuple[list[dict[str, Any]], str]:
    from kdx.io import atomic_write_text, write_json

    name = settings["name"]
    metrics = DATASETS[settings["data"]]["metrics"]
    rows = summarize(runs, methods, metrics)
    settings["published_reused"] = sum(1 for r in runs if r.get("published"))
    settings["versions"]["runs_kdx_commits"] = sorted({r["kdx_commit"] for r in runs if r.get("kdx_commit")})
    for r in rows:
        if r["kind"] == "teacher":
            r["given"] = settings["teacher_given"]
    text = render_markdown(rows, settings)
    ordered = sorted(runs, key=lambda r: (r["kind"] != "teacher", r["seed"], r.get("order", 0)))
    atomic_write_text(out / f"{name}.md", text)
    write_csv(out / f"{name}.csv", ordered, metrics)
    write_json(out / f"{name}.json", {"settings": settings, "metric": next(iter(metrics.values())), "table": rows,
                                      "runs": ordered})
    write_json(out / f"{name}_versions.json", settings["versions"])
    if png:
        write_png(out / f"{name}.png", rows, settings)
    return rows, text


def publish(out: Path, name: str, dest: Path) -> list[Path]:
    """Copy the table, the per-run CSV, the chart and the versions into `dest` (docs/results/)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for suffix in (".md", ".csv", ".png", "_versions.json"):
        src = out / f"{name}{suffix}"
        if src.is_file():
            copied.append(Path(shutil.copy2(src, dest / src.name)))
    return copied


# ----------------------------------------------------------------------------- main


def reads_teacher_outputs_only(method: str) -> bool:
    """True when a row's method reads no teacher layers (logits or the embedding), so the teacher cache serves it."""
    from kdx.distill import Distiller, distiller_class

    name = {**ROWS, **FACE_ROWS}.get(method, {}).get("method", method)
    try:
        cls = distiller_class(name)
    except Exception:  # noqa: BLE001 - an unknown method fails in its own run, with its error
        return False
    return cls.teacher_layers is Distiller.teacher_layers


def number(value: float) -> str:
    return f"{value:.6g}"


def recipe_overrides(method: str, base: list[str], epochs: int) -> tuple[list[str], str]:
    """The papers' recipe of a row on top of its preset, scaled to `epochs`: (overrides, a short description).

    DKD/ReviewKD: the linear warm-up of 20 of 240 epochs becomes epochs / 12. Methods whose papers train
    CE + w L: kdx's total (1 - alpha) CE + alpha w L is (1 - alpha) times that objective, so the learning rate is
    divided and the weight decay multiplied by (1 - alpha): every SGD (momentum, Nesterov) step is then the paper's.
    """
    overrides: list[str] = []
    notes: list[str] = []
    if method in WARMUP_SHARE:
        warmup = number(epochs * WARMUP_SHARE[method])
        overrides.append(f"distill.warmup_epochs={warmup}")
        notes.append(f"warm-up {warmup} ep")
    if method in PAPER_CE_PLUS_LOSS:
        from kdx.distill.settings import split_distill_section

        cfg = compose(base)
        alpha = split_distill_section(cfg.distill, "classification")[0].alpha
        if 0.0 < alpha < 1.0:
            keep = 1.0 - alpha
            lr, wd = float(cfg.optim.lr) / keep, float(cfg.optim.get("weight_decay", 0.0)) * keep
            overrides += [f"optim.lr={number(lr)}", f"optim.weight_decay={number(wd)}"]
            notes.append(f"CE + w·L: lr {number(lr)}, wd {number(wd)}")
    return overrides, "; ".join(notes)


def cell_worker(method: str, kind: str, seed: int, overrides: list[str], run_dir: str, rerun_dir: str,
                threads: int, recipe: str, order: int, metrics: dict[str, str] = CLASSIFICATION_METRICS,
                train: bool = True, published: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cell in a worker process (--jobs > 1)."""
    rec = run_one(method, kind, seed, overrides, Path(run_dir), Path(rerun_dir), threads, metrics, train=train,
                  published=published)
    rec.update(recipe=recipe, order=order)
    return rec


def run_cells(cells: list[tuple], out: Path, args: argparse.Namespace, settings: dict[str, Any],
              runs: list[dict[str, Any]], threads: int | None, metrics: dict[str, str]) -> None:
    """Train every cell (method, kind, seed, overrides, recipe) into OUT/<method>/seed<k>, --jobs at a time,
    rewriting the table after each one."""
    def folder(method: str, seed: int, root: Path = out) -> Path:
        return root / FOLDERS.get(method, method) / f"seed{seed}"

    total = len(cells)
    finished = 0

    def collect(rec: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        runs.append(rec)
        print(f"[compare] {finished}/{total} run(s) done", flush=True)
        write_outputs(out, runs, args.methods, settings, png=False)

    jobs = [(m, k, s, o, str(folder(m, s)), str(folder(m, s, out / "rerun")), threads, recipe, i, metrics,
             not args.finished_only, args.published.get((m, s))) for i, (m, k, s, o, recipe) in enumerate(cells)]
    if args.jobs == 1:
        for job in jobs:
            collect(cell_worker(*job))
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(cell_worker, *job) for job in jobs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    collect(future.result())


def finish(out: Path, args: argparse.Namespace, settings: dict[str, Any], runs: list[dict[str, Any]],
           started: float) -> int:
    """Write the final table, CSV, chart and versions (and publish them); print the table."""
    if not args.finished_only:  # the time of this invocation (a tabulation only would say nothing)
        settings["wall_s"] = round(time.time() - started, 1)
    rows, text = write_outputs(out, runs, args.methods, settings)
    failed = [r for r in runs if r["status"] == "failed"]
    pending = [r for r in runs if r["status"] == "pending"]
    print("\n" + text)
    print(f"[compare] {len(runs) - len(failed) - len(pending)} run(s) finished, {len(failed)} failed"
          + (f", {len(pending)} not run yet (--finished-only)" if pending else "")
          + f", in {time.time() - started:.0f} s; wrote {out / (args.name + '.md')}, .csv, .json, .png and "
            f"_versions.json", flush=True)
    if args.publish is not None:
        copied = publish(out, args.name, args.publish)
        print(f"[compare] published {', '.join(shown_path(c) for c in copied)}", flush=True)
    return 0


def run_face_benchmark(args: argparse.Namespace, spec: dict[str, Any], out: Path, settings: dict[str, Any],
                       common, threads: int | None) -> int:
    """--data orl: per seed, the given teacher scored, the student alone and every face row trained."""
    started = time.time()
    exp, metrics = spec["experiment"], spec["metrics"]
    runs: list[dict[str, Any]] = []
    cells = []
    for seed in args.seeds:
        student = [f"experiment={exp}/student", *common(None, args.epochs, seed), *args.overrides]
        cells.append((STUDENT, "student", seed, student, ""))
        for method in args.methods:
            row = FACE_ROWS[method]
            base = [f"experiment={exp}/{row['experiment']}", f"distill={row['distill']}",
                    *common(None, args.epochs, seed), *row["overrides"]]
            if args.cache and reads_teacher_outputs_only(method):
                base += ["distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={shown_path(out / 'teacher_cache')}"]
            cells.append((method, "distill", seed, [*base, *args.overrides], ""))
        # the teacher of this seed's split: what the first distilled row reads (its data and teacher sections)
        scored_with = next((c[3] for c in cells if c[1] == "distill" and c[2] == seed), None) or \
            [f"experiment={exp}/face_kd", *common(None, args.epochs, seed), *args.overrides]
        command = " ".join(shlex.quote(w) for w in ["python", "scripts/compare_methods.py", "--data", args.data,
                                                      "--preset", args.preset, "--seeds", str(seed), "--methods",
                                                      "--out", shown_path(out / "rerun")])
        runs.append(score_face_teacher(seed, scored_with, out / FOLDERS[TEACHER] / f"seed{seed}", command, metrics))
    teacher = to_teacher_label(scored_with)
    settings["teacher_ckpt"] = teacher
    run_cells(cells, out, args, settings, runs, threads, metrics)
    return finish(out, args, settings, runs, started)


def to_teacher_label(overrides: list[str]) -> str:
    """How the face rows' teacher is named in the table: its ONNX file, or its checkpoint."""
    from kdx.configs import to_dict

    spec = to_dict(compose(overrides).teacher)
    return str(spec.get("onnx") or spec.get("ckpt") or spec.get("name"))


def making_options(argv: list[str]) -> list[str]:
    """The options that decide what the benchmark makes: without --finished-only and --resume-from (how this
    invocation got its runs), up to `--`."""
    kept, skip = [], False
    for i, a in enumerate(argv):
        if a == "--":
            return kept + argv[i:]
        if skip:
            skip = False
        elif a == "--resume-from":
            skip = True
        elif a != "--finished-only" and not a.startswith("--resume-from="):
            kept.append(a)
    return kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DATASETS[args.data]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    exp, pair = spec["experiment"], spec["pair"]
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.jobs) if args.jobs > 1 else None

    def common(subset: int | None, epochs: int, seed: int) -> list[str]:
        base = [f"pair={pair}", f"seed={seed}", f"trainer.max_epochs={epochs}"]
        if subset is not None:
            base.append(f"{spec['subset_key']}={subset}")
        return base

    settings: dict[str, Any] = {
        "name": args.name, "preset": args.preset, "data": args.data, "pair": pair, "methods": args.methods,
        "seeds": args.seeds, "epochs": args.epochs, "train_subset": args.train_subset,
        "teacher_epochs": args.teacher_epochs, "teacher_train_subset": args.teacher_train_subset,
        "overrides": args.overrides, "recipes": args.recipes, "cache": args.cache, "jobs": args.jobs,
        "teacher_given": args.teacher_ckpt is not None, "out": shown_path(out),
        # the command that makes the benchmark (without how this invocation got its runs: making_options)
        "command": " ".join(shlex.quote(w) for w in ["python", "scripts/compare_methods.py",
                                                      *making_options(sys.argv[1:] if argv is None else argv)]),
        "finished_only": args.finished_only,
        "versions": versions(),
    }
    face, metrics = spec["kind"] == "face", spec["metrics"]
    args.published = read_published(args.resume_from, metrics) if args.resume_from is not None else {}
    if args.resume_from is not None:
        settings["resumed_from"] = shown_path(args.resume_from)
        print(f"[compare] {len(args.published)} completed run(s) in {shown_path(args.resume_from)}: reused where "
              f"{shown_path(out)} has no finished run of the same config", flush=True)
    runs: list[dict[str, Any]] = []
    if face:  # the pair's teacher is given (an ONNX model): scored on each seed's test identities, never trained
        return run_face_benchmark(args, spec, out, settings, common, threads)
    if args.teacher_ckpt is not None:
        teacher = given_teacher(args.teacher_ckpt.resolve())
    else:
        teacher = run_one(TEACHER, "teacher", 0,
                          [f"experiment={exp}/teacher", *common(args.teacher_train_subset, args.teacher_epochs, 0),
                           *args.overrides], out / FOLDERS[TEACHER] / "seed0", out / "rerun" / "teacher" / "seed0",
                          train=not args.finished_only, published=args.published.get((TEACHER, 0)))
    runs.append(teacher)
    settings["teacher_ckpt"] = shown_path(teacher["checkpoint"]) if teacher["checkpoint"] else None
    if teacher["status"] != "completed" or not teacher["checkpoint"]:
        write_outputs(out, runs, args.methods, settings)
        why = ("is not finished (--finished-only trains nothing)" if teacher["status"] == "pending"
               else f"failed ({teacher['error']})")
        print(f"[compare] the teacher {why}; nothing to distill. See {teacher['run_dir']}", file=sys.stderr, flush=True)
        return 1

    cells = []  # seed-major: an interrupted comparison still has whole seeds
    for seed in args.seeds:
        student = [f"experiment={exp}/student", *common(args.train_subset, args.epochs, seed), *args.overrides]
        cells.append((STUDENT, "student", seed, student, ""))
        for method in args.methods:
            row = ROWS.get(method, {"experiment": "kd", "distill": method})
            base = [f"experiment={exp}/{row['experiment']}"]
            if row["distill"]:
                base.append(f"distill={row['distill']}")
            base += [f"teacher.ckpt={settings['teacher_ckpt']}", *common(args.train_subset, args.epochs, seed)]
            if args.cache and reads_teacher_outputs_only(method):
                base += ["distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={shown_path(out / 'teacher_cache')}"]
            base += args.overrides
            recipe = ""
            if args.recipes:
                try:
                    extra, recipe = recipe_overrides(method, base, args.epochs)
                    base += extra
                except Exception as e:  # noqa: BLE001 - the run itself reports a config that does not compose
                    print(f"[compare] {method}: no recipe ({first_line(e)})", file=sys.stderr, flush=True)
            cells.append((method, "distill", seed, base, recipe))

    run_cells(cells, out, args, settings, runs, threads, metrics)
    return finish(out, args, settings, runs, started)


if __name__ == "__main__":
    sys.exit(main())

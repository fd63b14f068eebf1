"""scripts/compare_methods.py on the synthetic data and on ORL faces: the method table, its files, and reuse of
finished runs."""
import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TINY = ["data.train_size=96", "data.val_size=32", "data.test_size=32", "data.batch_size=32",
        "trainer.progress_bar=none"]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "scripts" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the Markdown table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]


def results_mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("*/seed*/results.json")) if p.parent.parent.name != "rerun"}


def test_method_table_on_synthetic_data_and_rerun_reuses_finished_runs(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "cmp"
    args = ["--data", "synthetic", "--methods", "kd", "dkd", "--seeds", "0", "1", "--epochs", "1",
            "--teacher-epochs", "1", "--out", str(out), "--", *TINY]
    assert script.main(args) == 0
    for name in ("methods.md", "methods.csv", "methods.json", "methods.png"):
        assert (out / name).is_file(), name
    assert (out / "methods.png").read_bytes().startswith(b"\x89PNG")

    markdown = (out / "methods.md").read_text()
    assert markdown in capsys.readouterr().out  # the table is printed at the end
    rows = table_rows(markdown)
    assert [r[0] for r in rows[:2]] == ["teacher (resnet8)", "student alone, CE (cnn_tiny)"]
    assert sorted(r[0] for r in rows[2:]) == ["dkd", "kd"]
    for row in rows:
        assert "±" in row[2], row  # test top-1 mean ± std
    for row in rows[2:]:
        assert "±" in row[3] and row[5] == "2" and row[1].startswith(("Hinton", "Zhao")), row
    means = [float(r[2].split("±")[0]) for r in rows[2:]]
    assert means == sorted(means, reverse=True)  # methods sorted by mean accuracy

    with open(out / "methods.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert {r["method"] for r in runs} == {"teacher", "student alone", "kd", "dkd"}
    assert all(r["config_hash"] and r["command"].startswith("OMP_NUM_THREADS=") for r in runs)
    distilled = [r for r in runs if r["kind"] == "distill"]
    assert len(distilled) == 4 and all(r["status"] == "completed" for r in distilled)
    assert {(r["method"], r["seed"]) for r in distilled} == {(m, s) for m in ("kd", "dkd") for s in ("0", "1")}
    assert [r["kind"] for r in runs].count("student") == 2 and [r["kind"] for r in runs].count("teacher") == 1
    table = json.loads((out / "methods.json").read_text())["table"]
    assert all(0.0 <= r["mean"] <= 1.0 and r["s_per_epoch"] > 0 for r in table)

    # a re-run retrains nothing, and an unknown method is reported as failed without stopping the others
    before = results_mtimes(out)
    assert len(before) == 7
    assert script.main([*args[:5], "nosuch", *args[5:]]) == 0
    assert results_mtimes(out) == {**before, **{p: t for p, t in results_mtimes(out).items() if "nosuch" in str(p)}}
    with open(out / "methods.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert all(r["reused"] == "True" for r in runs if r["method"] != "nosuch")
    failed = [r for r in runs if r["method"] == "nosuch"]
    assert len(failed) == 2 and all(r["status"] == "failed" and "nosuch" in r["error"] for r in failed)
    rows = table_rows((out / "methods.md").read_text())
    assert rows[-1][0] == "nosuch" and "FAILED 2/2" in rows[-1][-1]

    # --finished-only tabulates a benchmark under way: seed 2 is not run, nothing is trained or created for it
    before = results_mtimes(out)
    assert script.main(["--data", "synthetic", "--methods", "kd", "dkd", "--seeds", "0", "1", "2", "--epochs", "1",
                        "--teacher-epochs", "1", "--out", str(out), "--finished-only", "--", *TINY]) == 0
    assert results_mtimes(out) == before and not (out / "kd" / "seed2").exists()
    markdown = (out / "methods.md").read_text()
    assert "**Under way: 3 run(s) not finished yet**" in markdown and "--finished-only" not in markdown
    rows = {r[0]: r for r in table_rows(markdown)}
    assert rows["kd"][5] == "2" and rows["kd"][-1] == "not run yet: 1/3"
    with open(out / "methods.csv", newline="") as fh:
        pending = [(r["method"], r["seed"]) for r in csv.DictReader(fh) if r["status"] == "pending"]
    assert sorted(pending) == [("dkd", "2"), ("kd", "2"), ("student alone", "2")]


def test_converged_preset_small_version_reproduces_a_cell_from_its_printed_command(tmp_path, monkeypatch):
    """The converged benchmark's shape (recipes, cache, fixed split, seeded views) on two methods, one seed and a
    few steps; one cell re-run with the command from the CSV gives the same metrics to the last digit."""
    script = load_script()
    monkeypatch.chdir(tmp_path)  # commands name paths relative to where the benchmark ran
    out, docs = Path("cmp"), Path("docs_results")
    args = ["--preset", "converged", "--data", "synthetic", "--methods", "dkd", "lskd", "--seeds", "0",
            "--epochs", "2", "--teacher-epochs", "1", "--jobs", "1", "--out", str(out), "--publish", str(docs),
            "--", *TINY, "data.num_workers=0"]
    assert script.main(args) == 0
    name = "methods_converged"
    for suffix in (".md", ".csv", ".png", "_versions.json"):
        assert (docs / f"{name}{suffix}").is_file(), suffix
    versions = json.loads((docs / f"{name}_versions.json").read_text())
    assert {"torch", "lightning", "kdx", "kdx_commit"} <= set(versions)
    assert versions["kdx_commit"] is None or len(versions["kdx_commit"].split("+")[0]) == 40  # git HEAD
    markdown = (docs / f"{name}.md").read_text()
    assert f"torch {versions['torch']}" in markdown and "s / epoch" in markdown and "Δ vs student" in markdown
    with open(docs / f"{name}.csv", newline="") as fh:
        runs = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(runs) == {"teacher", "student alone", "dkd", "lskd"}
    assert all(r["status"] == "completed" and 0.0 <= float(r["test_acc1"]) <= 1.0 for r in runs.values())
    assert all(len(r["config_hash"]) >= 8 for r in runs.values())

    dkd = shlex.split(runs["dkd"]["command"])
    assert dkd[0] == "OMP_NUM_THREADS=1" or dkd[0].startswith("OMP_NUM_THREADS=")
    # the recipe: DKD's warm-up scaled to 2 epochs (20/240 * 2), CE + w L through lr / (1 - alpha), the cache on
    assert "distill.warmup_epochs=0.166667" in dkd and "optim.lr=0.1" in dkd and "optim.weight_decay=0.00025" in dkd
    assert "distill.teacher_cache.mode=disk" in dkd and "data.seed=0" in dkd and "+data.seeded_views=true" in dkd
    lskd = shlex.split(runs["lskd"]["command"])
    assert "distill=lskd" in lskd and not any(w.startswith("optim.lr=") for w in lskd)

    # re-run the dkd cell exactly as printed (a fresh process, from the same folder)
    env = {**os.environ, dkd[0].split("=")[0]: dkd[0].split("=")[1]}
    kdx_train = str(Path(sys.executable).with_name("kdx-train"))
    done = subprocess.run([kdx_train, *dkd[2:]], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rerun_dir = next(w.split("=", 1)[1] for w in dkd if w.startswith("hydra.run.dir="))
    again = json.loads((Path(rerun_dir) / "results.json").read_text())
    first = json.loads((Path(runs["dkd"]["run_dir"]) / "results.json").read_text())
    assert again["config_hash"] == first["config_hash"] == runs["dkd"]["config_hash"]
    assert again["metrics"] == first["metrics"]  # every metric, to the last digit
    assert repr(again["metrics"]["test/acc1"]) == runs["dkd"]["test_acc1"]


FACE_TINY = ["+trainer.limit_train_batches=2", "data.val_identities=2", "data.test_identities=4",
             "data.num_val_pairs=20", "data.num_test_pairs=40", "student.kwargs.input_size=[32,32]",
             "trainer.progress_bar=none"]


def test_face_methods_table_on_orl_scores_the_given_teacher_per_seed_and_reuses_runs(tmp_path):
    """--preset faces on real ORL images, reduced: the SFace teacher scored on each seed's test pairs (never
    trained), the student alone and two face rows trained, the face metrics in the CSV and the table; a re-run
    retrains and rescores nothing; a classification-only option is refused by name."""
    script = load_script()
    out = tmp_path / "faces"
    args = ["--preset", "faces", "--methods", "emb_mse", "rkd", "--seeds", "0", "1", "--epochs", "1", "--jobs", "1",
            "--out", str(out), "--", *FACE_TINY]
    assert script.main(args) == 0
    with open(out / "methods_faces.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert {r["method"] for r in runs} == {"teacher", "student alone", "emb_mse", "rkd"}
    assert all(r["status"] == "completed" for r in runs), [r["error"] for r in runs]
    teachers = [r for r in runs if r["method"] == "teacher"]
    assert sorted(r["seed"] for r in teachers) == ["0", "1"]  # one score per seed's identity split
    assert all(r["fit_s"] == "" and r["checkpoint"] == "" for r in teachers)  # scored, not trained
    for r in runs:
        assert 0.5 <= float(r["test_verif_acc"]) <= 1.0 and 0.0 <= float(r["test_auc"]) <= 1.0, r
        assert r["test_tar@far=1e-1"] != ""
    # SFace (trained on millions of faces) verifies the held-out ORL identities better than a 1-epoch student
    assert min(float(r["test_verif_acc"]) for r in teachers) > max(
        float(r["test_verif_acc"]) for r in runs if r["method"] == "student alone")
    rkd = next(r for r in runs if r["method"] == "rkd" and r["seed"] == "0")
    words = shlex.split(rkd["command"])
    assert "distill.method=rkd" in words and "~distill.projection" in words and "distill.teacher_cache.mode=disk" in words
    rows = table_rows((out / "methods_faces.md").read_text())
    assert rows[0][0].startswith("teacher (") and rows[1][0].startswith("student alone, margin loss")
    assert all("±" in r[2] and "±" in r[4] for r in rows)  # verification accuracy and AUC, mean ± std

    before = results_mtimes(out)
    assert len(before) == 8
    assert script.main(args) == 0
    assert results_mtimes(out) == before
    with pytest.raises(SystemExit):
        script.parse_args(["--data", "orl", "--methods", "dkd"])


def test_seconds_per_epoch_of_a_resumed_run_divide_its_fit_time_by_the_epochs_it_trained(tmp_path):
    """A run resumed after 16 of 20 epochs timed only its last 4: s / epoch is fit_s / 4, not fit_s / 20 (which
    showed such face rows at 4.5 s / epoch beside 16 s for the others); runs recorded before `fit_epochs` existed
    count their train_epoch_s entries."""
    script = load_script()
    results = {"status": "completed", "epochs": 20, "metrics": {"test/acc1": 0.9, "val/acc1": 0.9},
               "time": {"fit_s": 80.0, "fit_epochs": 4, "train_epoch_s": [15.0] * 4}}
    assert script.record_of("kd", "distill", 0, tmp_path, results)["s_per_epoch"] == 20.0
    del results["time"]["fit_epochs"]
    assert script.record_of("kd", "distill", 0, tmp_path, results)["s_per_epoch"] == 20.0
    results["time"] = {"fit_s": 80.0}
    assert script.record_of("kd", "distill", 0, tmp_path, results)["s_per_epoch"] == 4.0


def test_each_face_row_distills_with_its_own_method_only():
    """A face row named after one method trains that method alone (face_emb's mixed-in relational term emptied),
    and the default-preset row keeps the mix: the rows' composed distill sections, read as kdx-train reads them."""
    from kdx.distill.mix import split_distill_config
    from kdx.distill.settings import split_distill_section

    script = load_script()
    for name, row in script.FACE_ROWS.items():
        cfg = script.compose([f"experiment=orl/{row['experiment']}", f"distill={row['distill']}", *row["overrides"]])
        _, methods = split_distill_section(cfg.distill, "face")
        trained = sorted(entry[0] for entry in split_distill_config(methods))
        assert trained == (["emb_cos", "relational"] if name == "emb_cos+relational" else [row["method"]]), name


def test_a_benchmark_resumes_from_its_published_csv_on_a_fresh_machine(tmp_path, monkeypatch, capsys):
    """The run folders are gone (a fresh clone), the published CSV is not: its completed cells are reused when
    their config hash is asked for again, the teacher is trained again for the cells still to run (the same
    teacher: no warning), and every row says which kdx commit trained it."""
    script = load_script()
    monkeypatch.chdir(tmp_path)
    docs = Path("docs_results")
    common = ["--data", "synthetic", "--methods", "kd", "--epochs", "1", "--teacher-epochs", "1", "--jobs", "1",
              "--out", "cmp", "--publish", str(docs)]
    assert script.main([*common, "--seeds", "0", "--", *TINY]) == 0
    with open(docs / "methods.csv", newline="") as fh:
        first = {(r["method"], r["seed"]): r for r in csv.DictReader(fh)}
    assert all(r["kdx_commit"] == (script.kdx_commit() or "") for r in first.values())
    versions = json.loads((docs / "methods_versions.json").read_text())
    assert versions["runs_kdx_commits"] == ([script.kdx_commit()] if script.kdx_commit() else [])

    import shutil
    shutil.rmtree("cmp")  # the machine is new: only the committed results are left
    capsys.readouterr()
    assert script.main([*common, "--seeds", "0", "--finished-only", "--", *TINY]) == 0
    assert not Path("cmp/kd").exists() and not Path("cmp/student").exists()
    with open(docs / "methods.csv", newline="") as fh:
        again = {(r["method"], r["seed"]): r for r in csv.DictReader(fh)}
    assert set(again) == set(first) and all(r["status"] == "completed" for r in again.values())
    assert all(again[k]["test_acc1"] == first[k]["test_acc1"] for k in first)
    assert "3 run(s) were taken from the published" in (docs / "methods.md").read_text()

    # training a new seed: the teacher is trained again (its checkpoint is needed), seed 0 is not
    assert script.main([*common, "--seeds", "0", "1", "--", *TINY]) == 0
    printed = capsys.readouterr()
    assert "kd seed 0: reusing the published run" in printed.out and "warning" not in printed.err
    assert not Path("cmp/kd/seed0").exists() and Path("cmp/kd/seed1/results.json").is_file()
    assert (Path("cmp/kd/seed1") / script.COMMIT_FILE).is_file()
    with open(docs / "methods.csv", newline="") as fh:
        last = {(r["method"], r["seed"]): r for r in csv.DictReader(fh)}
    assert last[("kd", "0")]["test_acc1"] == first[("kd", "0")]["test_acc1"]
    assert last[("teacher", "0")]["test_acc1"] == first[("teacher", "0")]["test_acc1"]  # the same teacher again
    assert last[("kd", "1")]["status"] == "completed"

    # how an invocation got its runs is not part of the command that makes the benchmark
    assert script.making_options(["--seeds", "0", "--resume-from", "x.csv", "--finished-only", "--", "a=b"]) == \
        ["--seeds", "0", "--", "a=b"]

    # a published CSV that is not there is refused by name
    with pytest.raises(SystemExit):
        script.parse_args([*common, "--resume-from", "nosuch.csv"])

"""kdx-report on a fake Hydra multirun folder: CSV rows and order, report.md, PNGs, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kdx.cli import report_main
from kdx.errors import KdxError
from kdx.report import MARKER, collect_jobs, make_report
from kdx.report import grids as tables  # cell_grids, best_per_pair

PAIR_A = "fmnist_resnet20_cnn_small"
PAIR_B = "fmnist_resnet56_cnn_tiny"
BASE = {PAIR_A: 0.80, PAIR_B: 0.70}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def acc(pair: str, t: float, alpha: float) -> float:
    """Made-up test/acc1: best at pair A, T=4, alpha=0.9."""
    return round(BASE[pair] + 0.01 * t + 0.1 * alpha, 6)


def write_job(folder: Path, overrides: list[str], results: dict | str | None) -> Path:
    """A Hydra job folder with .hydra/overrides.yaml and (unless None) a results.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        text = results if isinstance(results, str) else json.dumps(results)
        (folder / "results.json").write_text(text)
    return folder


def results(pair: str, t: float, alpha: float, seed: int = 0, value: float | None = None) -> dict:
    """A v1 results.json of a completed distill job."""
    value = acc(pair, t, alpha) if value is None else value
    teacher, student = pair.split("_", 1)[1].split("_", 1)
    return {
        "kdx_version": "0.1.0", "status": "completed", "error": None, "task": "distill",
        "experiment": "fmnist/kd", "run_dir": "/abs/path",
        "overrides": [f"distill.temperature={t:g}", f"distill.alpha={alpha:g}", f"pair={pair}",
                      f"seed={seed}"],
        "hparams": {"pair": pair, "teacher": teacher, "student": student, "temperature": float(t),
                    "alpha": alpha, "seed": seed, "data": "fmnist", "network": "student"},
        "metrics": {"val/acc1": value + 0.01, "test/acc1": value, "test/acc5": 0.99,
                    "test/loss": round(2.0 - value, 6)},
        "monitor": {"metric": "val/acc1", "mode": "max", "best": value + 0.01},
        "params": {"network": 16794, "teacher": 272186},
        "time": {"fit_s": 12.3, "test_s": 1.0, "total_s": 14.0},
        "checkpoints": {"best": "/abs/best.ckpt", "last": "/abs/last.ckpt"},
        "started_at": "2026-11-23T10:00:00", "finished_at": "2026-11-23T10:01:00",
    }


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """multirun/<date>/<time>/ with a 2 pairs x 2 T x 2 alpha grid, a second seed, and 3 broken jobs."""
    root = tmp_path / "multirun" / "2026-11-23" / "10-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    n = 0
    for pair in (PAIR_A, PAIR_B):
        for t in (1, 4):
            for alpha in (0.5, 0.9):
                res = results(pair, t, alpha)
                write_job(root / str(n), res["overrides"], res)
                n += 1
    # job 8: second seed of pair A, T=1, alpha=0.5 (cell mean = (0.86 + 0.96) / 2 = 0.91)
    res = results(PAIR_A, 1, 0.5, seed=1, value=0.96)
    write_job(root / "8", res["overrides"], res)
    # job 9: failed with an error message
    failed = results(PAIR_B, 8, 0.1)
    failed.update(status="failed", error="CUDA out of memory", metrics={})
    write_job(root / "9", failed["overrides"], failed)
    # job 10: died before writing results.json
    write_job(root / "10", ["distill.temperature=16", "distill.alpha=0.1", f"pair={PAIR_A}"], None)
    # job 11: corrupt results.json
    write_job(root / "11", ["distill.temperature=2", "distill.alpha=0.3", f"pair={PAIR_A}"],
              '{"status": "completed", "metrics": {"test/acc1": 0.')
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    """report.csv as a list of dicts."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def is_png(path: Path) -> bool:
    """True for a non-empty file with the PNG signature."""
    return path.is_file() and path.stat().st_size > len(PNG_MAGIC) and path.read_bytes()[:8] == PNG_MAGIC


def test_report_end_to_end(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out

    rows = read_csv(out / "report.csv")
    assert len(rows) == 12  # 9 completed + failed + died + corrupt
    done = [r for r in rows if r["status"] == "completed"]
    assert [r["rank"] for r in done] == [str(i) for i in range(1, 10)]
    assert rows[:9] == done  # ranked jobs first, failed ones after
    best = rows[0]
    assert best["job"] == "8"  # seed 1 of pair A, T=1, alpha=0.5 scored 0.96
    assert float(best["test/acc1"]) == pytest.approx(0.96)
    assert best["pair"] == PAIR_A and best["teacher"] == "resnet20" and best["student"] == "cnn_small"
    assert float(best["temperature"]) == 1 and float(best["alpha"]) == 0.5
    assert "distill.temperature=1" in best["overrides"] and best["params.network"] == "16794"
    assert rows[1]["job"] == "3"  # pair A, T=4, alpha=0.9: 0.80 + 0.04 + 0.09
    values = [float(r["test/acc1"]) for r in done]
    assert values == sorted(values, reverse=True)
    broken = {r["job"]: r for r in rows[9:]}
    assert set(broken) == {"9", "10", "11"}
    assert all(r["status"] == "failed" and r["rank"] == "" for r in broken.values())
    assert broken["9"]["error"] == "CUDA out of memory"
    assert "no results.json" in broken["10"]["error"]
    assert broken["10"]["pair"] == PAIR_A  # from .hydra/overrides.yaml
    assert "cannot be parsed" in broken["11"]["error"]

    md = (out / "report.md").read_text()
    assert md.splitlines()[0] == MARKER
    failed_section = md.split("## Failed jobs (3)", 1)[1]
    for text in ("| 9 |", "| 10 |", "| 11 |", "CUDA out of memory", "cannot be parsed"):
        assert text in failed_section
    assert "heatmap_fmnist_resnet20_cnn_small.png" in md and "pairs.png" in md

    for name in (f"heatmap_{PAIR_A}.png", f"heatmap_{PAIR_B}.png", "pairs.png"):
        assert is_png(out / name), name
    assert "Best val/acc1=0.97 (max, test/acc1=0.96) in 8" in stdout  # ranked by validation, test beside it
    assert "pair=fmnist_resnet20_cnn_small T=1 alpha=0.5" in stdout

    # a second run over its own report overwrites it; the sweep folder itself is untouched
    assert report_main([str(sweep), "--out", str(out)]) == 0
    assert not (sweep / "report.md").exists()


def test_default_out_is_dir_and_mean_over_duplicate_cells(sweep: Path) -> None:
    assert make_report(sweep, plots=False).metric == "val/acc1"  # the jobs' checkpoint.monitor, never test/
    report = make_report(sweep, metric="test/acc1", plots=False)
    assert report.out == sweep.resolve() and (sweep / "report.md").is_file()
    assert (report.metric, report.mode) == ("test/acc1", "max")
    grid = tables.cell_grids(report.ranked, report.metric)[PAIR_A]
    assert grid.temperatures == [1.0, 4.0] and grid.alphas == [0.5, 0.9]
    assert grid.counts[0][0] == 2
    assert grid.mean(1.0, 0.5) == pytest.approx((acc(PAIR_A, 1, 0.5) + 0.96) / 2)
    assert grid.mean(4.0, 0.9) == pytest.approx(acc(PAIR_A, 4, 0.9))
    assert "| 1 | 0.91 ± 0.0707 (n=2) | 0.9 |" in (sweep / "report.md").read_text()  # std: sqrt(2 * 0.05^2 / 1)
    # best per pair: pair A first with its best single job
    pairs = tables.best_per_pair(report.ranked, report.metric)
    assert [(p, round(v, 6)) for p, v, _ in pairs] == [(PAIR_A, 0.96), (PAIR_B, acc(PAIR_B, 4, 0.9))]


def test_mode_min_ordering(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "min"
    assert report_main([str(sweep), "--metric", "test/loss", "--mode", "min", "--out", str(out),
                        "--no-plots"]) == 0
    done = [r for r in read_csv(out / "report.csv") if r["status"] == "completed"]
    losses = [float(r["test/loss"]) for r in done]
    assert losses == sorted(losses) and done[0]["job"] == "8"
    # a loss metric defaults to min; --mode max reverses the order
    assert make_report(sweep, metric="test/loss", out=tmp_path / "a", plots=False).mode == "min"
    worst_first = make_report(sweep, metric="test/acc1", mode="min", out=tmp_path / "b", plots=False)
    assert worst_first.ranked[0].rel == "4"  # pair B, T=1, alpha=0.5


def test_default_metric_choice(tmp_path: Path) -> None:
    face = tmp_path / "face"
    for i, (auc, verif) in enumerate([(0.9, 0.8), (0.95, 0.85)]):
        write_job(face / str(i), [f"seed={i}"], {
            "status": "completed", "task": "face",
            "metrics": {"test/auc": auc, "test/verif_acc": verif, "test/tar@far=1e-3": 0.5},
            "monitor": {"metric": "test/verif_acc", "mode": "max"},
        })
    report = make_report(face, plots=False)
    assert (report.metric, report.mode, report.best.rel) == ("test/verif_acc", "max", "1")
    # no test/acc1, no monitor: the first metric found
    bare = tmp_path / "bare"
    write_job(bare / "0", [], {"metrics": {"val/top1": 0.5, "val/loss": 1.0}})
    assert make_report(bare, plots=False).metric == "val/top1"


def test_pipeline_stages_and_running_job(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for stage, value in (("teacher", 0.9), ("student", 0.7), ("kd", 0.75)):
        (run / stage).mkdir()
        (run / stage / "results.json").write_text(json.dumps(
            {"status": "completed", "metrics": {"test/acc1": value},
             "hparams": {"pair": PAIR_A, "network": "teacher" if stage == "teacher" else "student"}}))
    (run / "extra").mkdir()
    (run / "extra" / "results.json").write_text(json.dumps({"status": "running"}))
    jobs = {j.rel: j for j in collect_jobs(run)}
    assert set(jobs) == {"teacher", "student", "kd", "extra"}  # run/ itself is no dead job
    assert jobs["extra"].status == "running" and not jobs["extra"].ok
    report = make_report(run, out=tmp_path / "out")
    assert [j.rel for j in report.ranked] == ["teacher", "kd", "student"]
    assert [p for p, _, _ in tables.best_per_pair(report.ranked, report.metric)] == [
        f"{PAIR_A} (teacher)", PAIR_A]
    assert is_png(tmp_path / "out" / "pairs.png")
    assert not list((tmp_path / "out").glob("heatmap_*.png"))  # no temperature/alpha: no heatmap


def test_bad_inputs(sweep: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    assert report_main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err

    empty = tmp_path / "empty"
    write_job(empty / "0", ["seed=0"], None)  # only a job that died: still no results.json
    assert report_main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"no results.json under {empty}" in err
    assert "point kdx-report at a run or multirun folder" in err
    assert len(err.strip().splitlines()) == 1

    assert report_main([str(sweep), "--metric", "test/acc99", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "'test/acc99'" in err
    for name in ("test/acc1", "test/acc5", "test/loss", "val/acc1"):
        assert name in err
    assert not (sweep / "report.md").exists()

    user = tmp_path / "user"
    user.mkdir()
    (user / "report.md").write_text("# my notes\n")
    assert report_main([str(sweep), "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert str(user / "report.md") in err and "--out" in err
    assert (user / "report.md").read_text() == "# my notes\n"
    assert not (user / "report.csv").exists()

    (user / "report.md").unlink()
    (user / "pairs.png").write_bytes(PNG_MAGIC + b"someone else's plot")
    with pytest.raises(KdxError, match="pairs.png exists and is not a kdx report"):
        make_report(sweep, out=user)
    assert not (user / "report.md").exists()


def test_folders_set_aside_by_kdx_are_not_reported(tmp_path):
    from kdx.report.collect import collect_jobs

    for name in ("0", "0.replaced-20261123-101010", "kd.incomplete-20261123-101010"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"status": "completed", "metrics": {"test/acc1": 0.5}}))
    assert [job.rel for job in collect_jobs(tmp_path)] == ["0"]

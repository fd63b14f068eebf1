"""kdx-report over seeds: jobs that differ only by their seed grouped into configurations, with mean, sample std
and 95% interval in report.md ("## Over seeds"), report_seeds.csv, the grid cells, the terminal and the plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from kdx.cli import report_main
from kdx.errors import KdxError
from kdx.report import collect_jobs, make_report
from kdx.report import plots
from kdx.report.rank import rank_jobs
from kdx.report.seeds import T975, group_configs, interval95, sample_std, t975, verdict

A = ["distill.temperature=4", "distill.alpha=0.9", "pair=p"]  # configuration A, 3 seeds
B = ["distill.temperature=1", "distill.alpha=0.5", "pair=p"]  # configuration B, 3 seeds
LABEL_A, LABEL_B = " ".join(A), " ".join(B)

# By hand (t_{0.975} with 2 degrees of freedom = 4.303, sqrt(3) = 1.7320508):
# A: val 0.80, 0.82, 0.84 -> mean 0.82; std = sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02;
#    half-width 4.303 * 0.02 / sqrt(3) = 0.0496868 -> CI [0.7703132, 0.8696868]
# B: val 0.78, 0.79, 0.80 -> mean 0.79; std 0.01; half-width 4.303 * 0.01 / sqrt(3) = 0.0248434
#    -> CI [0.7651566, 0.8148434]: overlaps A's (0.7652 <= 0.8697 and 0.7703 <= 0.8148)
# B far: val 0.70, 0.71, 0.72 -> mean 0.71, std 0.01, CI [0.6851566, 0.7348434]: below A's 0.7703, no overlap
# test/acc1 = val - 0.01: A 0.81 ± 0.02, B 0.78 ± 0.01
HALF_A, HALF_B = 0.0496868, 0.0248434
B_CLOSE, B_FAR = (0.78, 0.79, 0.80), (0.70, 0.71, 0.72)


def write_job(folder: Path, overrides: list[str], seed: int, val: float) -> None:
    """A Hydra job folder: .hydra/overrides.yaml and the results.json of a completed distill job."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    temperature, alpha = (float(o.split("=")[1]) for o in overrides[:2])
    (folder / "results.json").write_text(json.dumps({
        "status": "completed", "task": "distill", "experiment": "fmnist/kd", "overrides": overrides,
        "hparams": {"pair": "p", "teacher": "resnet20", "student": "cnn_tiny", "temperature": temperature,
                    "alpha": alpha, "seed": seed, "network": "student"},
        "metrics": {"val/acc1": val, "test/acc1": round(val - 0.01, 6)},
        "monitor": {"metric": "val/acc1", "mode": "max"}, "time": {"total_s": 3.0},
    }))


def make_sweep(root: Path, b_values=B_CLOSE, seeds=(0, 1, 2)) -> Path:
    """multirun/<time>/ with configurations A and B, one job per seed (jobs 0.. of A, then B)."""
    jobs = [(A, s, v) for s, v in zip(seeds, (0.80, 0.82, 0.84))] + [(B, s, v) for s, v in zip(seeds, b_values)]
    for n, (config, seed, val) in enumerate(jobs):
        extra = ["hydra.launcher.n_jobs=2"] if n == 2 else []  # not part of the configuration
        write_job(root / str(n), [*config, f"seed={seed}", *extra], seed, val)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_statistics_by_hand(tmp_path):
    jobs = collect_jobs(make_sweep(tmp_path / "sweep"))
    ranked, _ = rank_jobs(jobs, "val/acc1", "max")
    a, b = group_configs(ranked, "val/acc1", "max")
    assert (a.label, a.n, a.seeds, [j.rel for j in a.jobs]) == (LABEL_A, 3, ("0", "1", "2"), ["0", "1", "2"])
    assert (b.label, b.n, b.seeds) == (LABEL_B, 3, ("0", "1", "2"))
    assert a.mean == pytest.approx(0.82) and a.std == pytest.approx(0.02)
    assert a.ci == pytest.approx((0.82 - HALF_A, 0.82 + HALF_A), abs=1e-6)
    assert b.mean == pytest.approx(0.79) and b.std == pytest.approx(0.01)
    assert b.ci == pytest.approx((0.79 - HALF_B, 0.79 + HALF_B), abs=1e-6)
    assert (a.test_metric, a.test_mean, a.test_std) == ("test/acc1", pytest.approx(0.81), pytest.approx(0.02))
    # min mode: lowest mean first
    assert [c.label for c in group_configs(ranked, "val/acc1", "min")] == [LABEL_B, LABEL_A]
    # one value: no std, no interval; t beyond the table: the normal quantile
    assert sample_std([0.5]) is None and interval95([0.5]) is None
    assert (t975(2), t975(30), t975(35), t975(500)) == (4.303, 2.042, 2.042, 1.96)


def test_t_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")  # not a kdx dependency: the table is checked where it is installed
    for df, value in T975.items():
        assert round(float(stats.t.ppf(0.975, df)), 3) == value, df


def test_over_seeds_section_csv_and_grid(tmp_path, capsys):
    sweep, out = make_sweep(tmp_path / "sweep"), tmp_path / "out"
    report = make_report(sweep, out=out)
    md = (out / "report.md").read_text()
    print(md.split("## Ranking")[0].split("## Over seeds")[1])  # shown with pytest -s
    assert md.index("## Over seeds") < md.index("## Ranking")
    section = md.split("## Over seeds", 1)[1].split("## Ranking", 1)[0]
    assert (f"| 1 | {LABEL_A} | 3 | 0, 1, 2 | 0.82 ± 0.02 | \\[0.7703, 0.8697\\] | 0.81 ± 0.02 |" in section)
    assert (f"| 2 | {LABEL_B} | 3 | 0, 1, 2 | 0.79 ± 0.01 | \\[0.7652, 0.8148\\] | 0.78 ± 0.01 |" in section)
    assert "hydra.launcher" not in section and "seed=" not in section
    assert (f"Best by the mean val/acc1: {LABEL_A} (0.82 ± 0.02 over 3 seeds, 95% CI \\[0.7703, 0.8697\\]); "
            f"its interval overlaps that of the runner-up {LABEL_B}") in section
    assert "so the win may be within the seed-to-seed noise." in section
    # the grid cells: mean ± std (n)
    assert "| 1 | 0.79 ± 0.01 (n=3) |  |" in md and "| 4 |  | 0.82 ± 0.02 (n=3) |" in md

    rows = read_csv(out / "report_seeds.csv")
    assert list(rows[0])[:4] == ["rank", "configuration", "n", "seeds"]
    assert [(r["rank"], r["configuration"], r["n"], r["seeds"], r["jobs"]) for r in rows] == [
        ("1", LABEL_A, "3", "0 1 2", "0 1 2"), ("2", LABEL_B, "3", "0 1 2", "3 4 5")]
    got = {k: float(v) for k, v in rows[0].items() if k.startswith(("val/", "test/"))}
    assert got == pytest.approx({"val/acc1 mean": 0.82, "val/acc1 std": 0.02, "val/acc1 ci95_lo": 0.82 - HALF_A,
                                 "val/acc1 ci95_hi": 0.82 + HALF_A, "test/acc1 mean": 0.81,
                                 "test/acc1 std": 0.02}, abs=1e-6)
    jobs_csv = read_csv(out / "report.csv")  # still one row per job
    assert len(jobs_csv) == 6 and list(jobs_csv[0])[:3] == ["rank", "job", "status"]
    assert [p.name for p in report.files][:3] == ["report.md", "report.csv", "report_seeds.csv"]

    # a rerun replaces its own report_seeds.csv
    assert report_main([str(sweep), "--out", str(out), "--no-plots"]) == 0


def test_interval_without_overlap(tmp_path):
    out = tmp_path / "out"
    make_report(make_sweep(tmp_path / "sweep", b_values=B_FAR), out=out, plots=False)
    md = (out / "report.md").read_text()
    assert "| 2 | " + LABEL_B + " | 3 | 0, 1, 2 | 0.71 ± 0.01 | \\[0.6852, 0.7348\\] |" in md
    assert "its interval does not overlap that of the runner-up" in md
    assert "so the win is larger than the seed-to-seed noise." in md


def test_verdict_when_the_best_has_one_seed(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    write_job(sweep / "6", ["distill.temperature=8", "distill.alpha=0.1", "pair=p", "seed=0"], 0, 0.9)
    ranked, _ = rank_jobs(collect_jobs(sweep), "val/acc1", "max")
    configs = group_configs(ranked, "val/acc1", "max")
    assert [(c.n, c.std, c.ci) for c in configs[:1]] == [(1, None, None)]
    assert verdict(configs, "val/acc1") == (
        "Best by the mean val/acc1: distill.temperature=8 distill.alpha=0.1 pair=p (0.9, one seed); the runner-up is "
        f"{LABEL_A} (0.82 ± 0.02 over 3 seeds, 95% CI [0.7703, 0.8697]), and with one seed the best has no "
        "interval to compare.")


def test_terminal_shows_configurations_over_seeds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert report_main([str(make_sweep(tmp_path / "sweep")), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    stdout = capsys.readouterr().out
    table = stdout.split("configurations over seeds", 1)[1]
    best = next(line for line in table.splitlines() if line.lstrip().startswith("1 "))
    assert best.split()[:5] == ["1", "p", "4", "0.9", "3"]  # one line: #, pair, T, alpha, n, seeds, mean, CI, test
    for text in ("0, 1, 2", "0.82 ± 0.02", "[0.7703, 0.8697]", "0.81 ± 0.02"):
        assert text in best, (text, best)
    assert f"Best by the mean val/acc1: {LABEL_A} (0.82 ± 0.02 over 3 seeds" in " ".join(table.split())
    assert "report_seeds.csv" in stdout.splitlines()[-1]  # the "Wrote ..." line


def test_one_seed_per_configuration_has_no_seeds_section(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for n, (config, val) in enumerate([(A, 0.82), (B, 0.79)]):
        write_job(sweep / str(n), [*config, "seed=0"], 0, val)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "report_seeds.csv").write_text("my,own\n1,2\n")  # not kdx-report's: needed by nothing, left alone
    assert report_main([str(sweep), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert "## Over seeds" not in md and "± 0." not in md
    assert "One seed per configuration, so no interval can be given" in md
    assert (out / "report_seeds.csv").read_text() == "my,own\n1,2\n"
    assert "configurations over seeds" not in capsys.readouterr().out

    # a folder that held a seeds report: its own report_seeds.csv goes with it, not left stale
    seeded = tmp_path / "seeded"
    make_report(make_sweep(tmp_path / "sweep3"), out=seeded, plots=False)
    assert (seeded / "report_seeds.csv").is_file()
    make_report(sweep, out=seeded, plots=False)
    assert not (seeded / "report_seeds.csv").exists()


def test_foreign_report_seeds_csv_is_refused_before_writing(tmp_path, capsys):
    sweep, out = make_sweep(tmp_path / "sweep"), tmp_path / "out"
    out.mkdir()
    (out / "report_seeds.csv").write_text("config,mean\nmine,0.9\n")
    assert report_main([str(sweep), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / "report_seeds.csv") in err and "--out" in err
    assert sorted(p.name for p in out.iterdir()) == ["report_seeds.csv"]  # nothing written
    assert (out / "report_seeds.csv").read_text() == "config,mean\nmine,0.9\n"
    with pytest.raises(KdxError, match="report_seeds.csv exists and is not a kdx report"):
        make_report(sweep, out=out, plots=False)


def test_pipeline_stages_are_separate_configurations(tmp_path):
    # kdx-pipeline -m seed=0,1: each job folder holds its stages, which share the job's overrides
    for seed in (0, 1):
        job = tmp_path / str(seed)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
        for stage, network, task, val in (("teacher", "teacher", "supervised", 0.9), ("kd", "student", "distill", 0.8)):
            (job / stage).mkdir()
            (job / stage / "results.json").write_text(json.dumps({
                "status": "completed", "task": task, "metrics": {"val/acc1": val + seed / 100},
                "hparams": {"pair": "p", "network": network, "seed": seed}}))
    report = make_report(tmp_path, out=tmp_path / "out", plots=False)
    assert [(c.label, c.n, [j.rel for j in c.jobs]) for c in report.configs] == [
        ("(no overrides) (teacher)", 2, ["0/teacher", "1/teacher"]), ("(no overrides) (kd)", 2, ["0/kd", "1/kd"])]
    assert report.configs[0].std == pytest.approx(math.sqrt(2 * 0.005 ** 2))  # 0.90, 0.91 around 0.905


def test_plots_show_the_spread_over_seeds(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    make_report(make_sweep(tmp_path / "sweep"), out=tmp_path / "out")
    heatmap, bars = figures  # heatmap_p.png, then pairs.png
    labels = [t.get_text() for t in heatmap.axes[0].texts]
    assert "0.82 ± 0.02\nn=3" in labels and "0.79 ± 0.01\nn=3" in labels
    ax = bars.axes[0]
    from matplotlib.container import ErrorbarContainer

    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)  # best job (A, seed 2): A's std
    assert "0.84\nsd 0.02, n=3" in [t.get_text() for t in ax.texts]

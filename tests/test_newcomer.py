"""The newcomer's path (issue 12), each point run the way the user ran it: console scripts in subprocesses.

Parallel sweeps with loader workers, pretrained weights offline, kdx-eval on held-out identities, kdx-report
ranked by validation, comparison timings and plots, progress and quiet output, help and model listing, and
bringing one's own model, datamodule and configs.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_train, run_cli
from image_files import write_class_folder
from kdx.errors import CheckpointError, ConfigError

SMALL = ["trainer.max_epochs=1", "data.train_size=128", "data.val_size=64", "data.test_size=64"]


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


# ---------------------------------------------------------------- 1, 10: hydra/launcher=parallel

@pytest.mark.slow
def test_parallel_launcher_runs_two_jobs_with_loader_workers_and_divides_the_cores(tmp_path):
    """Two jobs side by side whose DataLoaders start worker processes (failed before: loky's start method)."""
    from kdx.launcher import available_cores

    sweep = tmp_path / "sweep"
    out = run_cli("kdx-train", "-m", "experiment=synthetic/student", *SMALL, "seed=0,1", "data.num_workers=1",
                  "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.launcher.workers_per_job=1",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Please call `iter(combined_loader)` first" not in out.stderr
    per_job = max(1, available_cores() // 2)
    assert f"[kdx] parallel launcher: 2 job(s) at a time on {available_cores()} CPU core(s)" in out.stdout
    assert out.stdout.count("[kdx] parallel job: ") == 2
    assert f"({per_job} of {available_cores()} cores)" in out.stdout
    for job in ("0", "1"):  # side-by-side jobs' lines say which job printed them
        assert f"its lines start [job {job}]" in out.stdout
        assert f"[job {job}] epoch 1/" in out.stdout
    for job in ("0", "1"):
        assert results(sweep / job)["status"] == "completed"
        assert "num_workers: 1" in (sweep / job / "config.yaml").read_text()  # the loader really had a worker


def test_core_plan_divides_cores_between_jobs():
    from kdx.launcher import plan_cores

    two = plan_cores(n_jobs=2, jobs=6, cores=2)  # the machine: 2 cores, 2 jobs
    assert (two.parallel, two.cores_per_job, two.max_workers) == (2, 1, 0)
    assert two.job_settings(4) == (1, 0)  # data.num_workers=4 -> 0, one torch thread
    eight = plan_cores(n_jobs=2, jobs=6, cores=8)
    assert eight.job_settings(4) == (2, 2) and eight.job_settings(0) == (4, 0) and eight.job_settings(None) == (4, None)
    assert plan_cores(n_jobs=4, jobs=2, cores=8).parallel == 2  # never more at once than there are jobs
    assert plan_cores(n_jobs=-1, jobs=10, cores=4).parallel == 4
    assert plan_cores(2, 4, threads_per_job=3, workers_per_job=1, cores=2).job_settings(2) == (3, 1)
    assert "share them" in plan_cores(n_jobs=4, jobs=4, cores=2).describe()
    with pytest.raises(ConfigError, match="hydra.launcher.n_jobs"):
        plan_cores(n_jobs=0, jobs=2)
    with pytest.raises(ConfigError, match="hydra.launcher.workers_per_job must be auto or a whole number"):
        plan_cores(2, 2, workers_per_job="many")


def test_parallel_launcher_config_composes_with_kdx_keys():
    cfg = compose_train(["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.kdx_launcher.parallel_launcher.ParallelJoblibLauncher"
    assert (launcher.n_jobs, launcher.threads_per_job, launcher.workers_per_job) == (3, "auto", "auto")


# ---------------------------------------------------------------- 2: pretrained weights without internet

def test_transfer_with_pretrained_backbone_offline_is_one_sentence(tmp_path):
    write_class_folder(tmp_path / "images", num_classes=2, per_class=6, size=24)
    dead_proxy = "http://127.0.0.1:9"  # nothing listens there: every download fails at once, as offline
    env = {"HTTPS_PROXY": dead_proxy, "HTTP_PROXY": dead_proxy, "https_proxy": dead_proxy,
           "http_proxy": dead_proxy, "TORCH_HOME": str(tmp_path / "torch_home")}
    out = run_cli("kdx-train", "experiment=folder/transfer", f"data.root={tmp_path / 'images'}",
                  "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env, timeout=240)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith("kdx: error: pretrained weights for tv:resnet18 cannot be downloaded")
    assert "resnet18-f37072fd.pth" in lines[0] and "teacher.pretrained=false" in lines[0]


def test_unresolvable_weights_host_fails_before_any_download(monkeypatch):
    from kdx.models import hub

    source = hub.WeightsSource("https://example.invalid/w.pth", "w.pth", None, cached=False)
    for key in hub.PROXY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(hub, "host_resolves", lambda host, timeout_s=5.0: False)
    called = []
    with pytest.raises(CheckpointError, match="example.invalid does not resolve.*pretrained=false"):
        hub.fetch_pretrained("tv:x", source, lambda: called.append(1))
    assert not called  # no minute of retries
    cached = hub.WeightsSource(source.url, source.filename, None, cached=True)
    assert hub.fetch_pretrained("tv:x", cached, lambda: "built") == "built"  # a cached file needs no network


def test_download_errors_are_told_apart_from_other_errors():
    import urllib.error

    from kdx.models.hub import is_download_error

    try:
        try:
            raise urllib.error.URLError("Name or service not known")
        except urllib.error.URLError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        assert is_download_error(e)
    assert not is_download_error(ValueError("unknown weights name"))


# ---------------------------------------------------------------- 3: kdx-eval on held-out identities

@pytest.fixture(scope="module")
def orl_run(tmp_path_factory):
    """A face run folder as kdx-train leaves it: config.yaml (ORL split) and checkpoints/best.ckpt."""
    from omegaconf import OmegaConf

    from kdx.models import build_embedding_model
    from kdx.configs import build_datamodule

    run = tmp_path_factory.mktemp("orl_run")
    cfg = compose_train(["experiment=orl/student"])
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    dm = build_datamodule(cfg.data)
    torch.manual_seed(0)
    net = build_embedding_model("mobilefacenet", 16, input_size=32)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "kdx": {"task": "face", "network_prefix": "net.", "class_names": list(dm.train_identities),
                        "embedding_model": {"name": "mobilefacenet", "embedding_size": 16, "input_size": 32}}},
               run / "checkpoints" / "best.ckpt")
    return run, dm


def test_kdx_eval_orl_scores_the_run_test_identities_by_default(orl_run, tmp_path):
    run, dm = orl_run
    out = run_cli("kdx-eval", str(run / "checkpoints" / "best.ckpt"), "orl", "--folds", "5",
                  "--out", str(tmp_path / "m.json"), cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    test_ids = sorted(dm.test_identities_held_out)
    assert f"identities  {len(test_ids)} test identities of the run's split" in out.stdout
    assert f"left out: {len(dm.train_identities)} trained on, {len(dm.held_out_identities)} used for validation" \
        in out.stdout
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["identities"]["used"] == test_ids
    assert not set(saved["identities"]["used"]) & set(dm.train_identities)
    assert out.stderr.strip() == ""  # no stray warnings


def test_kdx_eval_of_a_run_checkpoint_gives_the_runs_own_test_number(tmp_path):
    """A face run's test/verif_acc and kdx-eval of its best.ckpt on the same folder agree to the digit: kdx-eval
    scores the run's own test pairs (data.num_test_pairs, seeded as in training) with flipped images as the run
    did (task.flip_eval), and says so; --num-pairs builds other pairs of the same identities and says that."""
    run = tmp_path / "run"
    out = run_cli("kdx-train", "experiment=orl/student", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                  "student.kwargs.input_size=[32,32]", "data.num_val_pairs=20", "data.num_test_pairs=60",
                  "trainer.progress_bar=none", f"hydra.run.dir={run}", cwd=tmp_path, timeout=300,
                  env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    ckpt = results["checkpoints"]["best"]
    own = run_cli("kdx-eval", ckpt, "orl", "--out", str(tmp_path / "own.json"), cwd=tmp_path, timeout=240)
    assert own.returncode == 0, own.stderr[-3000:]
    assert ("pairs       60 (30 same, 30 different; the run's own test pairs (data.num_test_pairs=60, seeded with "
            "data.seed + 1 = 1), with flipped images, as its test metrics)") in own.stdout
    record = json.loads((tmp_path / "own.json").read_text())
    assert record["pairs"] == 60
    assert record["metrics"]["accuracy"] == pytest.approx(results["metrics"]["test/verif_acc"], abs=1e-6)
    other = run_cli("kdx-eval", ckpt, "orl", "--num-pairs", "40", cwd=tmp_path, timeout=240)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "new pairs of the run's test identities (--num-pairs 40, --seed 0), not the 60 its test metrics were " \
           "measured on; leave --num-pairs out to score those" in other.stdout


def test_kdx_eval_all_identities_says_how_many_were_trained_on(orl_run, tmp_path):
    run, dm = orl_run
    out = run_cli("kdx-eval", str(run / "checkpoints" / "best.ckpt"), "orl", "--identities", "all",
                  "--num-pairs", "200", "--folds", "5", cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"all 40 identities; {len(dm.train_identities)} of them were trained on" in out.stdout


def test_identity_selection_without_the_run_config():
    from pathlib import Path as P

    from kdx.eval.identities import RecordedSplit, select_identities

    folder = {f"s{i}": [f"s{i}/{j}.pgm" for j in range(3)] for i in range(6)}
    unseen, sel = select_identities(folder, P("faces"), RecordedSplit(train=["s0", "s1", "s2"]))
    assert sorted(unseen) == ["s3", "s4", "s5"] and sel.mode == "unseen" and sel.left_out["training"] == ["s0", "s1", "s2"]
    everything, sel = select_identities(folder, P("faces"), None)
    assert len(everything) == 6 and "records no training identities" in sel.description
    with pytest.raises(ConfigError, match="--identities test needs the run's test identities"):
        select_identities(folder, P("faces"), RecordedSplit(train=["s0"]), "test")
    with pytest.raises(ConfigError, match="every identity .* was trained on"):
        select_identities(folder, P("faces"), RecordedSplit(train=sorted(folder)))


# ---------------------------------------------------------------- 4, 7, 9: kdx-report

def _job(folder: Path, name: str, val: float, test: float, t: float, alpha: float, overrides=(), **hparams) -> None:
    job = folder / name
    job.mkdir(parents=True)
    hp = {"pair": "p", "teacher": "resnet20", "student": "cnn_tiny", "temperature": t, "alpha": alpha,
          "network": "student", **hparams}
    (job / "results.json").write_text(json.dumps({
        "status": "completed", "task": hparams.get("task", "distill"), "hparams": hp,
        "overrides": [*overrides, f"distill.temperature={t}", f"distill.alpha={alpha}"],
        "metrics": {"val/acc1": val, "best_val/acc1": val, "test/acc1": test},
        "monitor": {"metric": "val/acc1", "mode": "max"}, "params": {"network": 4370}, "time": {"total_s": 3.0}}))


@pytest.fixture()
def sweep_dir(tmp_path):
    sweep = tmp_path / "multirun"
    ckpt = "teacher.ckpt=/home/someone/projects/kdx/runs/fmnist/teacher/checkpoints/best.ckpt"
    # job 0 is best on validation, job 1 on test: the report must rank job 0 first
    for i, (val, test, t, alpha) in enumerate([(0.90, 0.80, 1, 0.5), (0.85, 0.95, 4, 0.5), (0.80, 0.81, 1, 0.9),
                                                (0.70, 0.72, 4, 0.9)]):
        _job(sweep, str(i), val, test, t, alpha, overrides=("experiment=fmnist/kd", ckpt, "trainer.max_epochs=5"))
    return sweep


def test_kdx_report_ranks_by_validation_and_shows_test_beside_it(sweep_dir, tmp_path):
    out = run_cli("kdx-report", str(sweep_dir), "--no-plots", cwd=tmp_path, env={"COLUMNS": "80"}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Best best_val/acc1=0.9 (max, test/acc1=0.8) in 0" in out.stdout
    assert "note:" not in out.stderr
    md = (sweep_dir / "report.md").read_text()
    assert "Ranked by **best\\_val/acc1**" in md or "Ranked by **best_val/acc1**" in md
    section = md.split("## Ranking", 1)[1].split("\n## ", 1)[0]
    ranking = [line.split("|")[2].strip() for line in section.splitlines() if line.startswith("| ")]
    assert ranking[1:] == ["0", "1", "2", "3"]  # by validation, not by test (1 would be first)

    by_test = run_cli("kdx-report", str(sweep_dir), "--metric", "test/acc1", "--no-plots", cwd=tmp_path, timeout=120)
    assert by_test.returncode == 0 and "kdx-report: note: ranking by test/acc1, a test-set metric" in by_test.stderr


def test_kdx_report_terminal_table_has_one_line_per_job_at_80_columns(sweep_dir, tmp_path):
    out = run_cli("kdx-report", str(sweep_dir), "--no-plots", cwd=tmp_path, env={"COLUMNS": "80"}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("same in every job: experiment=fmnist/kd teacher.ckpt=…/checkpoints/best.ckpt")
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    body = lines[rule + 1: rule + 5]
    assert [line.split()[1] for line in body] == ["0", "1", "2", "3"]  # job column: one line per job
    assert all(len(line) <= 80 for line in lines[:rule + 5])
    assert "/home/someone" not in "\n".join(lines[:rule + 5])


def test_kdx_report_heatmap_compares_with_the_student_alone(sweep_dir, tmp_path):
    from kdx.report import make_report

    alone = tmp_path / "student_alone"
    _job(alone, "run", 0.82, 0.83, 0, 0, task="supervised")
    (alone / "run" / "results.json").write_text(json.dumps({
        **json.loads((alone / "run" / "results.json").read_text()), "hparams": {"network": "student",
                                                                                 "student": "cnn_tiny"}}))
    report = make_report(sweep_dir, out=tmp_path / "with", baselines=[alone])
    md = (tmp_path / "with" / "report.md").read_text()
    assert "Baseline: student alone 0.82" in md and "+0.0800" in md  # 0.90 - 0.82 in the T=1, alpha=0.5 cell
    assert (tmp_path / "with" / "heatmap_p.png").read_bytes()[:4] == b"\x89PNG"
    assert report.ranked[0].rel == "0"
    make_report(sweep_dir, out=tmp_path / "without")
    assert "No student-alone run of cnn_tiny was found" in (tmp_path / "without" / "report.md").read_text()
    with pytest.raises(Exception, match="holds no finished student-alone run"):
        make_report(sweep_dir, out=tmp_path / "bad", baselines=[sweep_dir])


# ---------------------------------------------------------------- 7, 9: comparison timings, plot, table

def test_interleaved_timing_rotates_models_every_round():
    from kdx.eval.profile import interleaved_times

    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = interleaved_times(runners, rounds=3, block_s=0.0, warmup=1)
    assert all(len(v) == 3 for v in times.values())
    timed = calls[3:]  # after one warm-up call each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_comparison_plot_uses_log_scale_for_parameters_and_table_fits_80_columns(tmp_path):
    from rich.console import Console

    from kdx.eval.compare import needs_log_scale, plot_comparison, print_table
    from kdx.eval.compare_face import face_columns

    rows = [{"model": "teacher", "params": 272186, "latency_ms": 1.5, "latency_q1_ms": 1.4, "latency_q3_ms": 1.7,
             "test_acc1": 0.89},
            {"model": "student alone", "params": 4370, "latency_ms": 0.16, "latency_q1_ms": 0.15,
             "latency_q3_ms": 0.18, "test_acc1": 0.83}]
    scales = plot_comparison(rows, tmp_path / "c.png")
    assert scales["params"] == "log" and scales["latency_ms"] == "linear"  # 63x apart; 9x apart
    assert not needs_log_scale([0.2, 0.25, 0.3])

    columns = face_columns(64, (1e-1, 1e-2, 1e-3))
    face_rows = [{"model": m, "architecture": a, "input": "112x112", "embedding_size": 128, "params": p, "macs": 5e7,
                  "size_mb": 3.8, "latency_ms": 4.6, "latency_q1_ms": 4.4, "latency_q3_ms": 4.9, "images_per_s": 300.0,
                  "images_per_s_q1": 280.0, "images_per_s_q3": 310.0, "verif_acc": 0.86, "verif_acc_std": 0.02,
                  "auc": 0.95, "tar@far=1e-1": 0.9, "tar@far=1e-2": 0.6, "tar@far=1e-3": 0.5}
                 for m, a, p in (("teacher (given)", "sface (ONNX)", 9_980_000), ("student alone", "mobilefacenet", 990_000),
                                 ("student distilled", "mobilefacenet", 990_000))]
    console = Console(width=80, record=True, file=open(tmp_path / "t.txt", "w"))
    print_table(face_rows, "face", columns, console=console)
    text = console.export_text()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    for header, _ in columns.values():
        if header != "model":
            assert header in text, header
    assert "4.60" in text and "4.40–4.90" in text


# ---------------------------------------------------------------- 8, 9: progress and quiet output

NOISE = ("Tip:", "GPU available", "LeafSpec", "on_after_batch_transfer", "Trainer.fit` stopped", "litlogger",
         "Restoring states")


@pytest.mark.slow
def test_progress_lines_with_eta_and_no_library_noise_in_a_log(tmp_path):
    args = ["experiment=synthetic/teacher", "trainer.max_epochs=2", "data.train_size=512", "trainer.progress_every=2"]
    out = run_cli("kdx-train", *args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path, timeout=240)  # CI=1, no tty
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    steps = re.findall(r"^epoch (\d)/2  step (\d)/8 \(\d+%\)  loss \d+\.\d{4}  [\d,]+ img/s  ETA epoch [\dms]+(, run [\dms]+)?$",
                       out.stdout, flags=re.M)
    assert [(e, s) for e, s, _ in steps] == [(e, s) for e in "12" for s in "2468"]
    assert all(run for e, _, run in steps if e == "1")  # the whole run's ETA while epochs remain
    assert re.search(r"^epoch 1/2  \d+\.\ds  .*val/acc1 \d\.\d{4}.*  ETA [\dms]+$", out.stdout, flags=re.M)
    assert "Epoch 0" not in text
    for noise in NOISE:
        assert noise not in text, noise
    assert (tmp_path / "a" / "cli.log").read_text().count("GPU available") == 1  # kept in the run's log file

    verbose = run_cli("kdx-train", *args, "trainer.progress_bar=none", f"hydra.run.dir={tmp_path / 'b'}",
                      cwd=tmp_path, env={"KDX_VERBOSE": "1"}, timeout=240)
    assert verbose.returncode == 0 and "GPU available" in verbose.stdout + verbose.stderr
    assert "step 2/8" not in verbose.stdout  # progress_bar=none: epoch lines only


def test_progress_bars_count_epochs_from_one():
    from types import SimpleNamespace

    from kdx.progress import _compact_metrics, progress_callbacks, resolve_mode

    callbacks, shows_bar = progress_callbacks("rich", "auto")
    bar = callbacks[-1]
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(0).strip() == "epoch 1/3"
    assert shows_bar and resolve_mode("auto") in ("rich", "log")
    assert _compact_metrics({"train/loss_step": 1.0, "train/loss_epoch": 2.0, "v_num": 0, "val/acc1": 0.5}) == \
        {"loss": 1.0, "val/acc1": 0.5}
    with pytest.raises(ConfigError, match="trainer.progress_every must be auto or a whole number"):
        progress_callbacks("log", "often")
    with pytest.raises(ConfigError, match="trainer.progress_bar must be"):
        progress_callbacks("fancy", "auto")


# ---------------------------------------------------------------- 11: help and model listing

def test_kdx_train_and_pipeline_help_speak_of_kdx(tmp_path):
    out = run_cli("kdx-train", "--help", cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("kdx-train: train one network")
    for text in ("kdx-train experiment=fmnist/teacher", "== Config groups", "experiment/fmnist: consistent, kd, probe, student",
                 "student.name=my_pkg.nets:TinyNet", "--config-dir"):
        assert text in out.stdout, text
    assert "powered by Hydra" not in out.stdout
    pipe = run_cli("kdx-pipeline", "--help", cwd=tmp_path, timeout=120)
    assert pipe.returncode == 0 and pipe.stdout.startswith("kdx-pipeline: every stage of a pipeline experiment")


def test_help_into_a_pipe_closed_early_ends_quietly(tmp_path):
    # `kdx-train --help | head -1`: the reader is gone before the help is written
    proc = subprocess.Popen([Path(sys.executable).parent / "kdx-train", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]


def _models(*args: str, tmp_path: Path):
    return subprocess.run([sys.executable, "-m", "kdx.models", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)


def test_python_m_kdx_models_filters_and_helps(tmp_path, capsys):
    missing = _models("foo", tmp_path=tmp_path)
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no kdx, torchvision or timm model name matches 'foo'" in missing.stderr
    helped = _models("--help", tmp_path=tmp_path)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m kdx.models")
    assert "resnet20" not in helped.stdout.split("examples:")[0]

    from kdx.models.__main__ import main

    assert main(["resnet2", "--source", "kdx"]) == 0 and capsys.readouterr().out.split() == ["resnet20"]
    assert main(["resnt20", "--source", "kdx"]) == 1 and "close names: resnet20" in capsys.readouterr().err
    assert main(["cnn_*", "--source", "kdx"]) == 0 and capsys.readouterr().out.split() == ["cnn_medium", "cnn_small", "cnn_tiny"]


# ---------------------------------------------------------------- 12: one's own model, datamodule and configs

MY_NETS = '''
from torch import nn


class TinyNet(nn.Module):
    """A model of the user's own, in the user's own module."""

    def __init__(self, num_classes, in_chans=3, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def not_a_model(num_classes):
    return None
'''

MY_DATA = '''
import torch
from torch.utils.data import TensorDataset

from kdx.data import KdxDataModule


class Stripes(KdxDataModule):
    """Horizontal or vertical stripes: a datamodule of the user's own."""

    def __init__(self, size=16, per_class=64, **loader_kwargs):
        super().__init__(**loader_kwargs)
        self.size, self.per_class = size, per_class
        self.class_names, self.in_chans, self.image_size = ["horizontal", "vertical"], 1, size

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        sets = []
        for _ in range(3):
            x = torch.rand(2 * self.per_class, 1, self.size, self.size, generator=g) * 0.3
            y = torch.arange(2 * self.per_class) % 2
            x[y == 0, :, ::4, :] += 1.0
            x[y == 1, :, :, ::4] += 1.0
            sets.append(TensorDataset(x, y))
        self.train_set, self.val_set, self.test_set = sets
'''


def _project(root: Path) -> Path:
    (root / "conf" / "data").mkdir(parents=True)
    (root / "conf" / "pair").mkdir()
    (root / "conf" / "experiment" / "mine").mkdir(parents=True)
    (root / "my_nets.py").write_text(MY_NETS)
    (root / "my_data.py").write_text(MY_DATA)
    (root / "conf" / "data" / "stripes.yaml").write_text(
        "_target_: my_data.Stripes\nname: stripes\nsize: 16\nper_class: 64\nbatch_size: 32\n")
    (root / "conf" / "pair" / "mine.yaml").write_text(
        "# @package _global_\npair:\n  name: mine\n"
        "teacher: {name: my_nets:TinyNet, pretrained: false, ckpt: null, kwargs: {width: 16}}\n"
        "student: {name: my_nets.TinyNet, pretrained: false, ckpt: null, kwargs: {width: 4}}\n")
    (root / "conf" / "experiment" / "mine" / "teacher.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: stripes\n  - override /pair: mine\n"
        "run_name: mine_teacher\ntrainer:\n  max_epochs: 1\n")
    (root / "conf" / "experiment" / "mine" / "kd.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: stripes\n  - override /pair: mine\n"
        "  - override /task: distill\nrun_name: mine_kd\ntrainer:\n  max_epochs: 1\n")
    return root


@pytest.mark.slow
def test_own_model_datamodule_and_configs_without_a_wrapper_script(tmp_path):
    project = _project(tmp_path / "project")
    env = {"PYTHONPATH": str(project)}
    teacher = run_cli("kdx-train", "--config-dir", "conf", "experiment=mine/teacher", "hydra.run.dir=runs/teacher",
                      cwd=project, env=env, timeout=240)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    done = results(project / "runs" / "teacher")
    assert done["status"] == "completed" and done["data"]["num_classes"] == 2 and done["hparams"]["teacher"] == "my_nets:TinyNet"
    ckpt = project / "runs" / "teacher" / "checkpoints" / "best.ckpt"
    # the same configs through hydra.searchpath, from another folder; the teacher is rebuilt from its checkpoint
    kd = run_cli("kdx-train", f"hydra.searchpath=[file://{project / 'conf'}]", "experiment=mine/kd",
                 f"teacher.ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'kd'}", cwd=tmp_path, env=env, timeout=240)
    assert kd.returncode == 0, kd.stderr[-3000:]
    assert results(tmp_path / "kd")["status"] == "completed"


def test_own_model_names_are_checked(tmp_path, monkeypatch):
    from kdx.models import build_model

    (tmp_path / "my_nets.py").write_text(MY_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = build_model("my_nets:TinyNet", num_classes=3, in_chans=1, width=4)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ConfigError, match="'my_nets:not_a_model' is a function, not an nn.Module class"):
        build_model("my_nets:not_a_model", num_classes=3)
    with pytest.raises(ConfigError, match="module 'my_nets' has no attribute 'Nope'"):
        build_model("my_nets:Nope", num_classes=3)
    with pytest.raises(ConfigError, match="module 'no_such_pkg.nets' is not importable.*PYTHONPATH"):
        build_model("no_such_pkg.nets:TinyNet", num_classes=3)


def test_each_harmless_warning_pattern_hides_its_warning_and_nothing_else():
    import warnings

    from kdx.quiet import HARMLESS_WARNINGS, quiet_library_output

    samples = ["Checkpoint directory /x exists and is not empty.",
               "The number of training batches (4) is smaller than the logging interval Trainer(log_every_n_steps=20).",
               "`isinstance(treespec, LeafSpec)` is deprecated",
               "You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a "
               "`LightningDataModule`. It will use the implementation from `LightningModule` instance.",
               "The 'train_dataloader' does not have many workers which may be a bottleneck.",
               "This DataLoader will create 4 worker processes in total. Our suggested max number of worker is 2",
               "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used.",
               "Consider setting `persistent_workers=True` in 'train_dataloader' to speed up the dataloader worker initialization.",
               "Found 34 module(s) in eval mode at the start of training. This may lead to unexpected behavior"]
    assert len(samples) == len(HARMLESS_WARNINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_output()
        for text in samples:
            warnings.warn(text)
        warnings.warn("distill.temperature=0.5 is unusually low")  # a warning of kdx's own stays
    assert [str(w.message) for w in caught] == ["distill.temperature=0.5 is unusually low"]

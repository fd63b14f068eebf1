"""kdx-tune (kdx.tune): the search-space and settings checks, the Lightning hook that reports each epoch to the
trial, and real studies on the synthetic data run as a user runs them (console scripts in subprocesses): a tiny
study end to end with a pruned trial and its best command re-run, a study killed with SIGKILL and continued,
two worker processes sharing one SQLite storage."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, CONF, cli_env, compose_train, run_cli
from omegaconf import OmegaConf

from kdx.errors import ConfigError
from kdx.tune.settings import parse_settings

# small and quick: 8 training steps and 2 validation batches an epoch
TINY = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "data.batch_size=32",
        "trainer.progress_bar=none", "trainer.max_epochs=2"]
PRESETS = sorted(p.stem for p in (CONF / "distill").glob("*.yaml"))
CHECKPOINT = {"monitor": "val/acc1", "mode": "max"}


def tune_section(**changes):
    section = OmegaConf.to_container(OmegaConf.load(CONF / "tune.yaml").tune, resolve=False)
    section["seed"] = 0
    section.update(changes)
    return section


def load(study_dir: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="synthetic_kd", storage=f"sqlite:///{study_dir / 'study.db'}")


def states(study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def error_line(out) -> str:
    """The one line a refused kdx-tune prints (exit code 2, no traceback)."""
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdx: error: "), out.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------- settings
def test_shipped_settings_parse_and_every_space_is_a_small_documented_one():
    settings = parse_settings(tune_section(), CHECKPOINT, PRESETS)
    assert settings.methods == ("kd", "dkd", "dist") and settings.metric == "val/acc1" and settings.maximize
    assert settings.pruner["name"] == "median" and settings.sampler["name"] == "tpe"
    everything = parse_settings(tune_section(methods=sorted(tune_section()["space"])), CHECKPOINT, PRESETS)
    text = (CONF / "tune.yaml").read_text()
    for method, space in everything.space.items():
        assert method in PRESETS and 1 <= len(space) <= 3, method
        assert all(s.path.startswith("distill.") and s.kind == "float" for s in space), method
        assert f"\n    {method}:" in text and "#" in text.split(f"\n    {method}:", 1)[1].splitlines()[0], method


@pytest.mark.parametrize("method", sorted(OmegaConf.load(CONF / "tune.yaml").tune.space))
def test_each_shipped_space_gives_valid_runs_at_both_ends(method):
    """Every method's space, at its low and at its high end, composes into a kdx-train config that kdx accepts."""
    from kdx.tasks import validate_config

    settings = parse_settings(tune_section(methods=[method]), CHECKPOINT, PRESETS)
    for end in ("low", "high"):
        overrides = [f"{s.path}={getattr(s, end)}" for s in settings.space[method]]
        cfg = compose_train(["experiment=synthetic/kd", f"distill={method}", "teacher.ckpt=teacher.ckpt", *overrides])
        validate_config(cfg)
        for s in settings.space[method]:
            assert OmegaConf.select(cfg, s.path) == getattr(s, end)


@pytest.mark.parametrize("changes, words", [
    ({"methods": ["kd", "nosuch"]}, ["tune.methods", "'nosuch' is not a distill preset", "dkd"]),
    ({"methods": []}, ["tune.methods must list at least one"]),
    ({"methods": ["kd", "kd"]}, ["tune.methods lists kd more than once"]),
    ({"methods": ["kd"], "space": {"kd": {}}}, ["search space is empty", "tune.space.kd"]),
    ({"methods": ["face_logit"]}, ["tune.space has no search space for method face_logit"]),
    ({"space": {"kd": {"distill": {"temperature": {"low": 8.0, "high": 1.0}}}, "dkd": {}, "dist": {}}},
     ["tune.space.kd.distill.temperature.low must be below its high"]),
    ({"space": {"kd": {"distill": {"temperature": {"low": 0.0, "high": 4.0, "log": True}}}, "dkd": {}, "dist": {}}},
     ["tune.space.kd.distill.temperature", "log scale", "low must be > 0"]),
    ({"space": {"kd": {"distill": {"temperature": {"low": 1.0, "hi": 4.0}}}, "dkd": {}, "dist": {}}},
     ["tune.space.kd.distill.temperature.hi is not a range key"]),
    ({"space": {"kd": {"distill": {"temperature": {"choices": []}}}, "dkd": {}, "dist": {}}},
     ["tune.space.kd.distill.temperature.choices must be a non-empty list"]),
    ({"metric": "test/acc1"}, ["tune.metric must be a validation metric", "never on test"]),
    ({"metric": "val/loss"}, ["tune.direction is needed"]),
    ({"pruner": {"name": "hyperband"}}, ["tune.pruner.name must be one of median, asha, none"]),
    ({"trials": 0}, ["tune.trials must be a whole number >= 1"]),
    ({"jobs": "two"}, ["tune.jobs must be a whole number >= 1"]),
    ({"storage": "study.db"}, ["tune.storage must be a database URL"]),
    ({"enqueue": [{"method": "at"}]}, ["tune.enqueue[0].method is at, which is not in tune.methods"]),
    ({"enqueue": [{"method": "kd", "distill": {"beta": 2.0}}]},
     ["tune.enqueue[0].distill.beta is not a searched setting of kd"]),
    ({"enqueue": [{"method": "kd", "distill": {"temperature": 20.0}}]},
     ["tune.enqueue[0].distill.temperature is 20.0, outside tune.space.kd.distill.temperature"]),
    ({"pace": 3}, ["tune.pace is not a kdx-tune setting"]),
])
def test_bad_settings_are_one_sentence_naming_the_key(changes, words):
    with pytest.raises(ConfigError) as e:
        parse_settings(tune_section(**changes), CHECKPOINT, PRESETS)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_ranges_choices_and_enqueued_values_as_trials_use_them():
    settings = parse_settings(tune_section(
        methods=["kd", "dkd"],
        space={"kd": {"distill": {"temperature": {"low": 1.0, "high": 8.0, "log": True}},
                      "data": {"mix": {"mode": {"choices": ["off", "mixup"]}}}},
               "dkd": {"distill": {"warmup_epochs": {"low": 0, "high": 5, "type": "int"}}}},
        enqueue=[{"method": "kd", "distill": {"temperature": 2.0}, "data": {"mix": {"mode": "mixup"}}}]),
        CHECKPOINT, PRESETS)
    kd = {s.path: s for s in settings.space["kd"]}
    assert kd["distill.temperature"].log and kd["data.mix.mode"].choices == ("off", "mixup")
    assert settings.space["dkd"][0].kind == "int" and settings.space["dkd"][0].contains(3)
    assert not settings.space["dkd"][0].contains(2.5)
    assert settings.enqueue == ({"method": "kd", "params": {"distill.temperature": 2.0, "data.mix.mode": "mixup"}},)
    again = type(settings).from_dict(json.loads(json.dumps(settings.as_dict())))
    assert again == settings  # what a worker process rebuilds from workers.json


def test_sampled_floats_are_rounded_to_the_value_the_trial_trains_with():
    import optuna

    settings = parse_settings(tune_section(methods=["kd"]), CHECKPOINT, PRESETS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    values = [s.suggest(trial) for s in settings.space["kd"]]
    for s, v in zip(settings.space["kd"], values):
        assert v == float(f"{v:.4g}") and s.low <= v <= s.high


def test_pruner_and_sampler_settings_build_what_they_name():
    import optuna

    from kdx.tune.study import make_pruner, make_sampler

    def built(**changes):
        settings = parse_settings(tune_section(**changes), CHECKPOINT, PRESETS)
        return make_pruner(settings), make_sampler(settings, worker=1)

    median, tpe = built(pruner={"name": "median", "min_epochs": 3, "startup_trials": 2})
    assert isinstance(median, optuna.pruners.MedianPruner) and isinstance(tpe, optuna.samplers.TPESampler)
    assert median._n_warmup_steps == 3 and median._n_startup_trials == 2  # epochs 1-3 are never cut short
    asha, _ = built(pruner={"name": "asha", "min_epochs": 2, "reduction_factor": 4})
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner)
    assert asha._min_resource == 2 and asha._reduction_factor == 4
    none, random = built(pruner={"name": "none"}, sampler={"name": "random"})
    assert isinstance(none, optuna.pruners.NopPruner) and isinstance(random, optuna.samplers.RandomSampler)


# ---------------------------------------------------------------------------------------------- the Lightning hook
def test_trials_reporter_reaches_only_the_trainer_built_during_the_trial():
    import pytorch_lightning as pl

    from kdx.tune.callback import TrialReporter, entry_point_installed, reporting

    assert entry_point_installed(), "kdx's pytorch_lightning.callbacks_factory entry point (pip install -e .)"
    reporter = TrialReporter(trial=None, metric="val/acc1", maximize=True)
    assert not any(isinstance(c, TrialReporter) for c in pl.Trainer(logger=False).callbacks)
    with reporting(reporter):
        first = pl.Trainer(logger=False, enable_checkpointing=False)
        second = pl.Trainer(logger=False, enable_checkpointing=False)
    assert reporter in first.callbacks
    assert not any(isinstance(c, TrialReporter) for c in second.callbacks)
    assert not any(isinstance(c, TrialReporter) for c in pl.Trainer(logger=False).callbacks)


def test_reporter_reports_each_epoch_and_stops_the_trainer_when_pruned():
    from types import SimpleNamespace

    from kdx.tune.callback import TrialReporter

    class Trial:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return len(self.reports) == 2

    trial = Trial()
    reporter = TrialReporter(trial, "val/acc1", maximize=True)
    trainer = SimpleNamespace(sanity_checking=True, callback_metrics={"val/acc1": 0.1}, current_epoch=0, should_stop=False)
    reporter.on_validation_end(trainer, None)  # the sanity check is not an epoch
    assert trial.reports == []
    for epoch, value in enumerate([0.5, 0.4]):
        trainer.sanity_checking, trainer.current_epoch, trainer.callback_metrics = False, epoch, {"val/acc1": value}
        reporter.on_validation_end(trainer, None)
    assert trial.reports == [(1, 0.5), (2, 0.4)]  # steps are epochs counted from 1
    assert trainer.should_stop and reporter.pruned_at == 1 and reporter.epochs == 2 and reporter.best() == 0.5
    trainer.callback_metrics = {"val/loss": 1.0}
    with pytest.raises(ConfigError, match="tune.metric val/acc1 is not logged by this run .*val/loss"):
        reporter.on_validation_end(trainer, None)


# ---------------------------------------------------------------------------------------------- the command line
def test_kdx_tune_help_answers_quickly(tmp_path):
    started = time.monotonic()
    out = run_cli("kdx-tune", "--help", cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kdx-tune: search distillation methods" in out.stdout and "tune.trials=N" in out.stdout
    assert time.monotonic() - started < 15


def test_unknown_method_and_empty_space_are_refused_before_any_work(tmp_path):
    out = run_cli("kdx-tune", "experiment=synthetic/kd", "teacher.ckpt=x.ckpt", "tune.methods=[kd,nosuch]",
                  cwd=tmp_path, timeout=120)
    assert "tune.methods: 'nosuch' is not a distill preset; choose from" in error_line(out)
    out = run_cli("kdx-tune", "experiment=synthetic/kd", "teacher.ckpt=x.ckpt", "tune.methods=[kd]", "tune.space.kd=null",
                  cwd=tmp_path, timeout=120)
    assert "the search space is empty: tune.space.kd has no settings" in error_line(out)
    study = tmp_path / "studies" / "synthetic_kd"  # (Hydra makes the folder of every job)
    assert not (study / "study.db").exists() and not (study / "trials").exists()  # nothing was started


def test_storage_that_cannot_be_written_is_one_sentence(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out = run_cli("kdx-tune", "experiment=synthetic/kd", "teacher.ckpt=x.ckpt",
                  f"tune.storage=sqlite:///{tmp_path / 'a_file' / 'study.db'}", cwd=tmp_path, timeout=120)
    line = error_line(out)
    assert f"tune.storage: the study database {tmp_path / 'a_file' / 'study.db'} cannot be written" in line
    assert "hydra.run.dir=DIR" in line


def test_overrides_that_kdx_tune_decides_are_refused(tmp_path):
    out = run_cli("kdx-tune", "experiment=synthetic/kd", "teacher.ckpt=x.ckpt", "distill=dkd", "tune.methods=[kd,dkd]",
                  cwd=tmp_path, timeout=120)
    assert "distill=dkd: kdx-tune picks the method of each trial from tune.methods; give tune.methods=[dkd]" in \
        error_line(out)


# ---------------------------------------------------------------------------------------------- real studies
def tune_cli(study: Path, teacher: Path, *extra: str) -> list[str]:
    return ["experiment=synthetic/kd", f"teacher.ckpt={teacher}", f"hydra.run.dir={study}", *TINY, *extra]


@pytest.mark.slow
def test_tiny_study_end_to_end_prunes_reports_and_its_best_command_reruns(tmp_path, synthetic_teacher):
    study_dir = tmp_path / "study"
    # trial 0: kd as it learns; trial 1: kd with a learning rate too small to learn anything in an epoch, which the
    # median pruner (active after one finished trial, from the first epoch on) stops after its first epoch;
    # then two trials the sampler proposes
    args = tune_cli(study_dir, synthetic_teacher, "tune.methods=[kd,dkd]", "tune.trials=4", "tune.baseline=false",
                    "+tune.space.kd.optim.lr={low: 1.0e-6, high: 0.2, log: true}",
                    "tune.enqueue=[{method: kd, optim: {lr: 0.1}}, {method: kd, optim: {lr: 1.0e-6}}]",
                    "tune.pruner.startup_trials=1", "tune.sampler.startup_trials=2")
    out = run_cli("kdx-tune", *args, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = load(study_dir)
    assert sorted(states(study).values()).count("FAIL") == 0 and len(states(study)) == 4
    assert states(study)[0] == "COMPLETE" and states(study)[1] == "PRUNED", states(study)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[1].user_attrs["epochs"] == 1 and trials[1].user_attrs["pruned_after_epoch"] == 1
    assert trials[0].user_attrs["epochs"] == 2 and trials[0].params["kd:optim.lr"] == 0.1
    for number, trial in trials.items():  # one real kdx-train run each, in the study folder; valued on val only
        results = json.loads((study_dir / "trials" / f"{number:04d}" / "results.json").read_text())
        assert results["status"] == "completed" and results["hparams"]["method"] == trial.user_attrs["method"]
        assert f"distill={trial.user_attrs['method']}" in results["overrides"]
        if trial.state.name == "COMPLETE":
            assert trial.value == pytest.approx(results["metrics"]["best_val/acc1"])
    assert any((study_dir / "teacher_cache").iterdir())  # kd and dkd read teacher outputs only: one shared store

    report = (study_dir / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 4 and "pruned (after epoch 1)" in report
    values = [float(r.split(" | ")[3]) for r in rows]
    assert values[0] == pytest.approx(max(t.value for t in trials.values() if t.state.name == "COMPLETE"), abs=5e-5)
    assert (study_dir / "trials.png").read_bytes().startswith(b"\x89PNG")
    best = json.loads((study_dir / "best.json").read_text())
    assert best["command"] in out.stdout and best["command"] in report and best["value"] == pytest.approx(values[0], abs=5e-5)

    # the best command trains the same run again (into a folder of our choosing) and gets the same value
    command = shlex.split(best["command"])
    assert command[0] == "kdx-train"
    rerun = run_cli("kdx-train", *command[1:], f"hydra.run.dir={tmp_path / 'rerun'}", cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert again["metrics"]["best_val/acc1"] == pytest.approx(best["value"], abs=1e-6)

    # the same command again: the study is complete, nothing is trained; other settings are refused
    mtimes = {p: p.stat().st_mtime_ns for p in study_dir.glob("trials/*/results.json")}
    out = run_cli("kdx-tune", *args, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "already holds 4 finished trials" in out.stdout, out.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in study_dir.glob("trials/*/results.json")} == mtimes
    out = run_cli("kdx-tune", *[a if a != "tune.methods=[kd,dkd]" else "tune.methods=[kd,dist]" for a in args],
                  cwd=tmp_path, timeout=300)
    line = error_line(out)
    assert f"{study_dir.resolve()} holds a study made with other settings (tune.methods" in line


@pytest.mark.slow
def test_a_study_killed_with_sigkill_continues_with_its_finished_trials_kept(tmp_path, synthetic_teacher):
    study_dir = tmp_path / "study"
    args = tune_cli(study_dir, synthetic_teacher, "tune.methods=[kd]", "tune.trials=2", "tune.pruner.name=none")
    # each checkpoint save pauses, so the kill lands inside trial 1's second epoch
    env = cli_env(KDX_FAULT_PAUSE_IN_SAVE="0.25")
    proc = subprocess.Popen([str(BIN / "kdx-tune"), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    last = study_dir / "trials" / "0001" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last.exists(), proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "timed out"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    first = study_dir / "trials" / "0000" / "results.json"
    assert json.loads(first.read_text())["status"] == "completed"
    kept = first.stat().st_mtime_ns
    assert states(load(study_dir)) == {0: "COMPLETE", 1: "RUNNING"}

    out = run_cli("kdx-tune", *args, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trial 1 was running when the study was stopped; marked failed" in out.stdout
    assert states(load(study_dir)) == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    assert first.stat().st_mtime_ns == kept  # trial 0 was not run again
    assert "trial 0 (" not in out.stdout
    report = (study_dir / "report.md").read_text()
    assert "failed: its process was killed while it ran" in report and "2 complete, 1 fail" in report


@pytest.mark.slow
def test_two_worker_processes_share_the_sqlite_storage(tmp_path, synthetic_teacher):
    study_dir = tmp_path / "study"
    args = tune_cli(study_dir, synthetic_teacher, "tune.methods=[kd,dkd]", "tune.trials=3", "tune.jobs=2",
                    "tune.pruner.name=none")
    out = run_cli("kdx-tune", *args, cwd=tmp_path, env={"KDX_FAULT_PAUSE_IN_SAVE": "0.3"}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 worker processes" in out.stdout
    study = load(study_dir)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # exactly tune.trials, no trial over
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers
    assert {w.split(",")[0] for w in workers} == {"worker 0", "worker 1"}
    spec = json.loads((study_dir / "workers.json").read_text())
    assert spec["storage"] == f"sqlite:///{study_dir.resolve() / 'study.db'}" and spec["threads"] >= 1
    spans = {}
    for t in trials:
        w = t.user_attrs["worker"]
        start, end = t.datetime_start, t.datetime_complete
        spans.setdefault(w, []).append((start, end))
    (a, b) = spans.values()
    assert any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)  # side by side, not one after the other

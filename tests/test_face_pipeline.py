"""Face presets say what they should; face runs fail clearly on bad teachers; the ORL pipeline runs end to end
(every face config is instantiated in test_configs.py)."""
import json

import pytest

from conftest import compose_train, run_cli
from kdx.errors import ConfigError

FACE_EXPERIMENTS = ["orl/student", "orl/face_kd", "orl/teacher"]


@pytest.mark.parametrize("experiment", FACE_EXPERIMENTS)
def test_face_experiments_compose(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.task.name in ("face", "face_distill") and cfg.data.name == "orl"
    assert cfg.checkpoint.monitor == "val/verif_acc" and cfg.checkpoint.mode == "max"
    assert cfg.task.margin.kind == "arcface"
    if cfg.task.name == "face_distill":
        assert cfg.teacher.onnx == "sface" and cfg.distill.method == "emb_cos" and list(cfg.distill.mix) == ["relational"]


def test_face_distill_without_a_teacher_is_a_config_error():
    from kdx.tasks import validate_config

    cfg = compose_train(["experiment=orl/face_kd", "teacher.onnx=null"])
    with pytest.raises(ConfigError, match="teacher.onnx=PATH"):
        validate_config(cfg)


def test_logit_kd_with_an_onnx_teacher_says_why_it_cannot(tmp_path):
    from kdx.configs import build_datamodule
    from kdx.tasks import task_for

    cfg = compose_train(["experiment=orl/face_kd", "distill=face_logit", "data.num_val_pairs=20",
                         "data.num_test_pairs=20"])
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="'logit_kd' needs logits, but the teacher has no margin head"):
        task_for(cfg).create(dm)


def test_training_an_onnx_network_is_refused():
    from kdx.configs import build_datamodule
    from kdx.tasks import task_for

    cfg = compose_train(["experiment=orl/teacher", "pair=sface_mobilefacenet56", "data.num_val_pairs=20",
                         "data.num_test_pairs=20"])
    dm = build_datamodule(cfg.data)
    with pytest.raises(ConfigError, match="ONNX model .*cannot be trained"):
        task_for(cfg).create(dm)


REDUCED = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "data.val_identities=2", "data.test_identities=2",
           "data.num_val_pairs=20", "data.num_test_pairs=20", "task.bn_recalibration_batches=2",
           "student.kwargs.input_size=[32,32]", "pipeline.compare.latency_runs=2", "pipeline.compare.throughput_batch=4",
           "pipeline.compare.throughput_runs=1", "trainer.progress_bar=none"]


@pytest.mark.slow
def test_orl_pipeline_end_to_end(tmp_path):
    """kdx-pipeline experiment=orl_faces on a reduced setting: 2 stages, SFace teacher row, comparison files."""
    # one torch thread: under `pytest -n 2` a second worker shares the 2 cores, and oversubscribed OpenMP crawls
    proc = run_cli("kdx-pipeline", "experiment=orl_faces", *REDUCED, cwd=tmp_path, timeout=240,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "orl_faces"
    comparison = json.loads((run_dir / "comparison.json").read_text())
    rows = comparison["rows"]
    assert [r["model"] for r in rows] == ["teacher (given)", "student alone", "student distilled"]
    assert rows[0]["architecture"] == "sface (ONNX)" and rows[0]["macs"] is None and rows[0]["embedding_size"] == 128
    for row in rows:
        assert 0.0 <= row["verif_acc"] <= 1.0 and 0.0 <= row["auc"] <= 1.0 and row["params"] > 0
        assert row["latency_ms"] > 0 and "tar@far=1e-1" in row
    assert rows[0]["auc"] > 0.9  # SFace on unseen ORL identities
    assert rows[1]["params"] < rows[0]["params"]
    for name in ("comparison.md", "comparison.png", "pipeline.json", "student/results.json", "kd/results.json"):
        assert (run_dir / name).is_file(), name
    kd = json.loads((run_dir / "kd" / "results.json").read_text())
    assert kd["status"] == "completed" and kd["params"]["teacher"] > 1_000_000
    assert "test/verif_acc" in kd["metrics"] and kd["monitor"]["metric"] == "val/verif_acc"
    assert "TAR@FAR=1e-1" in (run_dir / "comparison.md").read_text()
    # kdx-eval scores the distilled student's checkpoint on the same kind of data
    ckpt = kd["checkpoints"]["best"]
    proc = run_cli("kdx-eval", ckpt, "orl", "--num-pairs", "40", "--flip", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accuracy" in proc.stdout


@pytest.mark.slow
def test_orl_pipeline_with_a_trained_iresnet_teacher_and_logit_kd(tmp_path):
    """The trained-teacher option: its checkpoint feeds the kd stage (logit_kd allowed: same identities)."""
    overrides = [o for o in REDUCED if not o.startswith("student.kwargs")] + ["+trainer.limit_train_batches=2",
                                                                            "distill=face_logit"]
    overrides.remove("+trainer.limit_train_batches=3")
    proc = run_cli("kdx-pipeline", "experiment=orl_faces_iresnet", *overrides, cwd=tmp_path, timeout=240,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "orl_faces_iresnet"
    rows = json.loads((run_dir / "comparison.json").read_text())["rows"]
    assert [(r["model"], r["architecture"]) for r in rows] == [
        ("teacher", "iresnet18"), ("student alone", "mobilefacenet"), ("student distilled", "mobilefacenet")]
    assert rows[0]["macs"] > rows[1]["macs"] > 0
    kd = json.loads((run_dir / "kd" / "results.json").read_text())
    assert kd["hparams"]["method"] == "logit_kd" and kd["hparams"]["mix"] == ["emb_cos"]
    assert any(o.startswith("teacher.ckpt=") for o in kd["overrides"])

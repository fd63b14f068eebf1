"""kdx-pipeline end to end on a tiny folder of real JPEG files, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env
from image_files import write_class_folder

BIN = Path(sys.executable).parent
ENV = cli_env()


def run_pipeline(tmp_path, *extra):
    cmd = [BIN / "kdx-pipeline", "experiment=folder", f"data.root={tmp_path / 'images'}", "pair=synthetic_tiny",
           "data.image_size=16", "data.num_workers=0", "data.batch_size=16", "data.val_split=0.2",
           "data.test_split=0.2", "trainer.max_epochs=4", "optim.lr=0.05", "pipeline.compare.latency_runs=3",
           "pipeline.compare.throughput_runs=1", f"hydra.run.dir={tmp_path / 'run'}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)


@pytest.mark.slow
def test_pipeline_on_jpeg_folders_ends_in_a_comparison_and_reuses_the_teacher(tmp_path):
    write_class_folder(tmp_path / "images", num_classes=3, per_class=20, size=20)
    proc = run_pipeline(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    comparison = json.loads((run / "comparison.json").read_text())
    rows = {r["model"]: r for r in comparison["rows"]}
    assert list(rows) == ["teacher", "student alone", "student distilled"]
    assert rows["teacher"]["architecture"] == "resnet8" and rows["student distilled"]["architecture"] == "cnn_tiny"
    assert rows["teacher"]["params"] > rows["student alone"]["params"] == rows["student distilled"]["params"]
    assert rows["teacher"]["agreement"] == 1.0
    for row in rows.values():
        assert row["macs"] > 0 and row["latency_ms"] > 0 and row["images_per_s"] > 0 and row["size_mb"] > 0
        assert row["latency_q1_ms"] <= row["latency_ms"] <= row["latency_q3_ms"]  # median of interleaved rounds
        assert row["latency_rounds"] >= 3
        assert 0.0 <= row["test_acc1"] <= 1.0
        assert 0.0 <= row["ece"] <= 1.0 and row["nll"] > 0  # calibration is always measured
        assert sum(b["count"] for b in row["reliability"]) == 12  # every test image in one confidence bin
        assert "acc_fgsm" not in row  # robustness is opt-in
    assert rows["teacher"]["test_acc1"] > 0.5  # 3 classes: chance is 1/3
    assert (run / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "comparison.md").read_text().startswith("# folder: teacher vs student")
    assert (run / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "student distilled" in proc.stdout
    kd = json.loads((run / "kd" / "results.json").read_text())
    assert kd["task"] == "distill" and kd["status"] == "completed"
    teacher_ckpt = run / "teacher" / "checkpoints" / "best.ckpt"
    stamp = teacher_ckpt.stat().st_mtime_ns

    again = run_pipeline(tmp_path)  # finished stages are reused, never retrained or overwritten
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1/3 teacher: reusing the finished run" in again.stdout
    assert teacher_ckpt.stat().st_mtime_ns == stamp

    changed = run_pipeline(tmp_path, "distill.temperature=2")
    assert changed.returncode == 2
    assert "kd holds a finished kd run made with a different config" in changed.stderr

    # a finished teacher can seed a new pipeline folder; an unfinished stage there is set aside, not deleted
    (tmp_path / "run2" / "student").mkdir(parents=True)
    (tmp_path / "run2" / "student" / "results.json").write_text('{"status": "failed"}')
    seeded = run_pipeline(tmp_path, "distill.temperature=2", f"hydra.run.dir={tmp_path / 'run2'}",
                          f"pipeline.teacher_ckpt={teacher_ckpt}", "pipeline.compare.robustness.enabled=true",
                          "pipeline.compare.export_onnx=true")
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    assert not (tmp_path / "run2" / "teacher").exists()
    aside = list((tmp_path / "run2").glob("student.incomplete-*"))
    assert len(aside) == 1 and json.loads((aside[0] / "results.json").read_text())["status"] == "failed"
    rows = json.loads((tmp_path / "run2" / "comparison.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "student alone", "student distilled"]
    assert rows[0]["test_acc1"] == pytest.approx(comparison["rows"][0]["test_acc1"])  # the same teacher
    for row in rows:  # robustness on request: PGD is at least as strong as FGSM
        assert row["acc_pgd"] <= row["acc_fgsm"] + 1 / 12 + 1e-9  # one image of slack in 12
        assert 0.0 <= row["acc_noise"] <= 1.0 and 0.0 <= row["acc_blur"] <= 1.0
    exported = rows[2]  # the distilled student, exported, checked and timed in onnxruntime next to PyTorch
    onnx_file = tmp_path / "run2" / "student_distilled.onnx"
    assert exported["onnx_file"] == str(onnx_file) and onnx_file.is_file() and onnx_file.with_suffix(".onnx.json").is_file()
    assert exported["onnx_max_abs_diff"] < 1e-4 and exported["onnx_latency_ms"] > 0 and exported["torch_latency_paired_ms"] > 0
    assert "onnxruntime b=1 (ms)" in (tmp_path / "run2" / "comparison.md").read_text()

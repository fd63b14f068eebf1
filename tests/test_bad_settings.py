"""Bad settings are one sentence naming the key, before any training: sizes of zero, one class, a monitor the
task never logs, a batch larger than the training set, negative noise, and a key of another datamodule."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import compose_train, run_cli
from kdx.errors import ConfigError, DataError

QUIET = ["trainer.max_epochs=1", "trainer.progress_bar=none"]


@pytest.mark.parametrize("override, message", [
    ("data.train_size=0", "data.train_size must be a whole number >= 1, got 0"),
    ("data.val_size=0", "data.val_size must be a whole number >= 1, got 0"),
    ("data.image_size=0", "data.image_size must be a whole number >= 1, got 0"),
    ("data.num_classes=1", "data.num_classes must be a whole number >= 2, got 1; a classifier needs at least two"),
    ("data.noise=-1", "data.noise must be a finite number >= 0, got -1"),
])
def test_bad_data_sizes_are_refused_with_the_config(override, message):
    from kdx.tasks import validate_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(compose_train(["experiment=synthetic/teacher", override]))


def test_bad_data_sizes_are_one_line_from_kdx_train(tmp_path):
    for override in ("data.train_size=0", "data.num_classes=1"):
        out = run_cli("kdx-train", "experiment=synthetic/teacher", override, *QUIET, f"hydra.run.dir={tmp_path / 'r'}",
                      cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and override.split("=")[0] in lines[0], out.stderr[-2000:]
        assert not (tmp_path / "r" / "results.json").exists()  # refused before any work


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path):
    from kdx.train import run_training

    cfg = compose_train(["experiment=synthetic/teacher", "data.batch_size=100000", "data.train_size=64", *QUIET])
    with pytest.raises(ConfigError, match=r"data.batch_size=100000 is larger than the training set \(64 images\).*"
                                          r"at most 64"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a batch equal to the set is fine
    done = run_training(compose_train(["experiment=synthetic/teacher", "data.batch_size=64", "data.train_size=64",
                                       *QUIET]), tmp_path / "ok")
    assert done["status"] == "completed"


def test_a_monitor_the_task_never_logs_is_refused_before_training(tmp_path):
    from kdx.train import run_training

    cfg = compose_train(["experiment=synthetic/teacher", "checkpoint.monitor=val/acc", *QUIET])
    with pytest.raises(ConfigError, match=r"checkpoint.monitor=val/acc is not a metric this task logs \(it logs "
                                          r"val/acc1, val/loss\); did you mean checkpoint.monitor=val/acc1\?"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.csv").exists()
    done = run_training(compose_train(["experiment=synthetic/teacher", "checkpoint.monitor=val/loss",
                                       "checkpoint.mode=min", *QUIET]), tmp_path / "ok")
    assert done["status"] == "completed"


def _one_class_folder(root: Path) -> Path:
    (root / "cats").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (12, 12), (40 * i, 10, 10)).save(root / "cats" / f"{i}.png")
    return root


def test_a_one_class_image_folder_is_one_sentence(tmp_path):
    from kdx.data.image_folder import ImageFolderDataModule

    root = _one_class_folder(tmp_path / "images")
    with pytest.raises(DataError, match=r"has only the class folder 'cats'; a classifier needs at least two classes"):
        ImageFolderDataModule(str(root), image_size=8, num_workers=0).setup("fit")
    out = run_cli("kdx-train", "experiment=folder/transfer", f"data.root={root}", "data.image_size=8",
                  "teacher.pretrained=false", "student.pretrained=false", *QUIET, f"hydra.run.dir={tmp_path / 'r'}",
                  cwd=tmp_path)
    assert out.returncode == 2 and "a classifier needs at least two classes" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_key_of_another_datamodule_says_where_it_belongs(tmp_path):
    root = _one_class_folder(tmp_path / "images")
    out = run_cli("kdx-train", "data=image_folder", f"data.root={root}", "data.train_size=0", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "data.train_size is a key of data=synthetic, not of the data config chosen here (data=image_folder)" in \
        lines[0]
    assert "did you mean data.train_size" not in lines[0]

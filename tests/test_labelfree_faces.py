"""Label-free face distillation: the student never sees an identity label, only the teacher's embeddings."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train, run_cli
from kdx.data.face import FaceFolderDataModule, ORLFacesDataModule
from kdx.errors import ConfigError, DataError


def _crops(root, n=12, size=20, nested=True):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / (f"batch{i % 3}" / __import__("pathlib").Path(f"sub{i % 2}") if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"face{i}.png")
    return root


def test_orl_without_labels_keeps_the_training_faces_and_hides_every_identity():
    labelled = ORLFacesDataModule(val_identities=4, test_identities=8, num_val_pairs=20, num_test_pairs=20, seed=0)
    free = ORLFacesDataModule(val_identities=4, test_identities=8, num_val_pairs=20, num_test_pairs=20, seed=0,
                              labels=False)
    labelled.setup("fit")
    free.setup("fit")
    assert [p for p, _ in free.train_samples] == [p for p, _ in labelled.train_samples]  # the same 280 faces
    assert len(free.train_samples) == 280 and {label for _, label in free.train_samples} == {-1}
    assert free.pairs == labelled.pairs and free.test_pairs == labelled.test_pairs  # the same held-out identities
    assert set(next(iter(free.train_dataloader()))["labels"].tolist()) == {-1}
    assert free.describe()["train_labels"] is False


def test_a_folder_of_crops_flat_or_nested_is_the_training_set(tmp_path):
    crops = _crops(tmp_path / "crops")
    (tmp_path / "crops" / "notes.txt").write_text("not an image")
    (tmp_path / "crops" / "broken.png").write_bytes(b"not a png")
    ids = tmp_path / "ids"
    for i in range(4):
        (ids / f"p{i}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i + j, np.uint8)).save(ids / f"p{i}" / f"{j}.png")
    with pytest.warns(UserWarning, match=r"data.crops: 1 unreadable image\(s\) skipped.*broken.png"):
        dm = FaceFolderDataModule(ids, val_identities=2, num_val_pairs=4, image_size=20, crops=str(crops))
        dm.setup("fit")
    assert len(dm.train_samples) == 12 and all(label == -1 for _, label in dm.train_samples)
    assert all("crops" in p for p, _ in dm.train_samples) and dm.describe()["identities_train"] == 0


def test_a_crops_folder_without_a_readable_image_is_one_sentence(tmp_path):
    (tmp_path / "crops" / "a").mkdir(parents=True)
    (tmp_path / "crops" / "a" / "x.jpg").write_bytes(b"garbage")
    ids = tmp_path / "ids"
    for i in range(3):
        (ids / f"p{i}").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ids / f"p{i}" / "0.png")
    dm = FaceFolderDataModule(ids, val_identities=2, num_val_pairs=2, image_size=8, crops=str(tmp_path / "crops"))
    with pytest.raises(DataError, match=r"data.crops=.*crops holds no readable image \(1 image files, 1 unreadable"):
        dm.setup("fit")


def test_random_crops_are_seeded_and_stay_inside_the_face():
    from kdx.data.face import FaceTransform

    t = FaceTransform((16, 16), 3, crop_scale=0.5)
    img = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(40, 30, 3) % 251)
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    assert torch.equal(a, t(img)) and a.shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="data.train_crop_scale must be in"):
        FaceTransform((16, 16), 3, crop_scale=0)


@pytest.mark.parametrize("overrides, message", [
    (["distill.alpha=0.5"], "data.mix.mode=both mixes faces, but the margin loss"),
    (["data.mix.mode=off", "distill.alpha=0.5"], "data.labels=false hides the identity labels"),
])
def test_label_free_settings_a_margin_loss_cannot_use_are_refused(overrides, message):
    from kdx.tasks import task_for

    cfg = compose_train(["experiment=orl/face_kd_labelfree", *overrides])
    with pytest.raises(ConfigError, match=message):
        task_for(cfg).check()


@pytest.mark.slow
def test_label_free_pipeline_on_orl_end_to_end(tmp_path):
    """kdx-pipeline experiment=orl_faces_labelfree, reduced: the distilled row learnt from SFace without labels."""
    from test_face_pipeline import REDUCED

    proc = run_cli("kdx-pipeline", "experiment=orl_faces_labelfree", *REDUCED, "distill.teacher_cache.views=1",
                   cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "orl_faces_labelfree"
    rows = json.loads((run_dir / "comparison.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher (given)", "student alone", "student distilled"]
    kd = json.loads((run_dir / "kd" / "results.json").read_text())
    assert kd["status"] == "completed" and "train/loss_margin" not in json.dumps(kd["metrics"])
    config = (run_dir / "kd" / "config.yaml").read_text()
    assert "labels: false" in config and "mode: both" in config
    assert all(0.0 <= r["verif_acc"] <= 1.0 for r in rows)

"""Datamodules on real image files written by the tests, and every bad-input message."""
import gzip
import struct
import warnings
from collections import Counter

import pytest
import torch
from PIL import Image

from conftest import run_cli
from image_files import class_image, write_class_folder, write_split_folders
from kdx.data import FashionMNISTDataModule, ImageFolderDataModule, SyntheticDataModule
from kdx.data.fashion_mnist import locate_fashion_mnist, read_idx
from kdx.errors import DataError


def test_split_folders_share_the_class_list_and_load_as_tensors(tmp_path):
    write_split_folders(tmp_path, num_classes=3)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4)
    dm.setup()
    assert dm.class_names == ["class_0", "class_1", "class_2"]
    assert dm.describe()["train"] == 36 and dm.describe()["val"] == 12 and dm.describe()["test"] == 12
    _b = next(iter(dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_single_folder_is_split_stratified_and_reproducibly(tmp_path):
    write_class_folder(tmp_path, num_classes=3, per_class=10)
    splits = []
    for _ in range(2):
        dm = ImageFolderDataModule(str(tmp_path), image_size=16, val_split=0.2, test_split=0.2, seed=3)
        dm.setup()
        splits.append([p for p, _ in dm.val_set.samples])
        assert Counter(label for _, label in dm.val_set.samples) == {0: 2, 1: 2, 2: 2}
        assert Counter(label for _, label in dm.test_set.samples) == {0: 2, 1: 2, 2: 2}
        assert not set(dm.train_set.samples) & set(dm.val_set.samples)
    assert splits[0] == splits[1]


def test_grey_rgba_and_palette_images_become_rgb_or_grey(tmp_path):
    write_class_folder(tmp_path, num_classes=2, per_class=3)
    class_image(0, 50).convert("L").save(tmp_path / "class_0" / "grey.png")
    class_image(0, 51).convert("RGBA").save(tmp_path / "class_0" / "rgba.png")
    class_image(1, 52).convert("P").save(tmp_path / "class_1" / "palette.png")
    for in_chans in (3, 1):
        dm = ImageFolderDataModule(str(tmp_path), image_size=8, in_chans=in_chans, val_split=0.3, test_split=0.3)
        dm.setup()
        shapes = {dm.train_set[i][0].shape for i in range(len(dm.train_set))}
        assert shapes == {(in_chans, 8, 8)}


def test_missing_folder_error_names_it(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope")).setup()


def test_empty_class_folder_error_names_it(tmp_path):
    write_class_folder(tmp_path, num_classes=2, per_class=3)
    (tmp_path / "class_9").mkdir()
    with pytest.raises(DataError, match=r"class folder .*class_9 has no images"):
        ImageFolderDataModule(str(tmp_path)).setup()


def test_val_split_with_a_class_train_lacks_is_an_error(tmp_path):
    write_split_folders(tmp_path, num_classes=2)
    write_class_folder(tmp_path / "val_extra", num_classes=3, per_class=2)
    (tmp_path / "val_extra" / "class_2").rename(tmp_path / "val" / "class_2")
    with pytest.raises(DataError, match="class_2.*that train/ lacks"):
        ImageFolderDataModule(str(tmp_path)).setup()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_truncated_image_fails_with_its_path_by_default(tmp_path):
    write_class_folder(tmp_path, num_classes=2, per_class=6)
    bad = tmp_path / "class_1" / "img_002.jpg"
    _truncate(bad)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_split=0.0001, test_split=0.0001)
    dm.setup()
    index = [p for p, _ in dm.train_set.samples].index(bad) if bad in [p for p, _ in dm.train_set.samples] else None
    dataset = dm.train_set if index is not None else dm.val_set
    index = index if index is not None else [p for p, _ in dm.val_set.samples].index(bad)
    with pytest.raises(DataError, match=f"cannot read image {bad}.*data.bad_images=skip"):
        dataset[index]


def test_truncated_image_is_skipped_and_counted_when_configured(tmp_path):
    write_class_folder(tmp_path, num_classes=2, per_class=6)
    _truncate(tmp_path / "class_1" / "img_002.jpg")
    (tmp_path / "class_0" / "notes.png").write_bytes(b"not an image at all")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, bad_images="skip", val_split=0.2, test_split=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    assert len(dm.skipped) == 2
    skips = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(skips) == 1 and skips[0].startswith("skipped 2 unreadable")  # once, not once per split
    total = len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
    assert total == 11 and all(dm.train_set[i][0].shape == (3, 8, 8) for i in range(len(dm.train_set)))


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_fashion_mnist_reads_idx_files_from_a_configured_root(tmp_path):
    images = torch.randint(0, 255, (30, 28, 28), dtype=torch.uint8)
    labels = torch.arange(30, dtype=torch.uint8) % 10
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    assert (read_idx(tmp_path / "train-images-idx3-ubyte.gz") == images.numpy()).all()
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=10, download=False, batch_size=8)
    dm.setup()
    assert dm.describe() == {"num_classes": 10, "in_chans": 1, "image_size": 28, "train": 20, "val": 10, "test": 30}


def test_idx_files_are_decoded_once_but_a_replaced_file_is_read_again(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(path, torch.arange(5, dtype=torch.uint8))
    first = read_idx(path)
    assert read_idx(path) is first  # the same decoded array: a sweep's jobs do not un-gzip it again
    _write_idx(path, torch.arange(7, dtype=torch.uint8) * 2)  # new size: a new version of the file
    assert read_idx(path).tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert not first.flags.writeable  # shared, so nobody may change it in place


def test_fashion_mnist_missing_everywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("kdx.data.fashion_mnist.DEBIAN_DIR", str(tmp_path / "absent"))
    monkeypatch.delenv("KDX_FMNIST_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        locate_fashion_mnist(None, download=False)


def test_not_an_idx_file(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(DataError, match="x.gz is not an IDX file"):
        read_idx(tmp_path / "x.gz")


def test_synthetic_data_is_reproducible_and_balanced():
    a, b = SyntheticDataModule(seed=1), SyntheticDataModule(seed=1)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert Counter(a.train_set.labels.tolist()) == {0: 128, 1: 128, 2: 128, 3: 128}
    assert not torch.equal(a.train_set.images[:128], a.val_set.images)


@pytest.mark.slow
def test_a_truncated_image_read_by_loader_workers_is_one_sentence(tmp_path):
    """kdx-train on a folder with a truncated image, read by 2 DataLoader worker processes: the error is the one
    sentence naming the file and the fix, not torch's report of the worker's traceback."""
    data = tmp_path / "data"
    write_class_folder(data, num_classes=2, per_class=8)
    for bad in sorted((data / "class_1").iterdir()):  # every image of a class: the training split has some of them
        _truncate(bad)
    bad = data / "class_1"
    out = run_cli("kdx-train", "experiment=folder/student", "pair=synthetic_tiny", f"data.root={data}", "data.num_workers=2",
                  "data.image_size=16", "data.val_split=0.25", "data.test_split=0.25", "data.batch_size=4",
                  "trainer.max_epochs=1", "trainer.progress_bar=none", f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr and "worker process" not in out.stderr, out.stderr
    assert lines[0].startswith("kdx: error: ") and str(bad) in lines[0] and "data.bad_images=skip" in lines[0]


def test_a_workers_report_is_reduced_to_its_sentence():
    from kdx.errors import DataError, ModelNotFoundError, worker_sentence

    report = ("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 3, in f\n    raise DataError("...")\n'
              "kdx.errors.DataError: cannot read image /d/a.jpg: truncated; replace or delete the file\n")
    assert str(DataError(report)) == "cannot read image /d/a.jpg: truncated; replace or delete the file"
    assert str(ModelNotFoundError(report)) == "cannot read image /d/a.jpg: truncated; replace or delete the file"
    assert worker_sentence("a plain sentence: with a colon") == "a plain sentence: with a colon"
    assert str(DataError("data folder /x does not exist")) == "data folder /x does not exist"

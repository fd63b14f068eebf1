"""Verification .bin files, LFW pairs.txt, kdx pairs files and pair building."""
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kdx.data.face_formats import (
    build_verification_pairs,
    load_pairs,
    read_lfw_pairs,
    read_pairs_file,
    read_verification_bin,
    write_pairs_file,
    write_verification_bin,
)
from kdx.errors import DataError


def test_bin_round_trip(tmp_path):
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    for i in range(4):
        images[i, i % 3] = 60 * (i + 1)
    path = tmp_path / "tiny.bin"
    write_verification_bin(path, images, [True, False])
    got, issame = read_verification_bin(path, image_size=(16, 16))
    assert got.shape == (4, 3, 16, 16) and got.dtype == torch.uint8
    assert issame.tolist() == [True, False]
    assert (got.float() - images.float()).abs().mean() < 3  # JPEG
    got, _ = read_verification_bin(path, image_size=(8, 10))
    assert got.shape == (4, 3, 8, 10)


def test_bin_accepts_python2_style_bytes_pickle(tmp_path):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(buf, format="PNG")
    path = tmp_path / "py2.bin"
    with open(path, "wb") as f:
        pickle.dump(([bytearray(buf.getvalue()), bytearray(buf.getvalue())], np.array([1])), f, protocol=2)
    got, issame = read_verification_bin(path, image_size=(8, 8))
    assert got.shape == (2, 3, 8, 8) and issame.tolist() == [True]


def test_bin_errors(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="bad.bin"):
        read_verification_bin(bad)
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match="pair"):
        read_verification_bin(wrong)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps(([b"x"] * 3, [True])))
    with pytest.raises(DataError, match="odd number"):
        read_verification_bin(odd)
    mismatch = tmp_path / "mm.bin"
    mismatch.write_bytes(pickle.dumps(([b"x"] * 4, [True])))
    with pytest.raises(DataError, match="4 images but 1"):
        read_verification_bin(mismatch)
    with pytest.raises(DataError, match="odd number"):
        write_verification_bin(tmp_path / "o.bin", torch.zeros(3, 3, 4, 4, dtype=torch.uint8), [True])


def test_lfw_pairs_txt(tmp_path):
    for name, n in (("Alice_Smith", 2), ("Bob", 1), ("Carol", 3)):
        (tmp_path / name).mkdir()
        for i in range(1, n + 1):
            (tmp_path / name / f"{name}_{i:04d}.jpg").write_bytes(b"")
    (tmp_path / "pairs.txt").write_text("1\t2\nAlice_Smith\t1\t2\nCarol\t1\t3\nAlice_Smith\t2\tBob\t1\nBob\t1\tCarol\t2\n")
    pairs = read_lfw_pairs(tmp_path / "pairs.txt")
    assert pairs[0] == (str(tmp_path / "Alice_Smith/Alice_Smith_0001.jpg"), str(tmp_path / "Alice_Smith/Alice_Smith_0002.jpg"), True)
    assert pairs[2] == (str(tmp_path / "Alice_Smith/Alice_Smith_0002.jpg"), str(tmp_path / "Bob/Bob_0001.jpg"), False)
    assert [p[2] for p in pairs] == [True, True, False, False]
    assert load_pairs(tmp_path / "pairs.txt") == pairs
    (tmp_path / "missing.txt").write_text("Dan\t1\t2\n")
    with pytest.raises(DataError, match="do not exist"):
        read_lfw_pairs(tmp_path / "missing.txt")
    (tmp_path / "broken.txt").write_text("a b\n")
    with pytest.raises(DataError, match="line"):
        read_lfw_pairs(tmp_path / "broken.txt", check_exists=False)


def test_kdx_pairs_file_round_trip(tmp_path):
    pairs = [(str(tmp_path / "a/1.png"), str(tmp_path / "a/2.png"), True), ("/abs/x.png", str(tmp_path / "b/1.png"), False)]
    write_pairs_file(tmp_path / "p.tsv", pairs, root=tmp_path)
    assert (tmp_path / "p.tsv").read_text().splitlines()[0] == "a/1.png\ta/2.png\t1"
    assert read_pairs_file(tmp_path / "p.tsv", root=tmp_path, check_exists=False) == pairs
    assert load_pairs(tmp_path / "p.tsv", root=tmp_path, check_exists=False) == pairs


def test_build_pairs_balanced_reproducible_interleaved():
    ids = {f"p{i}": [f"p{i}/{j}.png" for j in range(4)] for i in range(6)}
    ids["lonely"] = ["lonely/0.png"]
    with pytest.warns(UserWarning, match="lonely"):
        pairs = build_verification_pairs(ids, 40, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pairs == build_verification_pairs(ids, 40, seed=3)
        assert pairs != build_verification_pairs(ids, 40, seed=4)
    assert len(pairs) == 40 and sum(p[2] for p in pairs) == 20
    assert len({(a, b) for a, b, _ in pairs}) == 40
    for a, b, same in pairs:
        assert (a.split("/")[0] == b.split("/")[0]) == same
        if same:
            assert "lonely" not in a
    for f in range(10):
        fold = pairs[4 * f: 4 * f + 4]
        assert {p[2] for p in fold} == {True, False}
    # asking for more positives than exist: capped, still balanced
    with pytest.warns(UserWarning, match="only 36 same-identity pairs"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="identities with a single")
        many = build_verification_pairs(ids, 1000, seed=0)
    assert len(many) == 72 and sum(p[2] for p in many) == 36

"""InsightFace RecordIO: round trip, magic-word splitting, errors, dataset and packing."""
import io
import struct

import pytest
from PIL import Image

from kdx.data.recordio import (
    MAGIC,
    IRHeader,
    RecordFaceDataset,
    RecordIOReader,
    RecordIOWriter,
    pack_header,
    unpack_header,
)
from kdx.data.pack import pack_identity_folder, pack_main
from kdx.errors import DataError

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _jpeg(color, size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_header_round_trip_scalar_and_vector_labels():
    h, rest = unpack_header(pack_header(IRHeader(0, 3.0, 7, 0), b"img"))
    assert (h.flag, h.label, h.id, h.id2, rest) == (0, 3.0, 7, 0, b"img")
    h, rest = unpack_header(pack_header(IRHeader(0, [1.0, 5.0], 0, 0), b"xy"))
    assert h.flag == 2 and list(h.label) == [1.0, 5.0] and rest == b"xy"
    assert len(pack_header(IRHeader(0, 1.0, 0, 0))) == 24


def test_round_trip_with_magic_inside_payload(tmp_path):
    # payload holding the magic word at aligned offsets 0, 8 and at the very end, plus one unaligned copy
    tricky = MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"x" + MAGIC_BYTES + b"yyy" + MAGIC_BYTES
    payloads = [b"hello", tricky, b"", b"1234", MAGIC_BYTES, bytes(range(256)) * 3]
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec, idx) as w:
        for k, p in enumerate(payloads):
            w.write(p, key=10 + k)
    raw = rec.read_bytes()
    assert len(raw) % 4 == 0
    # the tricky record is split: its first chunk has cflag 1
    off = int(idx.read_text().splitlines()[1].split("\t")[1])
    assert struct.unpack_from("<I", raw, off + 4)[0] >> 29 == 1
    r = RecordIOReader(rec, idx)
    assert len(r) == len(payloads)
    for k, p in enumerate(payloads):
        assert r.read(10 + k) == p
    assert list(RecordIOReader(rec)) == payloads  # sequential, no index
    assert RecordIOReader(rec).read(1) == tricky


def test_bad_magic_names_file_and_offset(tmp_path):
    rec = tmp_path / "bad.rec"
    rec.write_bytes(b"\0" * 16)
    with pytest.raises(DataError, match=r"bad\.rec.*offset 0"):
        RecordIOReader(rec)


def test_idx_offset_not_at_a_record(tmp_path):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write(b"abcdefgh", key=0)
        w.write(b"ijkl", key=1)
    idx.write_text("0\t0\n1\t4\n2\t9999\n")
    r = RecordIOReader(rec, idx)
    with pytest.raises(DataError, match=r"offset 4.*\.idx"):
        r.read(1)
    with pytest.raises(DataError, match="9999"):
        r.read(2)


def _identity_folder(root, sizes=((3, "red"), (2, "blue"))):
    for i, (n, color) in enumerate(sizes):
        d = root / f"id{i}"
        d.mkdir(parents=True)
        for j in range(n):
            Image.new("RGB", (12, 10), color).save(d / f"{j}.png")
    return root


def test_pack_identity_folder_insightface_layout(tmp_path):
    src = _identity_folder(tmp_path / "faces")
    info = pack_identity_folder(src, tmp_path / "rec")
    assert info == {"num_images": 5, "num_classes": 2, "height": 10, "width": 12}
    assert (tmp_path / "rec" / "property").read_text().strip() == "2,10,12"
    r = RecordIOReader(tmp_path / "rec" / "train.rec", tmp_path / "rec" / "train.idx")
    h0, _ = unpack_header(r.read(0))
    assert h0.flag == 2 and list(h0.label) == [6.0, 8.0]  # images 1..5, identities 6..7
    h6, _ = unpack_header(r.read(6))
    assert list(h6.label) == [1.0, 4.0]
    ds = RecordFaceDataset(tmp_path / "rec")
    assert len(ds) == 5 and ds.num_classes == 2
    x, y = ds[0]
    assert x.shape == (3, 10, 12) and y == 0 and abs(float(x[0].mean()) - 1.0) < 0.02  # red
    assert [ds[i][1] for i in range(5)] == [0, 0, 0, 1, 1]


def test_pack_main_cli(tmp_path, capsys):
    src = _identity_folder(tmp_path / "faces")
    assert pack_main([str(src), str(tmp_path / "out"), "--image-size", "8", "8"]) == 0
    assert "5 images of 2 identities" in capsys.readouterr().out
    assert RecordFaceDataset(tmp_path / "out")[4][0].shape == (3, 8, 8)
    assert pack_main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2

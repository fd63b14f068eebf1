"""InsightFace RecordIO: round trip, magic-word splitting, errors, dataset and packing."""
import io
import struct

import pytest
import torch
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
from kdx.cli import pack_main
from kdx.data.pack import pack_identity_folder
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
    with pytest.raises(DataError, match=r"bad\.rec has no RecordIO magic number at byte offset 0; the file is not "):
        RecordIOReader(rec)  # scanning without an .idx: no "(offset from ...)" in the message


def test_idx_offset_not_at_a_record(tmp_path):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write(b"abcdefgh", key=0)
        w.write(b"ijkl", key=1)
    idx.write_text("0\t0\n1\t4\n2\t9999\n")
    r = RecordIOReader(rec, idx)
    with pytest.raises(DataError, match=r"t\.rec has no RecordIO magic number at byte offset 4 \(offset from .*t\.idx\)"):
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
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32 and y == 0 and abs(float(x[0].mean()) - 1.0) < 0.02
    assert [ds[i][1] for i in range(5)] == [0, 0, 0, 1, 1]


def test_pack_main_cli(tmp_path, capsys):
    src = _identity_folder(tmp_path / "faces")
    assert pack_main([str(src), str(tmp_path / "out"), "--image-size", "8", "8"]) == 0
    assert "5 images of 2 identities" in capsys.readouterr().out
    assert RecordFaceDataset(tmp_path / "out")[4][0].shape == (3, 8, 8)
    assert pack_main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2


def test_reader_pickles_without_its_file_handle_and_closes(tmp_path):
    """DataLoader workers receive the reader pickled: the copy opens its own handle; close() releases it."""
    import pickle

    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for i, payload in enumerate([b"zero", b"one!", b"two"]):
            w.write(pack_header(IRHeader(0, float(i), i, 0), payload), key=i)
    r = RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    assert unpack_header(r.read(1))[1] == b"one!" and r._file is not None
    copy = pickle.loads(pickle.dumps(r))
    assert copy._file is None and r._file is not None and not r._file.closed  # the original keeps its handle
    header, data = RecordIOReader.unpack(copy.read(2))
    assert (header.label, data) == (2.0, b"two")
    handle = r._file
    r.close()
    assert handle.closed and r._file is None
    r.close()  # closing twice is harmless
    assert unpack_header(r.read(0))[1] == b"zero"  # and a closed reader reopens on the next read


def test_dataset_without_property_file_counts_identities_from_the_labels(tmp_path):
    src = _identity_folder(tmp_path / "faces", sizes=((1, "red"), (2, "blue"), (1, "green")))
    pack_identity_folder(src, tmp_path / "rec")
    (tmp_path / "rec" / "property").unlink()
    ds = RecordFaceDataset(tmp_path / "rec")
    assert ds.num_classes == 3 and [ds[i][1] for i in range(len(ds))] == [0, 1, 1, 2]


def _write_rec(folder, records, prop=None):
    """A train.rec/.idx holding `records` = [(key, label or label list, payload)] in this file order."""
    folder.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(folder / "train.rec", folder / "train.idx") as w:
        for key, label, payload in records:
            w.write(pack_header(IRHeader(0, label, key, 0), payload), key=key)
    if prop:
        (folder / "property").write_text(prop)
    return folder


def test_dataset_follows_the_idx_keys_not_the_file_order(tmp_path):
    """Keys written out of file order: the dataset reads through the .idx, so key 1 is image 0 wherever it lies."""
    folder = _write_rec(tmp_path / "rec", [(0, [4.0, 4.0], b""), (3, 2.0, _jpeg("green")), (1, 0.0, _jpeg("red")),
                                           (2, 1.0, _jpeg("blue"))], prop="3,8,8")
    ds = RecordFaceDataset(folder)
    assert [ds[i][1] for i in range(3)] == [0, 1, 2]
    assert torch.equal(ds[0][0], torch.stack([torch.ones(8, 8), torch.zeros(8, 8), torch.zeros(8, 8)]))  # red, /255
    assert torch.equal(ds[1][0][2], torch.ones(8, 8))  # then blue (lossless PNG records)


def test_dataset_without_a_header_record_reads_every_record_as_an_image(tmp_path):
    folder = _write_rec(tmp_path / "rec", [(5, 1.0, _jpeg("blue")), (7, 0.0, _jpeg("red")), (9, 1.0, _jpeg("blue"))])
    ds = RecordFaceDataset(folder)
    assert ds.keys == [5, 7, 9] and ds.num_classes == 2 and [ds[i][1] for i in range(3)] == [1, 0, 1]
    folder0 = _write_rec(tmp_path / "rec0", [(0, 1.0, _jpeg("blue")), (1, 0.0, _jpeg("red"))])  # key 0, flag 0
    assert [y for _, y in RecordFaceDataset(folder0)] == [1, 0]


def test_a_one_value_header_record_still_ends_the_images(tmp_path):
    folder = _write_rec(tmp_path / "rec", [(0, [3.0], b""), (1, 0.0, _jpeg("red")), (2, 1.0, _jpeg("blue")),
                                           (3, [1.0, 3.0], b"")])
    assert RecordFaceDataset(folder).keys == [1, 2]


def test_dataset_labels_from_label_arrays_use_the_first_value(tmp_path):
    folder = _write_rec(tmp_path / "rec", [(1, [1.0, 0.0, 7.0], _jpeg("red")), (2, [0.0, 1.0], _jpeg("blue"))],
                        prop="2,8,8")
    assert [y for _, y in RecordFaceDataset(folder)] == [1, 0]


def test_property_file_sets_the_identity_count_and_bounds_the_labels(tmp_path):
    folder = _write_rec(tmp_path / "rec", [(1, 0.0, _jpeg("red")), (2, 1.0, _jpeg("blue"))], prop="5,8,8")
    assert RecordFaceDataset(folder).num_classes == 5  # more identities than this shard's labels reach
    (folder / "property").write_text("2,8,8,3")  # fields after the third are ignored
    assert RecordFaceDataset(folder).num_classes == 2
    bad = _write_rec(tmp_path / "bad", [(1, 0.0, _jpeg("red")), (2, 2.0, _jpeg("blue"))], prop="2,8,8")
    ds = RecordFaceDataset(bad)
    with pytest.raises(DataError, match=r"record 2 of .*train.rec has identity label 2.*2 identities"):
        ds[1]


def test_damaged_labels_and_images_name_the_record(tmp_path):
    folder = _write_rec(tmp_path / "rec", [(0, [2.5, 4.0], b""), (1, 0.0, _jpeg("red"))])
    with pytest.raises(DataError, match=r"the header record \(key 0\) of .*train.rec has the first identity"):
        RecordFaceDataset(folder)
    folder = _write_rec(tmp_path / "rec2", [(1, 0.0, _jpeg("red")), (2, 1.5, _jpeg("red")), (3, 0.0, b"no image")],
                        prop="2,8,8")
    ds = RecordFaceDataset(folder)
    with pytest.raises(DataError, match=r"record 2 of .*train.rec has its identity label 1.5"):
        ds[1]
    with pytest.raises(DataError, match=r"record 3 of .*train.rec"):
        ds[2]


def test_dataset_applies_its_transform_to_an_rgb_image(tmp_path):
    folder = _write_rec(tmp_path / "rec", [(1, 0.0, _jpeg("red", size=(6, 4)))], prop="1,4,6")
    seen = []
    ds = RecordFaceDataset(folder, transform=lambda img: seen.append((img.mode, img.size)) or "tensor")
    assert ds[0] == ("tensor", 0) and seen == [("RGB", (6, 4))]


@pytest.mark.parametrize("value, ok", [(3.0, 3), (0, 0), (2.5, None), (-1.0, None), (float("nan"), None),
                                       (float("inf"), None)])
def test_whole_number_labels(value, ok):
    from kdx.data.recordio import _whole_number
    if ok is None:
        with pytest.raises(DataError, match="somewhere has its label"):
            _whole_number(value, "somewhere", "its label")
    else:
        assert _whole_number(value, "somewhere", "its label") == ok


def test_reader_finds_the_idx_next_to_the_rec_with_auto(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write(b"first", key=10)
        w.write(b"second", key=20)
    assert RecordIOReader(rec, "auto").keys == [10, 20]
    assert RecordIOReader(rec).keys == [0, 1]  # no index: records by position
    idx.unlink()
    assert RecordIOReader(rec, "auto").keys == [0, 1] and RecordIOReader(rec, "auto").read(1) == b"second"


def test_idx_files_skip_blank_lines_and_name_a_bad_line(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordIOWriter(rec, idx) as w:
        for k in range(3):
            w.write(b"x" * (k + 1), key=k)
    lines = idx.read_text().splitlines()
    idx.write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n")
    assert RecordIOReader(rec, idx).keys == [0, 1, 2]
    idx.write_text(lines[0] + "\n" + lines[1] + "\nthree\t4\n")
    with pytest.raises(DataError, match=r"a\.idx line 3 is not `key<TAB>offset`: 'three\\t4'"):
        RecordIOReader(rec, idx)


def test_idx_offsets_outside_the_file_are_refused(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write(b"abcd", key=0)
    size = rec.stat().st_size
    idx.write_text(f"0\t0\n1\t{size}\n2\t-8\n")
    r = RecordIOReader(rec, idx)
    for key, offset in ((1, size), (2, -8)):
        with pytest.raises(DataError, match=rf"gives key {key} the offset {offset}, outside"):
            r.read(key)


def test_headers_of_exactly_24_bytes_and_truncated_label_arrays():
    h, rest = unpack_header(pack_header(IRHeader(0, 5.0, 1, 2)))
    assert (h.flag, h.label, h.id, h.id2, rest) == (0, 5.0, 1, 2, b"")
    whole = pack_header(IRHeader(0, [1.0, 2.0], 0, 0), b"")
    with pytest.raises(DataError, match="announces 2 labels but holds only 4 bytes"):
        unpack_header(whole[:-4])
    with pytest.raises(DataError, match="shorter than its 24-byte header"):
        unpack_header(whole[:23])


def test_a_dataset_of_no_images_and_a_bad_label_found_while_counting(tmp_path):
    empty = _write_rec(tmp_path / "empty", [(0, [1.0, 1.0], b"")])
    ds = RecordFaceDataset(empty)
    assert len(ds) == 0 and ds.num_classes == 0
    bad = _write_rec(tmp_path / "bad", [(1, 0.0, _jpeg("red")), (2, 0.5, _jpeg("red"))])  # no property file
    with pytest.raises(DataError, match=r"record 2 of .*train.rec has its identity label 0.5"):
        RecordFaceDataset(bad)


def test_the_fingerprint_changes_when_the_record_file_is_rewritten(tmp_path):
    """The teacher cache's key (kdx.data.fingerprint): a train.rec rewritten in place with other images of the
    same sizes is another dataset."""
    import os

    records = [(5, 1.0, _jpeg("blue")), (7, 0.0, _jpeg("red"))]
    folder = _write_rec(tmp_path / "rec", records)
    first = RecordFaceDataset(folder).fingerprint()
    assert RecordFaceDataset(folder).fingerprint() == first
    _write_rec(folder, list(reversed(records)))
    os.utime(folder / "train.rec", ns=(1, 10 ** 18))  # whatever the clock's resolution
    assert RecordFaceDataset(folder).fingerprint() != first

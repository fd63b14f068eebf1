"""Pack a face folder (one subfolder of images per identity) into InsightFace
RecordIO (train.rec, train.idx, property), written so that a failed pack leaves an existing dataset as it was;
`kdx-pack FOLDER OUT_DIR` (kdx.cli.pack_main) is the console script."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

from kdx.data.images import decode_image, list_identity_folder
from kdx.data.recordio import IRHeader, RecordIOWriter, pack_header
from kdx.errors import DataError
from kdx.io import fsync_dir, temporary_path


def pack_identity_folder(folder: str | os.PathLike, out_dir: str | os.PathLike, quality: int = 95,
                         image_size: Sequence[int] | None = None) -> dict[str, int]:
    """Write train.rec/train.idx/property (InsightFace layout) from one-subfolder-per-identity images.

    The three files are written under temporary names and renamed into place only once all are complete:
    a pack that fails (an unreadable image, a full disk, a kill) leaves a dataset already in `out_dir` as it was.
    """
    identities = list_identity_folder(folder)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_images = sum(len(v) for v in identities.values())
    id_start = num_images + 1
    id_end = id_start + len(identities)
    size_seen: tuple[int, int] | None = tuple(image_size) if image_size else None  # (h, w)
    final = {name: out_dir / name for name in ("train.rec", "train.idx", "property")}
    tmp = {name: temporary_path(path) for name, path in final.items()}
    try:
        with RecordIOWriter(tmp["train.rec"], tmp["train.idx"]) as w:
            w.write(pack_header(IRHeader(2, [id_start, id_end], 0, 0)), key=0)
            key = 1
            ranges = []
            for label, (_name, paths) in enumerate(identities.items()):
                first = key
                for p in paths:
                    img = decode_image(p, 3, size_seen, name=f"image {p}")
                    if size_seen is None:
                        size_seen = (img.height, img.width)
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=quality)
                    w.write(pack_header(IRHeader(0, float(label), key, 0), buf.getvalue()), key=key)
                    key += 1
                ranges.append((first, key))
            for i, (a, b) in enumerate(ranges):
                w.write(pack_header(IRHeader(2, [a, b], 0, 0)), key=id_start + i)
            w.sync()
        h, wdt = size_seen or (112, 112)
        with open(tmp["property"], "w") as f:
            f.write(f"{len(identities)},{h},{wdt}\n")
            f.flush()
            os.fsync(f.fileno())
        for name in ("train.rec", "train.idx", "property"):  # the index and property follow the data they describe
            os.replace(tmp[name], final[name])
        fsync_dir(out_dir)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return {"num_images": num_images, "num_classes": len(identities), "height": h, "width": wdt}

"""Face-verification pair formats: InsightFace `.bin` files, LFW `pairs.txt`, kdx pairs files.

Every format describes pairs (a, b, issame). InsightFace `.bin` files are a pickle of
`(bins, issame_list)` where `bins` holds 2N encoded images and pair i is images 2i and 2i+1.
The kdx pairs file is one `path_a<TAB>path_b<TAB>0|1` line per pair (paths relative to the file's
folder or absolute).
"""
from __future__ import annotations

import io
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdx.data.images import decode_image
from kdx.errors import DataError
from kdx.io import atomic_write_bytes, atomic_write_text

Pair = tuple[str, str, bool]


# --------------------------------------------------------------------------- InsightFace .bin files
def _decode_to_array(data: bytes, image_size: tuple[int, int], source: str) -> np.ndarray:
    return np.asarray(decode_image(data, 3, image_size, name=source, hint="the .bin file is damaged"), dtype=np.uint8)


class _BinUnpickler(pickle.Unpickler):
    """Unpickles what an InsightFace `.bin` holds and nothing else: lists and tuples of byte strings and
    booleans, written by Python 2 or 3, or numpy arrays of them. Every other global (anything that could
    run code while loading) is refused with a DataError naming it.

    What the admitted constructors may allocate is bounded too: `bytes(n)`/`bytearray(n)` with a number (a
    few bytes of file asking for gigabytes of zeros) is refused, and everything they build together may not
    exceed a few times the file's size (a memo reference costs two bytes of file however large its target,
    so `list(<the same 1 MB bytes>)` repeated would otherwise amplify a small file into gigabytes)."""

    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar")}

    def __init__(self, file, source: str, size: int = 0) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source
        self.budget = 4 * int(size) + (1 << 20)  # elements the constructors below may still create

    def _bounded(self, ctor):
        """`ctor` (bytes, bytearray, list, tuple, bool, int) charged against the allocation budget."""

        def build(*args):
            arg = args[0] if args else None
            if ctor in (bytes, bytearray) and isinstance(arg, int):
                raise DataError(f"{self.source} asks for {ctor.__name__}({arg}), a buffer of zeros that a "
                                f"verification .bin never holds; the file is refused")
            if ctor in (bytes, bytearray, list, tuple) and arg is not None:
                if not hasattr(arg, "__len__"):
                    raise DataError(f"{self.source} asks to build a {ctor.__name__} from a "
                                    f"{type(arg).__name__}; the file is refused")
                self._charge(len(arg))
            elif ctor is int and isinstance(arg, (str, bytes, bytearray)):
                self._charge(len(arg))
            return ctor(*args)

        return build

    def _charge(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise DataError(f"{self.source} builds far more data than the file holds (memo references repeated to "
                            f"amplify it); the file is refused")

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in ("bytearray", "bytes", "bool", "int", "list", "tuple"):
            return self._bounded(getattr(__import__("builtins"), name))
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles of Python 3 write bytes
            def encode(text, encoding="latin1"):
                if isinstance(text, str):
                    self._charge(len(text))
                return _latin1_encode(text, encoding)

            return encode
        if (module, name) in self._NUMPY:
            import importlib

            return getattr(importlib.import_module(module), name)
        module = "builtins" if module == "__builtin__" else module  # how Python 2 pickles spell it
        raise DataError(f"{self.source} asks to load the Python object {module}.{name}, which a verification .bin "
                        f"never holds (only encoded images and issame flags); the file is refused because "
                        f"loading it could run code")


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as pickle protocol 2 uses it for bytes; only the latin-1 form is accepted."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise DataError("a verification .bin asks for a text encoding other than latin-1; the file is refused")
    return text.encode("latin1")


def _as_flags(issame, path: Path) -> list[bool]:
    if isinstance(issame, np.ndarray):
        if issame.dtype.kind not in "biu":
            raise DataError(f"{path} holds issame flags of type {issame.dtype}; expected booleans or 0/1")
        issame = issame.tolist()
    try:
        flags = list(issame)
    except TypeError:
        raise DataError(f"{path} must hold (list of encoded images, list of booleans)") from None
    out = []
    for x in flags:
        if isinstance(x, np.generic):
            x = x.item()
        if not isinstance(x, (bool, int)) or x not in (0, 1):
            raise DataError(f"{path} holds an issame flag {x!r}; every flag must be true/false or 0/1")
        out.append(bool(x))
    return out


def read_verification_bin(path: str | os.PathLike, image_size: Sequence[int] = (112, 112)
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images 2N x 3 x H x W in RGB, bool issame N) from an InsightFace verification `.bin`.

    The pickle is read by a restricted unpickler (see _BinUnpickler): a file asking for anything but byte
    strings, booleans and numpy arrays is refused without running it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification file {path} does not exist; pass an InsightFace .bin file such as lfw.bin")
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, str(path), os.fstat(f.fileno()).st_size).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a pickled (images, issame) verification file ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"{path} must hold the pickle of a pair (encoded images, issame list), found {type(obj).__name__}")
    bins, issame = obj
    issame = _as_flags(issame, path)
    try:
        bins = list(bins)
    except TypeError:
        raise DataError(f"{path} must hold (list of encoded images, list of booleans)") from None
    if not bins:
        raise DataError(f"{path} holds no images (an empty verification set); pass a .bin with at least one pair")
    _check_counts(len(bins), len(issame), str(path))
    distinct = len({id(b) for b in bins})
    if distinct != len(bins):  # pickle memo references: 2 bytes of file each, one full decoded image each
        raise DataError(f"{path} lists {len(bins)} images but only {distinct} distinct ones (the same encoded image "
                        f"referenced again and again), which a real verification .bin never does; the file is "
                        f"refused")
    h, w = int(image_size[0]), int(image_size[1])
    images = np.empty((len(bins), 3, h, w), dtype=np.uint8)
    for i, data in enumerate(bins):
        if isinstance(data, np.ndarray):
            if data.dtype.kind not in "uiS" or data.dtype.itemsize != 1 and data.dtype.kind != "S":
                raise DataError(f"image {i} of {path} is an array of {data.dtype}, not encoded image bytes")
            data = data.tobytes()
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(f"image {i} of {path} is a {type(data).__name__}, not encoded image bytes")
        images[i] = _decode_to_array(data, (h, w), f"image {i} of {path}").transpose(2, 0, 1)
    return torch.from_numpy(images), torch.tensor(issame, dtype=torch.bool)


def _check_counts(num_images: int, num_pairs: int, source: str) -> None:
    if num_images % 2:
        raise DataError(f"{source} holds an odd number of images ({num_images}); pairs need 2 images each")
    if num_images != 2 * num_pairs:
        raise DataError(f"{source} holds {num_images} images but {num_pairs} issame flags; it needs exactly 2 images per flag")


def write_verification_bin(path: str | os.PathLike, images_or_encoded, issame: Sequence[bool],
                           quality: int = 95) -> None:
    """Write an InsightFace `.bin`: images are encoded bytes, or uint8 N x 3 x H x W / N x H x W x 3 arrays."""
    from PIL import Image

    issame = [bool(x) for x in (issame.tolist() if hasattr(issame, "tolist") else issame)]
    if isinstance(images_or_encoded, torch.Tensor):
        images_or_encoded = images_or_encoded.cpu().numpy()
    items = list(images_or_encoded)
    _check_counts(len(items), len(issame), "the images passed to write_verification_bin")
    bins: list[bytes] = []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            bins.append(bytes(item))
            continue
        arr = np.asarray(item)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8:
            raise DataError(f"image {i} passed to write_verification_bin must be uint8 (0..255), got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        buf = io.BytesIO()
        Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=quality)
        bins.append(buf.getvalue())
    atomic_write_bytes(path, pickle.dumps((bins, issame), protocol=4))


# --------------------------------------------------------------------------- pairs files
def read_lfw_pairs(path: str | os.PathLike, root: str | os.PathLike | None = None, ext: str = ".jpg",
                   check_exists: bool = True) -> list[Pair]:
    """Pairs from an LFW `pairs.txt` (`name i j` / `name1 i name2 j` lines) as root/name/name_000i.jpg paths."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    root = Path(root) if root is not None else path.parent
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and all(tok.isdigit() for tok in lines[0]) and len(lines[0]) in (1, 2):
        header = [int(t) for t in lines[0]]
        lines = lines[1:]
        expected = header[0] * header[1] * 2 if len(header) == 2 else header[0] * 2
        if expected != len(lines) and len(header) == 2:
            warnings.warn(f"{path}: header says {header[0]} folds x {header[1]} pairs per class = {expected} "
                          f"pairs, found {len(lines)}", stacklevel=2)

    def image(name: str, num: str) -> str:
        """LFW file name of image `num` of `name`."""
        return str(root / name / f"{name}_{int(num):04d}{ext}")

    pairs: list[Pair] = []
    for lineno, toks in enumerate(lines, 2):
        if len(toks) == 3:
            pairs.append((image(toks[0], toks[1]), image(toks[0], toks[2]), True))
        elif len(toks) == 4:
            pairs.append((image(toks[0], toks[1]), image(toks[2], toks[3]), False))
        else:
            raise DataError(f"{path} line {lineno} is neither `name i j` nor `name1 i name2 j`: {' '.join(toks)!r}")
    if not pairs:
        raise DataError(f"pairs file {path} lists no pairs; it needs `name i j` / `name1 i name2 j` lines")
    if check_exists:
        _check_pair_files(pairs, path)
    return pairs


def _check_pair_files(pairs: list[Pair], source: Path) -> None:
    missing = [p for a, b, _ in pairs for p in (a, b) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} images named in {source} do not exist (first: {missing[0]}); "
                        "check the image root folder")


def read_pairs_file(path: str | os.PathLike, root: str | os.PathLike | None = None,
                    check_exists: bool = True) -> list[Pair]:
    """Pairs from a kdx pairs file (`path_a<TAB>path_b<TAB>0|1`); relative paths resolve against `root`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    root = Path(root) if root is not None else path.parent
    pairs: list[Pair] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        toks = line.rstrip("\n").split("\t")
        if len(toks) != 3 or toks[2].strip() not in ("0", "1"):
            raise DataError(f"{path} line {lineno} is not `path_a<TAB>path_b<TAB>0|1`: {line!r}")
        a, b = (str(root / t) if not os.path.isabs(t) else t for t in toks[:2])
        pairs.append((a, b, toks[2].strip() == "1"))
    if not pairs:
        raise DataError(f"pairs file {path} lists no pairs; it needs `path_a<TAB>path_b<TAB>0|1` lines")
    if check_exists:
        _check_pair_files(pairs, path)
    return pairs


def write_pairs_file(path: str | os.PathLike, pairs: Sequence[Pair], root: str | os.PathLike | None = None) -> None:
    """Write a kdx pairs file; paths under `root` are written relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for a, b, same in pairs:
        if root is not None:
            a, b = (os.path.relpath(p, root) if Path(p).resolve().is_relative_to(Path(root).resolve()) else p
                    for p in (a, b))
        if "\t" in a or "\t" in b:
            raise DataError(f"image path {a!r} or {b!r} contains a TAB and cannot be written to {path}")
        lines.append(f"{a}\t{b}\t{int(bool(same))}\n")
    atomic_write_text(path, "".join(lines))


def load_pairs(path: str | os.PathLike, root: str | os.PathLike | None = None, check_exists: bool = True) -> list[Pair]:
    """Pairs from either a kdx pairs file or an LFW pairs.txt, told apart by their first line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    with open(path) as f:
        first = next((ln for ln in f if ln.strip() and not ln.startswith("#")), "")
    toks = first.split()
    lfw_header = 1 <= len(toks) <= 2 and all(t.isdigit() for t in toks)
    lfw_line = len(toks) in (3, 4) and toks[1].isdigit() and toks[-1].isdigit()
    if not (lfw_header or lfw_line):
        return read_pairs_file(path, root, check_exists)
    return read_lfw_pairs(path, root, check_exists=check_exists)


# --------------------------------------------------------------------------- building pairs
def build_verification_pairs(identity_to_paths: dict[str, list[str]], num_pairs: int, seed: int = 0) -> list[Pair]:
    """Balanced, seeded same/different pairs, alternating (same, different, ...) so every fold holds both."""
    if num_pairs < 2:
        raise DataError(f"num_pairs must be at least 2 (one same and one different pair), got {num_pairs}")
    ids = sorted(identity_to_paths)
    paths = {k: sorted(identity_to_paths[k]) for k in ids}
    single = [k for k in ids if len(paths[k]) < 2]
    if single:
        shown = ", ".join(single[:10]) + (f" and {len(single) - 10} more" if len(single) > 10 else "")
        warnings.warn(f"identities with a single image cannot form a same-identity pair and are left out of "
                      f"positive pairs: {shown}", stacklevel=2)
    multi = [k for k in ids if len(paths[k]) >= 2]
    if not multi:
        raise DataError("no identity has two images, so no same-identity pair can be built; add images")
    if len(ids) < 2:
        raise DataError("only one identity is available, so no different-identity pair can be built; add identities")
    rng = random.Random(seed)
    total_pos = sum(len(paths[k]) * (len(paths[k]) - 1) // 2 for k in multi)
    num_pos = num_pairs // 2
    if num_pos > total_pos:
        warnings.warn(f"only {total_pos} same-identity pairs exist; using {total_pos} same and {total_pos} "
                      f"different pairs instead of {num_pairs} pairs", stacklevel=2)
        num_pos = total_pos
    # positives: sample pair indices without replacement over the flattened (identity, i<j) space
    offsets, acc = [], 0
    for k in multi:
        offsets.append(acc)
        acc += len(paths[k]) * (len(paths[k]) - 1) // 2
    picks = sorted(rng.sample(range(total_pos), num_pos))
    positives: list[Pair] = []
    import bisect

    for flat in picks:
        j = bisect.bisect_right(offsets, flat) - 1
        k = multi[j]
        a, b = _unrank_pair(flat - offsets[j], len(paths[k]))
        positives.append((paths[k][a], paths[k][b], True))
    rng.shuffle(positives)
    # negatives: distinct unordered image pairs of different identities
    total_images = sum(len(v) for v in paths.values())
    total_neg = (total_images * (total_images - 1) // 2) - sum(len(v) * (len(v) - 1) // 2 for v in paths.values())
    num_neg = min(num_pos, total_neg)
    seen: set[tuple[str, str]] = set()
    negatives: list[Pair] = []
    while len(negatives) < num_neg:
        ia, ib = rng.sample(range(len(ids)), 2)
        a = rng.choice(paths[ids[ia]])
        b = rng.choice(paths[ids[ib]])
        key = (a, b) if a < b else (b, a)
        if key in seen:
            continue
        seen.add(key)
        negatives.append((a, b, False))
    pairs: list[Pair] = []
    for i in range(max(len(positives), len(negatives))):
        if i < len(positives):
            pairs.append(positives[i])
        if i < len(negatives):
            pairs.append(negatives[i])
    return pairs


def _unrank_pair(r: int, n: int) -> tuple[int, int]:
    """The r-th pair (i < j) of n items in row-major order."""
    i = 0
    while r >= n - 1 - i:
        r -= n - 1 - i
        i += 1
    return i, i + 1 + r

"""Image files: which files count as images, the one decoder every dataset uses (every failure told in one
sentence that names the image), and the scanners of image folders (flat, or one subfolder per class)."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence

from PIL import Image

from kdx.errors import DataError

# file endings read as images, everywhere (lower case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp", ".gif")


def open_image(source: str | os.PathLike | bytes | bytearray, name: str | None = None,
               hint: str = "remove or re-encode it") -> Image.Image:
    """Open and fully decode an image file (or encoded bytes); a DataError names `name` (default: the path).

    Besides unreadable and truncated files, this refuses images with more pixels than PIL's
    `Image.MAX_IMAGE_PIXELS` (decompression bombs: a small file that would decode into gigabytes), which
    PIL itself only warns about below twice that limit.
    """
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else Path(source))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name} is too large to decode safely ({e}); it may be a decompression bomb: {hint}, or "
                        f"shrink it below {Image.MAX_IMAGE_PIXELS} pixels") from None
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"cannot read {name} ({e}); {hint}") from None
    return img


def decode_image(source: str | os.PathLike | bytes | bytearray | Image.Image, in_chans: int = 3,
                 size: Sequence[int] | None = None, name: str | None = None,
                 hint: str = "remove or re-encode it") -> Image.Image:
    """An image as RGB (or L for `in_chans=1`), resized (bilinear) to `size` = (height, width) when given.

    Palette and transparent images are composited on white first, so transparent pixels do not turn black.
    `source` is a path, encoded bytes or an already opened PIL image; failures are a DataError naming it.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"decode_image gives 1 (grey) or 3 (RGB) channels, not in_chans={in_chans!r}")
    img = source if isinstance(source, Image.Image) else open_image(source, name, hint)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    img = img.convert("L" if in_chans == 1 else "RGB")
    if size is not None and (img.height, img.width) != (int(size[0]), int(size[1])):
        img = img.resize((int(size[1]), int(size[0])), Image.BILINEAR)
    return img


def is_image_file(path: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    """True for a file whose ending is one of `extensions` (case-insensitive)."""
    return path.suffix.lower() in tuple(e.lower() for e in extensions) and path.is_file()


def list_images(folder: str | os.PathLike, key: str = "data.unlabeled") -> list[Path]:
    """Image files directly in `folder` and below it, sorted; a DataError naming `key` when there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{key}={folder} is not a folder; point it at a folder of images")
    files = sorted(p for p in root.rglob("*") if is_image_file(p))
    if not files:
        raise DataError(f"{key}={folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                        "point it at a folder of images")
    return files


def scan_class_folders(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                       kind: str = "class", recursive: bool = True, skip_empty: bool = False) -> dict[str, list[Path]]:
    """{class name: its sorted image files} of a folder holding one subfolder per class (or identity, `kind`).

    Hidden subfolders are left out; with `recursive`, images in nested folders count too. A class folder
    without images is a DataError naming it, or left out with `skip_empty`; so is a root with none at all.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; set data.root to a folder with one subfolder per {kind}")
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if is_image_file(p, extensions))
        if files:
            found[folder.name] = files
        elif not skip_empty:
            raise DataError(f"{kind} folder {folder} has no images ({', '.join(extensions[:4])}, ...); "
                            f"add images or remove the folder")
    if not found:
        raise DataError(f"data folder {root} has no {kind} subfolders with images; put each {kind}'s images in "
                        f"{root}/<{kind}>/")
    return found


def list_identity_folder(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[str]]:
    """{identity name: sorted image paths} of a face folder (one subfolder of images per identity; subfolders
    without images are left out)."""
    found = scan_class_folders(folder, extensions, kind="identity", recursive=False, skip_empty=True)
    return {name: [str(p) for p in files] for name, files in found.items()}

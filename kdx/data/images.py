"""Decoding image files and encoded bytes, with every failure told in one sentence that names the image."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

from kdx.errors import DataError


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

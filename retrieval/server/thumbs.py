"""JPEG thumbnails of library images, cached on disk in the library folder.

A thumbnail is keyed by the image's content hash and the size asked, so a
changed file gets a new one and the key doubles as an HTTP ``ETag``. Files are
written atomically (temp file, rename): concurrent requests for the same
thumbnail at worst both build it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from ..imageio import MAX_MEGAPIXELS, ImageLoadError, to_rgb

#: Sizes a client may ask for (the longer side, pixels); others are refused so the cache stays bounded.
MIN_SIZE, MAX_SIZE = 32, 1024
JPEG_QUALITY = 85


class ThumbCache:
    """Thumbnails under ``folder`` (``LIBRARY/thumbs``), two-level fan-out by hash."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, content_hash: str, size: int) -> Path:
        return self.folder / content_hash[:2] / f"{content_hash}-{size}.jpg"

    @staticmethod
    def etag(content_hash: str, size: int) -> str:
        return f'"{content_hash[:24]}-{size}"'

    def get(self, source: str, content_hash: str, size: int) -> Path:
        """The cached thumbnail of ``source`` (built on first use); raises
        :class:`ImageLoadError` when the file cannot be decoded."""
        out = self.path(content_hash, size)
        if out.is_file():
            return out
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(source) as img:
                    w, h = img.size
                    if w * h > MAX_MEGAPIXELS * 1e6:
                        raise ImageLoadError(f"too large: {w}x{h} is over {MAX_MEGAPIXELS:g} megapixels")
                    if img.format == "JPEG":
                        img.draft("RGB", (size, size))
                    img.load()
                    im = to_rgb(ImageOps.exif_transpose(img) or img)
                    im.thumbnail((size, size), Image.Resampling.LANCZOS)
        except ImageLoadError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(f"cannot decode: {exc}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                im.save(fh, "JPEG", quality=JPEG_QUALITY, optimize=True)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

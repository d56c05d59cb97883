"""Image decoding for indexing and queries.

JPEGs are decoded at reduced scale with Pillow's ``draft`` (never smaller than
the model needs), EXIF orientation is applied, and every mode (palette with
transparency, LA/RGBA, CMYK, 16-bit and float) is converted to RGB correctly.
A file that cannot be used raises :class:`ImageLoadError` with a short reason
that the store records; nothing here crashes on a bad file.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File extensions indexed by default (lower case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
#: Images larger than this many megapixels are refused (decompression bombs).
MAX_MEGAPIXELS = 180.0

_EXIF_DATETIME_ORIGINAL = 0x9003
_EXIF_IFD = 0x8769
_EXIF_DATETIME = 0x0132


class ImageLoadError(Exception):
    """A file could not be decoded into an image; ``reason`` is stored."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LoadedImage:
    """An RGB image ready for preprocessing, with facts about the original."""

    image: Image.Image  # RGB, possibly reduced by JPEG draft decoding
    width: int  # original width after EXIF orientation
    height: int  # original height after EXIF orientation
    taken_at: dt.datetime | None  # EXIF DateTimeOriginal, if present


def _exif_datetime(img: Image.Image) -> dt.datetime | None:
    try:
        exif = img.getexif()
    except Exception:
        return None
    raw = None
    try:
        raw = exif.get_ifd(_EXIF_IFD).get(_EXIF_DATETIME_ORIGINAL)
    except Exception:
        raw = None
    raw = raw or exif.get(_EXIF_DATETIME)
    if not raw or not isinstance(raw, str):
        return None
    try:
        return dt.datetime.strptime(raw.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike[str], min_size: int = 224, max_megapixels: float = MAX_MEGAPIXELS) -> LoadedImage:
    """Decode ``path`` into RGB, reduced (never below ``min_size`` on the short side).

    Raises :class:`ImageLoadError` for empty, truncated, unreadable or
    oversized files.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_megapixels * 1e6:
                    raise ImageLoadError(f"too large: {w}x{h} is over {max_megapixels:g} megapixels")
                taken = _exif_datetime(img)
                orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
                if img.format == "JPEG":
                    # Request the model's size in the *stored* orientation; draft
                    # keeps both sides at least that large.
                    img.draft("RGB", (min_size, min_size))
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
                out = ImageOps.exif_transpose(img) or img
                if orientation in (5, 6, 7, 8):
                    w, h = h, w
                rgb = to_rgb(out)
                if rgb is img:
                    rgb = rgb.copy()
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError("not an image Pillow can identify") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"too large: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageLoadError(f"too large: {exc}") from None
    except FileNotFoundError:
        raise ImageLoadError("file not found") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        msg = str(exc).strip() or type(exc).__name__
        if "truncat" in msg.lower():
            raise ImageLoadError(f"truncated file ({msg})") from None
        raise ImageLoadError(f"cannot decode: {msg}") from None
    return LoadedImage(rgb, w, h, taken)

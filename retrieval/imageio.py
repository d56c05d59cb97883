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
import threading
import warnings
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .paths import NotRegularFile, open_regular

#: File extensions indexed by default (lower case): the raster formats Pillow
#: reads (HEIC/HEIF through pillow-heif). Left out on purpose: PDF/EPS (need
#: Ghostscript, not images), WMF/EMF (Windows only), scientific containers
#: (FITS, HDF5, GRIB, BUFR) and raw dumps (.rgb, .raw).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".avif", ".avifs", ".heic", ".heif", ".hif", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx",
    ".tga", ".icb", ".vda", ".vst", ".ico", ".cur", ".icns", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm",
    ".pcx", ".dcx", ".qoi", ".dds", ".psd", ".sgi", ".ras", ".blp", ".mpo", ".xpm",
})
#: Images larger than this many megapixels are refused before they are decoded
#: (decompression bombs, lying headers). This is the one limit: Pillow's own
#: bomb warning (at half Pillow's error size) is silenced in favour of it, and
#: Pillow's DecompressionBombError (above 2 x its MAX_IMAGE_PIXELS, about 179 MP)
#: is reported as "too large" like ours.
MAX_MEGAPIXELS = 178.0

_EXIF_DATETIME_ORIGINAL = 0x9003
_EXIF_IFD = 0x8769
_EXIF_DATETIME = 0x0132


_HEIF_READY = False
_HEIF_LOCK = threading.Lock()


def _register_heif() -> None:
    """Let Pillow open HEIC/HEIF (iPhone photos) through pillow-heif, once
    (loader threads call this at the same time: the lock makes them wait)."""
    global _HEIF_READY
    if _HEIF_READY:
        return
    with _HEIF_LOCK:
        if _HEIF_READY:
            return
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
        except ImportError:  # pragma: no cover - a core dependency; tolerated when missing
            pass
        _HEIF_READY = True


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

    Raises :class:`ImageLoadError` for anything that makes one file unusable:
    empty, truncated, malformed (whatever Pillow raises on it), oversized, not
    a regular file. Only ``KeyboardInterrupt``, ``SystemExit`` and
    ``MemoryError`` (the process, not the file) pass through.
    """
    _register_heif()
    try:
        with open_regular(path) as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ImageLoadError("empty file")
            return _decode(fh, min_size, max_megapixels)
    except ImageLoadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageLoadError(describe_error(exc)) from None


def describe_error(exc: BaseException) -> str:
    """A short reason for a file that cannot be used, for the store and the user."""
    if isinstance(exc, ImageLoadError):
        return exc.reason
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can identify"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large: {exc}"
    if isinstance(exc, NotRegularFile):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    msg = str(exc).strip()
    if "truncat" in msg.lower():
        return f"truncated file ({msg})"
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)) and msg:
        return f"cannot decode: {msg}"
    return f"cannot decode: {type(exc).__name__}" + (f": {msg}" if msg else "")


def _decode(fh: IO[bytes], min_size: int, max_megapixels: float) -> LoadedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MAX_MEGAPIXELS is the size limit; a damaged file's warnings are noise
        with Image.open(fh) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageLoadError(f"invalid size {w}x{h}")
            if w * h > max_megapixels * 1e6:
                raise ImageLoadError(f"too large: {w}x{h} is over {max_megapixels:g} megapixels")
            taken = _exif_datetime(img)
            orientation = _orientation(img)
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
    return LoadedImage(rgb, w, h, taken)


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1

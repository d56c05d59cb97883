"""Sample files of every indexed format, and malformed mutants of them.

Used by the test suite and ``scripts/fuzz_index.py`` to check that no input
file can stop an index run: every file ends either indexed or recorded as
failed with a reason.

Formats written here: every one Pillow (or pillow-heif) can write, plus a
hand-built PSD (Pillow reads PSD but cannot write it). Read-only formats that
are indexed but have no sample: CUR, DCX, SUN raster (.ras), XPM, MPO and
ICNS (Pillow writes ICNS only on macOS).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def _psd(img: Image.Image, path: Path) -> None:
    """A minimal RGB PSD: header, empty sections, raw planar composite."""
    rgb = np.asarray(img.convert("RGB"))
    h, w = rgb.shape[:2]
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)
    body = struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + rgb.transpose(2, 0, 1).tobytes()
    path.write_bytes(header + body)


def _heif(img: Image.Image, path: Path) -> None:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    img.save(path, format="HEIF", quality=80)


#: extension -> writer(image, path)
WRITERS: dict[str, Callable[[Image.Image, Path], None]] = {
    ".jpg": lambda im, p: im.save(p, "JPEG", quality=85),
    ".png": lambda im, p: im.save(p, "PNG"),
    ".webp": lambda im, p: im.save(p, "WEBP"),
    ".gif": lambda im, p: im.convert("P").save(p, "GIF"),
    ".bmp": lambda im, p: im.save(p, "BMP"),
    ".tiff": lambda im, p: im.save(p, "TIFF", compression="tiff_deflate"),
    ".avif": lambda im, p: im.save(p, "AVIF", quality=60),
    ".heic": _heif,
    ".jp2": lambda im, p: im.save(p, "JPEG2000"),
    ".tga": lambda im, p: im.save(p, "TGA", compression="tga_rle"),
    ".ico": lambda im, p: im.save(p, "ICO", sizes=[(48, 48)]),
    ".ppm": lambda im, p: im.save(p, "PPM"),
    ".pgm": lambda im, p: im.convert("L").save(p, "PPM"),
    ".pbm": lambda im, p: im.convert("1").save(p, "PPM"),
    ".pcx": lambda im, p: im.save(p, "PCX"),
    ".qoi": lambda im, p: im.save(p, "QOI"),
    ".dds": lambda im, p: im.convert("RGBA").save(p, "DDS"),
    ".psd": _psd,
    ".sgi": lambda im, p: im.save(p, "SGI"),
    ".blp": lambda im, p: im.convert("P").save(p, "BLP"),
}


def sample_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct blocky RGB image per seed."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.NEAREST)


def write_samples(folder: Path, seed: int = 0) -> dict[str, Path]:
    """One valid file per format in :data:`WRITERS`; returns extension -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (ext, write) in enumerate(sorted(WRITERS.items())):
        path = folder / f"sample_{ext[1:]}{ext}"
        write(sample_image(seed * 100 + i), path)
        out[ext] = path
    return out


def _lie_about_size(data: bytearray, rng: random.Random) -> None:
    """Overwrite a 16- or 32-bit field in the first 32 bytes with a huge or zero value."""
    if len(data) < 8:
        return
    at = rng.randrange(0, min(len(data) - 4, 28))
    value = rng.choice([0, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 65500, 1 << 20])
    fmt = rng.choice([">I", "<I", ">H", "<H"])
    struct.pack_into(fmt, data, at, value & (0xFFFF if fmt.endswith("H") else 0xFFFFFFFF))


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A malformed variant of ``data`` and how it was made."""
    buf = bytearray(data)
    kind = rng.choice(["truncate", "flip-header", "flip-body", "lie-size", "zero-run", "mixed"])
    if kind == "truncate":
        return bytes(buf[: rng.randrange(0, max(1, len(buf)))]), kind
    if kind in ("flip-header", "mixed"):
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(0, min(64, len(buf)))] ^= 1 << rng.randrange(8)
    if kind in ("flip-body", "mixed"):
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(0, len(buf))] = rng.randrange(256)
    if kind in ("lie-size", "mixed"):
        _lie_about_size(buf, rng)
    if kind == "zero-run":
        start = rng.randrange(0, len(buf))
        buf[start : start + rng.randint(1, 64)] = bytes(min(64, len(buf) - start))
    if kind == "mixed":
        buf = buf[: rng.randrange(len(buf) // 2, len(buf) + 1)]
    return bytes(buf), kind


def write_mutants(folder: Path, samples: dict[str, Path], per_format: int, seed: int = 0) -> list[Path]:
    """``per_format`` mutants of each sample under ``folder``; returns their paths."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ext, src in sorted(samples.items()):
        data = src.read_bytes()
        for i in range(per_format):
            mutant, kind = mutate(data, rng)
            path = folder / f"{ext[1:]}_{i:04d}_{kind}{ext}"
            path.write_bytes(mutant)
            out.append(path)
    return out

"""Decoding real files in many formats and modes, and refusing broken ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrieval.imageio import ImageLoadError, load_image, to_rgb


def _exif_jpeg(path, orientation: int, size=(80, 40), date: str | None = None) -> None:
    img = Image.new("RGB", size, (200, 30, 30))
    img.paste((20, 20, 220), (0, 0, size[0] // 2, size[1]))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    if date:
        exif.get_ifd(0x8769)[0x9003] = date
    img.save(path, exif=exif.tobytes())


def test_exif_orientation_and_date(tmp_path):
    p = tmp_path / "rot.jpg"
    _exif_jpeg(p, 6, date="2021:07:04 12:30:00")  # rotate 90 cw on display
    out = load_image(p, min_size=40)
    assert (out.width, out.height) == (40, 80)
    assert out.image.size == (40, 80)
    assert out.taken_at is not None and out.taken_at.year == 2021 and out.taken_at.month == 7
    top = np.asarray(out.image)[2, 20]
    assert top[2] > 150 and top[0] < 100  # the blue half is now on top


def test_jpeg_draft_decodes_reduced_but_not_below_model_size(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (10, 200, 10)).save(p, quality=90)
    out = load_image(p, min_size=224)
    assert (out.width, out.height) == (2000, 1500)  # original size is reported
    assert min(out.image.size) >= 224 and out.image.size[0] <= 500  # decoded at 1/4 or 1/8


@pytest.mark.parametrize(
    "mode,fmt,ext",
    [
        ("P", "PNG", "png"),
        ("LA", "PNG", "png"),
        ("RGBA", "PNG", "png"),
        ("RGBA", "WEBP", "webp"),
        ("CMYK", "JPEG", "jpg"),
        ("I;16", "PNG", "png"),
        ("L", "BMP", "bmp"),
        ("RGB", "TIFF", "tiff"),
        ("F", "TIFF", "tif"),
        ("1", "PNG", "png"),
    ],
)
def test_modes_become_rgb(tmp_path, mode, fmt, ext):
    base = Image.new("RGB", (32, 32), (255, 0, 0))
    if mode == "I;16":
        img = Image.fromarray(np.full((32, 32), 65535, np.uint16))
    elif mode == "F":
        img = Image.fromarray(np.full((32, 32), 0.5, np.float32))
    else:
        img = base.convert(mode)
    p = tmp_path / f"x.{ext}"
    img.save(p, fmt)
    out = load_image(p, min_size=16)
    assert out.image.mode == "RGB"
    assert out.image.size == (32, 32) or (fmt == "JPEG" and min(out.image.size) >= 16)  # JPEG: draft
    px = out.image.getpixel((5, 5))
    if mode == "I;16":
        assert px == (255, 255, 255)  # full-scale 16-bit is white, not clipped garbage
    if mode == "F":
        assert 120 <= px[0] <= 135


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    px = load_image(p, min_size=8).image.getpixel((3, 3))
    assert px[0] > 200 and px[2] < 50


def test_mislabelled_png_named_jpg_still_loads(tmp_path):
    p = tmp_path / "really_png.jpg"
    Image.new("RGB", (20, 20), (0, 255, 0)).save(p, "PNG")
    assert load_image(p, min_size=8).image.getpixel((1, 1))[1] == 255


def test_broken_files_raise_with_reason(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello, not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    reasons = {}
    for p in (empty, text, trunc, tmp_path / "missing.png"):
        with pytest.raises(ImageLoadError) as ei:
            load_image(p, min_size=8)
        reasons[p.name] = ei.value.reason
    assert reasons["empty.jpg"] == "empty file"
    assert "identify" in reasons["text.jpg"]
    assert "truncated" in reasons["trunc.jpg"]
    assert reasons["missing.png"] == "file not found"


def test_megapixel_limit(tmp_path):
    p = tmp_path / "wide.png"
    Image.new("L", (3000, 2000)).save(p)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(p, min_size=8, max_megapixels=5)

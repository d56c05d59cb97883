"""Decoding JPEGs on the encoder's device (retrieval/device_decoding.py).

On a GPU the decoder is nvJPEG; here the same code runs with torchvision's
CPU decoder and the torch encoder, which is what these tests check: the
device path must record what loader threads record (sizes, EXIF facts,
failures and their reasons) and give nearly the same vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from retrieval import device_decoding
from retrieval.engine import Engine
from retrieval.indexing import decoding


def _picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth, asymmetric picture (JPEG keeps it well; every turn of it differs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.01, 0.05, 3)
    img = np.stack([127 + 120 * np.sin(a * xx + b * yy), 255 * xx / w, 127 + 120 * np.cos(c * yy * (1 + xx / w))], -1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _with_exif(img: Image.Image, orientation: int, taken: str | None = None) -> Image.Exif:
    exif = img.getexif()
    exif[0x0112] = orientation
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_as_pillow_does(orientation):
    img = _picture(7, 4, seed=orientation)
    img.info["exif"] = _with_exif(img, orientation).tobytes()
    want = np.asarray(ImageOps.exif_transpose(img))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    got = device_decoding._oriented(x, orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.fixture
def mixed_dir(tmp_path):
    """JPEGs of several sizes (one turned by EXIF, one with a date, one greyscale,
    one CMYK), a PNG, a broken and a truncated JPEG."""
    root = tmp_path / "mixed"
    root.mkdir()
    for i, (w, h) in enumerate([(640, 480), (640, 480), (480, 640), (300, 200), (1000, 700)]):
        _picture(w, h, i).save(root / f"p{i}.jpg", quality=92)
    img = _picture(400, 300, 7)
    img.save(root / "turned.jpg", quality=92, exif=_with_exif(img, 6, "2021:05:04 10:11:12"))
    _picture(320, 240, 8).convert("L").save(root / "grey.jpg", quality=92)
    _picture(320, 240, 9).convert("CMYK").save(root / "cmyk.jpg", quality=92)
    _picture(320, 240, 10).save(root / "flat.png")
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    data = (root / "p0.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 3])
    return root


@pytest.mark.parametrize("small_parts", [False, True])
def test_device_decoding_records_what_threads_record(tmp_path, tiny_model, mixed_dir, monkeypatch, small_parts):
    """Same rows, sizes, dates and failure reasons as loader threads, vectors
    within what two JPEG decoders and resamplers differ by, and the JPEGs really
    went through the device path (the CMYK one and the PNG through Pillow).
    ``small_parts``: decoder calls and resizes split into parts of a few
    images (as big photos split them), the same outcome."""
    if small_parts:
        monkeypatch.setattr(device_decoding, "DECODE_PIXELS", 700_000)  # about two 640x480 files a call
        monkeypatch.setattr(device_decoding, "RESIZE_PIXELS", 400_000)  # one 640x480 image a resize
    through: list[int] = []
    real = device_decoding.DevicePreprocess.__call__

    def counting(self, images):
        through.append(len(images))
        return real(self, images)

    monkeypatch.setattr(device_decoding.DevicePreprocess, "__call__", counting)
    seen = {}
    for how in ("threads", "device"):
        monkeypatch.setenv("CROSSFIND_DECODE", how)
        with Engine.open(tmp_path / how, model=tiny_model) as eng:
            assert decoding(eng.state().runtime("image")) == how
            rep = eng.index_folder(mixed_dir, batch_size=4, workers=2)
            assert (rep.encoded, rep.failed) == (9, 2), how
            ids = np.sort(eng.state().images.ids())
            rows = eng.store.images_by_id(ids.tolist())
            vecs = dict(zip((rows[i].path for i in ids.tolist()), eng.state().images.reconstruct(ids)))
            facts = {r.path: (r.width, r.height, r.taken_at) for r in rows.values()}
            fails = {f["path"]: f["error"] for f in eng.status()["failures"]}
            seen[how] = vecs, facts, fails
    (tv, tf, tx), (dv, df, dx) = seen["threads"], seen["device"]
    assert sum(through) == 7  # the plain JPEGs: 5 colour, turned, grey
    assert tf == df and tx == dx and len(tx) == 2
    turned = str(mixed_dir / "turned.jpg")
    assert df[turned][:2] == (300, 400) and df[turned][2].isoformat() == "2021-05-04T10:11:12"
    cos = {p: float(tv[p] @ dv[p]) for p in tv}
    assert min(cos.values()) > 0.999, cos
    # and each image is still nearest to itself across the two paths
    paths = sorted(tv)
    sims = np.stack([dv[p] for p in paths]) @ np.stack([tv[p] for p in paths]).T
    assert (sims.argmax(1) == np.arange(len(paths))).all()


def test_device_decoding_falls_back_when_the_decoder_is_missing(tiny_model, tmp_path, monkeypatch):
    """CROSSFIND_DECODE=device where the device cannot decode JPEGs: loader threads, said once."""
    monkeypatch.setenv("CROSSFIND_DECODE", "device")
    monkeypatch.setattr(device_decoding, "device_decoder_works", lambda device: False)
    with Engine.open(tmp_path / "lib", model=tiny_model) as eng:
        assert decoding(eng.state().runtime("image")) == "threads"

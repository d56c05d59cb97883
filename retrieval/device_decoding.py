"""Decoding JPEGs on the encoder's GPU (nvJPEG, through torchvision).

A GPU encodes tens of thousands of images a second; decoding them with
Pillow on the CPU cores is what bounds an index run there (see
docs/benchmarks.md, "GPU: one H200"). Here loader threads read the files
with their headers (size, EXIF orientation and time, with the same checks
as :func:`~retrieval.imageio.load_image`), and each batch's JPEGs go to
``torchvision.io.decode_jpeg`` on the device in one call; open_clip's
resize, centre crop and normalisation follow on the device, a few batched
tensor operations per batch.

Anything else (PNG, CMYK or 16-bit JPEG, a file the device decoder refuses)
is decoded on the CPU exactly as with loader threads, so a file that cannot
be used fails with the same reason. Vectors differ from the Pillow path's by
as little as two JPEG decoders and two bicubic resamplers differ: cosine
above 0.999 on the test model (``tests/test_device_decoding.py``), at least
0.99998 for ViT-B-32 on 20,000 photos decoded by nvJPEG (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .decoding import Decoded
from .imageio import MAX_MEGAPIXELS, ImageLoadError, _exif_datetime, _orientation, load_image
from .onnx_runtime import resize_and_crop
from .paths import open_regular
from .pipeline import Outcome, load_batches

LOG = logging.getLogger(__name__)

#: Pixels decoded in one call of the device decoder (bounds its memory on big photos).
DECODE_PIXELS = 256 * 2**20
#: Pixels resized in one batched call (float32 on the device: 12 bytes a pixel).
RESIZE_PIXELS = 64 * 2**20


class _Jpeg:
    """A file read for the device decoder: its bytes and what its header says."""

    __slots__ = ("data", "info", "orientation")

    def __init__(self, data: bytearray, info: Decoded, orientation: int) -> None:
        self.data, self.info, self.orientation = data, info, orientation


def read_jpeg(path: str, min_size: int, prepare: Callable[[Any], np.ndarray]) -> _Jpeg | tuple[Decoded, np.ndarray]:
    """Read ``path`` for the device decoder when it is a plain JPEG (8-bit RGB or
    greyscale), else decode it here as loader threads do: (facts, uint8 pixels).
    Raises :class:`~retrieval.imageio.ImageLoadError` for a file that cannot be used."""
    from PIL import Image

    try:
        with open_regular(path) as fh:
            data = bytearray(fh.read())  # writable: torch.frombuffer takes it without a warning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                plain = (img.format == "JPEG" and img.mode in ("RGB", "L") and 0 < w * h <= MAX_MEGAPIXELS * 1e6
                         and getattr(img, "n_frames", 1) == 1)
                if plain:
                    orientation = _orientation(img)
                    taken = _exif_datetime(img)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception:
        plain = False  # load_image below says why, as loader threads would
    if not plain:
        loaded = load_image(path, min_size=min_size)
        return Decoded(loaded.width, loaded.height, loaded.taken_at), prepare(loaded.image)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return _Jpeg(data, Decoded(w, h, taken), orientation)


def _oriented(x: Any, orientation: int) -> Any:
    """``x`` (C, H, W) turned upright as EXIF ``orientation`` says (Pillow's ``exif_transpose``)."""
    import torch

    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


class DevicePreprocess:
    """open_clip's resize (shorter side, antialiased), centre crop and
    normalisation on uint8 ``(C, H, W)`` tensors already on the device, batched
    by shape; ``preprocess`` is an export manifest's numbers
    (:func:`retrieval.onnx_export._preprocess_info`)."""

    def __init__(self, preprocess: dict[str, Any], device: str, dtype: Any) -> None:
        import torch

        self.p = preprocess
        self.device, self.dtype = device, dtype
        self.mean = torch.tensor(preprocess["mean"], device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocess["std"], device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: Sequence[Any]) -> list[Any]:
        """The model's input for each of ``images`` (uint8 (C, H, W) on the device), in order."""
        import torch
        import torch.nn.functional as F

        out: list[Any] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape), []).append(i)
        ch, cw = self.p["crop"]
        for shape, idx in groups.items():
            per = max(1, RESIZE_PIXELS // (shape[1] * shape[2]))
            for at in range(0, len(idx), per):
                part = idx[at:at + per]
                x = torch.stack([images[i] for i in part]).float()
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                nw, nh, left, top = resize_and_crop(x.shape[3], x.shape[2], self.p)
                if (nh, nw) != (x.shape[2], x.shape[3]):
                    x = F.interpolate(x, size=(nh, nw), mode=self.p["interpolation"], antialias=True, align_corners=False)
                    x = x.round_().clamp_(0.0, 255.0)  # as Pillow's uint8 result
                x = ((x[:, :, top:top + ch, left:left + cw] - self.mean) / self.std).to(self.dtype)
                for j, i in enumerate(part):
                    out[i] = x[j]
        return out


def device_decoder_works(device: str) -> bool:
    """Whether ``torchvision.io.decode_jpeg`` decodes on ``device`` here (tried once on a tiny JPEG)."""
    try:
        import torch
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 10, 10)).save(buf, "JPEG")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                              mode=ImageReadMode.RGB, device=device)
        return tuple(out[0].shape) == (3, 8, 16) and int(out[0][0].float().mean()) > 150
    except Exception as exc:  # no nvJPEG in this build, no such device, ...
        LOG.info("JPEG decoding on %s is not available: %s", device, exc)
        return False


def decoded_on_device(rows: Sequence[Any], enc: Any, preprocess: dict[str, Any], batch_size: int,
                      workers: int | None) -> Iterator[list[Outcome[Any, tuple[Decoded, Any]]]]:
    """Yield lists of ``batch_size`` outcomes for ``rows`` (with ``path``), in
    order: each value is (:class:`~retrieval.decoding.Decoded`, the model's
    input for it on ``enc.device``); a file that cannot be used has its
    reason as the error, as with loader threads. ``enc`` is a torch
    :class:`~retrieval.encoders.Encoder` (``prepare``, ``batch``, ``device``,
    ``dtype``, ``image_size``).

    Three stages overlap: ``workers`` threads (default: one a core) read
    files and their headers a few at a time; one thread decodes each batch's
    JPEGs with a single call of the device decoder (it leaves Python's lock
    meanwhile; a call costs about the same for 8 images as for 256, so
    batches, not files, go to it) and resizes, crops and normalises them on
    the device; the consumer encodes the batch before.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    size = enc.image_size
    prep = DevicePreprocess(preprocess, enc.device, enc.dtype)
    workers = workers or max(2, os.cpu_count() or 2)

    def decode(items: list[_Jpeg]) -> list[Any]:
        """uint8 (C, H, W) device tensors for ``items``; None for one the device decoder refuses."""
        out: list[Any] = []
        start = 0
        while start < len(items):  # in parts of at most DECODE_PIXELS
            end, pixels = start, 0
            while end < len(items) and (end == start or pixels + items[end].info.width * items[end].info.height <= DECODE_PIXELS):
                pixels += items[end].info.width * items[end].info.height
                end += 1
            part = [torch.frombuffer(j.data, dtype=torch.uint8) for j in items[start:end]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    out.extend(decode_jpeg(part, mode=ImageReadMode.RGB, device=enc.device))
                except RuntimeError:  # one bad file fails the whole call: each on its own
                    for data in part:
                        try:
                            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=enc.device))
                        except RuntimeError:
                            out.append(None)
            start = end
        return out

    def read(row: Any) -> _Jpeg | tuple[Decoded, np.ndarray]:
        return read_jpeg(os.fspath(row.path), size, enc.prepare)

    def finish(batch: list[Outcome[Any, Any]]) -> list[Outcome[Any, Any]]:
        """Decode and prepare one batch of read files (the decoding thread)."""
        read_ok: list[tuple[Outcome[Any, Any], _Jpeg]] = [(o, o.value) for o in batch
                                                          if o.error is None and isinstance(o.value, _Jpeg)]
        upright, where = [], []
        for (o, jp), im in zip(read_ok, decode([jp for _, jp in read_ok]) if read_ok else []):
            if im is not None:
                upright.append(_oriented(im, jp.orientation))
                where.append((o, jp.info))
                continue
            try:  # refused by the device decoder: Pillow decides, and names the reason
                o.value = (jp.info, enc.prepare(load_image(os.fspath(o.item.path), min_size=size).image))
            except ImageLoadError as exc:
                o.value, o.error = None, exc.reason
        for (o, info), x in zip(where, prep(upright)):
            o.value = (info, x)
        on_cpu: list[tuple[Outcome[Any, Any], tuple[Decoded, np.ndarray]]] = [
            (o, o.value) for o in batch
            if o.error is None and isinstance(o.value, tuple) and isinstance(o.value[1], np.ndarray)]
        if on_cpu:
            xs = enc.batch([v[1] for _, v in on_cpu]).to(enc.device, enc.dtype)
            for (o, v), x in zip(on_cpu, xs):
                o.value = (v[0], x)
        return batch

    decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossfind-device-decode")
    try:
        ahead: Future[list[Outcome[Any, Any]]] | None = None
        for batch in load_batches(rows, read, batch_size, workers):
            nxt = decoder.submit(finish, batch)
            if ahead is not None:
                yield ahead.result()
            ahead = nxt
        if ahead is not None:
            yield ahead.result()
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)

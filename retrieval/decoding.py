"""Decoding away from the encoding process: Ray tasks and local processes.

Images are decoded and preprocessed (resize, crop, RGB: the model's
per-image steps, as numbers where possible so no torch is needed) by
:func:`decode_batch`, which returns plain arrays. Ray Data runs it in CPU
tasks (:mod:`retrieval.ray_index`); :func:`decoded_in_processes` runs it in
a pool of local processes, which is how one machine feeds a GPU: a GPU
encodes tens of thousands of images a second, far more than loader threads
of one Python process hand over (they share its GIL; see docs/benchmarks.md,
"GPU: one H200").
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import LibraryError
from .pipeline import Outcome, ordered_batches


def decode_batch(batch: dict[str, np.ndarray], prepare: Callable[[Any], np.ndarray], min_size: int,
                 shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Decode and preprocess one batch of files (a Ray task, or a decoding process).

    Returns per file whether it loaded, the failure reason (``""`` when it
    did), its size, its EXIF time (ISO text or ``""``) and the preprocessed
    uint8 pixels (zeros for a failed file). Failures are judged as in-process:
    any ``Exception`` from loading one file is that file's reason.
    """
    from .imageio import load_image
    from .pipeline import _call

    n = len(batch["id"])
    pixels = np.zeros((n, *shape), np.uint8)
    ok = np.zeros(n, bool)
    error = np.full(n, "", dtype=object)
    width = np.zeros(n, np.int64)
    height = np.zeros(n, np.int64)
    taken = np.full(n, "", dtype=object)

    def load(path: str) -> Any:
        img = load_image(path, min_size=min_size)
        return img, prepare(img.image)

    for i, raw in enumerate(batch["path"]):
        out = _call(load, os.fsdecode(bytes(raw)), (Exception,))
        if out.error is not None or out.value is None:
            error[i] = out.error or "cannot decode"
            continue
        loaded, pix = out.value
        pixels[i] = pix
        ok[i] = True
        width[i], height[i] = loaded.width, loaded.height
        taken[i] = loaded.taken_at.isoformat() if loaded.taken_at is not None else ""
    return {"id": np.asarray(batch["id"], np.int64), "ok": ok, "error": error, "width": width, "height": height,
            "taken_at": taken, "pixels": pixels}


def preparer(enc: Any) -> Callable[[Any], np.ndarray]:
    """The model's per-image preprocessing, without the model: what decoding tasks and processes run.

    As plain numbers when open_clip's transform is the usual one (the ONNX
    export's description of it), so decoding tasks never import torch; else
    open_clip's own PIL steps (torchvision, pickled)."""
    from .onnx_runtime import OnnxEncoder

    if isinstance(enc, OnnxEncoder):
        return _Pixels(enc.manifest["preprocess"])
    from .onnx_export import ExportUnsupported, _preprocess_info

    try:
        return _Pixels(_preprocess_info(enc))
    except ExportUnsupported:
        pass
    split = enc._split
    if split is None:
        raise LibraryError(f"model {enc.spec.spec}'s preprocessing has no ToTensor step, so it cannot be split "
                           "between decoding processes and encoders; index it without --ray")
    return _PilSteps(split[0])


class _Pixels:
    """open_clip's resize, crop and RGB conversion from its numbers (:func:`~retrieval.onnx_runtime.prepare_pixels`)."""

    def __init__(self, preprocess: dict[str, Any]) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Any) -> np.ndarray:
        from .onnx_runtime import prepare_pixels

        return prepare_pixels(image, self.preprocess)


class _PilSteps:
    """open_clip's PIL steps (resize, crop, mode) as a uint8 array, as :meth:`Encoder.prepare`."""

    def __init__(self, steps: Callable[[Any], Any]) -> None:
        self.steps = steps

    def __call__(self, image: Any) -> np.ndarray:
        return np.asarray(self.steps(image), dtype=np.uint8)


class Decoded:
    """What decoding a file in another process tells about it (as :class:`~retrieval.imageio.LoadedImage`, no pixels)."""

    __slots__ = ("width", "height", "taken_at")

    def __init__(self, width: int, height: int, taken_at: dt.datetime | None) -> None:
        self.width, self.height, self.taken_at = width, height, taken_at


def decoded_in_processes(
    rows: Sequence[Any], prepare: Callable[[Any], np.ndarray], min_size: int, shape: tuple[int, ...],
    batch_size: int, workers: int, chunk: int = 32,
) -> Iterator[list[Outcome[Any, tuple[Decoded, np.ndarray]]]]:
    """Yield lists of ``batch_size`` outcomes for ``rows`` (anything with
    ``id`` and ``path``), decoded by ``workers`` processes ``chunk`` files at a
    time, in input order, at most ``2 * workers`` chunks ahead. Each outcome's
    value is (:class:`Decoded`, uint8 pixels); a file that cannot be used has
    its reason as the error, exactly as with loader threads."""
    import multiprocessing

    # spawn: the parent may hold a CUDA context and threads, which fork would copy half-made
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(part: list[Any]) -> Future[dict[str, np.ndarray]]:
        batch = {"id": np.asarray([r.id for r in part], np.int64),
                 "path": np.asarray([os.fsencode(r.path) for r in part], dtype=object)}
        return pool.submit(decode_batch, batch, prepare, min_size, shape)

    try:
        yield from ordered_batches(rows, submit, _outcomes, chunk, 2 * workers, batch_size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _outcomes(part: Sequence[Any], out: dict[str, np.ndarray]) -> list[Outcome[Any, tuple[Decoded, np.ndarray]]]:
    done: list[Outcome[Any, tuple[Decoded, np.ndarray]]] = []
    for j, row in enumerate(part):
        if not out["ok"][j]:
            done.append(Outcome(row, None, str(out["error"][j]) or "cannot decode"))
            continue
        taken = str(out["taken_at"][j])
        info = Decoded(int(out["width"][j]), int(out["height"][j]), dt.datetime.fromisoformat(taken) if taken else None)
        done.append(Outcome(row, (info, out["pixels"][j]), None))
    return done

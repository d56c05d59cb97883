"""Indexing through Ray Data: decode in CPU tasks, encode in an actor pool.

``Engine.index_folder(paths, ray="auto")`` (``crossfind index PATH --ray``)
runs the same incremental plan as in-process indexing (:mod:`retrieval.indexing`:
scan, plan, apply; only new or changed files are encoded) and hands the
encoding step to :class:`RayEncode`:

1. a Ray Dataset of the rows to encode (id and path);
2. ``map_batches`` in CPU tasks: :func:`~retrieval.imageio.load_image` (JPEG
   draft, EXIF orientation, size limits) and the model's per-image
   preprocessing; a file that cannot be used becomes that row's failure
   reason, exactly as in-process;
3. ``map_batches`` over an actor pool of :class:`EncodeBatch`: each actor
   loads the model once (one GPU per actor where the cluster has GPUs, on
   CPUs the library's ONNX export, as in-process) and returns vectors (and
   the reranker's patch tokens);
4. the driver takes the batches as they stream in, adds them to the image
   index and makes them durable through the same checkpoint as in-process
   indexing (:func:`retrieval.indexing.checkpoint`: index, tokens, then the
   vector rows' commit). A crash of a worker is retried by Ray; a crash of the
   driver loses only what came back since the last checkpoint, and a rerun
   encodes only what is not recorded yet.

Nothing here imports Ray until a run needs it; without Ray installed the run
fails with one line naming ``pip install 'crossfind[ray]'``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .decoding import decode_batch, preparer
from .errors import LibraryError

if TYPE_CHECKING:  # pragma: no cover
    from .indexing import EncodeOptions
    from .slot import ModelSlot
    from .store import Image, Store

LOG = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'crossfind[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how :meth:`retrieval.Engine.index_folder` encodes through Ray."""

    address: str = "auto"  # "auto": a running cluster, else a local one; or "HOST:PORT", "ray://HOST:PORT"
    actors: int | None = None  # encoder actors (default: one per GPU, else half the cluster's CPUs, at least 1)
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0 (encode on CPUs)
    cpus_per_actor: float = 1.0  # CPUs each encoder actor reserves (its encoder's threads on CPU)
    decode_cpus: float = 0.5  # CPUs each decoding task reserves (decoding also waits on reads)
    decode_batch: int = 16  # files per decoding task


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`LibraryError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pyarrow, pandas)
    except ImportError as exc:
        raise LibraryError(f"indexing with --ray needs Ray Data ({exc.name or 'ray'} is missing): {INSTALL_HINT}") from None
    return ray


@contextmanager
def connected(address: str) -> Iterator[Any]:
    """Ray connected to ``address`` for the block: an already initialised Ray
    as it is; ``auto`` attaches to a running cluster, else starts a local one
    (shut down after the block); anything else is a cluster address."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address in ("", "auto"):
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:
                ray.init(include_dashboard=False, **quiet)  # no cluster running: a local one of this machine
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise LibraryError(f"cannot reach the Ray cluster at {address!r}: {_first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- workers
@dataclass(frozen=True)
class EncoderRecipe:
    """What an encoder actor needs to build the model's image encoder."""

    spec: str  # the model spec
    onnx: Any  # the driver's ONNX encoder (sent without its sessions), used on CPU; None: torch
    dim: int  # vector size
    token_layer: str | None  # the reranker's patch-token layer, None: no tokens
    token_shape: tuple[int, ...] | None  # one token row's shape
    threads: int  # encoder threads on CPU


class EncodeBatch:
    """Ray actor: loads the image encoder once, then encodes decoded batches."""

    def __init__(self, recipe: EncoderRecipe) -> None:
        import ray

        self.recipe = recipe
        gpu = bool(ray.get_gpu_ids())
        if recipe.onnx is not None and not gpu:
            self.enc = recipe.onnx
            self.enc.threads = recipe.threads
        else:
            from .encoders import load_encoder

            if not gpu:
                import torch

                torch.set_num_threads(recipe.threads)
            self.enc = load_encoder(recipe.spec, device="cuda" if gpu else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.recipe
        ok = np.asarray(batch["ok"], bool)
        n = len(ok)
        vectors = np.zeros((n, r.dim), np.float32)
        out = {k: batch[k] for k in ("id", "ok", "error", "width", "height", "taken_at")}
        tokens = np.zeros((n, *r.token_shape), np.float16) if r.token_shape is not None else None
        has_tokens = np.zeros(n, bool)
        good = np.flatnonzero(ok)
        if len(good):
            x = self.enc.batch(list(batch["pixels"][good]))
            vecs, toks = self.enc.encode_images(x, with_tokens=tokens is not None, token_layer=r.token_layer or "final")
            vectors[good] = vecs
            if tokens is not None and toks is not None:
                tokens[good] = toks
                has_tokens[good] = True
        out["vector"] = vectors
        out["has_tokens"] = has_tokens
        if tokens is not None:
            out["tokens"] = tokens
        return out


# ------------------------------------------------------------------ driver
class RayEncode:
    """The encoding step of an index run, through Ray Data (see the module docstring).

    Called as :func:`retrieval.indexing.encode_pending` is, with the same
    result: rows marked ok or failed, vectors in the slot's index and made
    durable at checkpoints; returns the number of images encoded.
    """

    def __init__(self, opts: RayOptions) -> None:
        require_ray()  # fail before the run writes anything
        self.opts = opts

    @classmethod
    def of(cls, ray: RayOptions | str) -> RayEncode:
        """From ``index_folder``'s ``ray``: options, or a cluster address (``"auto"``: any)."""
        return cls(ray if isinstance(ray, RayOptions) else RayOptions(address=ray))

    def __call__(self, store: Store, slot: ModelSlot, rows: list[Image], opts: EncodeOptions, bar: Any) -> int:
        if opts.int8:
            raise LibraryError("this library's model indexes with --int8, which runs in this process, not through Ray: "
                               "index with --no-int8 to go through Ray in float32")
        if not rows:
            return 0  # nothing to encode: no cluster is started or reached
        with connected(self.opts.address) as ray:
            return self._run(ray, store, slot, rows, opts, bar)

    def _dataset(self, ray: Any, slot: ModelSlot, rows: list[Image], opts: EncodeOptions) -> Any:
        """The Ray Dataset of ``rows``: decoding tasks, then an actor pool of encoders (on GPUs where there are)."""
        from PIL import Image as PILImage
        from ray.data import ActorPoolStrategy, DataContext

        from .onnx_runtime import OnnxEncoder

        DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts images
        enc = slot.runtime("image")
        tokens = slot.tokens
        prepare = preparer(enc)
        shape = prepare(PILImage.new("RGB", (enc.image_size, enc.image_size))).shape
        resources = ray.cluster_resources()
        gpus = self.opts.gpus_per_actor if self.opts.gpus_per_actor is not None else (1.0 if resources.get("GPU") else 0.0)
        actors = self.opts.actors or (
            max(1, int(resources.get("GPU", 0) // gpus)) if gpus else max(1, int(resources.get("CPU", 2) // 2))
        )
        recipe = EncoderRecipe(
            spec=slot.spec.spec,
            onnx=enc if isinstance(enc, OnnxEncoder) else None,
            dim=slot.dim,
            token_layer=slot.token_layer if tokens is not None else None,
            token_shape=tuple(tokens.shape) if tokens is not None else None,
            threads=max(1, int(self.opts.cpus_per_actor)),
        )
        batch_size = opts.batch_size or (128 if gpus else 32)
        per_task = max(1, self.opts.decode_batch)
        items = [{"id": r.id, "path": os.fsencode(r.path)} for r in rows]
        decode_cpus = self.opts.decode_cpus
        if not gpus and decode_cpus == self.opts.cpus_per_actor:
            # Ray Data fuses a task stage into the next actor stage of equal resources (decoding would
            # then run inside the encoders, one at a time); a different reservation keeps them apart.
            decode_cpus *= 0.999
        # Ray retries failed decoding tasks and restarts failed actors (Ray Data's defaults).
        return (
            ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // per_task)))
            .map_batches(decode_batch, fn_kwargs={"prepare": prepare, "min_size": enc.image_size, "shape": shape},
                         batch_size=per_task, batch_format="numpy", num_cpus=decode_cpus)
            .map_batches(EncodeBatch, fn_constructor_kwargs={"recipe": recipe}, batch_size=batch_size,
                         batch_format="numpy", compute=ActorPoolStrategy(size=actors), num_cpus=self.opts.cpus_per_actor,
                         num_gpus=gpus)
        )

    def _run(self, ray: Any, store: Store, slot: ModelSlot, rows: list[Image], opts: EncodeOptions, bar: Any) -> int:
        """Write the vectors that come back from :meth:`_dataset` with the usual checkpoints."""
        from .durability import Pending
        from .indexing import checkpoint, mark_decoded, mark_failed

        tokens = slot.tokens
        ds = self._dataset(ray, slot, rows, opts)
        by_id = {r.id: r for r in rows}
        pending = Pending()
        encoded = 0
        last = time.monotonic()
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        while True:
            try:
                b = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # a Ray task or actor failed for good: keep what came back
                checkpoint(store, slot, pending)
                raise LibraryError(f"indexing through Ray failed ({type(exc).__name__}: {_first_line(exc)}); "
                                   "what was encoded is saved, run the command again to resume") from exc
            good: list[int] = []
            for j, rid in enumerate(b["id"].tolist()):
                row = by_id[rid]
                if not b["ok"][j]:
                    mark_failed(pending, row, str(b["error"][j]) or "cannot decode")
                    continue
                taken = str(b["taken_at"][j])
                mark_decoded(pending, row, int(b["width"][j]), int(b["height"][j]), dt.datetime.fromisoformat(taken) if taken else None)
                good.append(j)
            if good:
                ids = [int(b["id"][j]) for j in good]
                vecs = np.ascontiguousarray(b["vector"][good], np.float32)
                slot.images.add(ids, vecs)
                with_tokens = tokens is not None and bool(b["has_tokens"][good].all())
                if tokens is not None and with_tokens:
                    tokens.write(ids, np.asarray(b["tokens"][good], np.float16))
                pending.add([(i, by_id[i].content_hash, with_tokens) for i in ids], vecs)
                encoded += len(ids)
            bar.update(len(b["id"]))
            if time.monotonic() - last >= opts.checkpoint_seconds:
                checkpoint(store, slot, pending)
                pending, last = Pending(), time.monotonic()
        checkpoint(store, slot, pending)
        return encoded

"""A crossfind reranker's image memory, cached per image in the library.

Re-ranking a candidate image with :class:`~retrieval.rerank.CrossAttentionITM`
runs in two parts. The image part turns its stored patch tokens into the
*image memory* ``(patches, width)`` (projections, the local stem, the image
self-attention blocks, ``ln_image``: ``encode_image``); it does not depend on
the query and is more than half the cost. The cross part lets the query's
text tokens attend to that memory and gives the logit. Search keeps the image
memory of every candidate it scores, as float16, in a
:class:`~retrieval.feature_cache.FeatureCache` under the library's
``rerank-features/`` folder (beside BLIP's features), keyed by the image's id
and content hash and by a fingerprint of the reranker's files and the
model's weights, so a repeated or overlapping query runs the cross part only.
The files are written atomically, by searches too, without the writer lock;
a read-only library reads them and writes none. A small in-process LRU keeps
the most recent ones of a long-lived process (``crossfind serve``) in memory.

Memory computed for a search is rounded to float16 before it is scored, as
a cached one is, so a result never depends on what the cache held.
``crossfind index --rerank-features`` fills the cache ahead
(:meth:`ImageMemory.fill`). Set ``CROSSFIND_RERANK_CACHE=0`` to neither read
nor write it (every search then computes the memory of its candidates).

Torch-free: it calls the reranker it is given (torch or ONNX Runtime).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .feature_cache import FEATURES_DIR, FeatureCache, FeatureItem

LOG = logging.getLogger(__name__)

#: Set to 0 (or false, no, off) to switch the cache off.
CACHE_ENV = "CROSSFIND_RERANK_CACHE"
#: Bytes of image memory the in-process LRU keeps (shapes-tiny: 16 KiB an image, so about 4,000 images).
LRU_BYTES = 64 << 20


def cache_enabled() -> bool:
    """Whether searches read and write the image-memory cache (``$CROSSFIND_RERANK_CACHE``)."""
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def memory_fingerprint(reranker: Any, model_weights: str | None, model_spec: str) -> str:
    """The cache folder of ``reranker``'s memory for a model: its files' fingerprint
    and the model's weights (stored patch tokens change with them)."""
    return hashlib.sha256(f"{reranker.fingerprint}\0{model_weights or model_spec}".encode()).hexdigest()[:16]


class ImageMemory:
    """Image memory of library images for the model's own crossfind reranker:
    read from the cache, else computed from their patch tokens and cached.

    ``read_only()`` says whether the library may not be written (then nothing
    is cached on disk). ``computed`` counts the images whose memory this
    process computed.
    """

    def __init__(self, library_dir: Path, read_only: Callable[[], bool], lru_bytes: int = LRU_BYTES) -> None:
        self.root = Path(library_dir) / FEATURES_DIR
        self.read_only = read_only
        self.lru_bytes = lru_bytes
        self.computed = 0
        self._caches: dict[tuple[str, bool], FeatureCache] = {}
        self._recent: OrderedDict[tuple[str, int, str], np.ndarray] = OrderedDict()
        self._recent_bytes = 0
        self._lock = threading.Lock()

    def cache(self, slot: Any, reranker: Any) -> FeatureCache | None:
        """The on-disk cache of ``reranker``'s memory for ``slot``'s model, or None when switched off."""
        if not cache_enabled():
            return None
        key = (memory_fingerprint(reranker, slot.fingerprint, slot.spec.spec), self.read_only())
        if key not in self._caches:
            self._caches[key] = FeatureCache(self.root, key[0], reranker.memory_shape, read_only=key[1],
                                             what="reranker image memory")
        return self._caches[key]

    def memory(
        self, slot: Any, reranker: Any, ids: Sequence[int], rows: dict[int, Any],
        tokens: Callable[[Sequence[int]], np.ndarray],
    ) -> np.ndarray:
        """Image memory of images ``ids`` (float16 ``(n, patches, width)``, in
        their order): cached, else computed from ``tokens(missing ids)`` (their
        patch tokens) and cached. ``rows`` are their Image rows (content hashes)."""
        cache = self.cache(slot, reranker)
        out = np.empty((len(ids), *reranker.memory_shape), np.float16)
        items = [FeatureItem(i, rows[i].content_hash, rows[i].path) for i in ids]
        todo = []
        for j, item in enumerate(items):
            got = self._get(cache, item) if cache is not None else None
            if got is None:
                todo.append(j)
            else:
                out[j] = got
        if todo:
            toks = tokens([ids[j] for j in todo])
            new = reranker.image_memory(toks)
            self.computed += len(todo)
            for j, tok, mem in zip(todo, toks, new):
                out[j] = mem
                # All-zero tokens stand for a file that could not be read again: not worth keeping.
                if cache is not None and np.any(tok):
                    self._put(cache, items[j], out[j])
        return out

    def fill(self, slot: Any, reranker: Any, ids: Sequence[int], rows: Callable[[Sequence[int]], dict[int, Any]],
             tokens: Callable[..., np.ndarray], bar: Any, batch: int = 256) -> int:
        """Compute and cache the memory of every image of ``ids`` that lacks it, ``batch`` at a time;
        how many were computed. ``rows(ids)`` gives Image rows, ``tokens(ids, rows=rows)`` their
        patch tokens; ``bar`` is told each batch's size."""
        before = self.computed
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            part = rows(chunk)
            self.memory(slot, reranker, [i for i in chunk if i in part], part, functools.partial(tokens, rows=part))
            bar.update(len(chunk))
        return self.computed - before

    # ------------------------------------------------------------ in process
    def _get(self, cache: FeatureCache, item: FeatureItem) -> np.ndarray | None:
        key = (str(cache.dir), item.id, item.key)
        with self._lock:
            got = self._recent.get(key)
            if got is not None:
                self._recent.move_to_end(key)
                return got
        got = cache.get(item)
        if got is not None:
            self._remember(key, got)
        return got

    def _put(self, cache: FeatureCache, item: FeatureItem, memory: np.ndarray) -> None:
        cache.put(item, memory)
        self._remember((str(cache.dir), item.id, item.key), memory.copy())

    def _remember(self, key: tuple[str, int, str], memory: np.ndarray) -> None:
        if memory.nbytes > self.lru_bytes:
            return
        with self._lock:
            old = self._recent.pop(key, None)
            self._recent_bytes -= old.nbytes if old is not None else 0
            self._recent[key] = memory
            self._recent_bytes += memory.nbytes
            while self._recent_bytes > self.lru_bytes:
                _, dropped = self._recent.popitem(last=False)
                self._recent_bytes -= dropped.nbytes

"""A library's compressed-index shards served from several machines (issue 19).

``crossfind serve-shards`` (:func:`serve_shards`) serves some of the shard
files of a model's compressed index, memory-mapped, through FAISS's
``faiss.contrib.client_server`` (:mod:`retrieval.index.remote`). ``crossfind
set-shard-servers`` (:func:`retrieval.scale.set_shard_servers`) makes the
library's searches ask those servers for candidates (FAISS's ``ClientIndex``
and ``ResultHeap``) and re-score them exactly from the local float16 sidecar
(:func:`open_remote`), as for local shards. The protocol is pickle over plain
TCP with no authentication: trusted networks only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import LibraryError, QueryError
from .index.compressed import CompressedIndex, Sidecar, default_nprobe
from .index import SearchResult

if TYPE_CHECKING:
    from .index.remote import ShardService
    from .slot import ModelSlot


def _build(slot: ModelSlot, kind: str) -> dict[str, Any]:
    """What identifies ``kind``'s compressed index: ``build`` (library, generation,
    plan) and ``of`` (shard count); servers and client must agree on both."""
    from .scale import marker

    mark = marker(slot, kind)
    if mark is None:
        raise LibraryError(f"the {kind} of model {slot.spec.spec} have no compressed index; build one with "
                           f"crossfind index PATH --index-memory 4G --shards N")
    return {"build": f"{mark.get('library')}/{mark.get('generation')}/{mark.get('plan')}", "of": int(mark.get("shards", 1))}


def shard_paths(slot: ModelSlot, kind: str, shards: Sequence[int] | None = None) -> tuple[list[int], list[Any]]:
    """The shard numbers asked for (``None``: all) and their files."""
    from .scale import stem

    total = _build(slot, kind)["of"]
    chosen = sorted(set(range(total) if shards is None else (int(s) for s in shards)))
    bad = [s for s in chosen if not 0 <= s < total]
    if bad or not chosen:
        raise LibraryError(f"no shard {bad or chosen} in the {kind} index of {slot.spec.spec}: it has shards 0-{total - 1}")
    base = stem(slot, kind)
    paths = [base.with_name(base.name + ".faiss")] if total == 1 else [base.with_name(f"{base.name}.shard{s}.faiss") for s in chosen]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise LibraryError(f"shard files missing: {', '.join(missing)}")
    return chosen, paths


def serve_shards(slot: ModelSlot, kind: str = "images", shards: Sequence[int] | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> ShardService:
    """A bound, not yet running, server of ``kind``'s shard files ``shards``
    (``None``: all) for :class:`retrieval.index.remote.RemoteShards`; call its
    ``serve_forever()`` and ``close()``. Anyone who can reach ``host:port`` can
    make it unpickle data: bind a trusted network's address only."""
    from .index.remote import ShardService

    chosen, paths = shard_paths(slot, kind, shards)
    info = dict(_build(slot, kind), shards=chosen, kind=kind)
    try:
        return ShardService(paths, info, host=host, port=port)
    except OSError as exc:
        raise LibraryError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class RemoteCompressedIndex(CompressedIndex):
    """A :class:`CompressedIndex` over :class:`~retrieval.index.remote.RemoteShards`:
    a server failing mid-search is a :class:`QueryError` naming it."""

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        from .index.remote import RemoteError

        try:
            return super().search(queries, k, allowed=allowed)
        except RemoteError as exc:
            raise QueryError(str(exc)) from None


def open_remote(slot: ModelSlot, kind: str, servers: Sequence[tuple[str, int]]) -> RemoteCompressedIndex:
    """``kind``'s compressed index searched on ``servers``, re-scored from the
    local sidecar; :class:`LibraryError` when a server is down or serves
    another build or the servers do not hold every shard once."""
    from .index.remote import RemoteError, RemoteShards
    from .scale import stem

    try:
        remote = RemoteShards(servers, expect=_build(slot, kind))
    except RemoteError as exc:
        raise LibraryError(f"{exc} (or search the local shard files: crossfind set-shard-servers none)") from None
    index = RemoteCompressedIndex(remote, Sidecar.open(stem(slot, kind)))
    try:
        index.set_nprobe(default_nprobe(remote.nlist))
    except RemoteError as exc:
        raise LibraryError(str(exc)) from None
    return index

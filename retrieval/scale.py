"""A library's index under a memory budget: ``crossfind index --index-memory 4G``.

The budget is remembered per model (a store setting). After each indexing run
:func:`apply_index_memory` asks :func:`retrieval.index.compressed.plan_index`
which index the collection needs: while the uncompressed index fits, nothing
changes; past that, a compressed index (IVF-HNSW-PQ, optionally cut into
id-range shards) and its float16 re-scoring sidecar are built from the store's
durable float32 vectors next to ``images.faiss`` (``images.pq.*``), tagged
with the generation of the index they were built from. Searching processes
(:meth:`retrieval.slot.ModelSlot.search_index`) use it, memory-mapped, while
that generation is the store's; the uncompressed ``images.faiss`` stays the
writable index that indexing updates and that rebuilds and reconciliation use.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import LibraryError

if TYPE_CHECKING:
    from .slot import ModelSlot

LOG = logging.getLogger(__name__)

#: Rows read from the store and added per step while building.
BUILD_CHUNK = 100_000


def _memory_key(spec: str) -> str:
    return f"index-memory:{spec}"


@dataclass(frozen=True)
class ScaleReport:
    """What :func:`apply_index_memory` did for one kind of index."""

    kind: str  # "images" or "texts"
    vectors: int
    plan: str  # the FAISS factory string chosen
    compressed: bool  # a compressed index was built (or is in step already)
    shards: int
    built: bool  # built by this call

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "vectors": self.vectors, "plan": self.plan, "compressed": self.compressed,
                "shards": self.shards, "built": self.built}


def stem(slot: ModelSlot, kind: str) -> Path:
    return slot.dir / f"{kind}.pq"


def _marker(slot: ModelSlot, kind: str) -> Path:
    return slot.dir / f"{kind}.pq.json"


def _remove(slot: ModelSlot, kind: str) -> None:
    for path in slot.dir.glob(f"{kind}.pq.*"):
        path.unlink(missing_ok=True)


def in_step(slot: ModelSlot, kind: str) -> bool:
    """Whether ``kind``'s compressed index was built from the store's current generation."""
    try:
        mark = json.loads(_marker(slot, kind).read_text())
    except (OSError, ValueError):
        return False
    saved = slot.files.saved_generation(kind)
    return isinstance(mark, dict) and saved is not None and mark.get("generation") == saved \
        and mark.get("library") == slot.store.library_id


def open_scaled(slot: ModelSlot, kind: str) -> Any:
    """``kind``'s compressed index, memory-mapped, or ``None`` when there is none
    in step; its shards searched on the servers of :func:`set_shard_servers` when
    there are some (a server down: :class:`LibraryError`)."""
    if not in_step(slot, kind):
        return None
    servers = shard_servers(slot, kind)
    if servers:
        from .shard_servers import open_remote

        return open_remote(slot, kind, servers)
    from .index.compressed import CompressedIndex

    try:
        return CompressedIndex.open(stem(slot, kind), mmap=True)
    except (OSError, RuntimeError, ValueError) as exc:
        LOG.warning("the compressed %s index could not be opened, searching the full one: %s", kind, exc)
        return None


def _servers_key(slot: ModelSlot, kind: str) -> str:
    return f"shard-servers:{slot.spec.spec}:{kind}"


def shard_servers(slot: ModelSlot, kind: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` of the shard servers remembered for ``kind`` (none: search locally)."""
    from .index.remote import parse_servers

    text = slot.store.get_setting(_servers_key(slot, kind))
    return parse_servers(text) if text else []


def set_shard_servers(slot: ModelSlot, servers: str, kind: str = "images") -> list[str]:
    """Remember the servers (``"HOST:PORT,HOST:PORT"``, every shard of
    ``kind``'s compressed index served once among them; ``"none"``: search
    the local shard files again) that searches of ``kind`` use; returns them."""
    from .index.remote import parse_servers

    if servers.strip().lower() == "none":
        addrs: list[tuple[str, int]] = []
    else:
        try:
            addrs = parse_servers(servers)
        except ValueError as exc:
            raise LibraryError(str(exc)) from None
    names = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addrs]
    slot.store.set_setting(_servers_key(slot, kind), ",".join(names))
    slot.store.commit()
    slot._mapped.pop(kind, None)  # this process opens the index the new way on its next search
    return names


def marker(slot: ModelSlot, kind: str) -> dict[str, Any] | None:
    """What the build of ``kind``'s compressed index recorded (plan, shards, generation), or ``None``."""
    try:
        mark = json.loads(_marker(slot, kind).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def check_memory(memory: str) -> None:
    """Raise :class:`LibraryError` unless ``memory`` is a size (``4G``) or ``none``."""
    from .index.compressed import parse_memory

    if memory.lower() != "none":
        try:
            parse_memory(memory)
        except ValueError as exc:
            raise LibraryError(str(exc)) from None


def apply_index_memory(slot: ModelSlot, memory: str | None = None, shards: int | None = None,
                       kinds: tuple[str, ...] = ("images", "texts")) -> list[ScaleReport]:
    """Remember ``memory`` (e.g. ``"4G"``; ``None``: the remembered budget,
    ``"none"``: forget it) and bring each kind's compressed index in step
    with the plan for its size. The caller holds the writer lock."""
    from .index.compressed import CompressedIndex, TRAIN_SAMPLE, plan_index

    store = slot.store
    key = _memory_key(slot.spec.spec)
    if memory is not None and memory.lower() == "none":
        store.set_setting(key, "")
        store.commit()
        for kind in kinds:
            _remove(slot, kind)
        return []
    if memory is not None:
        check_memory(memory)
        saved: dict[str, Any] = {"memory": memory, "shards": int(shards or 1)}
        store.set_setting(key, json.dumps(saved))
        store.commit()
    else:
        text = store.get_setting(key)
        if not text:
            return []
        saved = json.loads(text)
        if shards is not None:
            saved["shards"] = int(shards)
    budget, nshards = str(saved["memory"]), max(1, int(saved.get("shards", 1)))
    reports = []
    for kind in kinds:
        n = store.count_vectors(slot.row.id, kind)
        try:
            plan = plan_index(n, slot.dim, budget)
        except ValueError as exc:
            raise LibraryError(f"{kind}: {exc}") from None
        if plan.kind != "ivfpq":
            _remove(slot, kind)
            reports.append(ScaleReport(kind, n, plan.factory, False, 0, False))
            continue
        if in_step(slot, kind) and json.loads(_marker(slot, kind).read_text()).get("plan") == plan.factory \
                and json.loads(_marker(slot, kind).read_text()).get("shards") == nshards:
            reports.append(ScaleReport(kind, n, plan.factory, True, nshards, False))
            continue
        generation = slot.files.saved_generation(kind)
        # The vectors stream from the store chunk by chunk: the build never holds them all.
        ids = store.vector_ids(slot.row.id, kind)
        rng = np.random.default_rng(0)
        picked = ids if len(ids) <= TRAIN_SAMPLE else ids[np.sort(rng.choice(len(ids), TRAIN_SAMPLE, replace=False))]
        sample = store.vectors_by_id(slot.row.id, kind, picked)
        _remove(slot, kind)
        LOG.info("building the compressed %s index %s for %d vectors in %d shard(s)", kind, plan.factory, n, nshards)
        chunks = (store.vectors_by_id(slot.row.id, kind, ids[s : s + BUILD_CHUNK]) for s in range(0, len(ids), BUILD_CHUNK))
        CompressedIndex.build(plan, ids, chunks, stem(slot, kind), sample, shards=nshards)
        mark = {"generation": generation, "library": store.library_id, "plan": plan.factory, "shards": nshards, "vectors": n}
        tmp = _marker(slot, kind).with_suffix(".tmp")
        tmp.write_text(json.dumps(mark) + "\n")
        os.replace(tmp, _marker(slot, kind))
        reports.append(ScaleReport(kind, n, plan.factory, True, nshards, True))
    return reports

"""Indexes past one machine's RAM: a compressed IVF-PQ index chosen under a
memory budget, exact re-scoring from a float16 sidecar, and id-range shards.

``plan_index(n, dim, memory)`` picks the index the way autofaiss does: the
uncompressed index of :mod:`retrieval.index` while it fits the budget, else
``IVF{nlist}_HNSW32,PQ{M}x8np`` (``np``: no polysemous training, which only serves Hamming pre-filtering and takes minutes) with the longest code that fits (inverted
lists follow ``4*sqrt(n)``, the coarse quantizer is an HNSW graph so probing
65k lists costs well under a millisecond).

A PQ code ranks candidates, it does not score them: :class:`CompressedIndex`
asks the PQ index for ``default_rescore(n) * k`` (20k up to 1M vectors, 150k at 10M) candidates and scores those exactly
against the vectors in a memory-mapped float16 sidecar (``*.f16.npy``, rows in
ascending id order, ids in ``*.ids.npy``). The sidecar is derived from the
store's durable float32 vectors and rebuilt with the index; float16 halves the
disk and page cache of float32 and changes an inner product of unit vectors by
well under 1e-3.

Shards: :func:`split_shards` cuts an index into files by id range (each a
complete index, loadable with ``IO_FLAG_MMAP`` and servable on its own by
``faiss.contrib.client_server``); :func:`open_shards` searches them together
through FAISS's threaded ``IndexShards``, whose result heap does the merge.

The compressed index uses the L2 metric internally: for unit vectors it ranks
exactly as inner product (``|a-b|^2 = 2 - 2 a.b``), it is the metric FAISS's
PQ, HNSW and 2-level training are built for, and the re-scored results are
inner products again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import SearchResult

LOG = logging.getLogger(__name__)

#: PQ code lengths tried, longest first. 64 bytes (8 dimensions a sub-quantizer
#: for 512-d vectors) is the longest: with exact re-scoring a longer code buys
#: little recall and costs search time linearly.
PQ_CHOICES = (64, 48, 32, 24, 16, 8)
#: Fraction of the memory budget the index itself may use; the rest is for the
#: process (model, query batch) and the page cache of re-scored sidecar rows.
INDEX_SHARE = 0.5
#: Candidates re-scored per result wanted, up to 1M vectors (200 for k=10:
#: recall@10 0.95-0.97 at 1M synthetic vectors where 100 gave 0.88-0.90),
#: growing with the index to MAX_RESCORE at 10M (1,500 for k=10: 0.937 at
#: nprobe 12, where 200 gave 0.73 at any nprobe); docs/benchmarks.md.
RESCORE = 20
MAX_RESCORE = 150
#: Vectors sampled to train OPQ, the coarse quantizer and the PQ codebooks.
TRAIN_SAMPLE = 262_144
#: Past this many lists the coarse quantizer is trained by 2-level k-means
#: (``faiss.contrib.clustering``): sqrt(nlist) clusters, then each split.
TWO_LEVEL_FROM = 1024
#: Lists probed: MAX_PROBE up to PROBE_FULL_UNTIL lists (1M vectors), then
#: fewer, to 12 at 16,384 (10M), where probing more lists gained little recall
#: (0.73 -> 0.75 from 16 to 64 lists at 200 re-scored) next to re-scoring
#: deeper, and cost time linearly (29 -> 96 ms a query); never below MIN_PROBE.
PROBE_FULL_UNTIL = 4096
MIN_PROBE = 8
MAX_PROBE = 64
#: Below this many vectors the index is never compressed (8-bit PQ codebooks
#: need 256 training vectors; such an index is small whatever the budget).
MIN_COMPRESSED = 256
#: HNSW beam width while assigning the vectors added to their lists.
ADD_EF = 32

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _faiss():
    import faiss  # heavy: imported on first use only

    return faiss


def parse_memory(text: str | int) -> int:
    """Bytes in ``"4G"``, ``"512M"``, ``"1.5GB"``, ``"4GiB"`` or a plain number."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a memory size: {text!r} (examples: 4G, 512M, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class IndexPlan:
    """The index for ``n`` vectors of dimension ``dim`` under a memory budget."""

    n: int
    dim: int
    kind: str  # "flat", "ivf" (IVF-Flat) or "ivfpq" (IVF with an HNSW coarse quantizer, PQ codes)
    factory: str  # the FAISS factory string
    nlist: int  # inverted lists (0 for flat)
    pq_m: int  # bytes of PQ code per vector (0 when uncompressed)
    bytes_per_vector: float  # index memory a vector, ids included
    memory_bytes: int  # estimated memory to hold the index for search


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``4*sqrt(n)``."""
    return int(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))


def _quantizer_bytes(nlist: int, dim: int) -> int:
    return nlist * (4 * dim + 2 * 32 * 4 + 16)  # centroids + HNSW32 links (level 0: 2*M neighbours)


def plan_index(n: int, dim: int, memory: int | str | None = None) -> IndexPlan:
    """The index ``crossfind`` builds for ``n`` vectors under ``memory`` bytes
    (``None``: no budget, the uncompressed index of :mod:`retrieval.index`).

    Like autofaiss: the uncompressed index while it fits, else the longest PQ
    code of :data:`PQ_CHOICES` whose index fits :data:`INDEX_SHARE` of the
    budget; below :data:`MIN_COMPRESSED` vectors, the uncompressed index
    whatever the budget. Raises ``ValueError`` when not even 8-byte codes fit.
    """
    from . import IVF_THRESHOLD, factory_string

    n, dim = int(n), int(dim)
    flat_spec = factory_string(n, dim)
    flat_bpv = 4 * dim + 8
    flat_nlist = 0 if n < IVF_THRESHOLD else ivf_lists(n)
    flat_mem = n * flat_bpv + (flat_nlist * 4 * dim)
    budget = None if memory is None else parse_memory(memory)
    if budget is None or flat_mem <= budget * INDEX_SHARE or n < MIN_COMPRESSED:
        return IndexPlan(n, dim, "flat" if flat_nlist == 0 else "ivf", flat_spec, flat_nlist, 0, float(flat_bpv), flat_mem)
    nlist = ivf_lists(n)
    for m in PQ_CHOICES:
        if dim % m:
            continue
        mem = n * (m + 8) + _quantizer_bytes(nlist, dim)
        if mem <= budget * INDEX_SHARE:
            return IndexPlan(n, dim, "ivfpq", f"IVF{nlist}_HNSW32,PQ{m}x8np", nlist, m, float(m + 8), mem)
    raise ValueError(f"{n} vectors of dimension {dim} need more than {budget} bytes even with 8-byte codes")


def default_nprobe(nlist: int) -> int:
    """Lists a search probes by default (see :data:`PROBE_BUDGET`)."""
    scaled = MAX_PROBE * min(1.0, PROBE_FULL_UNTIL / max(1, nlist)) ** 1.2
    return min(nlist, max(MIN_PROBE, int(round(scaled))))


def default_rescore(n: int) -> int:
    """Candidates re-scored per result wanted for an index of ``n`` vectors (see :data:`RESCORE`)."""
    return int(min(MAX_RESCORE, max(RESCORE, round(RESCORE * (n / 1_000_000) ** 0.875))))


def _ivf(index: Any) -> Any:
    faiss = _faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def train_compressed(plan: IndexPlan, sample: np.ndarray) -> Any:
    """An empty, trained FAISS index for ``plan`` (kind ``ivfpq``), trained on
    ``sample`` (unit vectors; a few hundred thousand are plenty)."""
    faiss = _faiss()
    if plan.kind != "ivfpq":
        raise ValueError(f"plan {plan.factory!r} is not a compressed index")
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_L2)
    if plan.nlist > TWO_LEVEL_FROM:
        from faiss.contrib.clustering import train_ivf_index_with_2level

        with contextlib.redirect_stdout(io.StringIO()):  # the contrib function prints its arguments
            train_ivf_index_with_2level(index, sample)
    else:
        index.train(sample)
    ivf = _ivf(index)
    ivf.nprobe = default_nprobe(plan.nlist)
    faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(2 * ivf.nprobe, 64)
    return index


class Sidecar:
    """Float16 copies of the vectors, rows in ascending id order, memory-mapped.

    Written once per build by :meth:`write` (chunks in ascending id order);
    :meth:`gather` reads the rows of given ids.
    """

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.ids = ids  # sorted int64
        self.vectors = vectors  # (n, dim) float16, usually a memmap

    @staticmethod
    def paths(stem: str | os.PathLike[str]) -> tuple[Path, Path]:
        stem = Path(stem)
        return stem.with_name(stem.name + ".ids.npy"), stem.with_name(stem.name + ".f16.npy")

    @classmethod
    def write(cls, stem: str | os.PathLike[str], ids: np.ndarray, chunks: Iterable[np.ndarray]) -> Sidecar:
        """Write ``ids`` (ascending) and their vectors, given as consecutive row chunks."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("sidecar ids must be strictly ascending")
        id_path, vec_path = cls.paths(stem)
        id_path.parent.mkdir(parents=True, exist_ok=True)
        dim = None
        out: Any = None
        row = 0
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if out is None:
                dim = chunk.shape[1]
                out = np.lib.format.open_memmap(str(vec_path) + ".tmp", mode="w+", dtype=np.float16, shape=(len(ids), dim))
            out[row : row + len(chunk)] = chunk.astype(np.float16)
            row += len(chunk)
        if row != len(ids) or out is None:
            raise ValueError(f"{row} vectors for {len(ids)} ids")
        out.flush()
        del out
        os.replace(str(vec_path) + ".tmp", vec_path)
        np.save(id_path, ids)
        return cls.open(stem)

    @classmethod
    def open(cls, stem: str | os.PathLike[str]) -> Sidecar:
        id_path, vec_path = cls.paths(stem)
        return cls(np.load(id_path), np.load(vec_path, mmap_mode="r"))

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of ``ids`` (each must be present)."""
        rows = np.searchsorted(self.ids, ids)
        if len(ids) and (rows.max() >= len(self.ids) or (self.ids[rows] != ids).any()):
            raise KeyError("ids missing from the re-scoring sidecar")
        order = np.argsort(rows)  # read the mapped file front to back
        out = np.empty((len(ids), self.vectors.shape[1]), np.float32)
        out[order] = self.vectors[rows[order]]
        return out


def rescore(queries: np.ndarray, cand: np.ndarray, sidecar: Sidecar, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate ids (``-1``:
    none), the best ``k`` of them: ``(scores, ids)``, ``-1`` where fewer."""
    nq = len(queries)
    scores = np.full((nq, k), -np.inf, np.float32)
    ids = np.full((nq, k), -1, np.int64)
    valid = cand >= 0
    flat = cand[valid]
    if len(flat) == 0:
        return scores, ids
    uniq, inv = np.unique(flat, return_inverse=True)
    vecs = sidecar.gather(uniq)
    rows = np.repeat(np.arange(nq), valid.sum(axis=1))
    s = np.einsum("ij,ij->i", vecs[inv], queries[rows])
    full = np.full(cand.shape, -np.inf, np.float32)
    full[valid] = s
    kk = min(k, cand.shape[1])
    top = np.argsort(-full, axis=1, kind="stable")[:, :kk]
    scores[:, :kk] = np.take_along_axis(full, top, axis=1)
    ids[:, :kk] = np.where(np.isfinite(scores[:, :kk]), np.take_along_axis(cand, top, axis=1), -1)
    return scores, ids


def split_shards(index: Any, bounds: Sequence[int]) -> list[Any]:
    """``index`` cut by id range into ``len(bounds) - 1`` indexes: shard ``s``
    holds the ids in ``[bounds[s], bounds[s+1])``. Works for the IVF indexes
    (Flat or PQ, with or without OPQ) and for ``IDMap2,Flat``; each shard is a
    complete index of the same type and training."""
    faiss = _faiss()
    from faiss.contrib.inspect_tools import get_invlist

    bounds = [int(b) for b in bounds]
    ivf = _ivf(index)
    shards: list[Any] = []
    if ivf is None:
        flat = faiss.downcast_index(index)
        ids = faiss.vector_to_array(flat.id_map).astype(np.int64)
        vecs = faiss.downcast_index(flat.index).reconstruct_n(0, flat.ntotal) if flat.ntotal else np.empty((0, index.d), np.float32)
        for lo, hi in zip(bounds, bounds[1:]):
            shard = faiss.index_factory(index.d, "IDMap2,Flat", index.metric_type)
            keep = (ids >= lo) & (ids < hi)
            if keep.any():
                shard.add_with_ids(np.ascontiguousarray(vecs[keep]), np.ascontiguousarray(ids[keep]))
            shards.append(shard)
        return shards
    empty = faiss.clone_index(index)
    empty.reset()
    for _ in zip(bounds, bounds[1:]):
        shards.append(faiss.clone_index(empty))
    targets = [_ivf(s) for s in shards]
    for lst in range(ivf.nlist):
        ids, codes = get_invlist(ivf.invlists, lst)
        if not len(ids):
            continue
        which = np.searchsorted(bounds, ids, side="right") - 1
        for s, t in enumerate(targets):
            keep = which == s
            if keep.any():
                sid, scode = np.ascontiguousarray(ids[keep]), np.ascontiguousarray(codes[keep])
                t.invlists.add_entries(lst, len(sid), faiss.swig_ptr(sid), faiss.swig_ptr(scode))
    for s, t in zip(shards, targets):
        t.ntotal = int(sum(t.invlists.list_size(i) for i in range(t.nlist)))
        s.ntotal = t.ntotal
    return shards


def id_bounds(ids: np.ndarray, shards: int) -> list[int]:
    """Boundaries that cut the ascending ``ids`` into ``shards`` ranges of
    near-equal size (the last one open-ended up to int64's maximum)."""
    ids = np.sort(np.asarray(ids, np.int64))
    if shards < 1:
        raise ValueError("shards must be at least 1")
    cuts = [int(ids[(len(ids) * s) // shards]) if len(ids) else s for s in range(1, shards)]
    return [int(np.iinfo(np.int64).min)] + cuts + [int(np.iinfo(np.int64).max)]


def write_shards(index: Any, shards: int, stem: str | os.PathLike[str], ids: np.ndarray | None = None) -> list[Path]:
    """Cut ``index`` into ``shards`` id ranges and write ``{stem}.shard{i}.faiss`` files."""
    faiss = _faiss()
    if ids is None:
        from . import VectorIndex

        ids = VectorIndex(index.d, index).ids() if index.metric_type == faiss.METRIC_INNER_PRODUCT else _all_ids(index)
    stem = Path(stem)
    paths = []
    for i, shard in enumerate(split_shards(index, id_bounds(ids, shards))):
        path = stem.with_name(f"{stem.name}.shard{i}.faiss")
        faiss.write_index(shard, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        paths.append(path)
    return paths


def _all_ids(index: Any) -> np.ndarray:
    from faiss.contrib.inspect_tools import get_invlist

    ivf = _ivf(index)
    parts = [get_invlist(ivf.invlists, i)[0] for i in range(ivf.nlist)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def open_shards(paths: Sequence[str | os.PathLike[str]], mmap: bool = True, nprobe: int | None = None) -> Any:
    """The shard files searched as one index: ``faiss.IndexShards`` (one
    thread a shard; FAISS merges the per-shard top-k), each shard read with
    ``IO_FLAG_MMAP`` unless ``mmap`` is false."""
    faiss = _faiss()
    parts = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP if mmap else 0) for p in paths]
    if not parts:
        raise ValueError("no shards to open")
    merged = faiss.IndexShards(parts[0].d, True, False)
    merged.metric_type = parts[0].metric_type
    for part in parts:
        ivf = _ivf(part)
        if ivf is not None and nprobe is not None:
            ivf.nprobe = int(nprobe)
        merged.add_shard(part)
    merged.referenced_objects = parts  # the shards live as long as the IndexShards
    return merged


def _parts(index: Any) -> list[Any]:
    faiss = _faiss()
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


class CompressedIndex:
    """A PQ index for candidates plus a float16 sidecar for exact scores.

    ``index`` is any FAISS index over unit vectors with ids (one ``ivfpq``
    index, or the :func:`open_shards` of several); ``sidecar`` holds every
    id's vector. :meth:`search` returns inner products, best first, like
    :meth:`retrieval.index.VectorIndex.search`.
    """

    def __init__(self, index: Any, sidecar: Sidecar, rescore_factor: int | None = None) -> None:
        self.index = index
        self.sidecar = sidecar
        self.dim = int(index.d)
        self.rescore_factor = int(rescore_factor) if rescore_factor is not None else default_rescore(int(index.ntotal))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return "ivfpq"

    @property
    def nprobe(self) -> int:
        if getattr(self.index, "remote", False):
            return int(self.index.nprobe)
        ivf = self._first_ivf()
        return int(ivf.nprobe) if ivf is not None else 0

    def _first_ivf(self) -> Any:
        return _ivf(_parts(self.index)[0])

    def set_nprobe(self, nprobe: int) -> None:
        faiss = _faiss()
        if getattr(self.index, "remote", False):  # index.remote.RemoteShards: the servers set it
            self.index.set_nprobe(int(nprobe))
            return
        for part in _parts(self.index):
            ivf = _ivf(part)
            ivf.nprobe = int(nprobe)
            q = faiss.downcast_index(ivf.quantizer)
            if hasattr(q, "hnsw"):
                q.hnsw.efSearch = max(2 * int(nprobe), 64)

    def candidates(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Ids of the ``n`` best PQ candidates per query (``-1`` where fewer)."""
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(n))
        return ids

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        """The top ``k`` by exact inner product among the ``rescore_factor * k``
        best PQ candidates of each query (``allowed``: only those ids, a
        filter applied inside FAISS), like :meth:`VectorIndex.search`."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(int(k), len(self))
        if k <= 0:
            return SearchResult(np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64))
        n = min(len(self), max(k, self.rescore_factor * k))
        cand = self.candidates(queries, n) if allowed is None else self._filtered(queries, n, allowed)
        scores, ids = rescore(queries, cand, self.sidecar, k)
        return SearchResult(scores, ids)

    def _filtered(self, queries: np.ndarray, n: int, allowed: np.ndarray) -> np.ndarray:
        """Candidates among ``allowed`` ids: each shard (local, or on its
        server) searched with an id selector, the lists merged by FAISS's
        ``ResultHeap``."""
        if getattr(self.index, "remote", False):
            return self.index.search_filtered(queries, n, allowed)[1]  # type: ignore[no-any-return]
        from .remote import filtered_candidates

        return filtered_candidates(_parts(self.index), queries, n, allowed)[1]

    # ----------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        plan: IndexPlan,
        ids: np.ndarray,
        chunks: Iterable[np.ndarray],
        stem: str | os.PathLike[str],
        sample: np.ndarray,
        shards: int = 1,
    ) -> CompressedIndex:
        """Train on ``sample``, add ``chunks`` (consecutive rows of the vectors
        of ``ids``, ascending), write the index (``{stem}.faiss``, or
        ``{stem}.shard{i}.faiss`` for several shards) and the sidecar, and open
        them memory-mapped."""
        faiss = _faiss()
        index = train_compressed(plan, sample)
        quantizer = faiss.downcast_index(_ivf(index).quantizer)
        search_ef = quantizer.hnsw.efSearch
        quantizer.hnsw.efSearch = ADD_EF  # assigning the base vectors: a narrower beam is enough
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        stem = Path(stem)
        start = 0

        def feed() -> Iterable[np.ndarray]:
            nonlocal start
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=np.float32)
                index.add_with_ids(chunk, ids[start : start + len(chunk)])
                start += len(chunk)
                yield chunk

        Sidecar.write(stem, ids, feed())
        quantizer.hnsw.efSearch = search_ef
        if shards <= 1:
            path = stem.with_name(stem.name + ".faiss")
            faiss.write_index(index, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
            del index
            return cls.open(stem)
        write_shards(index, shards, stem, ids=ids)
        del index
        return cls.open(stem)

    @classmethod
    def open(cls, stem: str | os.PathLike[str], mmap: bool = True) -> CompressedIndex:
        """The index written by :meth:`build` at ``stem`` (one file or shards)."""
        faiss = _faiss()
        stem = Path(stem)
        single = stem.with_name(stem.name + ".faiss")
        shard_paths = sorted(stem.parent.glob(stem.name + ".shard*.faiss"), key=lambda p: int(p.name.rsplit("shard", 1)[1].split(".")[0]))
        if single.exists():
            index = faiss.read_index(str(single), faiss.IO_FLAG_MMAP if mmap else 0)
        elif shard_paths:
            index = open_shards(shard_paths, mmap=mmap)
        else:
            raise FileNotFoundError(f"no index at {single} or its shards")
        out = cls(index, Sidecar.open(stem))
        ivf = out._first_ivf()
        if ivf is not None:
            out.set_nprobe(default_nprobe(int(ivf.nlist)))
        return out

"""The vector layer: FAISS indexes whose ids are SQLite primary keys.

Numpy in, numpy out. The metric is always inner product over L2-normalised
float32 vectors (cosine similarity). Small collections are searched exactly
(``IDMap2,Flat``); past :data:`IVF_THRESHOLD` vectors the index is rebuilt as an
inverted file (``IVF{nlist},Flat``) whose probe count is chosen for high recall,
and rebuilt again with more lists each time the collection outgrows them
(``nlist`` follows ``4*sqrt(n)``), so a library grown one batch at a time ends
up with the same index as one built in one go.
Persistence is atomic (temp file, fsync, rename) and always of the CPU index;
a GPU copy is made for search when ``faiss.get_num_gpus() > 0``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger(__name__)

#: Below this many vectors search is exact; at or above it an IVF index is used.
IVF_THRESHOLD = 50_000
#: Inverted lists are probed until at least this fraction of them is visited.
IVF_PROBE_FRACTION = 1 / 64
#: ... and never fewer than this many lists.
IVF_MIN_PROBE = 32
#: An IVF index is rebuilt when the list count suited to its size reaches this
#: multiple of the lists it has (lists grow with sqrt(n): every ~4x in size).
IVF_REGROW = 2
#: Vectors sampled to train the IVF coarse quantizer.
IVF_TRAIN_SAMPLE = 131_072

__all__ = ["VectorIndex", "SearchResult", "RangeResult", "factory_string", "IVF_THRESHOLD"]


def _faiss():
    import faiss  # heavy: imported on first use only

    return faiss


@dataclass(frozen=True)
class SearchResult:
    """Top-k scores and ids for each query row; missing slots have id -1."""

    scores: np.ndarray  # (nq, k) float32 inner products, best first
    ids: np.ndarray  # (nq, k) int64 SQLite primary keys, -1 where fewer than k exist


@dataclass(frozen=True)
class RangeResult:
    """Every stored vector within a threshold of each query row, in FAISS's
    ``lims`` layout: query ``q``'s matches are ``ids[lims[q]:lims[q+1]]``."""

    lims: np.ndarray  # (nq + 1,) int64 offsets into scores and ids
    scores: np.ndarray  # float32 inner products, each >= the threshold
    ids: np.ndarray  # int64 SQLite primary keys


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``4*sqrt(n)``."""
    return int(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))


def factory_string(n: int, dim: int) -> str:
    """The FAISS factory string used for a collection of ``n`` vectors."""
    if n < IVF_THRESHOLD:
        return "IDMap2,Flat"
    return f"IVF{ivf_lists(n)},Flat"


def _as_matrix(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got shape {x.shape}")
    return x


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class VectorIndex:
    """A FAISS index keyed by int64 ids, with inner-product metric.

    The index type follows the collection size: exact below
    :data:`IVF_THRESHOLD`, IVF above. Growth past the threshold rebuilds the
    index from its own stored vectors (vectors are never kept elsewhere).
    """

    def __init__(self, dim: int, index: Any = None) -> None:
        faiss = _faiss()
        self.dim = int(dim)
        self._index = index if index is not None else faiss.index_factory(self.dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        if self._index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("crossfind indexes use the inner-product metric")
        self._gpu: Any = None
        self.nprobe = 1
        self._set_nprobe()

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        """``"flat"`` or ``"ivf"``."""
        return "ivf" if self._ivf() is not None else "flat"

    def _ivf(self):
        faiss = _faiss()
        try:
            return faiss.extract_index_ivf(self._index)
        except RuntimeError:
            return None

    def _set_nprobe(self) -> None:
        ivf = self._ivf()
        if ivf is not None:
            self.nprobe = min(ivf.nlist, max(IVF_MIN_PROBE, int(math.ceil(ivf.nlist * IVF_PROBE_FRACTION))))
            ivf.nprobe = self.nprobe

    def ids(self) -> np.ndarray:
        """All ids held, as int64 (order unspecified)."""
        faiss = _faiss()
        ivf = self._ivf()
        if ivf is None:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        from faiss.contrib.inspect_tools import get_invlist, get_invlist_sizes

        sizes = get_invlist_sizes(ivf.invlists)
        out = [get_invlist(ivf.invlists, int(lst))[0] for lst in np.flatnonzero(sizes)]
        return np.concatenate(out).astype(np.int64) if out else np.empty(0, np.int64)

    def reconstruct(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """The stored vectors for ``ids`` (each must be present)."""
        ids = _as_ids(ids)
        ivf = self._ivf()
        if ivf is not None and ivf.direct_map.type == 0:
            # A hash table, not make_direct_map's array: SQLite ids are neither
            # dense nor zero-based, which the array form requires.
            ivf.set_direct_map_type(_faiss().DirectMap.Hashtable)
        out = np.empty((len(ids), self.dim), np.float32)
        for row, i in enumerate(ids):
            out[row] = self._index.reconstruct(int(i))
        return out

    # -------------------------------------------------------------- mutation
    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add (or replace) vectors under ``ids``."""
        ids = _as_ids(ids)
        vectors = _as_matrix(vectors, self.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        self.remove(ids)
        n = len(self) + len(ids)
        ivf = self._ivf()
        if (ivf is None and n >= IVF_THRESHOLD) or (ivf is not None and ivf_lists(n) >= IVF_REGROW * ivf.nlist):
            self._rebuild(n, extra=(ids, vectors))
        else:
            self._index.add_with_ids(vectors, ids)
        self._gpu = None

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove ``ids``; absent ids are ignored. Returns how many were removed."""
        ids = _as_ids(ids)
        if len(ids) == 0 or len(self) == 0:
            return 0
        faiss = _faiss()
        ivf = self._ivf()
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.Hashtable:
            # An IVF index that has reconstructed by id looks each id up in its hash table.
            sel: Any = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
        else:
            sel = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
        removed = int(self._index.remove_ids(sel))
        if removed:
            self._gpu = None
        return removed

    def _dump(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) held, read straight from the index's storage."""
        faiss = _faiss()
        ivf = self._ivf()
        if ivf is None:
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            flat = faiss.downcast_index(self._index.index)
            vecs = flat.reconstruct_n(0, flat.ntotal) if flat.ntotal else np.empty((0, self.dim), np.float32)
            return ids, np.ascontiguousarray(vecs, dtype=np.float32)
        if not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat):
            ids = self.ids()
            return ids, (self.reconstruct(ids) if len(ids) else np.empty((0, self.dim), np.float32))
        from faiss.contrib.inspect_tools import get_invlist, get_invlist_sizes

        out_ids, out_vecs = [], []
        for lst in np.flatnonzero(get_invlist_sizes(ivf.invlists)):
            list_ids, codes = get_invlist(ivf.invlists, int(lst))
            out_ids.append(list_ids)
            out_vecs.append(codes.view(np.float32).reshape(len(list_ids), self.dim))
        if not out_ids:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate(out_ids).astype(np.int64), np.concatenate(out_vecs)

    def _rebuild(self, n: int, extra: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Rebuild as the index type suited to ``n`` vectors, keeping every vector."""
        faiss = _faiss()
        ids, vecs = self._dump()
        if extra is not None:
            ids = np.concatenate([ids, extra[0]])
            vecs = np.concatenate([vecs, extra[1]])
        spec = factory_string(n, self.dim)
        LOG.info("rebuilding vector index as %s for %d vectors", spec, n)
        index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            sample = vecs if len(vecs) <= IVF_TRAIN_SAMPLE else vecs[rng.choice(len(vecs), IVF_TRAIN_SAMPLE, replace=False)]
            index.train(sample)
        index.add_with_ids(vecs, ids)
        self._index = index
        self._set_nprobe()
        self._gpu = None

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        """Top-``k`` ids by inner product for each query row.

        ``allowed`` restricts the search to those ids (a filter applied inside
        FAISS, so ``k`` results come back whenever ``k`` allowed ids exist).
        """
        faiss = _faiss()
        queries = _as_matrix(queries, self.dim)
        k = int(k)
        if k <= 0 or len(self) == 0:
            return SearchResult(np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64))
        if allowed is None:
            index = self._search_index()
            scores, ids = index.search(queries, min(k, len(self)))
            return SearchResult(scores, ids)
        allowed = np.unique(_as_ids(allowed))
        sel = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
        ivf = self._ivf()
        kk = min(k, len(allowed)) if len(allowed) else 0
        if kk == 0:
            return SearchResult(np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64))
        if ivf is None:
            params = faiss.SearchParameters(sel=sel)
            scores, ids = self._index.search(queries, kk, params=params)
            return SearchResult(scores, ids)
        params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        scores, ids = self._index.search(queries, kk, params=params)
        if (ids < 0).any():
            # A narrow filter can leave the probed lists short: probe them all.
            params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nlist)
            scores, ids = self._index.search(queries, kk, params=params)
        return SearchResult(scores, ids)

    def range_search(
        self, queries: np.ndarray, threshold: float, allowed: np.ndarray | None = None, nprobe: int | None = None
    ) -> RangeResult:
        """Every id whose vector has inner product >= ``threshold`` with a query row.

        Runs on the CPU index (an IVF index probes ``nprobe`` lists, default
        :attr:`nprobe`, so a match in an unprobed list is missed). ``allowed``
        restricts the matches to those ids. The result grows with the number
        of matches: callers bound memory by passing queries in batches.
        """
        faiss = _faiss()
        queries = _as_matrix(queries, self.dim)
        if len(self) == 0 or len(queries) == 0:
            return RangeResult(np.zeros(len(queries) + 1, np.int64), np.empty(0, np.float32), np.empty(0, np.int64))
        sel = None
        if allowed is not None:
            allowed = np.unique(_as_ids(allowed))
            sel = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
        ivf = self._ivf()
        if ivf is not None:
            probe = min(int(nprobe or self.nprobe), int(ivf.nlist))
            params: Any = faiss.SearchParametersIVF(nprobe=probe, sel=sel) if sel is not None else faiss.SearchParametersIVF(nprobe=probe)
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        lims, scores, ids = self._index.range_search(queries, float(threshold), params=params)
        return RangeResult(np.asarray(lims, np.int64), np.asarray(scores, np.float32), np.asarray(ids, np.int64))

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) held: int64 ids and float32 ``(n, dim)`` vectors, in the same order."""
        return self._dump()

    def _search_index(self):
        faiss = _faiss()
        if self._gpu is None and faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self._index)
            except Exception as exc:  # an index type the GPU build cannot hold
                LOG.warning("GPU transfer failed, searching on CPU: %s", exc)
                self._gpu = self._index
        if self._gpu is not None:
            if self._gpu is not self._index and self.kind == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self.nprobe)
            return self._gpu
        return self._index

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the CPU index atomically (temp file, fsync, rename); returns
        the CRC-32 of the bytes written, which :meth:`from_bytes` callers can
        check to notice a file damaged later."""
        import zlib

        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = faiss.serialize_index(self._index)
        crc = zlib.crc32(memoryview(data))
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(memoryview(data))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return crc

    @classmethod
    def from_bytes(cls, data: bytes, dim: int | None = None) -> VectorIndex:
        """An index from the bytes of a file written by :meth:`save`.

        Raises ``ValueError`` when they are not a readable index of dimension ``dim``.
        """
        faiss = _faiss()
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except Exception as exc:  # faiss raises RuntimeError on a damaged or cut-off file
            raise ValueError(f"not a readable FAISS index: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if dim is not None and index.d != dim:
            raise ValueError(f"index has dimension {index.d}, expected {dim}")
        try:
            return cls(index.d, index)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"not a crossfind index: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str], dim: int | None = None, mmap: bool = False) -> VectorIndex:
        """Read an index written by :meth:`save`; with ``mmap`` the file is mapped
        (``IO_FLAG_MMAP``: nothing read up front, pages come in as searches touch
        them), for processes that only search: such an index must not be changed."""
        faiss = _faiss()
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        if dim is not None and index.d != dim:
            raise ValueError(f"index at {path} has dimension {index.d}, expected {dim}")
        return cls(index.d, index)

    @classmethod
    def open(cls, path: str | os.PathLike[str], dim: int, mmap: bool = False) -> VectorIndex:
        """Load the index at ``path`` (mapped with ``mmap``, see :meth:`load`) or start an empty one of dimension ``dim``."""
        return cls.load(path, dim, mmap=mmap) if Path(path).exists() else cls(dim)

"""Shards of a compressed index served from other machines, through FAISS's
own ``faiss.contrib.client_server`` (pickle over TCP: trusted networks only).

Server side: :class:`ShardService` opens a machine's shard files
memory-mapped as one threaded ``IndexShards`` and answers FAISS's
``rpc.Client`` with :class:`ShardServer`, a ``client_server.SearchServer``
that also accepts an ``IndexShards`` (FAISS's own requires one IVF index),
says which shards it holds (:meth:`ShardServer.get_info`) and runs filtered
searches. The listening loop is ``rpc.run_server``'s, with a bind address (FAISS
binds every interface) and a way to stop.

Query side: :class:`RemoteShards` searches the servers through
``client_server.ClientIndex``, whose ``faiss.ResultHeap`` merges their lists;
:class:`retrieval.index.compressed.CompressedIndex` over it re-scores the
candidates exactly from the local float16 sidecar, as for local shards.

faiss 1.15's ``rpc.RestrictedUnpickler`` lets through ``numpy.core.multiarray``
but not numpy 2's ``numpy._core.multiarray``, so every array was refused
(facebookresearch/faiss#4379); :func:`_contrib` adds the new name to the same
allow-list, on both sides.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

LOG = logging.getLogger(__name__)

#: Seconds to connect to a shard server, and to wait for one answer.
CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 120.0


class RemoteError(Exception):
    """A shard server cannot be reached or answered with an error."""


def _faiss() -> Any:
    import faiss  # heavy: imported on first use only

    return faiss


def _contrib() -> Any:
    from faiss.contrib import client_server, rpc

    rpc.safe_modules.add("numpy._core.multiarray")  # numpy 2's name for the same module (faiss#4379)
    return client_server


class _DebugLog:
    """The file ``rpc.Server`` logs each call to (stderr by default): our logger at debug level."""

    def write(self, text: str) -> None:
        if text.strip():
            LOG.debug("%s", text.rstrip())

    def flush(self) -> None:
        pass


def filtered_candidates(parts: Sequence[Any], queries: np.ndarray, n: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best among ``allowed`` ids in the IVF indexes ``parts``: each
    searched with an id selector over every list, merged by ``faiss.ResultHeap``
    (L2: smallest first). Returns ``(distances, ids)``."""
    faiss = _faiss()

    allowed = np.unique(np.asarray(allowed, np.int64))
    sel = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
    heap = faiss.ResultHeap(len(queries), n)
    for part in parts:
        ivf = faiss.extract_index_ivf(part)
        params = faiss.SearchParametersIVF(sel=sel, nprobe=int(ivf.nlist))  # a narrow filter: every list
        d, i = part.search(queries, n, params=params)
        heap.add_result(d, i)
    heap.finalize()
    return heap.D, heap.I


def _shard_parts(index: Any) -> list[Any]:
    faiss = _faiss()

    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


def _make_server_class() -> type:
    cs = _contrib()
    from faiss.contrib import rpc

    class ShardServer(cs.SearchServer):  # type: ignore[misc,name-defined]
        """FAISS's ``SearchServer`` over one connection, for an ``IndexShards``
        of IVF shards; ``info`` is what :meth:`get_info` answers."""

        def __init__(self, s: socket.socket, index: Any, info: dict[str, Any]) -> None:
            rpc.Server.__init__(self, s, logf=_DebugLog())
            self.index = index
            self.index_ivf = None
            self.info = info

        def set_nprobe(self, nprobe: int) -> None:
            faiss = _faiss()

            for part in _shard_parts(self.index):
                ivf = faiss.extract_index_ivf(part)
                ivf.nprobe = int(nprobe)
                q = faiss.downcast_index(ivf.quantizer)
                if hasattr(q, "hnsw"):
                    q.hnsw.efSearch = max(2 * int(nprobe), 64)

        def get_info(self) -> dict[str, Any]:
            return dict(self.info, ntotal=int(self.index.ntotal))

        def search_filtered(self, x: np.ndarray, n: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return filtered_candidates(_shard_parts(self.index), x, int(n), allowed)

    return ShardServer


class ShardService:
    """Shard files served on ``host:port`` (``port`` 0: a free one, see
    :attr:`port`) until :meth:`close`. ``info`` (which shards, of how many,
    from which build) travels to every client, which checks it."""

    def __init__(self, paths: Sequence[Any], info: dict[str, Any], host: str = "127.0.0.1", port: int = 0) -> None:
        from .compressed import open_shards

        faiss = _faiss()

        self.index = open_shards(paths, mmap=True)
        ivf = faiss.extract_index_ivf(_shard_parts(self.index)[0])
        self.info = dict(info, d=int(self.index.d), nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
        self._handler = _make_server_class()
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(16)
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._closed = False

    def serve_forever(self) -> None:
        """Accept connections, each answered in its own thread by FAISS's ``exec_loop``."""
        while not self._closed:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                raise
            LOG.debug("shard client connected from %s", addr)
            self._conns.append(conn)
            handler = self._handler(conn, self.index, self.info)
            threading.Thread(target=handler.exec_loop, daemon=True, name=f"shard-client-{addr}").start()

    def close(self) -> None:
        self._closed = True
        for s in [self._sock, *self._conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def parse_servers(text: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"host1:9100,host2:9100"`` (or a list of ``HOST:PORT``) as ``(host, port)``
    pairs; ``[::1]:9100`` for IPv6. Raises ``ValueError`` on anything else."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not a HOST:PORT address: {item!r} (example: 10.0.0.5:9100)")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("no shard servers given (example: 10.0.0.5:9100,10.0.0.6:9100)")
    return out


def _name(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[-1] if text else type(exc).__name__
    if isinstance(exc, EOFError):
        reason = "connection lost (the server closed it)"
    elif isinstance(exc, ConnectionError):
        reason = f"connection lost ({exc.strerror or reason})"
    return reason


class _Named:
    """An ``rpc.Client`` whose failures are :class:`RemoteError` naming its server."""

    def __init__(self, addr: tuple[str, int], client: Any) -> None:
        self.addr = addr
        self.client = client

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            try:
                return self.client.generic_fun(name, args)
            except Exception as exc:
                raise RemoteError(f"shard server {_name(self.addr)}: {_reason(exc)}") from None

        return call


def _check_infos(infos: Sequence[tuple[tuple[str, int], dict[str, Any]]], expect: dict[str, Any] | None) -> None:
    """Every server from the same build (and ``expect``'s, when given), every
    shard served exactly once: else a :class:`RemoteError` saying which."""
    first_addr, first = infos[0]
    want = dict(expect) if expect is not None else {k: first.get(k) for k in ("build", "of")}
    for addr, info in infos:
        for key, value in want.items():
            if info.get(key) != value:
                raise RemoteError(f"shard server {_name(addr)} serves {key} {info.get(key)!r}, not {value!r} "
                                  f"(restart it on the current index: crossfind serve-shards)")
    served = sorted(s for _, info in infos for s in info["shards"])
    total = int(first["of"])
    if served != list(range(total)):
        missing = sorted(set(range(total)) - set(served))
        twice = sorted({s for s in served if served.count(s) > 1})
        raise RemoteError(f"the shard servers hold shards {served} of {total}"
                          + (f"; missing {missing}" if missing else "") + (f"; served twice {twice}" if twice else ""))


class RemoteShards:
    """The shards on ``servers`` searched as one index through FAISS's
    ``ClientIndex`` (one connection a server, its ``ResultHeap`` merging).

    Quacks like the FAISS index :class:`~retrieval.index.compressed.CompressedIndex`
    needs (``d``, ``ntotal``, ``search``) plus ``search_filtered`` and
    ``set_nprobe`` (server-wide: every client of a server shares it). ``expect``:
    the ``build`` and ``of`` (shard count) every server must report. A failure
    raises :class:`RemoteError` and drops the connections; the next call reconnects.
    """

    remote = True

    def __init__(self, servers: Sequence[tuple[str, int]], expect: dict[str, Any] | None = None) -> None:
        self.servers = [(str(h), int(p)) for h, p in servers]
        self.expect = expect
        self._lock = threading.Lock()
        self._client: Any = None
        self._nprobe: int | None = None
        self.info: dict[str, Any] = {}
        self._connect()

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        for addr in self.servers:  # rpc.Client has no timeout: find an unreachable server here, by name
            try:
                socket.create_connection(addr, timeout=CONNECT_TIMEOUT).close()
            except OSError as exc:
                raise RemoteError(f"shard server {_name(addr)}: {exc.strerror or exc} (is crossfind serve-shards running there?)") from None
        try:
            client = _contrib().ClientIndex(self.servers)
        except Exception as exc:
            raise RemoteError(f"shard servers {', '.join(map(_name, self.servers))}: {_reason(exc)}") from None
        client.sub_indexes = [_Named(a, s) for a, s in zip(self.servers, client.sub_indexes)]
        for sub in client.sub_indexes:
            sub.client.sock.settimeout(CALL_TIMEOUT)
        self._client = client
        try:
            infos = list(zip(self.servers, client.pool.map(lambda s: s.get_info(), client.sub_indexes)))
            _check_infos(infos, self.expect)
            if self._nprobe is not None:
                client.set_nprobe(self._nprobe)
        except RemoteError:
            self.close()
            raise
        self.info = dict(infos[0][1], ntotal=sum(int(i["ntotal"]) for _, i in infos))
        return client

    @property
    def d(self) -> int:
        return int(self.info["d"])

    @property
    def ntotal(self) -> int:
        return int(self.info["ntotal"])

    @property
    def nlist(self) -> int:
        return int(self.info["nlist"])

    @property
    def nprobe(self) -> int:
        return self._nprobe if self._nprobe is not None else int(self.info["nprobe"])

    def _call(self, fn: Any) -> Any:
        with self._lock:
            try:
                return fn(self._connect())
            except RemoteError:
                self.close()
                raise

    def set_nprobe(self, nprobe: int) -> None:
        self._nprobe = int(nprobe)
        self._call(lambda c: c.set_nprobe(int(nprobe)))

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest (L2) of every server's shards, merged by ``faiss.ResultHeap``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self._call(lambda c: c.search(x, int(k)))  # type: ignore[no-any-return]

    def search_filtered(self, x: np.ndarray, n: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:func:`filtered_candidates` on every server, merged by ``faiss.ResultHeap``."""
        faiss = _faiss()

        x = np.ascontiguousarray(x, dtype=np.float32)
        allowed = np.unique(np.asarray(allowed, np.int64))

        def run(c: Any) -> tuple[np.ndarray, np.ndarray]:
            heap = faiss.ResultHeap(len(x), int(n))
            for d, i in c.pool.imap(lambda s: s.search_filtered(x, int(n), allowed), c.sub_indexes):
                heap.add_result(d, i)
            heap.finalize()
            return heap.D, heap.I

        return self._call(run)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the connections (and the client's thread pool)."""
        client, self._client = self._client, None
        if client is None:
            return
        client.pool.terminate()
        for sub in client.sub_indexes:
            try:
                sub.client.sock.close()
            except OSError:
                pass

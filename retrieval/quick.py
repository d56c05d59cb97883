"""The quick path of a one-off text search from the command line.

A ``crossfind search "TEXT"`` process spends most of its time starting up:
importing SQLAlchemy and the store's mapped classes takes longer than
encoding the text and searching. For the common case (a text query, no
filters or weighted terms, nothing to re-rank, a SQLite library whose index
file is in step with its store) :func:`quick_search` does the search with
:mod:`sqlite3`, ONNX Runtime and FAISS alone. It makes the checks the engine
makes on that path (schema revision, the model's weights fingerprint, the
index file's generation, library id and vector count), searches the same
memory-mapped index the same way, and writes the same history rows, so the
result and ``crossfind history``/``show`` are what the engine gives.

Anything else (a database URL, an image or terms, filters, ``--dedup``,
``--threshold``, a reranker to run, a compressed or sharded index, an index
behind its store, a read-only library, a schema to upgrade, a model without
an ONNX export yet) returns None before anything is written, and the caller
searches through :class:`retrieval.Engine`, which handles and reports all of
it. ``CROSSFIND_QUICK=0`` always takes that path.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .encoders import ModelSpec, parse_spec, weights_fingerprint
from .paths import is_utf8
from .types import Hit, SearchQuery, SearchResult

#: As the store waits for a writer's lock (``store.BUSY_TIMEOUT_MS``).
BUSY_TIMEOUT_S = 30.0
#: Ids per ``IN (...)`` list.
CHUNK = 500


@dataclass(frozen=True)
class Plan:
    """What the quick path found in the library before searching."""

    library: Path
    spec: ModelSpec
    model_id: int
    dim: int
    export: Path  # the model's ONNX export folder
    kept: np.ndarray | None  # the text's vector, kept in the history by an earlier search
    notes: tuple[str, ...]


def enabled() -> bool:
    return os.environ.get("CROSSFIND_QUICK", "1").lower() not in ("0", "false", "no", "off")


def plain(query: SearchQuery) -> bool:
    """Whether ``query`` is a text and nothing more, which this path answers."""
    text = query.text
    return (
        text is not None and bool(text.strip()) and "\x00" not in text and is_utf8(text)
        and query.image is None and not query.terms and query.k >= 1
        and query.path_glob is None and query.since is None and query.until is None and query.corpus is None
        and not query.dedup and query.threshold is None and query.reranker is None
        and query.target in ("images", "texts")
    )


def quick_search(library: str | os.PathLike[str] | None, db: str | None, query: SearchQuery,
                 model: str | None = None) -> SearchResult | None:
    """Run ``query`` as :meth:`retrieval.Engine.search` would in the library
    ``library`` (``db``: the ``--db`` value), or return None when it is not the
    case this path answers (see the module docstring); then nothing was written.
    Made for a process that runs one search: it leaves FAISS on one thread."""
    t0 = time.perf_counter()
    if not enabled() or not plain(query):
        return None
    from .locations import database, default_database, library_dir

    if (database(db) if db is not None else default_database()) is not None:
        return None
    if library is not None and not os.fspath(library).strip():
        return None  # the engine says what is wrong with it
    try:
        lib = library_dir(library)
    except (OSError, RuntimeError):
        return None
    path = lib / "library.db"
    if not (path.is_file() and os.access(lib, os.W_OK) and os.access(path, os.W_OK)) or (lib / "store.json").exists():
        return None
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        con.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA synchronous=NORMAL")
        try:
            found = _find(con, lib, query, model, t0)
        except Exception:  # noqa: BLE001 - only a shortcut: the engine meets, and reports, whatever this was
            return None
        if found is None:
            return None
        plan, hits, vector, timings = found
        notes = list(plan.notes)
        seconds = time.perf_counter() - t0
        qid = _record(con, plan, query, hits, vector, seconds, notes)
        qjson = {"text": query.text, "image": None, "target": query.target}
        return SearchResult(qid, qjson, plan.spec.spec, False, hits, seconds, timings, tuple(notes))
    finally:
        con.close()


def _find(con: sqlite3.Connection, lib: Path, query: SearchQuery, model: str | None,
          t0: float) -> tuple[Plan, list[Hit], np.ndarray, dict[str, float]] | None:
    """The hits of ``query``, or None when the engine must answer."""
    plan = _plan(con, lib, query, model)
    if plan is None:
        return None
    encoded = _encode_meanwhile(plan, query.text or "") if plan.kept is None else None
    index = _index(con, plan, query.target)
    if index is None:
        return None
    raw = encoded() if encoded is not None else plan.kept
    if raw is None:
        return None
    v = np.sum([1.0 * raw], axis=0).astype(np.float32)  # as QueryEncoder.vector combines one part
    norm = float(np.linalg.norm(v))
    if norm < 1e-8:
        return None
    t1 = time.perf_counter()
    import faiss

    faiss.omp_set_num_threads(1)  # one query: starting OpenMP's threads cost more (13 ms at 50 vectors) than they save
    res = index.search(v / norm, query.k)
    ids = [int(i) for i in res.ids[0] if i >= 0][: query.k]
    dual = {int(i): float(s) for i, s in zip(res.ids[0], res.scores[0]) if i >= 0}
    rows = _rows(con, query.target, ids)
    hits = [
        Hit(rank, "image", i, rows[i][0], None, dual[i]) if query.target == "images"
        else Hit(rank, "text", i, None, rows[i][0], dual[i], None, rows[i][1])
        for rank, i in enumerate((i for i in ids if i in rows), 1)
    ]
    return plan, hits, raw, {"encode": t1 - t0, "index": time.perf_counter() - t1}


def _encode_meanwhile(plan: Plan, text: str) -> Callable[[], np.ndarray]:
    """Start encoding ``text`` in a thread; the returned call waits for its vector.

    The thread imports ONNX Runtime, loads the text session (one thread, no
    prepacking: :func:`retrieval.onnx_runtime.preload_export`) and the
    tokenizer, and runs the tower, which ONNX Runtime does without the GIL,
    while this thread imports FAISS and maps the index."""
    import threading

    from .onnx_runtime import OnnxEncoder, preload_export

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            preload_export(plan.export, ("text",))
            out["vector"] = OnnxEncoder(plan.export, plan.spec).encode_texts([text])[0]
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="crossfind-encode", daemon=True)
    thread.start()

    def result() -> np.ndarray:
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["vector"]

    return result


def _setting(con: sqlite3.Connection, key: str) -> str | None:
    row = con.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _plan(con: sqlite3.Connection, lib: Path, query: SearchQuery, model: str | None) -> Plan | None:
    """Engine.open's and Searcher.search's checks, as queries (None: not this path's case)."""
    from .onnx_runtime import MANIFEST, export_key, find_export, onnx_enabled
    from .rerank_files import reranker_dir
    from .revision import head_revision

    versions = con.execute("SELECT version_num FROM alembic_version").fetchall()
    if len(versions) != 1 or versions[0][0] != head_revision() or not onnx_enabled(None):
        return None
    spec_text = model if model is not None else _setting(con, "default_model")
    if not spec_text:
        return None
    ms = parse_spec(spec_text)
    row = con.execute("SELECT id, dim FROM models WHERE spec = ?", (ms.spec,)).fetchone()
    fingerprint = weights_fingerprint(ms)
    if row is None or (fingerprint is not None and _setting(con, f"weights:{ms.spec}") != fingerprint):
        return None  # nothing indexed, or weights changed: the engine says so, or drops the old vectors
    notes: tuple[str, ...] = ()
    if query.target == "images" and query.rerank:
        if _setting(con, f"reranker:{ms.spec}") not in (None, "", "default") or reranker_dir(ms) is not None:
            return None  # re-ranked: the engine
        notes = (f"model {ms.spec} has no reranker; results are ranked by the dual encoder alone",)
    export = find_export(lib, ms, export_key(ms, fingerprint))
    if export is None or not json.loads((export / MANIFEST).read_text()).get("text"):
        return None
    kept = con.execute(
        "SELECT text_vector FROM queries WHERE model = ? AND text = ? AND text_vector IS NOT NULL ORDER BY id DESC LIMIT 1",
        (ms.spec, query.text),
    ).fetchone()
    vector = np.frombuffer(kept[0], np.float32).copy() if kept is not None and len(kept[0]) == 4 * row[1] else None
    return Plan(lib, ms, int(row[0]), int(row[1]), export, vector, notes)


def _index(con: sqlite3.Connection, plan: Plan, kind: str) -> Any:
    """``kind``'s saved index memory-mapped, when it is the one the engine would
    search (see ``IndexFiles.mappable``); else None."""
    from .index import VectorIndex

    folder = plan.library / "models" / plan.spec.slug
    if (folder / f"{kind}.pq.json").exists() or _setting(con, f"shard-servers:{plan.spec.spec}:{kind}"):
        return None  # a compressed index, or shard servers: the engine
    try:
        side = json.loads((folder / f"{kind}.generation").read_text())
    except (OSError, ValueError):
        return None
    saved = _setting(con, f"generation:{plan.spec.spec}:{kind}")
    if not (isinstance(side, dict) and saved is not None and side.get("generation") == saved
            and side.get("library") == (_setting(con, "library_id") or "") and (folder / f"{kind}.faiss").is_file()):
        return None
    index = VectorIndex.open(folder / f"{kind}.faiss", plan.dim, mmap=True)
    table = "image_vectors" if kind == "images" else "text_vectors"
    (count,) = con.execute(f"SELECT COUNT(*) FROM {table} WHERE model_id = ?", (plan.model_id,)).fetchone()
    return index if len(index) == count else None


def _rows(con: sqlite3.Connection, target: str, ids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
    """id -> (path,) of images or (text, corpus) of texts; paths as the store keeps them."""
    out: dict[int, tuple[Any, ...]] = {}
    for s in range(0, len(ids), CHUNK):
        part = list(ids[s : s + CHUNK])
        marks = ",".join("?" * len(part))
        if target == "images":
            for i, raw in con.execute(f"SELECT id, CAST(path AS BLOB) FROM images WHERE id IN ({marks})", part):
                out[int(i)] = (bytes(raw).decode("utf-8", "surrogateescape"),)
        else:
            for i, text, corpus in con.execute(f"SELECT id, text, corpus FROM texts WHERE id IN ({marks})", part):
                out[int(i)] = (text, corpus)
    return out


def _stored_path(path: str | None) -> str | bytes | None:
    """A path as the store binds it: text, or raw bytes for a name that is not UTF-8."""
    if path is None or is_utf8(path):
        return path
    return path.encode("utf-8", "surrogateescape")


def _record(con: sqlite3.Connection, plan: Plan, query: SearchQuery, hits: list[Hit], vector: np.ndarray,
            seconds: float, notes: list[str]) -> int | None:
    """The rows ``Searcher.record`` writes (a JSON ``null`` for no terms or
    filters, as SQLAlchemy stores it); the query id, or None with a note when
    the library cannot be written."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    try:
        con.execute("BEGIN")
        cur = con.execute(
            "INSERT INTO queries (created_at, model, text, image_path, target, terms, filters, k, candidates, reranked,"
            " seconds, text_vector, text_tokens) VALUES (?, ?, ?, NULL, ?, 'null', 'null', ?, ?, 0, ?, ?, NULL)",
            (now, plan.spec.spec, query.text, query.target, query.k, query.candidates, seconds,
             np.ascontiguousarray(vector, np.float32).tobytes()),
        )
        qid = int(cur.lastrowid or 0)
        con.executemany(
            "INSERT INTO results (query_id, rank, kind, item_id, path, text, score, rerank_score)"
            " VALUES (?, ?, ?, ?, CAST(? AS TEXT), ?, ?, NULL)",
            [(qid, h.rank, h.kind, h.id, _stored_path(h.path), h.text, h.score) for h in hits],
        )
        con.execute("COMMIT")
        return qid
    except sqlite3.Error as exc:
        if con.in_transaction:
            con.execute("ROLLBACK")
        from .errors import write_failure

        notes.append(f"this search was not added to the history: {write_failure(exc) or str(exc).splitlines()[0]}")
        return None

"""The store on SQLite and on PostgreSQL, side by side, for a small library.

Generates ``--n`` shapes scenes (the ``crossfind demo`` data), then for each
store: indexes them with ``shapes-tiny`` (torch encoders, ``CROSSFIND_ONNX=0``,
so both runs encode the same way), indexes again (nothing changed: the scan
against the store's rows), opens the library and runs a first search, then
``--queries`` text searches (each different, recorded in the history), the
same searches repeated (their text vectors and tokens come from
the history), each with and without re-ranking, and ``status``. The
dual-encoder search of a repeated text is almost all store and FAISS: its
vector comes from the history, its hits' rows from the store, and it is
recorded in the history. PostgreSQL is the server at ``--db``, else a
throwaway one started like the tests' (Debian's ``postgresql`` package; on a
unix socket, ``fsync`` on).

    python scripts/bench_postgres.py --n 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import machine, say

REPO = Path(__file__).resolve().parents[1]
QUERIES = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "purple") for s in ("circle", "square", "triangle", "star")]


def run(lib: Path, scenes: Path, db: str | None, queries: int) -> dict[str, Any]:
    from retrieval import Engine, SearchQuery

    out: dict[str, Any] = {}
    t = time.perf_counter()
    with Engine.open(lib, model="shapes-tiny", db=db or "sqlite") as eng:
        rep = eng.index_folder(scenes)
        assert rep.failed == 0 and rep.added > 0
    out["index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with Engine.open(lib, model="shapes-tiny", db=db or "sqlite") as eng:
        rep = eng.index_folder(scenes)
        assert rep.unchanged == rep.scanned
    out["reindex_unchanged_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with Engine.open(lib, model="shapes-tiny", db=db or "sqlite") as eng:
        first = eng.search_text("a red circle left of a blue square", k=10)
        out["open_and_first_search_s"] = time.perf_counter() - t
        qs = (QUERIES * (queries // len(QUERIES) + 1))[:queries]
        for rerank in (False, True):
            texts = [f"{q} number {i} {'reranked' if rerank else 'plain'}" for i, q in enumerate(qs)]
            for label, rounds in (("new", texts), ("repeated", texts)):
                times = []
                for q in rounds:
                    t = time.perf_counter()
                    eng.search(SearchQuery(text=q, k=10, rerank=rerank))
                    times.append(time.perf_counter() - t)
                out[f"search_{'rerank' if rerank else 'dual'}_{label}_ms"] = statistics.median(times) * 1000
        t = time.perf_counter()
        for _ in range(10):
            st = eng.status()
        out["status_ms"] = (time.perf_counter() - t) * 100
        from sqlalchemy import text

        with eng.store.engine.connect() as con:  # one statement's round trip, for scale
            t = time.perf_counter()
            for _ in range(200):
                con.execute(text("SELECT 1")).all()
            out["select_1_ms"] = (time.perf_counter() - t) * 1000 / 200
        out["images"] = st["images_ok"]
        out["top_hit"] = first[0].path.rsplit("/", 1)[-1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="shapes scenes to index")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--db", help="a PostgreSQL database URL (default: start a throwaway server)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/crossfind-pg-bench"))
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    os.environ["CROSSFIND_ONNX"] = "0"
    from retrieval.shapes import generate

    scenes = args.work / f"scenes-{args.n}"
    if not (scenes / ".complete").exists():
        shutil.rmtree(scenes, ignore_errors=True)
        generate(scenes, args.n, 7)
        (scenes / ".complete").write_text("")
    server = None
    db = args.db
    if db is None:
        sys.path.insert(0, str(REPO / "tests"))
        from pgserver import PgServer

        server = PgServer(fsync=True)
        db = server.new_database()
    try:
        results = {}
        for name, url in (("sqlite", None), ("postgresql", db)):
            lib = args.work / f"lib-{name}"
            shutil.rmtree(lib, ignore_errors=True)
            say(f"{name} ...")
            results[name] = {k: round(v, 3) if isinstance(v, float) else v for k, v in run(lib, scenes, url, args.queries).items()}
            say(json.dumps(results[name]))
    finally:
        if server is not None:
            server.stop()
    report = {"n": args.n, "queries": args.queries, "results": results, "load_avg_end": os.getloadavg(), "machine": machine()}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

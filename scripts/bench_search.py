#!/usr/bin/env python
"""Search latency at large library sizes, IVF recall, and text-corpus throughput.

``build``: libraries of N synthetic images (and one of N texts) with clustered
unit vectors that resemble CLIP embeddings (see ``bench_common.clustered_vectors``),
made without encoding anything: rows straight into the store, vectors into the
model's ``VectorIndex`` in chunks as indexing would add them, index saved.

``run`` (the default): for each size, a fresh process (``time-search``) opens
the library and runs ``Engine.search`` for a text query (k=10, no reranker)
once to warm up and then ``--queries`` times; reported are the medians of
``timings["encode"]`` (text tower), ``timings["index"]`` (FAISS search + SQLite
row fetch) and the whole call, plus the cold first search (which loads the
index). Then recall@10 of the largest index against exact search (FAISS
``IndexFlatIP``) on 100 fresh queries from the same distribution; image->text
search latency over a 100k-text corpus; and ``add_texts`` throughput for a
20k-line ``.txt`` corpus.

Example::

    python scripts/bench_search.py --sizes 10000,1000000 --corpus 100000 --add-texts 20000
    python scripts/bench_search.py --sizes 2000,60000 --corpus 60000 --add-texts 300 --queries 5   # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import WORK, Monitor, caption, clustered_queries, clustered_vectors, fill_library, gen_jpegs, machine, median, random_model, say, wait_quiet, write_json

QUERY = "a photo of a dog playing on the beach"


def lib_dir(kind: str, n: int, arch: str) -> Path:
    return WORK / "libraries" / f"{arch}-{kind}-n{n}"


def time_search(lib: Path, spec: str, target: str, queries: int, image: str | None = None) -> dict:
    """In this process: a cold search, then ``queries`` timed searches (median)."""
    from retrieval import Engine
    from retrieval.types import SearchQuery

    nonce = time.time_ns()  # query texts never seen before: the engine reuses embeddings from its history
    t0 = time.perf_counter()
    with Engine.open(lib, model=spec) as eng:
        enc = eng.encoder  # model load is not part of a search's cost here
        load_model = time.perf_counter() - t0
        q = SearchQuery(text=None if image else f"{QUERY} {nonce}", image=image, k=10, target=target, rerank=False)
        t = time.perf_counter()
        first = eng.search(q)
        cold_wall = time.perf_counter() - t
        vi = eng.state().images if target == "images" else eng.state().texts
        n, kind, nprobe = len(vi), vi.kind, vi.nprobe
        nlist = int(vi._ivf().nlist) if kind == "ivf" else None
        runs = []
        for i in range(queries):
            qi = SearchQuery(text=None if image else f"{QUERY} {i} {nonce}", image=image, k=10, target=target, rerank=False)
            t = time.perf_counter()
            res = eng.search(qi)
            wall = time.perf_counter() - t
            assert len(res.hits) == 10, res.hits
            runs.append((res.timings["encode"], res.timings["index"], res.seconds, wall))
        # The same searches with query vectors drawn from the library's own
        # distribution: they land in its dense regions (big inverted lists),
        # which random-weight text embeddings do not.
        # (Handed over as the cached embedding of a text never asked before.)
        data_runs = []
        for i, v in enumerate(clustered_queries(queries, vi.dim, seed=0)):
            text = f"vector query {i} {nonce}"
            eng.searcher.queries.remember(text, v)
            res = eng.search(SearchQuery(text=text, k=10, target=target, rerank=False))
            assert len(res.hits) == 10, res.hits
            data_runs.append(res.timings["index"])
        del enc
    return {
        "n": n,
        "index_kind": kind,
        "nlist": nlist,
        "nprobe": nprobe,
        "model_load_s": load_model,
        "cold_first_search_s": cold_wall,
        "cold_first_index_s": first.timings["index"],
        "encode_ms": 1000 * median(r[0] for r in runs),
        "index_ms": 1000 * median(r[1] for r in runs),
        "index_ms_max": 1000 * max(r[1] for r in runs),
        "index_ms_data_queries": 1000 * median(data_runs),
        "index_ms_data_queries_max": 1000 * max(data_runs),
        "search_ms": 1000 * median(r[2] for r in runs),
        "wall_ms_incl_history": 1000 * median(r[3] for r in runs),
        "queries": queries,
    }


def recall(lib: Path, spec: str, n: int, nq: int = 100, k: int = 10) -> dict:
    """recall@k of the saved image index against exact inner-product search."""
    import faiss

    from retrieval.index import VectorIndex
    from retrieval.encoders import parse_spec

    path = lib / "models" / parse_spec(spec).slug / "images.faiss"
    index = VectorIndex.load(path)
    xb = clustered_vectors(n, index.dim, seed=0)
    ids = np.arange(1, n + 1, dtype=np.int64)  # rows were inserted into a fresh store: ids 1..n in order
    xq = clustered_queries(nq, index.dim, seed=0)
    flat = faiss.IndexFlatIP(index.dim)
    flat.add(xb)
    _, exact = flat.search(xq, k)
    exact_ids = ids[exact]
    t = time.perf_counter()
    got = index.search(xq, k).ids
    batch_s = time.perf_counter() - t
    single = []
    for row in xq[:20]:
        t = time.perf_counter()
        index.search(row, k)
        single.append(time.perf_counter() - t)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, exact_ids))
    ivf = index._ivf()
    return {
        "n": len(index),
        "kind": index.kind,
        "nlist": int(ivf.nlist) if ivf is not None else None,
        "nprobe": index.nprobe,
        "recall_at_10": hits / (nq * k),
        "queries": nq,
        "faiss_search_ms_single": 1000 * median(single),
        "faiss_search_ms_batch_per_query": 1000 * batch_s / nq,
    }


def add_texts(spec: str, n: int) -> dict:
    """``Engine.add_texts`` on an ``n``-line .txt into a fresh library (encoder loaded first)."""
    import shutil
    import tempfile

    from retrieval import Engine

    work = Path(tempfile.mkdtemp(prefix="addtexts-", dir=WORK))
    try:
        txt = work / "captions.txt"
        txt.write_text("".join(caption(i) + "\n" for i in range(n)))
        with Engine.open(work / "lib", model=spec) as eng:
            t = time.perf_counter()
            eng.encoder
            load = time.perf_counter() - t
            rep = eng.add_texts(txt)
        return {"n": n, "added": rep.added, "seconds": rep.seconds, "texts_per_s": rep.added / rep.seconds, "model_load_s": load}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def child(args: argparse.Namespace, fn: str, *extra: str) -> dict:
    """Run ``fn`` of this script in a fresh process; its JSON result, plus the CPU others used meanwhile."""
    cmd = [sys.executable, __file__, fn, "--arch", args.arch, *extra]
    if args.probe_fraction:
        cmd += ["--probe-fraction", str(args.probe_fraction)]
    with Monitor() as mon:
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{fn} failed (rc={out.returncode})")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["others"] = mon.report()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", nargs="?", default="run", choices=["run", "build", "time-search", "recall", "add-texts"])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights")
    p.add_argument("--sizes", default="10000,1000000", help="image library sizes")
    p.add_argument("--corpus", type=int, default=100_000, help="texts in the image->text corpus (0 to skip)")
    p.add_argument("--add-texts", type=int, default=20_000, help="lines of the add-texts corpus (0 to skip)")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--no-recall", action="store_true")
    p.add_argument("--wait-minutes", type=float, default=0)
    p.add_argument("--json", default=None)
    # time-search / recall
    p.add_argument("--lib", default=None)
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--target", default="images")
    p.add_argument("--image", default=None)
    p.add_argument("--probe-fraction", type=float, default=None, help="override index.IVF_PROBE_FRACTION (before/after comparisons)")
    args = p.parse_args(argv)
    spec = random_model(args.arch)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]

    if args.probe_fraction:
        import index

        index.IVF_PROBE_FRACTION = args.probe_fraction
    if args.cmd == "time-search":
        print(json.dumps(time_search(Path(args.lib), spec, args.target, args.queries, args.image)))
        return
    if args.cmd == "recall":
        print(json.dumps(recall(Path(args.lib), spec, args.n)))
        return
    if args.cmd == "add-texts":
        print(json.dumps(add_texts(spec, args.n)))
        return

    builds = {}
    for n in sizes:
        builds[f"images_{n}"] = fill_library(lib_dir("images", n, args.arch), spec, n, "images")
    if args.corpus:
        builds[f"texts_{args.corpus}"] = fill_library(lib_dir("texts", args.corpus, args.arch), spec, args.corpus, "texts")
    if args.cmd == "build":
        write_json(args.json, builds)
        return

    quiet = wait_quiet(args.wait_minutes) if args.wait_minutes else None
    out: dict = {"machine": machine(), "quiet": quiet, "model": spec, "arch": args.arch, "builds": builds, "search": {}}
    for n in sizes:
        say(f"timing text->image search over {n} vectors")
        out["search"][f"images_{n}"] = r = child(args, "time-search", "--lib", str(lib_dir("images", n, args.arch)), "--queries", str(args.queries))
        say(f"  encode {r['encode_ms']:.1f} ms, index+metadata {r['index_ms']:.2f} ms ({r['index_kind']}), cold first {r['cold_first_search_s']:.2f}s")
    if not args.no_recall and sizes:
        n = max(sizes)
        say(f"recall@10 of the {n}-vector index against exact search")
        out["recall"] = r = child(args, "recall", "--lib", str(lib_dir("images", n, args.arch)), "--n", str(n))
        say(f"  recall@10 {r['recall_at_10']:.3f} (nlist {r['nlist']}, nprobe {r['nprobe']}), {r['faiss_search_ms_single']:.2f} ms")
    if args.corpus:
        img = next(gen_jpegs(4, "small").glob("*.jpg"))
        say(f"timing image->text search over {args.corpus} texts")
        out["search"][f"texts_{args.corpus}"] = r = child(
            args, "time-search", "--lib", str(lib_dir("texts", args.corpus, args.arch)), "--target", "texts", "--image", str(img), "--queries", str(args.queries)
        )
        say(f"  encode {r['encode_ms']:.1f} ms, index+metadata {r['index_ms']:.2f} ms ({r['index_kind']})")
    if args.add_texts:
        say(f"add-texts of {args.add_texts} lines")
        out["add_texts"] = r = child(args, "add-texts", "--n", str(args.add_texts))
        say(f"  {r['texts_per_s']:.1f} texts/s")
    out["busy_after"] = machine()["busy"]

    print(f"{args.arch} random weights, CPU; k=10, median of {args.queries} searches after 1 warm-up, fresh process per library")
    print(f"{'library':<16} {'kind':>5} {'nlist':>6} {'nprobe':>6} {'encode ms':>10} {'index+meta ms':>14} {'(data queries)':>15} {'search ms':>10} {'cold first s':>13}")
    for key, r in out["search"].items():
        print(f"{key:<16} {r['index_kind']:>5} {str(r['nlist'] or '-'):>6} {r['nprobe']:>6} {r['encode_ms']:>10.1f} {r['index_ms']:>14.2f} {r['index_ms_data_queries']:>15.2f} {r['search_ms']:>10.1f} {r['cold_first_search_s']:>13.2f}")
    if "recall" in out:
        r = out["recall"]
        print(f"recall@10 at {r['n']}: {r['recall_at_10']:.3f} ({r['kind']}, nlist {r['nlist']}, nprobe {r['nprobe']}; {r['queries']} queries)")
    if "add_texts" in out:
        r = out["add_texts"]
        print(f"add-texts {r['n']} lines: {r['seconds']:.1f}s = {r['texts_per_s']:.1f} texts/s")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()

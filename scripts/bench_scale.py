#!/usr/bin/env python
"""The compressed index at 10M vectors: build time, memory, disk, latency, recall@10.

``build``: ``--n`` synthetic CLIP-like unit vectors (``bench_common``'s
generator, drawn chunk by chunk so the process never holds them all) go
through :class:`retrieval.index.compressed.CompressedIndex.build` with the plan
``plan_index(n, dim, --memory)`` picks: trained on a fresh sample of the same
distribution, added in chunks, float16 sidecar written alongside. While the
chunks stream past, the exact top-10 of ``--queries`` fresh queries is kept
with FAISS's ``ResultHeap`` (ground truth without a second pass). Reported:
build seconds by phase, peak RSS of the build process, bytes on disk.

``query`` (run by ``build`` in a fresh process): opens the index memory-mapped
and searches the queries one at a time (single thread) for each ``--nprobe`` x
``--rescore`` setting: median and p95 latency, median CPU time of the
searching thread (what a query costs when the machine is shared), recall@10 against the exact
top-10, and the query process's peak RSS (``ru_maxrss``) and its anonymous
and file-backed parts (``/proc/self/status``).

Example::

    nice -n 10 python scripts/bench_scale.py build --n 10000000 --memory 4G --out /work/runs/scale/n10m
    nice -n 10 python scripts/bench_scale.py build --n 1000000 --memory 200M --out /work/runs/scale/n1m   # trial
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import _draw, say

HERE = Path(__file__).resolve().parent


def layout(dim: int, clusters: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cluster layout of ``bench_common.clustered_vectors(..., seed)``."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(clusters, 2.0))
    return mean, centres, weights


def stream(n: int, dim: int, chunk: int, seed: int = 0):
    """The vectors of ``clustered_vectors(n, dim, seed=seed, chunk=chunk)``, chunk by chunk."""
    mean, centres, weights = layout(dim, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for start in range(0, n, chunk):
        yield _draw(min(chunk, n - start), mean, centres, weights, rng, chunk)


def fresh(n: int, dim: int, query_seed: int) -> np.ndarray:
    mean, centres, weights = layout(dim)
    return _draw(n, mean, centres, weights, np.random.default_rng(query_seed), 100_000)


def rss() -> dict:
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key + "_gib"] = int(val.split()[0]) / 2**20
    return out


def build(args: argparse.Namespace) -> None:
    import faiss

    from retrieval.index.compressed import CompressedIndex, plan_index

    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_index(args.n, args.dim, args.memory)
    if args.factory:
        from dataclasses import replace

        plan = replace(plan, factory=args.factory, kind="ivfpq")
    say(f"plan: {plan}")
    queries = fresh(args.queries, args.dim, 12345)
    sample = fresh(args.train, args.dim, 777)
    heap = faiss.ResultHeap(len(queries), 10, keep_max=True)
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    times = {"generate_and_truth_s": 0.0}
    done = 0

    def chunks():
        nonlocal done
        for x in stream(args.n, args.dim, args.chunk):
            t = time.perf_counter()
            heap.add_result(queries @ x.T, np.broadcast_to(ids[done : done + len(x)], (len(queries), len(x))).copy())
            times["generate_and_truth_s"] += time.perf_counter() - t
            done += len(x)
            if True:
                say(f"  added {done}/{args.n} ({time.perf_counter() - t0:.0f} s)")
            yield x

    t0 = time.perf_counter()
    say("training and adding")
    CompressedIndex.build(plan, ids, chunks(), out / "images", sample, shards=args.shards)
    total = time.perf_counter() - t0
    heap.finalize()
    np.save(out / "queries.npy", queries)
    np.save(out / "truth.npy", heap.I)
    disk = {p.name: p.stat().st_size for p in out.iterdir() if p.name.startswith("images")}
    result = {
        "n": args.n, "dim": args.dim, "memory": args.memory, "plan": plan.__dict__, "shards": args.shards,
        "train_vectors": args.train, "build_s": total, **times, "build_process": rss(), "disk_bytes": disk,
        "disk_gib_index": sum(v for k, v in disk.items() if k.endswith(".faiss")) / 2**30,
        "disk_gib_sidecar": sum(v for k, v in disk.items() if k.endswith(".npy")) / 2**30,
        "machine": {"cpu": next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if ln.startswith("Model name")), "?"),
                    "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }
    say(json.dumps(result, indent=1, default=str))
    q = subprocess.run(
        [sys.executable, str(Path(__file__)), "query", "--out", str(out), "--nprobe", args.nprobe, "--rescore", args.rescore],
        check=True, capture_output=True, text=True,
    )
    result["query"] = json.loads(q.stdout)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))


def query(args: argparse.Namespace) -> None:
    import faiss

    from retrieval.index.compressed import CompressedIndex

    faiss.omp_set_num_threads(1)
    out = Path(args.out)
    t = time.perf_counter()
    index = CompressedIndex.open(out / "images", mmap=True)
    open_s = time.perf_counter() - t
    queries = np.load(out / "queries.npy")
    truth = np.load(out / "truth.npy")
    rows = []
    for nprobe in [int(x) for x in args.nprobe.split(",")]:
        index.set_nprobe(nprobe)
        for factor in [int(x) for x in args.rescore.split(",")]:
            index.rescore_factor = factor
            index.search(queries[:5], 10)  # warm the quantizer's pages
            lat, cpu, hits = [], [], 0
            for q, gt in zip(queries, truth):
                t, c = time.perf_counter(), time.thread_time()
                got = index.search(q[None, :], 10).ids
                lat.append(time.perf_counter() - t)
                cpu.append(time.thread_time() - c)
                hits += len(set(got[0].tolist()) & set(gt.tolist()))
            lat_ms = np.array(lat) * 1000
            rows.append({"nprobe": nprobe, "rescore_candidates": 10 * factor, "recall_at_10": hits / (10 * len(queries)),
                         "median_ms": float(np.median(lat_ms)), "p95_ms": float(np.percentile(lat_ms, 95)),
                         "median_cpu_ms": float(np.median(cpu) * 1000)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"open_s": open_s, "queries": len(queries), "settings": rows, "query_process": rss()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["build", "query"])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--memory", default="4G", help="the --index-memory budget the plan is chosen under")
    ap.add_argument("--factory", default=None, help="override the plan's FAISS factory string (trials)")
    ap.add_argument("--chunk", type=int, default=200_000)
    ap.add_argument("--train", type=int, default=262_144, help="training sample size")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="FAISS threads while building")
    ap.add_argument("--nprobe", default="32,64,128,256")
    ap.add_argument("--rescore", default="5,10,20", help="candidates re-scored per result wanted")
    ap.add_argument("--out", required=True, help="folder for the index, sidecar and result.json (big: put it on a scratch disk)")
    args = ap.parse_args()
    build(args) if args.mode == "build" else query(args)


if __name__ == "__main__":
    main()

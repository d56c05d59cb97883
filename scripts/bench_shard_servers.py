#!/usr/bin/env python
"""Query latency through shard servers on localhost vs local ``IndexShards``.

Builds (or reuses, ``--out``) a compressed index of ``--n`` synthetic unit
vectors (``bench_scale``'s generator) cut into ``--shards`` shards, starts one
``ShardService`` subprocess a shard on 127.0.0.1, and searches ``--queries``
queries one at a time (k=10, re-scoring 200 candidates) through the local
``IndexShards`` and through ``RemoteShards``: median wall and client-CPU
milliseconds a query, and whether the ids agree. On localhost the servers and
the client share the same cores, so this is the protocol's cost, not a network's.

Example::

    nice -n 10 python scripts/bench_shard_servers.py --n 200000 --shards 4 --out /work/runs/shard_servers
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import Monitor, median, say
from bench_scale import fresh, stream

SERVE = ("import sys; from retrieval.index.remote import ShardService; "
         "s = ShardService([sys.argv[1]], {'shards': [int(sys.argv[2])], 'of': int(sys.argv[3]), 'build': 'bench'}); "
         "print(f'port {s.port}', flush=True); s.serve_forever()")


def timed(index, queries: np.ndarray) -> tuple[list[float], list[float], np.ndarray]:
    wall, cpu, ids = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.thread_time()
        ids.append(index.search(q[None], 10).ids[0])
        wall.append(1000 * (time.perf_counter() - t))
        cpu.append(1000 * (time.thread_time() - c))
    return wall, cpu, np.array(ids)


def main() -> None:
    from retrieval.index.compressed import CompressedIndex, Sidecar, default_nprobe, plan_index
    from retrieval.index.remote import RemoteShards

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"n{args.n}-s{args.shards}"
    if not stem.with_name(stem.name + ".f16.npy").exists():
        plan = plan_index(args.n, args.dim, args.n * args.dim)  # a quarter of float32: compressed
        sample = next(stream(min(args.n, 262_144), args.dim, 262_144, seed=7))  # as bench_scale: two-level training wants ~100 a list
        t = time.perf_counter()
        CompressedIndex.build(plan, np.arange(args.n, dtype=np.int64), stream(args.n, args.dim, 50_000), stem, sample, shards=args.shards)
        say(f"built {plan.factory} in {time.perf_counter() - t:.0f} s")
    queries = fresh(args.queries, args.dim, 12345)
    local = CompressedIndex.open(stem)
    procs = [subprocess.Popen([sys.executable, "-c", SERVE, f"{stem}.shard{i}.faiss", str(i), str(args.shards)],
                              stdout=subprocess.PIPE, text=True) for i in range(args.shards)]
    try:
        ports = [int(re.search(r"port (\d+)", p.stdout.readline()).group(1)) for p in procs]  # type: ignore[union-attr]
        remote = CompressedIndex(RemoteShards([("127.0.0.1", port) for port in ports]), Sidecar.open(stem))
        remote.set_nprobe(default_nprobe(remote.index.nlist))
        timed(local, queries[:10]), timed(remote, queries[:10])  # warm the page cache and connections
        with Monitor() as mon:
            lw, lc, li = timed(local, queries)
            rw, rc, ri = timed(remote, queries)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    out = {"n": args.n, "dim": args.dim, "shards": args.shards, "queries": args.queries, "nprobe": local.nprobe,
           "local_ms_p50": round(median(lw), 2), "local_cpu_ms_p50": round(median(lc), 2),
           "remote_ms_p50": round(median(rw), 2), "remote_client_cpu_ms_p50": round(median(rc), 2),
           "same_ids": bool((li == ri).all()), "load": mon.report()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

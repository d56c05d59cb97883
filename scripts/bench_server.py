#!/usr/bin/env python
"""``crossfind serve`` under load: search latency and throughput of a warm
server, the reranker through it, thumbnails, searches during an index job, and
a whole ``crossfind search`` process handed to a running server.

Two libraries, each served by a real ``crossfind serve`` subprocess on
127.0.0.1 (clients are threads of this process on keep-alive connections,
stdlib ``http.client``; everything is loopback):

* ``vectors``: 100k synthetic images with clustered unit vectors
  (``bench_common.fill_library``) for a random-weight ViT-B-32
  (``bench_common.random_model``): ``GET /api/search`` with a new text each
  time (so the text tower runs), ``k=10``, ``rerank=false``: p50/p99 one client
  at a time, then throughput and latency with 8 concurrent clients; then
  ``POST /api/index`` of a folder of 640x480 JPEGs and the same searches while
  that job runs; then ``crossfind search --json`` as a whole process, handed to
  the server over the library's unix socket (and once without a server).
* ``shapes``: generated scenes indexed with the bundled ``shapes-tiny`` model
  and its reranker, plus 640x480 JPEGs, the reranker's image memory prepared
  as ``crossfind index --rerank-features`` does: text searches re-ranking 50
  candidates (p50), each sent to that server and to a second one serving a
  copy of the library with the cache off (``CROSSFIND_RERANK_CACHE=0``), and ``GET /api/thumbs/ID?size=256``: first request (decode, resize,
  JPEG encode, write) and cached (file, and 304 with ``If-None-Match``).

Example::

    python scripts/bench_server.py --n 100000 --requests 200 --json /tmp/bench_server.json
    python scripts/bench_server.py --n 5000 --requests 40 --json -      # smoke test
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from bench_common import REPO, WORK, Monitor, fill_library, gen_jpegs, machine, median, random_model, say, write_json

CLI = [sys.executable, "-c", "from retrieval.cli import main; main()"]
QUERY = "a photo of a dog playing on the beach"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def ms(x: float) -> float:
    return round(1000 * x, 1)


class Server:
    """``crossfind serve --port 0`` on ``lib``, stopped with SIGTERM."""

    def __init__(self, lib: Path, model: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*CLI, "--library", str(lib), "serve", "--port", "0", "--model", model],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        assert self.proc.stderr is not None
        t0 = time.perf_counter()
        for line in self.proc.stderr:
            if "crossfind serve: http://" in line:
                break
        else:
            raise SystemExit("crossfind serve did not start")
        self.start_s = time.perf_counter() - t0
        url = urllib.parse.urlsplit(line.split()[2])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=300)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def get(conn: http.client.HTTPConnection, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
    t = time.perf_counter()
    conn.request("GET", url, headers=headers or {})
    r = conn.getresponse()
    body = r.read()
    return r.status, body, time.perf_counter() - t


def search_url(text: str, **opts: Any) -> str:
    return "/api/search?" + urllib.parse.urlencode({"q": text, **opts})


def sequential(srv: Server, n: int, tag: str, repeat: int = 0, **opts: Any) -> list[float]:
    """``n`` searches one after another; new texts, or with ``repeat`` a cycle of that many texts."""
    conn = srv.conn()
    out = []
    for i in range(n):
        status, body, sec = get(conn, search_url(f"{QUERY} {tag} {i % repeat if repeat else i}", **opts))
        assert status == 200, body[:200]
        out.append(sec)
    conn.close()
    return out


def concurrent(srv: Server, n: int, clients: int, tag: str, repeat: int = 0) -> dict[str, Any]:
    lat: list[float] = []
    lock = threading.Lock()
    todo = iter(range(n))

    def worker() -> None:
        conn = srv.conn()
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                break
            status, body, sec = get(conn, search_url(f"{QUERY} {tag} {i % repeat if repeat else i}", k=10, rerank="false"))
            assert status == 200, body[:200]
            with lock:
                lat.append(sec)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": n, "qps": round(n / wall, 1), "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99))}


def cli_search(lib: Path, text: str, server: bool) -> float:
    env = {**os.environ}
    env.pop("CROSSFIND_NO_SERVER", None)
    if not server:
        env["CROSSFIND_NO_SERVER"] = "1"
    t = time.perf_counter()
    out = subprocess.run([*CLI[:1], "-m", "retrieval.cli", "--library", str(lib), "search", text, "--no-rerank", "--json"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    sec = time.perf_counter() - t
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["hits"], out.stdout
    return sec


def bench_vectors(args: argparse.Namespace) -> dict[str, Any]:
    spec = random_model(args.arch)
    lib = WORK / "libraries" / f"serve-{args.arch}-n{args.n}"
    say(f"filling {lib} with {args.n} synthetic vectors")
    fill_library(lib, spec, args.n)
    srv = Server(lib, spec)
    res: dict[str, Any] = {"library": f"{args.n} synthetic image vectors, {args.arch} (random weights)", "server_start_s": round(srv.start_s, 2)}
    try:
        sequential(srv, 5, "warm", k=10, rerank="false")
        lat = sequential(srv, args.requests, "seq", k=10, rerank="false")
        res["search_1_client"] = {"requests": len(lat), "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99))}
        say(f"1 client: {res['search_1_client']}")
        res["search_8_clients"] = concurrent(srv, args.requests, 8, "conc")
        say(f"8 clients: {res['search_8_clients']}")
        # Texts asked before: their vectors are kept, so this is the server, FAISS and SQLite without the text tower.
        sequential(srv, 10, "rep", repeat=10, k=10, rerank="false")
        lat = sequential(srv, args.requests, "rep", repeat=10, k=10, rerank="false")
        res["repeat_1_client"] = {"requests": len(lat), "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99))}
        res["repeat_8_clients"] = concurrent(srv, args.requests, 8, "rep", repeat=10)
        say(f"repeated texts: {res['repeat_1_client']} {res['repeat_8_clients']}")

        # A whole `crossfind search` process handed to the server, and once in process.
        walls = [cli_search(lib, f"{QUERY} cli {i}", server=True) for i in range(args.cli_runs)]
        res["cli_through_server_s"] = {"runs": len(walls), "median": round(median(walls), 3), "min": round(min(walls), 3)}
        res["cli_in_process_s"] = round(cli_search(lib, f"{QUERY} cold", server=False), 2)
        say(f"cli: {res['cli_through_server_s']} (in process {res['cli_in_process_s']} s)")

        folder = gen_jpegs(args.job_images, "small", seed=7)
        conn = srv.conn()
        conn.request("POST", "/api/index", body=json.dumps({"path": str(folder)}), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        job = json.loads(r.read())
        assert r.status == 202, job
        during: list[float] = []
        i = 0
        while True:
            status, body, _ = get(conn, f"/api/jobs/{job['id']}")
            st = json.loads(body)
            if st["state"] != "running":
                break
            _, _, sec = get(conn, search_url(f"{QUERY} job {i}", k=10, rerank="false"))
            during.append(sec)
            i += 1
        conn.close()
        res["index_job"] = {"images": args.job_images, "state": st["state"], "report": st["report"], "rate_img_s": st["rate"]}
        res["search_during_job"] = {"requests": len(during), "p50_ms": ms(pct(during, 50)) if during else None,
                                    "p99_ms": ms(pct(during, 99)) if during else None}
        say(f"during job: {res['search_during_job']} ({res['index_job']})")
    finally:
        srv.stop()
    return res


def rerank_side_by_side(cached: Server, uncached: Server, captions: list[str], n: int) -> dict[str, Any]:
    """Text searches re-ranking 50 candidates, new captions, each sent to the server
    with the image-memory cache and then to the one without (its own copy of the
    library, so each caption is new to both); p50/p99 of each."""
    lat: dict[str, list[float]] = {"cached": [], "uncached": []}
    conns = {"cached": cached.conn(), "uncached": uncached.conn()}
    for i in range(3):  # warm-up: sessions, allocator
        for conn in conns.values():
            get(conn, search_url(captions[-1 - i], k=10, candidates=50))
    with Monitor() as mon:
        for i in range(n):
            for name, conn in conns.items():
                status, body, sec = get(conn, search_url(captions[i], k=10, candidates=50))
                assert status == 200 and json.loads(body)["reranked"], body[:200]
                lat[name].append(sec)
    for conn in conns.values():
        conn.close()
    out: dict[str, Any] = {}
    for name in lat:
        out[name] = {"requests": len(lat[name]), "p50_ms": ms(pct(lat[name], 50)), "p99_ms": ms(pct(lat[name], 99))}
    out["others_cpu"] = mon.report()
    return out


def bench_shapes(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval import Engine
    from retrieval.shapes import generate

    root = WORK / f"serve-shapes-{args.scenes}-{args.thumbs}"
    lib = root / "lib"
    scenes = root / "scenes"
    photos = gen_jpegs(args.thumbs, "small", seed=11)
    if not (root / ".built").is_file():
        records = generate(scenes, args.scenes, seed=3)
        with Engine.open(lib, model="shapes-tiny") as eng:
            eng.index_folder([scenes, photos])
        (root / ".built").write_text(json.dumps([r["caption"] for r in records]))
    # As `crossfind index --rerank-features` prepares a library: the reranker's image memory of every image.
    with Engine.open(lib, model="shapes-tiny") as eng:
        t = time.perf_counter()
        prepared = eng.rerank_features()
        say(f"rerank features: {prepared} computed in {time.perf_counter() - t:.1f} s")
    captions = json.loads((root / ".built").read_text())
    # A copy searched by a server with the cache off, side by side with the prepared library.
    bare = root / "lib-nocache"
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(lib, bare, ignore=shutil.ignore_patterns("rerank-features", "serve.sock"))
    srv = Server(lib, "shapes-tiny")
    off = Server(bare, "shapes-tiny", env={"CROSSFIND_RERANK_CACHE": "0"})
    res: dict[str, Any] = {"library": f"{args.scenes} generated scenes + {args.thumbs} 640x480 JPEGs, shapes-tiny"}
    try:
        side = rerank_side_by_side(srv, off, captions, min(args.requests, len(captions) - 3))
        res["rerank_50"], res["rerank_50_uncached"] = side["cached"], side["uncached"]
        res["rerank_others_cpu"] = side["others_cpu"]
        say(f"rerank, image memory cached: {res['rerank_50']}; computed: {res['rerank_50_uncached']}")
        off.stop()
        conn = srv.conn()
        status, body, _ = get(conn, search_url("x", k=10000, rerank="false", path=str(photos) + "/*"))
        ids = [h["id"] for h in json.loads(body)["hits"]]
        first, cached, not_modified = [], [], []
        for i in ids:
            status, body, sec = get(conn, f"/api/thumbs/{i}?size=256")  # the first request builds it
            assert status == 200
            first.append(sec)
            conn.request("GET", f"/api/thumbs/{i}?size=256")
            r = conn.getresponse()
            r.read()
            etag = r.getheader("ETag") or ""
            _, _, sec = get(conn, f"/api/thumbs/{i}?size=256")
            cached.append(sec)
            status, _, sec = get(conn, f"/api/thumbs/{i}?size=256", {"If-None-Match": etag})
            assert status == 304
            not_modified.append(sec)
        res["thumbs_256"] = {"images": len(ids), "first_ms": ms(statistics.median(first)), "cached_ms": ms(statistics.median(cached)),
                             "not_modified_ms": ms(statistics.median(not_modified))}
        say(f"thumbs: {res['thumbs_256']}")
        conn.close()
    finally:
        srv.stop()
        off.stop()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="synthetic image vectors in the library")
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights")
    p.add_argument("--requests", type=int, default=200, help="searches per measurement")
    p.add_argument("--cli-runs", type=int, default=10, help="whole crossfind search processes through the server")
    p.add_argument("--job-images", type=int, default=150, help="640x480 JPEGs the index job encodes")
    p.add_argument("--scenes", type=int, default=300, help="generated scenes in the reranker library")
    p.add_argument("--thumbs", type=int, default=30, help="640x480 JPEGs for the thumbnail timings")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    out["shapes"] = bench_shapes(args)
    out["vectors"] = bench_vectors(args)
    write_json(args.json, out)


if __name__ == "__main__":
    main()

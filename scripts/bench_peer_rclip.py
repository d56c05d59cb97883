#!/usr/bin/env python
"""crossfind and the rclip peer side by side, in one run, on the same files.

1. Runs ``/work/shared/peers/rclip/rclip_peer.sh`` (rclip 3.3.0, random-weight
   ViT-B-32-256 as ONNX, onnxruntime on the CPU): it generates the JPEG folders
   under ``$PEER_WORK/images``, times rclip indexing them, and times rclip
   searches (a new process each) on databases filled with N random vectors.
2. crossfind, with the same architecture (random-weight ViT-B-32-256 saved as a
   ``local-dir:`` model), indexes the peer's own JPEG folders into fresh
   libraries holding the model's export, as after its first use (in process,
   the image session loaded beforehand; and as a ``crossfind index --json``
   process), and
   searches libraries of the same sizes (synthetic rows and clustered vectors,
   see ``bench_common.fill_library``) with ``crossfind search ... --json``, a
   new process per search as rclip is timed, plus the in-process
   index-plus-metadata part.

Example::

    python scripts/bench_peer_rclip.py --small 100 --large 24 --search-sizes 10000,100000 --repeats 3
    python scripts/bench_peer_rclip.py --small 8 --large 2 --search-sizes 2000 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (REPO, WORK, Monitor, fill_library, gen_jpegs, machine, median, random_model, read_files, say, seed_library,
                          used_export, wait_quiet, write_json)

PEER = Path(os.environ.get("RCLIP_PEER", "/work/shared/peers/rclip/rclip_peer.sh"))
PEER_WORK = Path(os.environ.get("PEER_WORK", "/tmp/rclip-peer"))
QUERY = "a photo of a dog playing on the beach"  # rclip_peer.py's default query
SIZES = {"small": (640, 480), "large": (4000, 3000)}
CROSSFIND = str(Path(sys.executable).with_name("crossfind"))


def run_peer(args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """Run the peer benchmark; its ``rclip key=value`` results and its printed table."""
    cmd = [str(PEER), "--small", str(args.small), "--large", str(args.large),
           "--search-sizes", ",".join(str(n) for n in args.search_sizes), "--repeats", str(args.repeats)]
    env = dict(os.environ, EXPORT_PYTHON=os.environ.get("EXPORT_PYTHON", str(REPO / ".venv" / "bin" / "python")), PEER_WORK=str(PEER_WORK))
    say("running the rclip peer: " + " ".join(cmd))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"rclip peer failed (rc={proc.returncode})")
    results: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"rclip (\w+)=(\S+)$", line.strip())
        if m:
            results[m.group(1)] = float(m.group(2))
    say(f"rclip peer done in {time.perf_counter() - t:.0f}s")
    table = "\n".join(line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("rclip "))
    return results, table


def index_in_process(spec: str, folder: Path, warm: Path) -> dict:
    """``Engine.index_folder`` into a fresh library holding the model's export
    (as after its first use), the image session loaded before timing."""
    from retrieval import Engine

    lib = Path(tempfile.mkdtemp(prefix="peer-lib-", dir=WORK))
    try:
        seed_library(lib, warm)
        with Engine.open(lib, model=spec) as eng:
            t = time.perf_counter()
            runtime = eng.state().runtime("image")
            if hasattr(runtime, "session"):
                runtime.session("image")
            load = time.perf_counter() - t
            rep = eng.index_folder(folder)
        return {"n": rep.encoded, "seconds": rep.seconds, "img_per_s": rep.encoded / rep.seconds, "model_load_s": load,
                "runtime": type(runtime).__name__}
    finally:
        shutil.rmtree(lib, ignore_errors=True)


def index_cli(spec: str, folder: Path, warm: Path) -> dict:
    """``crossfind index FOLDER --json`` in a new process into a fresh library holding the model's export: wall time."""
    lib = Path(tempfile.mkdtemp(prefix="peer-cli-", dir=WORK))
    try:
        seed_library(lib, warm)
        t = time.perf_counter()
        out = subprocess.run([CROSSFIND, "--library", str(lib), "index", str(folder), "--model", spec, "--json"],
                             check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t
        rep = json.loads(out.stdout)
        return {"wall_s": wall, "report_seconds": rep["seconds"], "added": rep["added"], "failed": rep["failed"]}
    finally:
        shutil.rmtree(lib, ignore_errors=True)


def search_cli(spec: str, lib: Path, repeats: int, fresh: bool = True) -> dict:
    """``crossfind search QUERY -k 10 --json``, a new process each time: wall times.

    With ``fresh`` every run asks a text never asked before, so it is encoded
    (crossfind reuses the embedding of a text found in its search history,
    skipping the model load); otherwise the same text each time.
    """
    walls = []
    nonce = time.time_ns()
    for i in range(repeats):
        text = f"{QUERY} ({nonce} {i})" if fresh else QUERY
        t = time.perf_counter()
        out = subprocess.run([CROSSFIND, "--library", str(lib), "search", text, "-k", "10", "--no-rerank", "--model", spec, "--json"],
                             check=True, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        hits = json.loads(out.stdout)["hits"]
        assert len(hits) == 10, hits
    return {"wall_s": median(walls), "min_s": min(walls), "max_s": max(walls), "runs": walls}


def search_in_process(spec: str, lib: Path, queries: int) -> dict:
    """The in-process split (encode / index+metadata) from bench_search's timer, in a fresh process."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_search.py")), "time-search", "--arch", "ViT-B-32-256",
                          "--lib", str(lib), "--queries", str(queries)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=100, help="640x480 JPEGs both tools index")
    p.add_argument("--large", type=int, default=24, help="4000x3000 JPEGs both tools index")
    p.add_argument("--search-sizes", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[10_000, 100_000])
    p.add_argument("--repeats", type=int, default=3, help="searches per size (each a new process), as the peer runs them")
    p.add_argument("--queries", type=int, default=20, help="in-process searches for the index+metadata median")
    p.add_argument("--skip-peer", action="store_true", help="reuse nothing from rclip: crossfind side only (for smoke tests)")
    p.add_argument("--wait-minutes", type=float, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    arch = "ViT-B-32-256"
    spec = random_model(arch)
    quiet = wait_quiet(args.wait_minutes) if args.wait_minutes else None
    out: dict = {"machine": machine(), "quiet": quiet, "model": spec, "args": vars(args) | {"search_sizes": args.search_sizes}}
    t0 = time.perf_counter()

    if args.skip_peer:
        rclip: dict[str, float] = {}
        table = ""
        for kind, n in (("small", args.small), ("large", args.large)):
            if n:
                gen_jpegs(n, kind, root=PEER_WORK / "images")
    else:
        with Monitor() as mon:
            rclip, table = run_peer(args)
        out["rclip_others"] = mon.report()
    out["rclip"], out["rclip_table"] = rclip, table

    cf: dict = {"index": {}, "search": {}}
    warm = WORK / "peer-export-lib"  # the model's export, as a library holds it after its first use
    used_export(spec, warm, gen_jpegs(8, "small"))
    for kind, n in (("small", args.small), ("large", args.large)):
        if n <= 0:
            continue
        w, h = SIZES[kind]
        folder = PEER_WORK / "images" / f"{kind}-{w}x{h}-n{n}"
        if not (folder / ".complete").is_file():
            raise SystemExit(f"{folder} was not generated by the peer")
        read_files(folder)
        say(f"crossfind indexing the peer's {n} {kind} JPEGs")
        with Monitor() as mon:
            r = index_in_process(spec, folder, warm)
            r["cli"] = index_cli(spec, folder, warm)
        r["others"] = mon.report()
        cf["index"][kind] = r
        say(f"  {r['img_per_s']:.2f} img/s in process; CLI wall {r['cli']['wall_s']:.1f}s")
    for n in args.search_sizes:
        lib = WORK / "libraries" / f"{arch}-images-n{n}"
        fill_library(lib, spec, n, "images")
        say(f"crossfind searching {n} vectors: {args.repeats} CLI processes")
        with Monitor() as mon:
            r = search_cli(spec, lib, args.repeats)
            search_cli(spec, lib, 1, fresh=False)  # puts QUERY in the history
            r["repeated_query"] = search_cli(spec, lib, args.repeats, fresh=False)
        r["others"] = mon.report()
        r["in_process"] = search_in_process(spec, lib, args.queries)
        cf["search"][n] = r
        say(f"  CLI {r['wall_s']:.2f}s; in process index+metadata {r['in_process']['index_ms']:.2f} ms")
    out["crossfind"] = cf
    out["total_s"] = time.perf_counter() - t0
    out["busy_after"] = machine()["busy"]

    print(f"crossfind vs rclip {'' if rclip else '(peer skipped) '}on the same files; random-weight {arch}, CPU")
    if table:
        print(table)
    print()
    print(f"{'what':<40} {'rclip':>10} {'crossfind':>10} {'crossfind faster':>17}")
    rows = []
    for kind, r in cf["index"].items():
        n = r["n"]
        rc = rclip.get(f"index_{kind}_img_per_s_excl_model_load")
        rows.append((f"index {kind}: img/s excl. model load", rc, r["img_per_s"], (r["img_per_s"] / rc) if rc else None))
        rc_wall = rclip.get(f"index_{kind}_wall_s")
        rows.append((f"index {kind}: CLI process wall s ({n} img)", rc_wall, r["cli"]["wall_s"], (rc_wall / r["cli"]["wall_s"]) if rc_wall else None))
    for n, r in cf["search"].items():
        rc = rclip.get(f"search_{n}_s")
        rows.append((f"search {n}: CLI process wall s", rc, r["wall_s"], (rc / r["wall_s"]) if rc else None))
        rc_part = (rclip.get(f"search_{n}_db_load_s", 0) + rclip.get(f"search_{n}_rank_s", 0)) if rc else None
        ip = r["in_process"]["index_ms"] / 1000
        rows.append((f"search {n}: vectors+rank (index+meta) s", rc_part, ip, (rc_part / ip) if rc_part else None))
        rq = r["repeated_query"]["wall_s"]
        rows.append((f"search {n}: CLI wall s, query asked before", rc, rq, (rc / rq) if rc else None))
    for what, a, b, ratio in rows:
        fa = f"{a:10.4g}" if a is not None else f"{'-':>10}"
        fr = f"{ratio:16.1f}x" if ratio is not None else f"{'-':>17}"
        print(f"{what:<40} {fa} {b:10.4g} {fr}")
    out["comparison"] = [{"what": w, "rclip": a, "crossfind": b, "crossfind_faster_x": r} for w, a, b, r in rows]
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()

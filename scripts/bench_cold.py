#!/usr/bin/env python
"""Cold start against rclip: whole processes, side by side, alternating, in one run.

Issue 16's targets, each timed as a new process of each tool, the two tools
taking turns (rclip, crossfind, rclip, ...) ``--repeats`` times; the table
gives medians, the peak memory (``ru_maxrss`` of the child) and ratios:

* a new text query (never asked before) on a 50-image library and on a 100k
  library (synthetic rows: rclip's database filled by ``rclip_peer.py
  populate-db``, crossfind's by ``bench_common.fill_library``), without a server;
* a new text query with the bundled shapes-tiny model and its reranker
  (crossfind only: rclip has no reranker);
* ``crossfind index`` / rclip's first run on 200 640x480 and 50 4000x3000
  JPEGs (the peer's own generated folders), each into a fresh library.

rclip 3.3.0 runs from ``/work/shared/peers/rclip`` (random-weight
ViT-B-32-256 exported to ONNX, FP32 onnxruntime on the CPU); crossfind uses
the same architecture with random weights as a ``local-dir:`` model. A fresh
crossfind library gets the model's ONNX export copied in before it is timed,
as a library that has been used once holds it (the one-time export is timed
separately), OpenVINO's precision verdict for this CPU included. rclip has no
index-only command: its indexing run is ``rclip -f -t 10 QUERY`` in the
folder (index, then one search), as the peer times it.

Example::

    python scripts/bench_cold.py --repeats 5
    python scripts/bench_cold.py --repeats 1 --small 20 --large 4 --big 2000   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO, WORK, fill_library, machine, median, random_model, say, seed_library, used_export, write_json

PEER_DIR = Path(os.environ.get("RCLIP_PEER_DIR", "/work/shared/peers/rclip"))
PEER_WORK = Path(os.environ.get("PEER_WORK", "/tmp/rclip-peer"))
RCLIP_VENV = Path(os.environ.get("RCLIP_VENV", "/tmp/venv-rclip"))
MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
CROSSFIND = str(Path(sys.executable).with_name("crossfind"))
QUERY = "a photo of a dog playing on the beach"


def timed(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float, str]:
    """Run ``cmd`` as a new process: (wall seconds, peak RSS MiB, stdout).

    The peak comes from GNU time, a small process of its own: a child forked
    from this (large) process would inherit its high-water mark.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("r") as rss:
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], cwd=cwd, env=env, stdout=out, stderr=err)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read()[-2000:]}")
        return wall, int(rss.read().split()[-1]) / 1024, out.read()


def rclip_env(datadir: Path) -> dict:
    return dict(os.environ, RCLIP_DATADIR=str(datadir), HF_HUB_OFFLINE="1")


def rclip_datadir(path: Path, fresh: bool = True) -> Path:
    if fresh:
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_SUBDIR, "tokenizer"):
        if not (path / name).exists():
            (path / name).symlink_to(PEER_WORK / "models" / name)
    return path


def peer(*args: str) -> None:
    subprocess.run([str(RCLIP_VENV / "bin" / "python"), str(PEER_DIR / "rclip_peer.py"), *args], check=True,
                   stdout=subprocess.DEVNULL)


def images(kind: str, n: int) -> Path:
    w, h = {"small": (640, 480), "large": (4000, 3000)}[kind]
    folder = PEER_WORK / "images" / f"{kind}-{w}x{h}-n{n}"
    peer("gen-images", "--out", str(folder), "--n", str(n), "--size", kind)
    return folder


def crossfind(lib: Path, *args: str) -> list[str]:
    return [CROSSFIND, "--library", str(lib), *args]


def alternate(repeats: int, runs: dict[str, object]) -> dict[str, dict]:
    """Call each runner in turn ``repeats`` times; medians of wall and memory."""
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for i in range(repeats):
        for name, run in runs.items():
            got[name].append(run(i))  # type: ignore[operator]
    return {k: {"wall_s": median(w for w, _ in v), "rss_mib": median(m for _, m in v),
                "walls": [round(w, 3) for w, _ in v], "rss": [round(m) for _, m in v]} for k, v in got.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each tool per measurement")
    p.add_argument("--small", type=int, default=200, help="640x480 JPEGs indexed")
    p.add_argument("--large", type=int, default=50, help="4000x3000 JPEGs indexed")
    p.add_argument("--few", type=int, default=50, help="images in the small search library")
    p.add_argument("--big", type=int, default=100_000, help="rows in the large search library")
    p.add_argument("--int8", action="store_true", help="also index with `crossfind index --int8` (8-bit image tower, opt-in)")
    p.add_argument("--float32", action="store_true",
                   help="also index with the image tower in float32 on ONNX Runtime (CROSSFIND_BF16=0)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: index,search,rerank, or big (the 100k search library)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if not (RCLIP_VENV / "bin" / "rclip").exists() or not (PEER_WORK / "models" / MODEL_SUBDIR / "textual.onnx").exists():
        say("setting up the rclip peer")
        env = dict(os.environ, EXPORT_PYTHON=sys.executable, PEER_WORK=str(PEER_WORK))
        subprocess.run([str(PEER_DIR / "rclip_peer.sh"), "--setup-only"], env=env, check=True)
    rclip = str(RCLIP_VENV / "bin" / "rclip")
    spec = random_model("ViT-B-32-256")
    work = WORK / "cold"
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"machine": machine(), "model": spec, "args": vars(args), "results": {}}
    res = out["results"]
    t0 = time.perf_counter()

    # The model's export, made once (timed: what the first `crossfind index` of a library pays extra).
    warm = work / "export-lib"
    few = images("small", args.few)
    export, wall = used_export(spec, warm, few)
    if wall is not None:
        res["first_index_with_export"] = {"wall_s": wall, "images": args.few}
        say(f"first index of {args.few} images, with the ONNX export: {wall:.1f}s")

    if "search" not in skip:

        for label, size in (("few", args.few), ("big", args.big)):
            if label in skip:
                continue
            lib = work / f"search-{label}-n{size}"
            data = rclip_datadir(work / f"rclip-search-{label}-n{size}", fresh=False)
            if label == "few":
                if not (lib / "library.db").exists():
                    seed_library(lib, warm)
                    timed(crossfind(lib, "index", str(few), "--model", spec, "--json"))
                if not (data / "db.sqlite3").exists():
                    timed([rclip, "-f", "-t", "1", QUERY], cwd=few, env=rclip_env(data))
                cwd = few
            else:
                say(f"filling the {size}-row libraries (once)")
                fill_library(lib, spec, size, "images")
                for src in warm.glob("models/*/onnx"):
                    if not (lib / src.relative_to(warm)).exists():
                        shutil.copytree(src, lib / src.relative_to(warm), copy_function=os.link)
                cwd = work / f"rclip-photos-n{size}"
                cwd.mkdir(exist_ok=True)
                if not (data / "db.sqlite3").exists():
                    peer("populate-db", "--datadir", str(data), "--n", str(size), "--library", str(cwd))
            # one untimed run each, so both start with their files in the page cache
            timed([rclip, "-n", "-f", "-t", "10", QUERY], cwd=cwd, env=rclip_env(data))
            timed(crossfind(lib, "search", QUERY, "-k", "10", "--no-rerank", "--model", spec, "--json"))

            def run_rclip(i: int, cwd: Path = cwd, data: Path = data) -> tuple[float, float]:
                wall, rss, text = timed([rclip, "-n", "-f", "-t", "10", f"{QUERY} {time.time_ns()}"], cwd=cwd, env=rclip_env(data))
                assert len(text.splitlines()) == 10, text
                return wall, rss

            def run_cf(i: int, lib: Path = lib) -> tuple[float, float]:
                wall, rss, text = timed(crossfind(lib, "search", f"{QUERY} {time.time_ns()}", "-k", "10", "--no-rerank",
                                                  "--model", spec, "--json"))
                assert len(json.loads(text)["hits"]) == 10, text
                return wall, rss

            say(f"new text queries at {size} images: {args.repeats} x (rclip, crossfind)")
            res[f"search_{label}"] = r = alternate(args.repeats, {"rclip": run_rclip, "crossfind": run_cf})
            r["images"] = size
            say(f"  rclip {r['rclip']['wall_s']:.2f}s {r['rclip']['rss_mib']:.0f} MiB; "
                f"crossfind {r['crossfind']['wall_s']:.2f}s {r['crossfind']['rss_mib']:.0f} MiB")


    if "rerank" not in skip:
        shapes = work / "shapes-200"
        if not (shapes / "captions.jsonl").exists():
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_shapes.py"), "--out", str(shapes), "--n", "200", "--seed", "7"],
                           check=True, stdout=subprocess.DEVNULL)
        lib = work / "search-shapes"
        if not (lib / "library.db").exists():
            timed(crossfind(lib, "index", str(shapes), "--model", "shapes-tiny", "--json"))  # makes the export too
        timed(crossfind(lib, "search", "a red circle", "--model", "shapes-tiny", "--json"))

        def run_rr(i: int) -> tuple[float, float]:
            wall, rss, text = timed(crossfind(lib, "search", f"a red circle left of a blue square {time.time_ns()}",
                                              "-k", "10", "--model", "shapes-tiny", "--json"))
            assert json.loads(text)["reranked"] is True
            return wall, rss

        say(f"new text queries with shapes-tiny and its reranker: {args.repeats}")
        res["search_rerank"] = alternate(args.repeats, {"crossfind": run_rr})

    if "index" not in skip and args.int8:
        from retrieval.onnx_quant import int8_image

        int8_image(export, "image.onnx")  # made once, as a first --int8 run does
    if "index" not in skip:
        for kind, n in (("small", args.small), ("large", args.large)):
            if n <= 0:
                continue
            folder = images(kind, n)

            def run_rclip_index(i: int, folder: Path = folder) -> tuple[float, float]:
                data = rclip_datadir(work / "rclip-index")
                wall, rss, _ = timed([rclip, "-f", "-t", "10", QUERY], cwd=folder, env=rclip_env(data))
                return wall, rss

            def run_cf_index(i: int, folder: Path = folder, n: int = n, extra: tuple[str, ...] = (),
                             env: dict | None = None) -> tuple[float, float]:
                lib = work / "index-lib"
                seed_library(lib, warm)
                wall, rss, text = timed(crossfind(lib, "index", str(folder), "--model", spec, "--json", *extra),
                                        env=None if env is None else {**os.environ, **env})
                assert json.loads(text)["added"] == n, text
                return wall, rss

            runners = {"rclip": run_rclip_index, "crossfind": run_cf_index}
            if args.int8:
                runners["crossfind --int8"] = functools.partial(run_cf_index, extra=("--int8",))
            if args.float32:
                runners["crossfind float32"] = functools.partial(run_cf_index, env={"CROSSFIND_BF16": "0"})
            say(f"indexing {n} {kind} JPEGs: {args.repeats} x ({', '.join(runners)})")
            res[f"index_{kind}"] = r = alternate(args.repeats, runners)
            r["images"] = n
            for tool in runners:
                r[tool]["img_per_s"] = n / r[tool]["wall_s"]
            say("  " + "; ".join(f"{tool} {r[tool]['img_per_s']:.2f} img/s {r[tool]['rss_mib']:.0f} MiB" for tool in runners))
    out["total_s"] = time.perf_counter() - t0
    out["busy_after"] = machine()["busy"]

    print(f"crossfind vs rclip, whole processes, median of {args.repeats} alternating runs; random-weight ViT-B-32-256, CPU")
    print(f"{'what':<44} {'rclip':>14} {'crossfind':>14} {'ratio':>8} {'target':>12}")
    rows = []
    for label in ("few", "big"):
        r = res.get(f"search_{label}")
        if r:
            a, b = r["rclip"], r["crossfind"]
            rows.append((f"new text query, {r['images']} images: wall s", a["wall_s"], b["wall_s"], b["wall_s"] / a["wall_s"], "<= 0.6x"))
            rows.append((f"new text query, {r['images']} images: peak MiB", a["rss_mib"], b["rss_mib"], b["rss_mib"] / a["rss_mib"], "<= 1.0x"))
    if "search_rerank" in res:
        rows.append(("new text query, shapes-tiny + reranker: s", None, res["search_rerank"]["crossfind"]["wall_s"], None, "<= 1.0 s"))
    for kind, target in (("small", ">= 1.3x"), ("large", ">= 1.5x")):
        r = res.get(f"index_{kind}")
        if r:
            a, b = r["rclip"], r["crossfind"]
            rows.append((f"index {r['images']} {kind}: img/s (whole process)", a["img_per_s"], b["img_per_s"], b["img_per_s"] / a["img_per_s"], target))
            rows.append((f"index {r['images']} {kind}: peak MiB", a["rss_mib"], b["rss_mib"], b["rss_mib"] / a["rss_mib"], "<= 1.2x"))
            for tool, label in (("crossfind --int8", "--int8"), ("crossfind float32", "float32")):
                c = r.get(tool)
                if c:
                    rows.append((f"index {r['images']} {kind} {label}: img/s", a["img_per_s"], c["img_per_s"], c["img_per_s"] / a["img_per_s"], "-"))
                    rows.append((f"index {r['images']} {kind} {label}: peak MiB", a["rss_mib"], c["rss_mib"], c["rss_mib"] / a["rss_mib"], "-"))
    for what, a, b, ratio, target in rows:
        fa = f"{a:14.3f}" if a is not None else f"{'-':>14}"
        fr = f"{ratio:7.2f}x" if ratio is not None else f"{'-':>8}"
        print(f"{what:<44} {fa} {b:14.3f} {fr} {target:>12}")
    out["table"] = [{"what": w, "rclip": a, "crossfind": b, "ratio": r, "target": t} for w, a, b, r, t in rows]
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()

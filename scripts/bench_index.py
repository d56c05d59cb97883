#!/usr/bin/env python
"""Indexing throughput: crossfind's pipeline against a naive loop and the encoder alone.

For each JPEG folder (4000x3000 "large", 640x480 "small"; synthetic, the rclip
peer's generator) and one random-weight open_clip model on the CPU, images/s
measured three ways, all with the same encoder object (loaded and warmed up
before any timing) and the files already in the page cache:

* ``pipeline``: ``Engine.index_folder`` into a fresh library
  (scan, hash, threaded draft decode + preprocess, encode, store rows, index
  save); ``report.encoded / report.seconds``;
* ``naive``: for each batch of paths: ``PIL.Image.open``, ``convert("RGB")``,
  preprocess, encode; one batch at a time, no JPEG draft, no threads;
* ``ceiling``: the encoder alone on the already preprocessed tensors, same
  batch size.

Example::

    python scripts/bench_index.py                       # 48 large + 192 small, ViT-B-32
    python scripts/bench_index.py --large 4 --small 8 --json /tmp/idx.json   # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from typing import Any

from bench_common import WORK, Monitor, gen_jpegs, machine, median, random_model, read_files, say, wait_quiet, write_json


def naive(enc, paths: list[Path], batch_size: int) -> float:
    """Seconds for the naive loop over ``paths``."""
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        pix = []
        for p in paths[start : start + batch_size]:
            with Image.open(p) as im:
                pix.append(enc.preprocess(im.convert("RGB")))
        enc.encode_images(torch.stack(pix))
    return time.perf_counter() - t0


def ceiling(enc, paths: list[Path], batch_size: int) -> tuple[float, float]:
    """(seconds to encode preprocessed tensors, seconds it took to prepare them)."""
    import torch

    from retrieval.imageio import load_image

    t0 = time.perf_counter()
    batches = []
    for start in range(0, len(paths), batch_size):
        batches.append(torch.stack([enc.preprocess(load_image(p, min_size=enc.image_size).image) for p in paths[start : start + batch_size]]))
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x in batches:
        enc.encode_images(x)
    return time.perf_counter() - t0, prep


def pipeline(enc, folder: Path, batch_size: int, workers: int | None) -> dict:
    """Index ``folder`` into a fresh library with the loaded encoder; the report's numbers."""
    from retrieval import Engine
    from retrieval.store import DB_NAME
    from retrieval.store import open_store

    lib = Path(tempfile.mkdtemp(prefix="lib-", dir=WORK))
    try:
        with Engine(open_store(lib / DB_NAME), lib, encoder=enc) as eng:
            rep = eng.index_folder(folder, batch_size=batch_size, workers=workers)
        return {"encoded": rep.encoded, "failed": rep.failed, "seconds": rep.seconds}
    finally:
        shutil.rmtree(lib, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights (default ViT-B-32)")
    p.add_argument("--large", type=int, default=48, help="number of 4000x3000 JPEGs (0 to skip)")
    p.add_argument("--small", type=int, default=192, help="number of 640x480 JPEGs (0 to skip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="loader threads for the pipeline (default: the engine's)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each method, interleaved; the best is reported (and the median)")
    p.add_argument("--methods", default="pipeline,naive,ceiling")
    p.add_argument("--wait-minutes", type=float, default=0, help="wait this long for training jobs to finish first")
    p.add_argument("--json", default=None, help="write the results here as JSON ('-': stdout)")
    args = p.parse_args(argv)
    import torch

    from retrieval.encoders import load_encoder

    methods = args.methods.split(",")
    spec = random_model(args.arch)
    folders = [(kind, n) for kind, n in (("large", args.large), ("small", args.small)) if n > 0]
    paths = {kind: gen_jpegs(n, kind) for kind, n in folders}
    quiet = wait_quiet(args.wait_minutes) if args.wait_minutes else None
    t = time.perf_counter()
    enc = load_encoder(spec, device="cpu")
    load_s = time.perf_counter() - t
    from PIL import Image

    # warm-up: allocator, kernels, and the transforms' first call (which costs ~0.4s)
    enc.encode_images(torch.stack([enc.preprocess(Image.new("RGB", (640, 480)))] * 2))
    out = {"machine": machine(), "quiet": quiet, "model": spec, "arch": args.arch, "model_load_s": load_s,
           "batch_size": args.batch_size, "workers": args.workers, "results": {}}
    say(f"{args.arch} loaded in {load_s:.1f}s; torch threads {torch.get_num_threads()}")
    for kind, n in folders:
        folder = paths[kind]
        files = sorted(x for x in folder.iterdir() if x.suffix == ".jpg")
        read_files(folder)
        runs: dict[str, list[float]] = {m: [] for m in methods}
        others: dict[str, list[float]] = {m: [] for m in methods}
        prep: list[float] = []
        for rep in range(args.repeats):  # interleaved, so a burst of outside load hits one run, not one method
            for m in methods:
                with Monitor() as mon:
                    if m == "pipeline":
                        r = pipeline(enc, folder, args.batch_size, args.workers)
                        assert r["encoded"] == n, r
                        secs = r["seconds"]
                    elif m == "naive":
                        secs = naive(enc, files, args.batch_size)
                    else:
                        secs, p_s = ceiling(enc, files, args.batch_size)
                        prep.append(p_s)
                runs[m].append(secs)
                others[m].append(mon.report()["others_cores_avg"])
                say(f"{kind} run {rep + 1}: {m} {n / secs:.2f} img/s (others used {others[m][-1]:.2f} cores)")
        res: dict[str, Any] = {"n": n}
        for m in methods:
            res[f"{m}_img_s"] = n / min(runs[m])  # best run: the least disturbed
            res[f"{m}_img_s_median"] = n / median(runs[m])
            res[f"{m}_runs_s"] = runs[m]
            res[f"{m}_others_cores"] = others[m]
        if prep:
            res["load_preprocess_serial_img_s"] = n / min(prep)
        if "pipeline" in methods and "naive" in methods:
            res["pipeline_over_naive"] = res["pipeline_img_s"] / res["naive_img_s"]
        if "pipeline" in methods and "ceiling" in methods:
            res["pipeline_over_ceiling"] = res["pipeline_img_s"] / res["ceiling_img_s"]
        out["results"][kind] = res
    out["busy_after"] = machine()["busy"]
    print(f"{args.arch} random weights, CPU, {torch.get_num_threads()} torch threads, batch {args.batch_size}")
    print(f"{'folder':<18} {'n':>5} {'pipeline':>9} {'naive':>9} {'ceiling':>9} {'pipe/naive':>10} {'pipe/ceil':>10}")
    for kind, r in out["results"].items():
        size = "4000x3000" if kind == "large" else "640x480"
        cell = lambda key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
        print(f"{kind + ' ' + size:<18} {r['n']:>5} {cell('pipeline_img_s', '9.2f')} {cell('naive_img_s', '9.2f')} "
              f"{cell('ceiling_img_s', '9.2f')} {cell('pipeline_over_naive', '10.2f')} {cell('pipeline_over_ceiling', '10.2f')}")
    print(f"(images/s, best of {args.repeats} interleaved runs)")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()

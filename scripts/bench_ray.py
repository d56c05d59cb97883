#!/usr/bin/env python
"""Indexing in-process against indexing through Ray Data, on this machine.

What Ray's machinery costs when there is no cluster to spread over: the same
folder of small synthetic JPEGs (640x480, the shared generator) indexed with
the bundled ``shapes-tiny`` model (its ONNX export on the CPU, as a user gets
it) into fresh libraries, three ways:

* ``in-process``: ``Engine.index_folder(folder)``;
* ``ray, cluster running``: ``index_folder(folder, ray="auto")`` with a local
  Ray cluster already started in this process (the time counts the Dataset,
  the decoding tasks, the encoder actor's start and the driver's writes);
* ``ray, cluster running, second run``: the same again on that cluster (Ray
  keeps idle worker processes, so this shows what each run pays anew);
* ``ray, cluster started by the run``: the same with no cluster running, so
  the run starts a local one and shuts it down (what ``crossfind index PATH
  --ray`` does on a machine without a cluster).

Each library first indexes 4 other images, so the model's ONNX export (made
once per library) is not timed. Each way runs ``--runs`` times, alternating.

Example::

    python scripts/bench_ray.py                 # 200 images, 2 runs each
    python scripts/bench_ray.py --n 20 --runs 1 # smoke test
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import WORK, gen_jpegs, machine, median, say, write_json


def index_once(folder: Path, warm: Path, ray: str | None) -> tuple[float, int, dict[str, np.ndarray]]:
    """Seconds of one timed index run of ``folder`` into a fresh library, images encoded, vectors by path."""
    from retrieval import Engine

    lib = Path(tempfile.mkdtemp(prefix="bench-ray-", dir=WORK))
    try:
        with Engine.open(lib, model="shapes-tiny") as eng:
            eng.index_folder(warm)  # the ONNX export, in-process
            t0 = time.perf_counter()
            rep = eng.index_folder(folder, ray=ray)
            seconds = time.perf_counter() - t0
            state = eng.state()
            rows = eng.store.images_by_id(sorted(eng.store.image_vector_map(state.row.id)))
            ids = sorted(rows)
            vectors = dict(zip([rows[i].path for i in ids], state.images.reconstruct(ids)))
        return seconds, rep.encoded, vectors
    finally:
        shutil.rmtree(lib, ignore_errors=True)


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest absolute difference between two libraries' vectors (inf when their images differ)."""
    if a.keys() != b.keys():
        return float("inf")
    return float(max(np.abs(a[p] - b[p]).max() for p in a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="images to index (640x480 JPEGs)")
    ap.add_argument("--runs", type=int, default=2, help="runs of each way")
    ap.add_argument("--json", metavar="FILE", help="write the results here (default: stdout)")
    args = ap.parse_args()

    import ray

    WORK.mkdir(parents=True, exist_ok=True)
    folder = gen_jpegs(args.n, "small")
    warm = gen_jpegs(4, "small", root=WORK / "warm", seed=1)  # other bytes than the folder's (no copies)
    times: dict[str, list[float]] = {"in-process": [], "ray, cluster started by the run": [], "ray, cluster running": [],
                                     "ray, cluster running, second run": []}
    diffs: list[float] = []
    for run in range(args.runs):
        s, n, local = index_once(folder, warm, None)
        times["in-process"].append(s)
        say(f"run {run}: in-process {s:.1f}s ({n} encoded)")
        s, n, vecs = index_once(folder, warm, "auto")  # no cluster: the run starts one and shuts it down
        times["ray, cluster started by the run"].append(s)
        diffs.append(max_diff(local, vecs))
        say(f"run {run}: ray, cluster started by the run {s:.1f}s ({n} encoded)")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            for way in ("ray, cluster running", "ray, cluster running, second run"):
                s, n, vecs = index_once(folder, warm, "auto")
                times[way].append(s)
                diffs.append(max_diff(local, vecs))
                say(f"run {run}: {way} {s:.1f}s ({n} encoded)")
        finally:
            ray.shutdown()
    out = {
        "machine": machine(),
        "images": args.n,
        "runs": args.runs,
        "seconds": {k: v for k, v in times.items()},
        "median_seconds": {k: round(median(v), 2) for k, v in times.items()},
        "images_per_second": {k: round(args.n / median(v), 1) for k, v in times.items()},
        "max_vector_difference_ray_vs_in_process": max(diffs),
    }
    write_json(args.json, out)


if __name__ == "__main__":
    main()

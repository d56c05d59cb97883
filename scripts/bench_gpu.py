#!/usr/bin/env python
"""The GPU figures, in one short run on a machine with a CUDA GPU.

1. ``crossfind index`` of 20,000 synthetic 640x480 JPEGs (the rclip peer's
   generator) with a random-weight open_clip ViT-B-32: a whole process, fp16
   on the GPU, decoding in CPU threads (``--workers``); plus the encoder alone
   on ready tensors, to tell a decode-bound run from an encoder-bound one.
2. Exact search over 1M CLIP-like vectors (bench_common's generator): FAISS
   on the CPU cores and, where ``faiss`` has GPU support, FAISS's GPU flat
   index; else a float16 matrix product with ``torch.topk`` on the GPU, named
   as such. Latency of one query, and recall@10 against float32 exact.
3. Re-ranking one text query's 50 candidates on the GPU: the bundled
   shapes-tiny reranker, a random-weight reranker on ViT-B-32's tokens, and
   BLIP-base ITM (random weights, same compute) for 20 and 50 candidates with
   features cached and uncached.

Each part prints one JSON line and the whole report goes to ``--out``; a part
that fails prints its error and the rest still run.

Example::

    python scripts/bench_gpu.py --out /tmp/gpu.json
    python scripts/bench_gpu.py --n 200 --vectors 20000 --out /tmp/gpu.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import WORK, clustered_queries, clustered_vectors, gen_jpegs, random_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 2)


def part_index(args: argparse.Namespace) -> dict[str, Any]:
    """Whole-process ``crossfind index`` of ``args.n`` JPEGs, then the encoder alone."""
    t = time.perf_counter()
    folder = gen_jpegs(args.n, "small")
    gen_s = time.perf_counter() - t
    spec = random_model("ViT-B-32")
    lib = WORK / "gpu-lib"
    shutil.rmtree(lib, ignore_errors=True)
    cmd = [sys.executable, "-c", "from retrieval.cli import main; main()", "--library", str(lib),
           "index", str(folder), "--model", spec, "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=400)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"crossfind index failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    out: dict[str, Any] = {"images": args.n, "generate_s": round(gen_s, 1), "workers": args.workers,
                           "batch_size": args.batch_size, "wall_s": round(wall, 2),
                           "images_per_s": round(args.n / wall), "report": {k: report.get(k) for k in ("indexed", "added", "failed", "seconds") if k in report}}
    # the encoder alone: fp16 ViT-B-32 on ready 224x224 batches
    from retrieval.encoders import load_encoder

    enc = load_encoder(spec, device=DEVICE)
    x = torch.randn(args.batch_size, 3, 224, 224, device=DEVICE, dtype=enc.dtype)
    with torch.inference_mode():
        ms = median_ms(lambda: enc.model.encode_image(x), runs=20)
    out["encoder_only_images_per_s"] = round(args.batch_size / ms * 1000)
    out["encoder_dtype"] = str(enc.dtype)
    return out


def part_search(args: argparse.Namespace) -> dict[str, Any]:
    """Exact top-10 over ``args.vectors`` vectors: FAISS CPU, and FAISS GPU or torch on the GPU."""
    import faiss

    xb = clustered_vectors(args.vectors)
    xq = clustered_queries(200)
    out: dict[str, Any] = {"vectors": args.vectors, "dim": int(xb.shape[1]), "cpu_threads": faiss.omp_get_max_threads()}
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    _, truth = flat.search(xq, 10)
    out["faiss_cpu_flat_ms_per_query"] = median_ms(lambda: flat.search(xq[:1], 10), runs=20, warmup=2)
    out["faiss_cpu_flat_ms_per_200_batch"] = median_ms(lambda: flat.search(xq, 10), runs=5, warmup=1)
    if DEVICE != "cuda":
        return out
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        gpu = faiss.index_cpu_to_gpu(res, 0, flat, co)
        _, got = gpu.search(xq, 10)
        out["gpu"] = "faiss GpuIndexFlatIP, float16 storage"
        out["gpu_ms_per_query"] = median_ms(lambda: gpu.search(xq[:1], 10), runs=50)
        out["gpu_ms_per_200_batch"] = median_ms(lambda: gpu.search(xq, 10), runs=20)
    else:
        xb_t = torch.from_numpy(xb).to(DEVICE, torch.float16)
        xq_t = torch.from_numpy(xq).to(DEVICE, torch.float16)

        def top(q: torch.Tensor) -> np.ndarray:
            return torch.topk(q @ xb_t.T, 10, dim=1).indices.cpu().numpy()

        got = top(xq_t)
        out["gpu"] = "torch float16 matmul + topk (faiss here has no GPU support)"
        out["gpu_ms_per_query"] = median_ms(lambda: top(xq_t[:1]), runs=50)
        out["gpu_ms_per_200_batch"] = median_ms(lambda: top(xq_t), runs=20)
    out["gpu_recall_at_10"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])), 4)
    return out


def part_rerank(args: argparse.Namespace) -> dict[str, Any]:
    """Re-ranking 50 candidates on the GPU: shapes-tiny, ViT-B-32-shaped, BLIP-base."""
    from bench_blip import QUERY, random_blip_base
    from bench_reranker import random_vit_reranker

    from retrieval.encoders import load_encoder
    from retrieval.rerank import find_reranker
    from retrieval.rerank_blip import FeatureItem
    from retrieval.train.evaluation import latency_ms

    out: dict[str, Any] = {}
    shapes = find_reranker(load_encoder("shapes-tiny", device=DEVICE))
    if shapes is not None:
        out["shapes_tiny_50_ms"] = round(latency_ms(shapes, 50, 50), 2)
    with tempfile.TemporaryDirectory(prefix="crossfind-gpu-") as d:
        vit = random_vit_reranker("ViT-B-32", Path(d), shapes.config if shapes else None, device=DEVICE)
        out["vit_b_32_random_50_ms"] = round(latency_ms(vit, 50, 50), 2)
    rr = random_blip_base(WORK / "blip-base-random", device=DEVICE)
    folder = gen_jpegs(50, "small")
    files = sorted(folder.glob("*.jpg"))[:50]
    items = [FeatureItem(i + 1, f"{p.stat().st_size}-{p.stat().st_mtime_ns}", str(p)) for i, p in enumerate(files)]
    rr.margins_images(QUERY, np.zeros((1, *rr.image_shape), np.float32))
    rows = []
    for n in (20, 50):
        root = WORK / "blip-features-gpu" / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        cache = rr.cache(root)
        t = time.perf_counter()
        feats, _ = rr.features(items[:n], cache=cache)
        rr.margins_images(QUERY, feats)
        uncached = time.perf_counter() - t
        cached = median_ms(lambda: rr.margins_images(QUERY, rr.features(items[:n], cache=cache)[0]), runs=5, warmup=1)
        rows.append({"candidates": n, "uncached_ms": round(uncached * 1000, 1), "cached_ms": cached})
    out["blip_base_random_fp16"] = rows
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="JPEGs to index")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 4, help="decoding threads for crossfind index")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--parts", default="index,search,rerank")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__, "cpu_cores": os.cpu_count(),
    }
    print(json.dumps(report), flush=True)
    parts = {"index": part_index, "search": part_search, "rerank": part_rerank}
    for name in args.parts.split(","):
        t = time.perf_counter()
        try:
            report[name] = parts[name](args)
        except Exception as exc:  # a failed part is reported; the others still run
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        report[name]["part_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps({name: report[name]}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

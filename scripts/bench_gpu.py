#!/usr/bin/env python
"""The GPU figures, in one short run on a machine with a CUDA GPU.

1. ``crossfind index`` of 20,000 synthetic 640x480 JPEGs (the rclip peer's
   generator) with a random-weight open_clip ViT-B-32, fp16 on the GPU: a
   whole process for each way of decoding (``--decode``: on the GPU with
   nvJPEG, in a pool of processes with Pillow), the cosines between the two
   libraries' vectors, the steps of one run timed in this process, and the
   parts alone (nvJPEG on one batch, the encoder on ready tensors).
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


def _index_process(folder: Path, lib: Path, spec: str, args: argparse.Namespace, decode: str) -> dict[str, Any]:
    """One whole ``crossfind index`` process decoding as ``decode`` says (``$CROSSFIND_DECODE``)."""
    shutil.rmtree(lib, ignore_errors=True)
    cmd = [sys.executable, "-c", "from retrieval.cli import main; main()", "--library", str(lib),
           "index", str(folder), "--model", spec, "--batch-size", str(args.batch_size), "--json"]
    if args.workers:
        cmd[-1:-1] = ["--workers", str(args.workers)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, "CROSSFIND_DECODE": decode})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"crossfind index ({decode}) failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    return {"decode": decode, "wall_s": round(wall, 2), "images_per_s": round(args.n / wall),
            "index_folder_s": round(report.get("seconds", 0.0), 2),
            "report": {k: report.get(k) for k in ("added", "failed", "encoded") if k in report}}


def _phases(folder: Path, lib: Path, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same run in this process (model loaded first), timing each step of it."""
    import functools

    from retrieval import indexing
    from retrieval.engine import Engine

    times: dict[str, float] = {}

    def timed(owner: Any, name: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    for name in ("hash_files", "apply_plan", "checkpoint", "encode_pending"):
        timed(indexing, name)
    timed(indexing.Indexer, "_todo")
    shutil.rmtree(lib, ignore_errors=True)
    os.environ["CROSSFIND_DECODE"] = "auto"
    with Engine.open(lib, model=spec) as eng:
        eng.state().runtime("image")
        decode = indexing.decoding(eng.state().runtime("image"))
        t = time.perf_counter()
        rep = eng.index_folder(folder, batch_size=args.batch_size, workers=args.workers or None)
        wall = time.perf_counter() - t
    enc_s = times["encode_pending"]
    return {"decode": decode, "index_folder_s": round(wall, 2), "images_per_s": round(rep.encoded / wall),
            "encode_step_images_per_s": round(rep.encoded / enc_s), **{f"{k}_s": round(v, 2) for k, v in times.items()}}


def _same_vectors(a: Path, b: Path) -> dict[str, Any]:
    """Cosines between two libraries' vectors of the same files (GPU-decoded against Pillow-decoded)."""
    from retrieval.engine import Engine

    def by_path(lib: Path) -> dict[str, np.ndarray]:
        with Engine.open(lib) as eng:
            ids = np.sort(eng.state().images.ids())
            rows = eng.store.images_by_id(ids.tolist())
            return dict(zip((rows[i].path for i in ids.tolist()), eng.state().images.reconstruct(ids)))

    va, vb = by_path(a), by_path(b)
    cos = np.array([float(va[p] @ vb[p]) for p in va if p in vb])
    return {"files": int(cos.size), "cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 6)}


def part_index(args: argparse.Namespace) -> dict[str, Any]:
    """Whole-process ``crossfind index`` of ``args.n`` JPEGs per decoding, the steps of one run, the parts alone."""
    t = time.perf_counter()
    folder = gen_jpegs(args.n, "small")
    gen_s = time.perf_counter() - t
    spec = random_model("ViT-B-32")
    out: dict[str, Any] = {"images": args.n, "generate_s": round(gen_s, 1), "workers": args.workers or "default",
                           "batch_size": args.batch_size, "runs": []}
    libs = {}
    for decode in args.decode.split(","):
        libs[decode] = WORK / f"gpu-lib-{decode}"
        try:
            out["runs"].append(_index_process(folder, libs[decode], spec, args, decode))
        except Exception as exc:  # noqa: BLE001 - reported, the other runs go on
            out["runs"].append({"decode": decode, "error": str(exc)[-1500:]})
        print(json.dumps(out["runs"][-1]), flush=True)
    if "device" in libs and "processes" in libs:
        try:
            out["device_vs_pillow"] = _same_vectors(libs["device"], libs["processes"])
        except Exception as exc:  # noqa: BLE001
            out["device_vs_pillow"] = {"error": str(exc)[-1500:]}
    out["steps"] = []
    for workers in [int(w) for w in args.steps_workers.split(",")]:
        try:
            step = _phases(folder, WORK / "gpu-lib-steps", spec, argparse.Namespace(**{**vars(args), "workers": workers}))
            step["workers"] = workers or "default"
        except Exception as exc:  # noqa: BLE001
            step = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        out["steps"].append(step)
        print(json.dumps({"steps": step}), flush=True)
    # the parts alone: reading files and headers (one thread), nvJPEG on one batch, fp16 ViT-B-32 on ready batches
    from retrieval.device_decoding import read_jpeg
    from retrieval.encoders import load_encoder

    files = sorted(folder.glob("*.jpg"))[:2000]
    t = time.perf_counter()
    for f in files:
        read_jpeg(str(f), 224, lambda im: im)
    out["read_jpeg_us_per_file"] = round((time.perf_counter() - t) / len(files) * 1e6)

    if DEVICE == "cuda":
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                for p in sorted(folder.glob("*.jpg"))[: args.batch_size]]
        ms = median_ms(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=DEVICE), runs=10)
        out["nvjpeg_one_thread_images_per_s"] = round(len(data) / ms * 1000)
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
    p.add_argument("--workers", type=int, default=0, help="crossfind index --workers (0: its default, one a core on a GPU)")
    p.add_argument("--decode", default="device,processes", help="CROSSFIND_DECODE of the whole-process runs, in order")
    p.add_argument("--steps-workers", default="0", help="loader threads of the timed in-process runs, one run each (0: the default)")
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

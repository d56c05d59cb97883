#!/usr/bin/env python
"""Time BLIP ITM re-ranking on this machine, with BLIP-base's real sizes.

A random-weight ``BlipForImageTextRetrieval`` built from the default
``BlipConfig`` (ViT-B/16 at 384 px: 577 image tokens of width 768; a 12-layer
BERT-base text encoder with cross-attention) costs what the pretrained
``Salesforce/blip-itm-base-coco`` costs; its weights cannot be downloaded here.
For each candidate count it times one text query re-ranking that many JPEGs
(640x480):

* uncached: decode, BLIP's vision tower and the ITM pass (features then kept
  in a fresh :class:`~retrieval.rerank_blip.FeatureCache`);
* cached: features read from that cache (float16 .npy files), then the ITM pass.

Wall-clock milliseconds and the process's CPU seconds (all its threads) are
both given: on a shared machine the CPU time says what the work costs.

and reports the disk each image's features take, and what a 100k library costs.

Example::

    nice -n 15 python scripts/bench_blip.py --candidates 20,50 --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import WORK, Monitor, gen_jpegs, machine  # noqa: E402

from retrieval.rerank_blip import BlipReranker, FeatureItem  # noqa: E402
from retrieval.reranker_spec import RerankerSpec  # noqa: E402

QUERY = "a small red circle to the left of a large blue square"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(QUERY.split()))


def random_blip_base(work: Path, device: str = "cpu") -> BlipReranker:
    """BLIP-base's architecture with random weights, its processor's default 384 px preprocessing."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    work.mkdir(parents=True, exist_ok=True)
    vocab = work / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=BertTokenizer(str(vocab)))
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(BlipConfig())
    spec = RerankerSpec("local-dir:" + str(work), "blip", work, None)
    return BlipReranker(model, processor, spec, "random-blip-base", device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="20,50", help="comma-separated candidate counts")
    ap.add_argument("--runs", type=int, default=3, help="timed cached runs per count (median reported)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.candidates.split(",")]

    t0 = time.perf_counter()
    rr = random_blip_base(WORK / "blip-base-random")
    build_s = time.perf_counter() - t0
    folder = gen_jpegs(max(counts), "small")
    files = sorted(folder.glob("*.jpg"))[: max(counts)]
    items = [FeatureItem(i + 1, f"{p.stat().st_size}-{p.stat().st_mtime_ns}", str(p)) for i, p in enumerate(files)]
    rows = []
    with Monitor() as mon:
        rr.margins_images(QUERY, np.zeros((1, *rr.image_shape), np.float32))  # warm-up
        for n in counts:
            root = WORK / "blip-features" / f"n{n}"
            shutil.rmtree(root, ignore_errors=True)
            cache = rr.cache(root)
            t, c = time.perf_counter(), time.process_time()
            feats, ok = rr.features(items[:n], cache=cache)
            t_feat = time.perf_counter() - t
            margins = rr.margins_images(QUERY, feats)
            uncached, uncached_cpu = time.perf_counter() - t, time.process_time() - c
            assert ok.all() and len(margins) == n
            cached, read, itm, cached_cpu = [], [], [], []
            for _ in range(args.runs):
                t, c = time.perf_counter(), time.process_time()
                feats, ok = rr.features(items[:n], cache=cache, on_compute=lambda k: sys.exit(f"{k} not cached"))
                t_read = time.perf_counter() - t
                rr.margins_images(QUERY, feats)
                cached.append(time.perf_counter() - t)
                cached_cpu.append(time.process_time() - c)
                read.append(t_read)
                itm.append(cached[-1] - t_read)
            files_n = list(cache.dir.rglob("*.npy"))
            rows.append({
                "candidates": n,
                "uncached_ms": round(uncached * 1e3),
                "uncached_cpu_s": round(uncached_cpu, 1),
                "vision_ms_per_image": round(t_feat * 1e3 / n, 1),
                "cached_ms": round(statistics.median(cached) * 1e3),
                "cached_cpu_s": round(statistics.median(cached_cpu), 1),
                "cache_read_ms": round(statistics.median(read) * 1e3, 1),
                "itm_ms": round(statistics.median(itm) * 1e3),
                "bytes_per_image": int(np.mean([f.stat().st_size for f in files_n])),
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    per_image = rows[-1]["bytes_per_image"]
    report = {
        "model": "BlipForImageTextRetrieval(BlipConfig()) random weights: ViT-B/16 384 px, BERT-base ITM",
        "image_tokens": list(rr.image_shape),
        "query": QUERY,
        "build_s": round(build_s, 1),
        "rows": rows,
        "disk_per_image_kib": round(per_image / 1024, 1),
        "disk_100k_gib": round(per_image * 100_000 / 2**30, 1),
        "machine": machine(),
        "others_load": mon.report(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']}; image features {rr.image_shape[0]}x{rr.image_shape[1]} float16")
    print(f"{'candidates':>10} {'uncached ms':>12} {'(CPU s)':>8} {'vision ms/img':>14} {'cached ms':>10} {'(CPU s)':>8} "
          f"{'read ms':>8} {'ITM ms':>7}")
    for r in rows:
        print(f"{r['candidates']:>10} {r['uncached_ms']:>12} {r['uncached_cpu_s']:>8} {r['vision_ms_per_image']:>14} "
              f"{r['cached_ms']:>10} {r['cached_cpu_s']:>8} {r['cache_read_ms']:>8} {r['itm_ms']:>7}")
    print(f"disk per image: {report['disk_per_image_kib']} KiB; 100k images: {report['disk_100k_gib']} GiB")
    print(json.dumps({"machine": report["machine"], "others_load": report["others_load"]}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time the reranker: re-scoring 50 candidate images for one text query.

Candidates are given as stored float16 patch tokens in memory (as the engine
reads them from its token store); the query's text tokens are computed once per
call, as in a search. Reports the median of 50 runs for the bundled model's
trained reranker (when there is one) and for a random-weight open_clip
ViT-B-32 with a random reranker of the same shape, saved to a temporary
``local-dir:`` folder.

With ``--memory`` it also times, for the bundled model's reranker on torch and
on its ONNX export, what a search pays with the candidates' image memory cached
(:mod:`retrieval.rerank_memory`: the cross part only, plus reading 50 cached
files) against computing it (image part, then cross part), runs of the two
interleaved; wall and CPU milliseconds, and the CPU other processes used
meanwhile (``bench_common.Monitor``).

Example::

    python scripts/bench_reranker.py
    python scripts/bench_reranker.py --model shapes-tiny --arch ViT-B-32 --candidates 50 --runs 50
    python scripts/bench_reranker.py --memory --arch '' --runs 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval.encoders import load_encoder  # noqa: E402
from retrieval.rerank import CrossAttentionITM, Reranker, RerankerConfig, find_reranker  # noqa: E402
from retrieval.train.evaluation import latency_ms  # noqa: E402


def random_vit_reranker(arch: str, directory: Path, like: RerankerConfig | None = None, device: str = "cpu") -> Reranker:
    """A random-weight open_clip ``arch`` saved as a ``local-dir:`` model, with a random reranker shaped like ``like``."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = open_clip.get_model_config(arch)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    del model
    encoder = load_encoder(f"local-dir:{directory}", device=device)
    keep = ("width", "depth", "heads", "mlp_ratio", "image_layer", "text_words", "image_depth")
    shape = {} if like is None else {k: getattr(like, k) for k in keep}
    return Reranker(CrossAttentionITM(RerankerConfig.for_encoder(encoder, **shape)), encoder)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return 1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)


def memory_latency(reranker: Any, candidates: int, runs: int, label: str) -> dict[str, Any]:
    """Median wall and CPU ms of re-scoring ``candidates`` for a new text with their
    image memory computed (uncached) or read from a cache on disk (cached), interleaved."""
    from bench_common import Monitor

    from retrieval.feature_cache import FeatureCache, FeatureItem

    cfg = reranker.config
    tokens = np.random.default_rng(0).standard_normal((candidates, cfg.image_tokens, cfg.image_features)).astype(np.float16)
    query = "a small red circle left of a large blue square"
    with tempfile.TemporaryDirectory(prefix="crossfind-bench-memory-") as d:
        cache = FeatureCache(d, "fp", reranker.memory_shape, what="reranker image memory")
        items = [FeatureItem(i, "h", "") for i in range(candidates)]
        for item, mem in zip(items, reranker.image_memory(tokens)):
            cache.put(item, mem)

        def uncached() -> object:
            return reranker.logits_memory(query, reranker.image_memory(tokens))

        def cached() -> object:
            return reranker.logits_memory(query, np.stack([cache.get(item) for item in items]))

        def read() -> object:
            return np.stack([cache.get(item) for item in items])

        for _ in range(3):
            uncached(), cached()
        got: dict[str, list[tuple[float, float]]] = {"uncached": [], "cached": [], "cache_read": []}
        with Monitor() as mon:
            for _ in range(runs):
                for name, fn in (("uncached", uncached), ("cached", cached), ("cache_read", read)):
                    got[name].append(_timed(fn))
    out: dict[str, Any] = {"runtime": label, "candidates": candidates, "runs": runs}
    for name, times in got.items():
        out[f"{name}_ms"] = round(statistics.median(t[0] for t in times), 2)
        out[f"{name}_cpu_ms"] = round(statistics.median(t[1] for t in times), 2)
    out["cached_over_uncached"] = round(out["cached_ms"] / out["uncached_ms"], 3)
    out["others_cpu"] = mon.report()
    return out


def onnx_reranker(reranker: Reranker, directory: Path) -> Any:
    """``reranker``'s model and reranker exported to ONNX under ``directory`` and opened on ONNX Runtime."""
    from retrieval.encoders import weights_fingerprint
    from retrieval.onnx_export import export_model
    from retrieval.onnx_runtime import OnnxEncoder, OnnxReranker, export_key

    enc = reranker.encoder
    where = export_model(enc, directory, export_key(enc.spec, weights_fingerprint(enc.spec)), reranker)
    return OnnxReranker(OnnxEncoder(where, enc.spec))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-tiny", help="model whose trained reranker to time (default: shapes-tiny)")
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture timed with random weights ('' to skip)")
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--memory", action="store_true", help="also time cached against computed image memory (torch and ONNX)")
    args = p.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}")
    like = None
    reranker = find_reranker(load_encoder(args.model, device="cpu"))
    if reranker is None:
        print(f"{args.model}: no trained reranker found")
    else:
        like = reranker.config
        print(f"{args.model}: {latency_ms(reranker, args.candidates, args.runs):.1f} ms for {args.candidates} candidates (median of {args.runs})")
        if args.memory:
            print(json.dumps(memory_latency(reranker, args.candidates, args.runs, "torch")))
            with tempfile.TemporaryDirectory(prefix="crossfind-bench-onnx-") as d:
                print(json.dumps(memory_latency(onnx_reranker(reranker, Path(d)), args.candidates, args.runs, "onnx")))
    if args.arch:
        with tempfile.TemporaryDirectory(prefix="crossfind-bench-") as d:
            rr = random_vit_reranker(args.arch, Path(d), like)
            ms = latency_ms(rr, args.candidates, args.runs)
            cfg = rr.config
            print(f"{args.arch} (random weights, reranker width {cfg.width} depth {cfg.depth} image depth {cfg.image_depth}, "
                  f"{cfg.image_tokens}x{cfg.image_features} patch tokens of layer {cfg.image_layer}): "
                  f"{ms:.1f} ms for {args.candidates} candidates (median of {args.runs})")


if __name__ == "__main__":
    main()

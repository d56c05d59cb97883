#!/usr/bin/env python
"""Time the reranker: re-scoring 50 candidate images for one text query.

Candidates are given as stored float16 patch tokens in memory (as the engine
reads them from its token store); the query's text tokens are computed once per
call, as in a search. Reports the median of 50 runs for the bundled model's
trained reranker (when there is one) and for a random-weight open_clip
ViT-B-32 with a random reranker of the same shape, saved to a temporary
``local-dir:`` folder.

Example::

    python scripts/bench_reranker.py
    python scripts/bench_reranker.py --model shapes-tiny --arch ViT-B-32 --candidates 50 --runs 50
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-tiny", help="model whose trained reranker to time (default: shapes-tiny)")
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture timed with random weights ('' to skip)")
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}")
    like = None
    reranker = find_reranker(load_encoder(args.model, device="cpu"))
    if reranker is None:
        print(f"{args.model}: no trained reranker found")
    else:
        like = reranker.config
        print(f"{args.model}: {latency_ms(reranker, args.candidates, args.runs):.1f} ms for {args.candidates} candidates (median of {args.runs})")
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

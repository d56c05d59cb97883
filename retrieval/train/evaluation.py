"""Held-out evaluation of a trained reranker.

Retrieval Recall@1/5/10 of the dual encoder and after re-ranking its top
candidates (relevance by key, counted by :func:`retrieval.evaluate.recall_at_k`),
within-group accuracy on groups of four, pairwise preference of the true
caption over a minimally different one, and the latency of one query.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from ..encoders import Encoder
from ..evaluate import KS, hits_at_k, recall_at_k
from ..rerank import CrossAttentionITM, Reranker
from .data import Pool, parse_scene
from .losses import group_logits


def retrieval_eval(reranker: Reranker, pool: Pool, candidates: int = 50) -> dict[str, float | int]:
    """t2i and i2t Recall@1/5/10, dual encoder and re-ranked top ``candidates``,
    with how many dual-encoder t2i misses at 1 re-ranking fixes."""
    sims = pool.txt_vec @ pool.img_vec.T  # (Nt, Ni)
    tok = pool.img_tok.numpy()
    res: dict[str, float | int] = {}
    for direction in ("t2i", "i2t"):
        queries = len(pool.texts) if direction == "t2i" else len(pool.img_key)
        own = (pool.txt_key if direction == "t2i" else pool.img_key).tolist()
        keys = pool.img_key if direction == "t2i" else pool.txt_key
        dual_ranked, rr_ranked = [], []
        for q in range(queries):
            row = sims[q] if direction == "t2i" else sims[:, q]
            top = np.argsort(-row, kind="stable")[:candidates]
            if direction == "t2i":
                order = reranker.rank(pool.texts[q], tok[top], dual_scores=row[top])
            else:
                order = reranker.rank(tok[q], [pool.texts[c] for c in top], dual_scores=row[top])
            dual_ranked.append(keys[top].tolist())
            rr_ranked.append([int(keys[top[c.index]]) for c in order])
        for name, ranked in (("dual", dual_ranked), ("rerank", rr_ranked)):
            for k, v in recall_at_k(ranked, own, KS).items():
                res[f"{direction}_r{k}_{name}"] = v
        d, r = hits_at_k(dual_ranked, own, 1), hits_at_k(rr_ranked, own, 1)
        res[f"{direction}_misses_dual"] = int((~d).sum())
        res[f"{direction}_misses_fixed"] = float((r & ~d).sum() / max(1, (~d).sum()))
        res[f"{direction}_new_misses"] = int((d & ~r).sum())
    return res


def group_accuracy(module: CrossAttentionITM, pool: Pool, groups: np.ndarray) -> dict[str, float]:
    """Within-group t2i and i2t accuracy on groups of four items (one caption, one image each)."""
    was = module.training
    module.eval()
    with torch.no_grad():
        s = torch.cat([group_logits(module, pool, groups[a : a + 256].reshape(-1)) for a in range(0, len(groups), 256)])
    module.train(was)
    target = torch.arange(groups.shape[1])
    return {"t2i": float((s.argmax(1) == target).float().mean()), "i2t": float((s.argmax(2) == target).float().mean())}


def pairwise_eval(reranker: Reranker, encoder: Encoder, pool: Pool, seed: int) -> dict[str, float | int]:
    """True caption against the same phrasing of its scene with colours
    swapped, shapes swapped or the relation reversed, on each generated image."""
    from ..shapes import reverse_relation, swap_colors, swap_shapes

    tok = pool.img_tok.numpy()
    out: dict[str, float | int] = {}
    all_rr: list[bool] = []
    all_dual: list[bool] = []
    for name, fn in (("colors", swap_colors), ("shapes", swap_shapes), ("relation", reverse_relation)):
        rr, dual = [], []
        for t in range(len(pool.texts)):
            scene = parse_scene(pool.scenes[t])
            other = fn(scene) if scene is not None else None
            if scene is None or other is None:
                continue
            true_cap = scene.caption(np.random.default_rng([seed, t]))
            false_cap = other.caption(np.random.default_rng([seed, t]))
            i = pool.txt_img[t]
            v = encoder.encode_texts([true_cap, false_cap]) @ pool.img_vec[i]
            p = reranker.logits_texts(tok[i], [true_cap, false_cap], dual_scores=v)
            rr.append(bool(p[0] > p[1]))
            dual.append(bool(v[0] > v[1]))
        out[f"pairwise_{name}_rerank"] = float(np.mean(rr)) if rr else 0.0
        out[f"pairwise_{name}_dual"] = float(np.mean(dual)) if dual else 0.0
        out[f"pairwise_{name}_n"] = len(rr)
        all_rr += rr
        all_dual += dual
    out["pairwise_rerank"] = float(np.mean(all_rr)) if all_rr else 0.0
    out["pairwise_dual"] = float(np.mean(all_dual)) if all_dual else 0.0
    out["pairwise_n"] = len(all_rr)
    return out


def latency_ms(reranker: Reranker, candidates: int = 50, runs: int = 50, seed: int = 0) -> float:
    """Median milliseconds of ``score_images`` for one text query against ``candidates`` stored token rows."""
    cfg = reranker.config
    tokens = np.random.default_rng(seed).standard_normal((candidates, cfg.image_tokens, cfg.image_features))
    tokens = tokens.astype(np.float16)
    query = "a small red circle left of a large blue square"
    for _ in range(3):  # warm-up: allocator, thread pool
        reranker.score_images(query, tokens)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        reranker.score_images(query, tokens)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
